"""Backends: one small interface over ONNX Runtime, TensorRT and PyTorch.

A *runner* executes one engine and maps named inputs to named outputs (in the spirit of
Polygraphy's runners)::

    runner = OnnxRuntimeRunner("engines/brick0.onnx")
    outputs = runner.infer({"tiles": tiles, "cond": cond})

A *backend* makes the runner for each engine of a manifest and says, through ``arrays``, what its
runners take and return: NumPy arrays on the host, or torch tensors on the backend's device (see
arrays.py). Only the chosen backend's library is imported: the ONNX Runtime backend on the CPU
works where PyTorch is not installed.

Errors about the arguments are OptionErrors naming the argument (``backend``, ``precision``,
``ckpt``, ``device``, ``streams``); each command line maps them to its flags (:data:`FLAGS`).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from lego_export import contract
from lego_export.arrays import NumpyArrays, TorchArrays
from lego_export.errors import LegoError
from lego_export.manifest import MANIFEST_FILE, EngineSpec, Manifest, TensorSpec
from lego_export.options import OptionError

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt", "torch")
# What the bricks compute in: fp32; int8, the onnx-int8 graphs of lego-export build --int8 (ONNX Runtime
# and OpenVINO); bf16, OpenVINO's bf16 inference on CPUs with bf16 units. Embedder and decoder stay fp32.
COMPUTE_PRECISIONS = ("fp32", "int8", "bf16")
MAX_THREADS = 1024
INT8_FORMAT = "onnx-int8"
# The command-line flags of make_backend's and LegoPipeline.from_engines' arguments (lego-run, lego-serve).
FLAGS = {
    "backend": "--backend",
    "precision": "--precision",
    "ckpt": "--ckpt",
    "device": "--device",
    "threads": "--threads",
    "cuda_graphs": "--cuda-graphs",
}


def require_files(folder: Path, manifest: Manifest, formats: tuple[str, ...], who: str, roles=None) -> None:
    """Refuse, in one line naming the manifest field, engines with none of the formats a backend runs
    (a folder of TensorRT plans alone, say), before any is loaded."""
    for i, e in enumerate(manifest.engines):
        if (roles is None or e.role in roles) and not any(f in e.files for f in formats):
            raise LegoError(
                f"{folder / MANIFEST_FILE}: engines[{i}].files.{formats[-1]}: missing ({e.name} lists "
                f"{', '.join(e.files)}); {who} runs its {' or '.join(formats)} file"
            )


def check_int8_files(folder: Path, manifest: Manifest) -> None:
    """Refuse, in one line, a folder built without --int8."""
    missing = [e.name for e in manifest.bricks if INT8_FORMAT not in e.files]
    if missing:
        raise LegoError(f"{folder} has no int8 file for {missing[0]}; rebuild with lego-export build --int8")


def check_graph_io(spec: EngineSpec, path: str, inputs: list[tuple], outputs: list[tuple]) -> None:
    """The loaded graph's (name, shape) inputs and outputs are the manifest entry's: the same names,
    ranks and fixed sizes (dynamic dims may be None or a name). A graph that is not the engine its
    entry describes is refused here, not inside the backend at the first call."""
    rebuild = "rebuild the engines with lego-export build --force"
    for kind, want, got in (("inputs", spec.inputs, inputs), ("outputs", spec.outputs, outputs)):
        shapes = dict(got)
        if set(shapes) != {t.name for t in want} or len(shapes) != len(got):
            raise LegoError(
                f"{path}: the graph's {kind} are {sorted(shapes)}, its manifest entry {spec.name} says "
                f"{sorted(t.name for t in want)}; {rebuild}"
            )
        for t in want:
            shape = list(shapes[t.name])
            fixed = [(g, w) for g, w in zip(shape, t.shape, strict=False) if isinstance(w, int) and isinstance(g, int)]
            if len(shape) != len(t.shape) or any(g != w for g, w in fixed):
                raise LegoError(
                    f"{path}: {t.name} has shape {shape} in the graph, {t.shape} in the manifest; {rebuild}"
                )


class Runner(Protocol):
    def infer(self, feeds: dict) -> dict: ...


class Backend:
    """What every backend has, read directly by its callers (the pipeline, lego-run, lego-serve).

    name: the runtime (one of BACKENDS but auto); precision: what the bricks compute in
    (COMPUTE_PRECISIONS); arrays: what its runners take and return (NumpyArrays or TorchArrays);
    device: "cpu", "cuda" or "cuda:N"; streams: engine calls that may run at once; choice: how this
    backend came to be chosen, one line (named by the caller, a rule, or a measurement on this machine).
    """

    name: str = ""
    precision: str = "fp32"
    arrays: NumpyArrays | TorchArrays
    device: str = "cpu"
    streams: int = 1
    choice: str = ""

    def runner(self, spec: EngineSpec) -> Runner:
        raise NotImplementedError


class OnnxRuntimeRunner:
    """ONNX Runtime session over one .onnx file; CPU provider unless told otherwise.

    NumPy feeds go through ``session.run``. torch tensor feeds (on the CPU or a CUDA device) are
    bound in place with I/O binding, and the outputs are written into torch tensors on the same
    device: with the CUDA provider nothing is copied through the host.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        providers: list[str] | None = None,
        threads: int = 0,
        outputs: list[TensorSpec] | None = None,
        name: str | None = None,
    ):
        """model: an .onnx path, or the file's bytes as read and checked by Manifest.read_engine_file."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise LegoError("the onnxruntime backend needs the onnxruntime package (pip install onnxruntime)") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Bricks run one after another, each in its own session: a session whose threads keep
        # spinning after a call steals the cores from the next brick's session.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            source = model if isinstance(model, bytes) else str(model)
            self.session = ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            label = name or (model if not isinstance(model, bytes) else "the engine")
            raise LegoError(f"ONNX Runtime cannot load {label}: {str(e).splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_specs = outputs

    def infer(self, feeds: dict) -> dict:
        if all(isinstance(feeds[k], np.ndarray) for k in self.input_names):
            outputs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
            return dict(zip(self.output_names, outputs, strict=True))
        return self._infer_bound(feeds)

    def _infer_bound(self, feeds: dict) -> dict:
        """I/O binding on torch tensors: ORT reads the inputs and writes the outputs in place."""
        import torch

        if self.output_specs is None:
            raise LegoError("binding torch tensors needs the engine's output specs (from the manifest)")
        binding = self.session.io_binding()
        first = feeds[self.input_names[0]]
        device_type, device_id = first.device.type, first.device.index or 0
        for name in self.input_names:
            x = feeds[name].contiguous()
            binding.bind_input(name, device_type, device_id, np.float32, tuple(x.shape), x.data_ptr())
        outputs = {}
        for spec in self.output_specs:
            shape = contract.resolve_shape(spec.shape, first.shape[0])
            y = torch.empty(shape, dtype=torch.float32, device=first.device)
            binding.bind_output(spec.name, device_type, device_id, np.float32, shape, y.data_ptr())
            outputs[spec.name] = y
        if device_type == "cuda":
            torch.cuda.current_stream().synchronize()  # ORT runs on its own stream: inputs must be ready
        self.session.run_with_iobinding(binding)  # returns once the outputs are written
        return outputs


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: CPU provider by default; CUDA / TensorRT providers when onnxruntime-gpu has them.

    On the CPU provider the ORT-fused brick graphs (``onnx-ort``) are preferred; the portable graph
    is used elsewhere and when no fused graph was exported.
    """

    name = "onnxruntime"

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        providers: list[str] | None = None,
        threads: int = 0,
        precision: str = "fp32",
        streams: int = 1,
    ):
        import onnxruntime as ort

        if precision not in ("fp32", "int8"):
            raise OptionError("precision", f"{precision} runs on the openvino backend only, not on onnxruntime")
        if precision == "int8":
            check_int8_files(folder, manifest)
        self.precision = precision
        available = ort.get_available_providers()
        # int8 graphs are CPU graphs: on the CUDA provider their matrix products would run dequantized.
        preferred = (
            ["CPUExecutionProvider"] if precision == "int8" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        self.providers = providers or [p for p in preferred if p in available]
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise LegoError(f"ONNX Runtime here has no {', '.join(missing)} (available: {', '.join(available)})")
        self.folder, self.manifest, self.threads, self.streams = folder, manifest, threads, streams
        self.device = "cuda" if self.providers[0] != "CPUExecutionProvider" else "cpu"
        self.formats = ("onnx-ort", "onnx") if self.device == "cpu" else ("onnx",)
        require_files(folder, manifest, self.formats, "the onnxruntime backend")
        # On a GPU the canvas stays in CUDA memory between bricks (I/O binding on torch tensors);
        # without torch, every call copies through the host.
        on_gpu = self.device == "cuda" and importlib.util.find_spec("torch") is not None
        self.arrays = TorchArrays("cuda") if on_gpu else NumpyArrays()

    def runner(self, spec: EngineSpec) -> Runner:
        formats = (INT8_FORMAT,) if self.precision == "int8" and spec.role == "brick" else self.formats
        file = spec.files[next(f for f in formats if f in spec.files)]
        model = self.manifest.read_engine_file(self.folder, file)  # load what was verified
        runner = OnnxRuntimeRunner(model, self.providers, self.threads, spec.outputs, name=file.path)
        session = runner.session
        check_graph_io(spec, file.path, [(t.name, t.shape) for t in session.get_inputs()],
                       [(t.name, t.shape) for t in session.get_outputs()])  # fmt: skip
        return runner


class OpenVinoBackend(Backend):
    """OpenVINO on the CPU, reading the portable ONNX files (from the checked bytes, like every backend).

    Faster than ONNX Runtime on this project's bricks on some CPUs, slower on others
    (benchmarks/peers.py): `auto` measures both on first use (autoselect.py).
    """

    name = "openvino"

    def __init__(self, folder: Path, manifest: Manifest, threads: int = 0, precision: str = "fp32", streams: int = 1):
        try:
            import openvino as ov
        except ImportError:
            raise OptionError(
                "backend", "openvino needs the openvino package (pip install 'lego-export[openvino]')"
            ) from None
        self.core, self.folder, self.manifest, self.device = ov.Core(), folder, manifest, "cpu"
        _check_precision(precision)
        if precision == "int8":
            check_int8_files(folder, manifest)
            require_files(folder, manifest, ("onnx",), "the openvino backend", roles=("embedder", "decoder"))
        else:
            require_files(folder, manifest, ("onnx",), "the openvino backend")
        if precision == "bf16" and "BF16" not in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise OptionError("precision", "bf16: this CPU has no bf16 units OpenVINO can use; use fp32 or int8")
        self.precision, self.streams = precision, streams
        # f32 explicitly: on CPUs with bf16 units OpenVINO otherwise computes in bf16 (about 1e-3 off).
        self.config: dict[str, str | int | bool] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        # Unpinned: a call splits its work evenly over the threads and waits for the last one, and a
        # thread pinned to a core that another process is busy on cannot move to a free one.
        if "ENABLE_CPU_PINNING" in self.core.get_property("CPU", "SUPPORTED_PROPERTIES"):
            self.config["ENABLE_CPU_PINNING"] = False
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        if streams > 1:  # OpenVINO's own throughput streams, the threads split among them
            self.config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=streams)
        self.arrays = NumpyArrays()

    def runner(self, spec: EngineSpec) -> Runner:
        brick = spec.role == "brick"
        file = spec.files[INT8_FORMAT if self.precision == "int8" and brick else "onnx"]
        config = dict(self.config)
        if self.precision == "bf16" and brick:
            config["INFERENCE_PRECISION_HINT"] = "bf16"
        try:
            model = self.core.read_model(model=self.manifest.read_engine_file(self.folder, file))
            ports = [
                [(p.get_any_name(), [d.get_length() if d.is_static else None for d in p.get_partial_shape()])
                 for p in group]
                for group in (model.inputs, model.outputs)
            ]  # fmt: skip
            check_graph_io(spec, file.path, *ports)
            compiled = self.core.compile_model(model, "CPU", config)
        except LegoError:
            raise
        except Exception as e:  # OpenVINO raises its own exception types for graphs it cannot take
            raise LegoError(f"OpenVINO cannot load {file.path}: {str(e).splitlines()[0]}") from None
        return _OpenVinoRunner(compiled, [t.name for t in spec.outputs])


