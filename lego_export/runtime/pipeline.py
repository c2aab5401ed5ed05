"""The LEGO sampling pipeline over brick engines: the Python API behind lego-run and lego-serve.

    from lego_export.options import SamplingOptions
    from lego_export.runtime import LegoPipeline
    pipe = LegoPipeline.from_engines("engines/")             # OpenVINO or ONNX Runtime on a CPU
    result = pipe(num=16, classes=["sneaker"], resolution=(32, 96), seed=0)   # the model's recommended
    result = pipe(SamplingOptions(steps=50, skip="late"), num=16)             # or options of your own
    result = pipe(num=16, steps=18)                                           # fields by keyword
    result.images        # (16, C, 32, 96) float32 in [-1, 1]
    result.options       # what ran; result.timing: per-brick milliseconds, images/s, bricks skipped

A call turns its options into the per-step brick plan (plan.py, a pure function), runs the
sampler, and hands each evaluation to the one outer denoiser (lego_export/denoiser.py, the function
the PyTorch model calls too) with the engine runners as its brick calls. Everything of one call
lives in that call, so one pipeline can serve several calls at once (threads). The arrays are the
backend's (lego_export/arrays.py): NumPy on the host for CPU backends (no torch needed), torch
tensors on the GPU for GPU backends, so nothing goes through host memory between engine calls.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lego_export import contract
from lego_export.arrays import NumpyArrays
from lego_export.denoiser import BrickCache, denoise
from lego_export.edm import churn_noise, evaluations, initial_noise, sample
from lego_export.errors import LegoError
from lego_export.flops import model_brick_flops
from lego_export.manifest import Manifest
from lego_export.options import OptionError, SamplingOptions, check_canvas_sides, check_classes, check_request, resolve
from lego_export.plan import StepPlan, flop_fraction_saved, plan
from lego_export.points import resolve_quality
from lego_export.runtime.backends import MAX_THREADS, Backend, make_backend
from lego_export.runtime.runner import EngineRunner, Timing


def _expect(argument: str, value, kinds: tuple, wanted: str) -> None:
    """A TypeError naming the API argument given a value of the wrong type, before it is used."""
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise TypeError(f"{argument} must be {wanted}, got {type(value).__name__} {value!r:.60}")


def _expect_options(options, optional: bool = True) -> None:
    kinds = (SamplingOptions, type(None)) if optional else (SamplingOptions,)
    _expect("options", options, kinds, "a SamplingOptions" + (" or None" if optional else ""))


_PATH = (str, os.PathLike)


@dataclass
class SampleResult:
    images: np.ndarray  # (N, C, H, W) float32 in [-1, 1]; decoded images for a latent model
    labels: np.ndarray | None  # (N,) class per image; None for an unconditional model
    plan: list[StepPlan]
    timing: Timing
    options: SamplingOptions = field(default_factory=SamplingOptions)  # what ran
    recommended: bool = False  # whether those are the model's recommended setting
    latents: np.ndarray | None = None  # a latent model's raw samples, before the decoder


@dataclass
class _Call:
    """One call's bookkeeping: its Timing and, per engine output, whether it was finite."""

    timing: Timing
    step: int = 0
    finite: list = field(default_factory=list)  # (step, engine, all finite)

    def first_non_finite(self) -> str:
        """Where NaN or infinity first appeared: an engine's output at some step, or the sampler."""
        for step, name, finite in self.finite:
            if not bool(finite):
                return (
                    f"{name} returned NaN or infinity at step {step}: the engine or its inputs are broken "
                    "(run lego-export verify --ckpt to check it against PyTorch)"
                )
        return "the sampler produced NaN or infinity (no engine output was non-finite); check the model's EDM constants"


def files_precision(manifest: Manifest, backend: str, precision: str) -> str:
    """The precision inside the brick files a backend runs: its int8 graphs, its TensorRT plans, or
    the ONNX files (fp32 or fp16, as built)."""
    fmt = "onnx-int8" if precision == "int8" else "tensorrt" if backend == "tensorrt" else "onnx"
    found = sorted({b.files[fmt].precision for b in manifest.bricks if fmt in b.files})
    return "/".join(found) or precision


