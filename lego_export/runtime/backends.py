"""Backends: one small interface over ONNX Runtime, TensorRT and PyTorch.

A *runner* executes one engine and maps named numpy inputs to named numpy outputs (in the spirit of
Polygraphy's runners)::

    runner = OnnxRuntimeRunner("engines/brick0.onnx")
    outputs = runner.infer({"tiles": tiles, "cond": cond})

A *backend* makes the runner for each engine of a manifest. Only the chosen backend's library is
imported: the ONNX Runtime backend works where PyTorch is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

from lego_export.errors import LegoError
from lego_export.manifest import EngineSpec, Manifest

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


class Runner(Protocol):
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntimeRunner:
    """ONNX Runtime session over one .onnx file; CPU provider unless told otherwise."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0):
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
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            raise LegoError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))


class OnnxRuntimeBackend:
    """ONNX Runtime: CPU provider by default; CUDA / TensorRT providers when onnxruntime-gpu has them.

    On the CPU provider the ORT-fused brick graphs (``onnx-ort``) are preferred; the portable graph
    is used elsewhere and when no fused graph was exported.
    """

    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: Manifest, providers: list[str] | None = None, threads: int = 0):
        import onnxruntime as ort

        available = ort.get_available_providers()
        self.providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise LegoError(f"ONNX Runtime here has no {', '.join(missing)} (available: {', '.join(available)})")
        self.folder, self.manifest, self.threads = folder, manifest, threads
        self.device = "cuda" if self.providers[0] != "CPUExecutionProvider" else "cpu"
        self.formats = ("onnx-ort", "onnx") if self.device == "cpu" else ("onnx",)

    def runner(self, spec: EngineSpec) -> Runner:
        fmt = next(f for f in self.formats if f in spec.files)
        return OnnxRuntimeRunner(self.folder / spec.files[fmt].path, self.providers, self.threads)


class TorchBackend:
    """The PyTorch reference: the checkpoint's own modules, on CPU or CUDA."""

    name = "torch"

    def __init__(self, manifest: Manifest, ckpt: str | Path, device: str = "cpu"):
        import torch

        from lego_export.checkpoint import load_model
        from lego_export.manifest import sha256_file

        if sha256_file(ckpt) != manifest.source["sha256"]:
            raise LegoError(
                f"{ckpt} is not the checkpoint these engines were built from ({manifest.source['checkpoint']})"
            )
        if device == "cuda" and not torch.cuda.is_available():
            raise LegoError("--backend torch on cuda asked for, but PyTorch sees no CUDA GPU")
        self.torch, self.device = torch, device
        self.model = load_model(ckpt, device)

    def runner(self, spec: EngineSpec) -> Runner:
        module = self.model.embedder if spec.role == "embedder" else self.model.bricks[spec.index]
        return _TorchRunner(module, spec, self.torch, self.device)


class _TorchRunner:
    def __init__(self, module, spec: EngineSpec, torch, device: str):
        self.module, self.torch, self.device = module, torch, device
        self.inputs = [t.name for t in spec.inputs]
        self.output = spec.outputs[0].name

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            args = [self.torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.inputs]
            return {self.output: self.module(*args).float().cpu().numpy()}


class TensorRTBackend:
    """Native TensorRT plans. Torch CUDA tensors are the buffers; all engines share one activation
    memory block (they run one after another on one stream).

    Written against the TensorRT 10 Python API; not executed where this project is developed
    (no TensorRT, no GPU there).
    """

    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest):
        from lego_export.export.tensorrt import check_plan_compatible, tensorrt_environment

        trt, _ = tensorrt_environment()
        import torch

        self.trt, self.torch = trt, torch
        self.folder, self.manifest = folder, manifest
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream()
        self.engines = {}
        for spec in manifest.engines:
            if "tensorrt" not in spec.files:
                raise LegoError(
                    f"{spec.name} has no TensorRT plan; build one with: "
                    f"lego-export build --from-onnx {folder} --target tensorrt"
                )
            check_plan_compatible(spec.files["tensorrt"])
            plan = (folder / spec.files["tensorrt"].path).read_bytes()
            engine = self.runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise LegoError(f"TensorRT could not load {spec.files['tensorrt'].path}; rebuild it on this machine")
            self.engines[spec.name] = engine
        size = max(e.device_memory_size_v2 for e in self.engines.values())
        self.scratch = torch.empty(size, dtype=torch.uint8, device="cuda")

    def runner(self, spec: EngineSpec) -> Runner:
        engine = self.engines[spec.name]
        context = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.device_memory = self.scratch.data_ptr()  # shared: engines run one at a time
        return _TensorRTRunner(context, spec, self.torch, self.stream)


class _TensorRTRunner:
    def __init__(self, context, spec: EngineSpec, torch, stream):
        self.context, self.spec, self.torch, self.stream = context, spec, torch, stream

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, ctx = self.torch, self.context
        keep = []
        for t in self.spec.inputs:
            x = torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to("cuda", non_blocking=True)
            ctx.set_input_shape(t.name, tuple(x.shape))
            ctx.set_tensor_address(t.name, x.data_ptr())
            keep.append(x)
        outputs = {}
        for t in self.spec.outputs:
            y = torch.empty(tuple(ctx.get_tensor_shape(t.name)), dtype=torch.float32, device="cuda")
            ctx.set_tensor_address(t.name, y.data_ptr())
            outputs[t.name] = y
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise LegoError(f"TensorRT failed to run {self.spec.name}")
        self.stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outputs.items()}


def make_backend(
    name: str, folder: Path, manifest: Manifest, ckpt: str | None = None, device: str = "cpu", threads: int = 0
):
    """The backend asked for; 'auto' picks TensorRT plans on a GPU if built, else ONNX Runtime."""
    if name not in BACKENDS:
        raise LegoError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        has_plans = all("tensorrt" in e.files for e in manifest.engines)
        name = "tensorrt" if has_plans and importlib.util.find_spec("tensorrt") else "onnxruntime"
    if name == "torch":
        if ckpt is None:
            raise LegoError("--backend torch needs --ckpt CHECKPOINT (the reference runs the PyTorch model)")
        if importlib.util.find_spec("torch") is None:
            raise LegoError("--backend torch needs PyTorch, which is not installed")
        return TorchBackend(manifest, ckpt, device)
    if name == "tensorrt":
        return TensorRTBackend(folder, manifest)
    if importlib.util.find_spec("onnxruntime") is None:
        raise LegoError("--backend onnxruntime needs the onnxruntime package, which is not installed")
    return OnnxRuntimeBackend(folder, manifest, threads=threads)