class _OpenVinoRunner:
    def __init__(self, compiled, outputs: list[str]):
        self.compiled = compiled
        self.outputs = [(name, compiled.output(name)) for name in outputs]
        self._local = threading.local()  # an infer request is not shared between threads

    def infer(self, feeds: dict) -> dict:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        # share_inputs: the call reads the caller's arrays in place (it returns before they can
        # change). The outputs (share_outputs off) come back as new arrays, not views of the
        # request's buffers, which the next call overwrites.
        result = request.infer(feeds, share_inputs=True, share_outputs=False)
        return {name: result[port] for name, port in self.outputs}


def host_runner(folder: Path, manifest: Manifest, spec: EngineSpec) -> Runner:
    """An ONNX Runtime runner on NumPy arrays for an engine a backend does not run itself (a latent
    model's decoder under the torch and TensorRT backends); CUDA provider when onnxruntime-gpu has it."""
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    file = spec.files["onnx"]
    return OnnxRuntimeRunner(manifest.read_engine_file(folder, file), providers, name=file.path)


class TorchBackend(Backend):
    """The PyTorch reference: the checkpoint's own modules, on CPU or CUDA."""

    name = "torch"

    def __init__(self, folder: Path, manifest: Manifest, ckpt: str | Path, device: str = "cpu"):
        import torch

        from lego_export.checkpoint import load_model
        from lego_export.manifest import sha256_file

        if not Path(ckpt).is_file():
            raise OptionError("ckpt", f"{ckpt}: no such file")
        if sha256_file(ckpt) != manifest.source["sha256"]:
            raise OptionError(
                "ckpt", f"{ckpt} is not the checkpoint these engines were built from ({manifest.source['checkpoint']})"
            )
        if device == "cuda" and not torch.cuda.is_available():
            raise OptionError("device", "cuda: PyTorch sees no CUDA GPU (the torch backend on cuda asked for)")
        self.torch, self.device, self.precision = torch, device, "fp32"
        self.folder, self.manifest = folder, manifest
        self.model = load_model(ckpt, device)
        self.arrays = TorchArrays(device)

    def runner(self, spec: EngineSpec) -> Runner:
        if spec.role == "decoder":
            return host_runner(self.folder, self.manifest, spec)
        module = self.model.embedder if spec.role == "embedder" else self.model.bricks[spec.index]
        return _TorchRunner(module, spec, self.torch)