class LegoPipeline:
    """Sampling from a folder of brick engines with one backend."""

    def __init__(self, manifest: Manifest, backend: Backend, profile: bool = False, max_rows: int | None = None):
        """profile: time every engine call on GPU backends too (a device wait after each call; always
        done on the CPU). max_rows: rows per engine call (default: each engine's N range)."""
        self.manifest, self.backend = manifest, backend
        self.cfg = cfg = manifest.model
        self.channels, self.resolution, self.num_classes = cfg.img_channels, cfg.img_resolution, cfg.num_classes
        self.class_names = manifest.class_names
        self.edm = cfg.edm
        self.brick_sizes = [b.size for b in cfg.bricks]
        self.brick_flops = model_brick_flops(cfg)
        self.arrays = backend.arrays
        # Host arrays: every call returns once done, so timing it costs no device wait.
        on_host = isinstance(self.arrays, NumpyArrays) or not backend.device.startswith("cuda")
        self.per_engine_timing = profile or on_host
        self.precision = backend.precision
        self.built_precision = files_precision(manifest, backend.name, self.precision)

        def runner(spec, arrays=self.arrays):
            rows = spec.batch["max"] if max_rows is None else max_rows
            return EngineRunner(spec, backend.runner(spec), arrays, rows, timed=self.per_engine_timing)

        self.embedder = runner(manifest.embedder)
        self.bricks = [runner(s) for s in manifest.bricks]
        # The decoder runs once per sample on host arrays (its runner takes NumPy on every backend).
        self.decoder = runner(manifest.decoder, NumpyArrays()) if manifest.decoder is not None else None

    @classmethod
    def from_engines(
        cls,
        folder: str | Path,
        backend: str = "auto",
        *,
        ckpt: str | None = None,
        device: str = "cpu",
        threads: int = 0,
        cuda_graphs: bool = False,
        profile: bool = False,
        precision: str = "fp32",
    ) -> LegoPipeline:
        """Load manifest.json, check every engine file's sha256, and open the chosen backend (auto:
        TensorRT plans where usable, else on a CPU the faster of OpenVINO and ONNX Runtime, measured
        on this machine on first use and cached: autoselect.py); ``pipe.backend.choice`` says why.

        device is the torch backend's; threads ONNX Runtime's and OpenVINO's; cuda_graphs TensorRT's;
        profile as in the constructor; precision what the bricks compute in (backends.COMPUTE_PRECISIONS).
        """
        _expect("folder", folder, _PATH, "a folder path (str or Path)")
        _expect("backend", backend, (str,), "a backend name (str)")
        _expect("ckpt", ckpt, (*_PATH, type(None)), "a checkpoint path or None")
        for name, text in (("device", device), ("precision", precision)):
            _expect(name, text, (str,), "a str")
        _expect("threads", threads, (int, np.integer), "an int")
        for name, flag in (("cuda_graphs", cuda_graphs), ("profile", profile)):
            _expect(name, flag, (bool,), "True or False")
        if not 0 <= threads <= MAX_THREADS:
            raise OptionError("threads", f"must be from 0 (all cores) to {MAX_THREADS}, got {threads}")
        folder = Path(folder)
        manifest = Manifest.read(folder)
        # Every backend reads each engine file once, checks its sha256 and loads those bytes.
        opened = make_backend(
            backend,
            folder,
            manifest,
            ckpt=ckpt,
            device=device,
            threads=threads,
            cuda_graphs=cuda_graphs,
            precision=precision,
        )
        return cls(manifest, opened, profile=profile)

    def close(self) -> None:
        for r in [self.embedder, *self.bricks] + ([self.decoder] if self.decoder else []):
            r.close()

    # -- what a call will do, without running it ----------------------------------------------

    def options(
        self, options: SamplingOptions | None = None, recommended: bool = True, quality: str | None = None, **fields
    ) -> SamplingOptions:
        """The options a call with these arguments runs, checked: options (or the defaults) with the
        fields given by keyword; with no options and no trajectory field, the model's recommended
        setting when it has one and recommended is true (the rule of options.resolve); quality: the
        manifest's named point of that name ("fast", "balanced", "best") instead."""
        _expect_options(options)
        _expect("recommended", recommended, (bool,), "True or False")
        return self._choose(options, recommended, fields, quality)[0].validate(self.cfg)

    def _choose(
        self, options, recommended: bool, fields: dict, quality: str | None = None
    ) -> tuple[SamplingOptions, bool]:
        """The options of a call and whether they are the recommended setting (checked by plan())."""
        if options is not None:
            if quality is not None:
                raise OptionError("quality", "names a whole sampling setting; give it or options, not both")
            return (replace(options, **fields) if fields else options), False
        tuned = self.manifest.recommended
        if quality is not None:
            return resolve_quality(fields, tuned, quality)
        return resolve(fields, tuned.options if recommended and tuned is not None else None)

    def plan(self, options: SamplingOptions, resolution: tuple[int, int] | None = None, seed: int = 0):
        """The per-step table of bricks run and tile-grid offsets (plan.py)."""
        _expect_options(options, optional=False)
        return plan(options, self.cfg, resolution or (self.resolution, self.resolution), seed)

    def flops_saved(self, steps: list[StepPlan]) -> float:
        return flop_fraction_saved(steps, self.brick_flops)

    def labels_for(self, num: int, classes: Sequence[int | str] | None, indices: Sequence[int]) -> np.ndarray | None:
        """Class of each image index: the given classes (indices or names) in turn, or by default every
        class in equal consecutive blocks of the num images (so a grid with num / classes columns has
        a row per class)."""
        wanted = check_classes(classes, self.num_classes, self.class_names)
        if not self.num_classes:
            return None
        if not wanted:
            return np.array([i * self.num_classes // num for i in indices], dtype=np.int64)
        return np.array([wanted[i % len(wanted)] for i in indices], dtype=np.int64)

    # -- sampling ---------------------------------------------------------------------------------

    def __call__(
        self,
        options: SamplingOptions | None = None,
        *,
        num: int = 16,
        resolution: tuple[int, int] | None = None,
        classes: Sequence[int | str] | None = None,
        seed: int = 0,
        batch: int = 16,
        indices: Sequence[int] | None = None,
        progress: Callable[[int], None] | None = None,
        recommended: bool = True,
        quality: str | None = None,
        **fields,
    ) -> SampleResult:
        """Generate images. options and fields as in :meth:`options`. indices (default 0..num-1) pick
        each image's noise and class, so any split of the indices (batches, processes) yields the
        same images for the same seed; churn's fresh noise also depends only on (seed, index, step)."""
        _expect_options(options)
        _expect("recommended", recommended, (bool,), "True or False")
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a function of the step or None, got {type(progress).__name__}")
        chosen, used_recommended = self._choose(options, recommended, fields, quality)
        h, w = check_canvas_sides(resolution) if resolution is not None else (self.resolution, self.resolution)
        steps = self.plan(chosen, (h, w), seed)  # checks the options against the model, once
        check_request(num=num, batch=batch, seed=seed, canvas=(h, w), channels=self.channels, indices=indices)
        indices = list(range(num)) if indices is None else [int(i) for i in indices]
        labels = self.labels_for(num, classes, indices)
        sigmas = self.edm.sigmas(chosen.steps)

        call = _Call(Timing(per_engine=self.per_engine_timing, precision=self.precision, built=self.built_precision))
        start = time.perf_counter()
        images = []
        for lo in range(0, len(indices), batch):
            chunk = indices[lo : lo + batch]
            noise = self.arrays.from_numpy(initial_noise(seed, chunk, (self.channels, h, w)))
            onehot = None
            if labels is not None:
                onehot = self.arrays.from_numpy(np.eye(self.num_classes, dtype=np.float32)[labels[lo : lo + batch]])
            cache = BrickCache.for_options(chosen)  # one per batch: the corrections of its own images

            def evaluate(x, sigma, step, onehot=onehot, cache=cache):
                guidance = chosen.guidance if steps[step].guided else 1.0  # the plan knows the interval
                return self._denoise(call, x, sigma, steps[step], onehot, guidance, cache)

            def fresh_noise(step, chunk=chunk):
                return self.arrays.from_numpy(churn_noise(seed, chunk, (self.channels, h, w), step))

            x = sample(
                evaluate,
                noise,
                sigmas,
                method=chosen.sampler,
                on_step=progress,
                churn=chosen.churn,
                fresh_noise=fresh_noise,
            )
            images.append(self.arrays.to_numpy(x))
        timing = call.timing
        timing.total_s = time.perf_counter() - start
        timing.steps, timing.images, timing.flops_saved = chosen.steps, len(indices), self.flops_saved(steps)
        timing.full_chain_flops = sum(self._flops_per_row((h, w)))
        if chosen.caches and timing.full_chain_flops:  # the gate decides at run time: count what ran
            full = timing.images * timing.full_chain_flops * evaluations(chosen.sampler, chosen.steps)
            timing.flops_saved = 1.0 - timing.brick_flops / full
        out = np.concatenate(images)
        if not np.isfinite(out).all():
            raise LegoError(call.first_non_finite())
        latents = None
        if self.decoder is not None:
            latents, out = out, self.decode(out, timing)
            timing.total_s = time.perf_counter() - start
        images = np.clip(out, -1, 1).astype(np.float32)
        return SampleResult(images, labels, steps, timing, chosen, used_recommended, latents)

    def decode(self, latents: np.ndarray, timing: Timing | None = None) -> np.ndarray:
        """A latent model's samples (N, C, h, w) to images (N, 3, f h, f w), on the host, in chunks of
        the decoder's N range."""
        feeds = {contract.LATENTS: np.ascontiguousarray(latents)}
        images = self.decoder.infer(feeds, timing)[contract.IMAGES]
        if not np.isfinite(images).all():
            raise LegoError("the decoder returned NaN or infinity: check the decoder engine (lego-export verify)")
        return images

    def denoise(
        self, x, sigma: float, step: StepPlan, onehot=None, guidance: float = 1.0, cache: BrickCache | None = None
    ):
        """D(x; sigma) from the first step.bricks bricks with step.shift; guided when guidance != 1.
        x and onehot are arrays of this pipeline's kind (``self.arrays``); cache: the batch's BrickCache."""
        return self._denoise(_Call(Timing()), x, sigma, step, onehot, guidance, cache)

    def _flops_per_row(self, canvas: tuple[int, int]) -> list[float]:
        """Each brick's FLOPs for one image (one row of an evaluation) on this canvas."""
        scale = canvas[0] * canvas[1] / self.resolution**2  # tiles grow with the canvas area
        return [f * scale for f in self.brick_flops]

    def _denoise(self, call: _Call, x, sigma, step: StepPlan, onehot, guidance, cache):
        call.step = step.step
        call.timing.brick_evaluations += len(self.brick_sizes)
        call.timing.bricks_skipped += len(self.brick_sizes) - step.bricks
        out = self._denoise_call(call, x, sigma, step, onehot, guidance, cache)
        if cache is not None:
            record = cache.record[-1]
        else:  # nothing decided at run time: the plan says what ran
            rows = x.shape[0] * (2 if guidance != 1.0 and onehot is not None else 1)
            record = {"rows": rows, "run": [rows if step.runs(k) else 0 for k in range(len(self.bricks))],
                      "reused": [0] * len(self.bricks), "forecast": [0] * len(self.bricks),
                      "skipped": [0 if k < step.bricks else rows for k in range(len(self.bricks))]}  # fmt: skip
        call.timing.add_step(step.step, step.sigma, record)
        per_row = self._flops_per_row(tuple(x.shape[2:]))
        call.timing.brick_flops += sum(r * f for r, f in zip(record["run"], per_row, strict=True))
        return out

    def _denoise_call(self, call: _Call, x, sigma, step: StepPlan, onehot, guidance, cache):
        return denoise(
            x,
            sigma,
            onehot,
            embed=functools.partial(self._embed, call),
            bricks=[functools.partial(self._brick, call, k) for k in range(len(self.bricks))],
            brick_sizes=self.brick_sizes,
            edm=self.edm,
            num_bricks=step.bricks,
            shift=step.shift,
            guidance=guidance,
            cache=cache,
            cached=step.cached,
            guidance_cached=step.guidance_cached,
            arrays=self.arrays,
        )

    def _embed(self, call: _Call, c_noise, onehot):
        feeds = {contract.C_NOISE: c_noise}
        if self.num_classes:  # the engine takes a one-hot always: all zeros is the null label
            zeros = np.zeros((c_noise.shape[0], self.num_classes), np.float32)
            feeds[contract.CLASS_ONEHOT] = onehot if onehot is not None else self.arrays.from_numpy(zeros)
        return self._checked(call, "embedder", self.embedder.infer(feeds, call.timing)[contract.COND])

    def _brick(self, call: _Call, k: int, tiles, cond):
        out = self.bricks[k].infer({contract.TILES: tiles, contract.COND: cond}, call.timing)[contract.OUT]
        return self._checked(call, f"brick{k}", out)

    def _checked(self, call: _Call, name: str, out):
        """Note whether an engine output is finite (read only if the images are not: no device wait)."""
        call.finite.append((call.step, name, self.arrays.all_finite(out)))
        return out