class _TorchRunner:
    """Runs one module on torch tensors already on the backend's device."""

    def __init__(self, module, spec: EngineSpec, torch):
        self.module, self.torch = module, torch
        self.inputs = [t.name for t in spec.inputs]
        self.output = spec.outputs[0].name

    def infer(self, feeds: dict) -> dict:
        with self.torch.inference_mode():
            return {self.output: self.module(*(feeds[n] for n in self.inputs)).float()}


class TensorRTBackend(Backend):
    """Native TensorRT plans on torch CUDA tensors: the canvas never leaves the GPU, all engines share
    one activation memory block (they run one after another on one stream), and with cuda_graphs
    each (engine, N) is captured once as a CUDA graph and replayed.

    Written against the TensorRT 10 Python API; not executed where this project is developed
    (no TensorRT, no GPU there).
    """

    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest, cuda_graphs: bool = False):
        from lego_export.tensorrt_env import check_plan_compatible, tensorrt_environment

        trt, _ = tensorrt_environment()
        import torch

        self.trt, self.torch, self.cuda_graphs = trt, torch, cuda_graphs
        self.folder, self.manifest, self.device, self.precision = folder, manifest, "cuda", "fp32"
        self.arrays = TorchArrays("cuda")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream()  # TensorRT advises against enqueueing on the default stream
        self.engines = load_plans(folder, manifest, self.runtime.deserialize_cuda_engine, check_plan_compatible)
        size = max(e.device_memory_size_v2 for e in self.engines.values())
        self.scratch = torch.empty(size, dtype=torch.uint8, device="cuda")

    def runner(self, spec: EngineSpec) -> Runner:
        if spec.role == "decoder":
            return host_runner(self.folder, self.manifest, spec)
        engine = self.engines[spec.name]
        context = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())  # shared: one engine at a time
        return _TensorRTRunner(context, spec, self.torch, self.stream, self.cuda_graphs)


def load_plans(folder: Path, manifest: Manifest, deserialize, check_compatible) -> dict:
    """Every engine's TensorRT plan, each read once, checked against the manifest's sha256, and those
    very bytes deserialized."""
    engines = {}
    for spec in manifest.engines:
        if spec.role == "decoder":  # a latent decoder runs on ONNX Runtime (see TensorRTBackend.runner)
            continue
        if "tensorrt" not in spec.files:
            raise LegoError(
                f"{spec.name} has no TensorRT plan; build one with: "
                f"lego-export build --from-onnx {folder} --target tensorrt"
            )
        check_compatible(spec.files["tensorrt"])
        engine = deserialize(manifest.read_engine_file(folder, spec.files["tensorrt"]))
        if engine is None:
            raise LegoError(f"TensorRT could not load {spec.files['tensorrt'].path}; rebuild it on this machine")
        engines[spec.name] = engine
    return engines


class _TensorRTRunner:
    def __init__(self, context, spec: EngineSpec, torch, stream, cuda_graphs: bool):
        self.context, self.spec, self.torch, self.stream = context, spec, torch, stream
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[int, tuple] = {}  # N -> (graph, static inputs, static outputs)

    def _bind(self, inputs: dict, n: int) -> dict:
        """Point the context at the input tensors and at new output tensors for batch n."""
        ctx = self.context
        for name, x in inputs.items():
            ctx.set_input_shape(name, tuple(x.shape))
            ctx.set_tensor_address(name, x.data_ptr())
        outputs = {}
        for t in self.spec.outputs:
            shape = tuple(n if d == "N" else d for d in t.shape)
            outputs[t.name] = self.torch.empty(shape, dtype=self.torch.float32, device="cuda")
            ctx.set_tensor_address(t.name, outputs[t.name].data_ptr())
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise LegoError(f"TensorRT failed to run {self.spec.name}")

    def infer(self, feeds: dict) -> dict:
        torch = self.torch
        inputs = {t.name: feeds[t.name].contiguous() for t in self.spec.inputs}
        n = next(iter(inputs.values())).shape[0]
        self.stream.wait_stream(torch.cuda.current_stream())  # inputs were made on torch's stream
        with torch.cuda.stream(self.stream):
            if not self.cuda_graphs:
                outputs = self._bind(inputs, n)
                self._execute()
            else:
                if n not in self.graphs:
                    self.graphs[n] = self._capture(inputs, n)
                graph, static_inputs, static_outputs = self.graphs[n]
                for name, x in inputs.items():
                    static_inputs[name].copy_(x)
                graph.replay()
                outputs = {k: v.clone() for k, v in static_outputs.items()}  # the next replay overwrites
        torch.cuda.current_stream().wait_stream(self.stream)
        for x in inputs.values():
            x.record_stream(self.stream)
        return outputs

    def _capture(self, inputs: dict, n: int):
        """Capture one execution at batch n with static buffers (after one ordinary run, as TensorRT
        requires after a shape change)."""
        static_inputs = {name: x.clone() for name, x in inputs.items()}
        static_outputs = self._bind(static_inputs, n)
        self._execute()
        self.stream.synchronize()
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, stream=self.stream):
            self._execute()
        return graph, static_inputs, static_outputs


def _check_precision(precision: str) -> None:
    if precision not in COMPUTE_PRECISIONS:
        raise OptionError("precision", f"must be one of {', '.join(COMPUTE_PRECISIONS)}, got {precision!r}")


def _onnxruntime_has_cuda() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _auto_backend(
    folder: Path, manifest: Manifest, precision: str, threads: int = 0, streams: int = 1
) -> tuple[str, str]:
    """The backend auto takes, and why (Backend.choice). On a GPU by rule: TensorRT plans when built and
    TensorRT is installed (fp32 only), else ONNX Runtime's CUDA provider. bf16 runs on OpenVINO only.
    Else, on the CPU, the faster of OpenVINO and ONNX Runtime on this model, as measured on this
    machine on first use and cached (autoselect.py)."""
    from lego_export.runtime import autoselect

    has_plans = all("tensorrt" in e.files for e in manifest.engines)
    if precision == "fp32" and has_plans and importlib.util.find_spec("tensorrt"):
        return "tensorrt", "tensorrt: auto on a GPU: the engines have TensorRT plans and TensorRT is installed"
    if precision == "bf16":
        return "openvino", "openvino: auto: bf16 runs on OpenVINO only"
    if precision == "fp32" and _onnxruntime_has_cuda():
        return "onnxruntime", "onnxruntime: auto on a GPU: ONNX Runtime has the CUDA provider here"
    candidates = autoselect.installed()
    if not candidates:  # make_backend names the package to install
        return "onnxruntime", "onnxruntime: auto: no CPU runtime is installed"
    if precision == "int8":
        check_int8_files(folder, manifest)  # before measuring runtimes that would both refuse the folder
    chosen = autoselect.choose(folder, manifest, candidates, precision, threads, streams)
    return chosen.backend, chosen.reason


def make_backend(
    name: str,
    folder: Path,
    manifest: Manifest,
    ckpt: str | None = None,
    device: str = "cpu",
    threads: int = 0,
    cuda_graphs: bool = False,
    precision: str = "fp32",
    streams: int = 1,
) -> Backend:
    """The backend asked for; 'auto' as in _auto_backend. streams: engine calls that may run at once
    from different threads (a server's parallel streams), the cores shared among them. The backend's
    ``choice`` says how it was chosen."""
    if name not in BACKENDS:
        raise OptionError("backend", f"must be one of {', '.join(BACKENDS)}, got {name!r}")
    _check_precision(precision)
    choice = f"{name}: asked for by name (auto not used)"
    if name == "auto":
        name, choice = _auto_backend(folder, manifest, precision, threads, streams)
    backend = _open(name, folder, manifest, ckpt, device, threads, cuda_graphs, precision, streams)
    backend.choice = choice
    return backend


def _open(
    name: str, folder: Path, manifest: Manifest, ckpt, device: str, threads: int, cuda_graphs: bool, precision: str,
    streams: int,
) -> Backend:  # fmt: skip
    allowed = {"int8": ("onnxruntime", "openvino"), "bf16": ("openvino",)}.get(precision, BACKENDS)
    if name not in allowed:
        raise OptionError("precision", f"{precision} runs on {' and '.join(allowed)} only, not on the {name} backend")
    if streams > 1 and name not in ("onnxruntime", "openvino"):
        raise OptionError("streams", f"{streams}: parallel engine streams run on onnxruntime and openvino, not {name}")
    if name == "torch":
        if ckpt is None:
            raise OptionError("ckpt", "is needed by the torch backend (the reference runs the PyTorch model)")
        if importlib.util.find_spec("torch") is None:
            raise OptionError("backend", "torch needs PyTorch, which is not installed")
        return TorchBackend(folder, manifest, ckpt, device)
    if name == "tensorrt":
        return TensorRTBackend(folder, manifest, cuda_graphs)
    if name == "openvino":
        return OpenVinoBackend(folder, manifest, threads, precision, streams=streams)
    if importlib.util.find_spec("onnxruntime") is None:
        raise OptionError("backend", "onnxruntime needs the onnxruntime package, which is not installed")
    if streams > 1:  # each call runs on the thread that makes it, with its share of the cores
        threads = max(1, (threads or os.cpu_count() or 1) // streams)
    return OnnxRuntimeBackend(folder, manifest, threads=threads, precision=precision, streams=streams)
