"""The LEGO sampling pipeline over brick engines: the Python API behind lego-run.

    from lego_export.runtime import LegoPipeline
    pipe = LegoPipeline.from_engines("engines/")                 # ONNX Runtime on the CPU
    result = pipe(num=16, steps=50, classes=[3], skip="late", resolution=(32, 96), seed=0)
    result.images        # (16, C, 32, 96) float32 in [-1, 1]
    result.timing        # per-brick milliseconds, images/s, bricks skipped, ...

The pipeline turns a request into per-step plans (which bricks run, where the tile grid sits),
runs the sampler, and hands each evaluation to the one outer denoiser (lego_export/denoiser.py,
the same function the PyTorch model calls) with the backend's engine runners as its brick calls.
The arrays are the backend's (lego_export/arrays.py): NumPy on the host for ONNX Runtime on the CPU
(no torch needed), torch tensors on the GPU for GPU backends, so nothing goes through host memory
between engine calls.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lego_export import contract
from lego_export.arrays import NumpyArrays
from lego_export.denoiser import denoise
from lego_export.edm import SAMPLERS, Churn, churn_noise, initial_noise, sample
from lego_export.errors import LegoError
from lego_export.flops import model_brick_flops
from lego_export.manifest import Manifest
from lego_export.runtime.backends import Runner, make_backend
from lego_export.runtime.schedule import (
    SkipPolicy,
    StepPlan,
    flop_fraction_saved,
    late_brick_policy,
    make_plan,
    parse_policy,
)
from lego_export.tiling import check_canvas

# PG: skip the global brick for the last 20% of the trajectory. Chosen by measurement
# (benchmarks/results/quality.md): on the shipped model 0.2 keeps FID within 1% of the full chain,
# while the paper's best ImageNet point, 0.3, costs 13-17% here.
DEFAULT_T_BREAK = 0.2


MAX_IMAGES = 1_000_000
MAX_STEPS = 10_000
MAX_SIDE = 16_384
CANVAS_BYTES_PER_PIXEL = 280  # measured: peak memory per canvas pixel per image in a batch (README)


def check_request(num: int, batch: int, seed: int, steps: int, resolution: tuple[int, int], channels: int) -> None:
    """Refuse, before anything is allocated, a request out of range or larger than this machine's memory."""
    for value, option, lo, hi in (
        (num, "--num", 1, MAX_IMAGES),
        (batch, "--batch", 1, MAX_IMAGES),
        (steps, "--steps", 1, MAX_STEPS),
        (seed, "--seed", 0, 2**63 - 1),
        (resolution[0], "--resolution height", 1, MAX_SIDE),
        (resolution[1], "--resolution width", 1, MAX_SIDE),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
            raise LegoError(f"{option} must be an integer from {lo} to {hi}, got {value!r}")
    need = CANVAS_BYTES_PER_PIXEL * resolution[0] * resolution[1] * min(num, batch) * max(channels, 1)
    have = physical_memory()
    if have and need > 0.8 * have:
        raise LegoError(
            f"a batch of {min(num, batch)} canvases of {resolution[0]}x{resolution[1]} needs about "
            f"{need / 2**30:.1f} GiB; this machine has {have / 2**30:.1f} GiB: lower --batch or --resolution"
        )


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Timing:
    """Where the time went in one call; engine times are summed over all calls of that engine."""

    engine_ms: dict[str, float] = field(default_factory=dict)
    engine_calls: dict[str, int] = field(default_factory=dict)
    total_s: float = 0.0
    steps: int = 0
    images: int = 0
    brick_evaluations: int = 0  # brick calls on one batch (one per brick per denoiser evaluation)
    bricks_skipped: int = 0
    flops_saved: float = 0.0  # fraction of brick FLOPs the plan skipped
    per_engine: bool = True  # False on an asynchronous device unless profiling: engine_ms stays empty
    precision: str = "fp32"  # what the bricks computed in (backends.PRECISIONS)

    def add(self, name: str, seconds: float) -> None:
        self.engine_ms[name] = self.engine_ms.get(name, 0.0) + seconds * 1e3
        self.engine_calls[name] = self.engine_calls.get(name, 0) + 1

    @property
    def overhead_fraction(self) -> float | None:
        """Share of the wall time spent outside engine calls (tiling, concatenation, sampler)."""
        total_ms = self.total_s * 1e3
        if not self.per_engine:
            return None
        return max(0.0, 1.0 - sum(self.engine_ms.values()) / total_ms) if total_ms else 0.0

    def summary(self) -> dict:
        per_step = {k: v / max(self.steps, 1) for k, v in self.engine_ms.items()}
        return {
            "total_s": self.total_s,
            "images": self.images,
            "images_per_s": self.images / self.total_s if self.total_s else 0.0,
            "s_per_image": self.total_s / self.images if self.images else 0.0,
            "steps": self.steps,
            "ms_per_step": self.total_s * 1e3 / max(self.steps, 1),
            "engine_ms_per_step": per_step,
            "engine_calls": dict(self.engine_calls),
            "overhead_fraction": self.overhead_fraction,
            "brick_evaluations": self.brick_evaluations,
            "bricks_skipped": self.bricks_skipped,
            "flops_saved": self.flops_saved,
            "precision": self.precision,
        }

    def table(self) -> str:
        s = self.summary()
        lines = [f"{'engine':10} {'ms/step':>10} {'calls':>7}"]
        for name, calls in s["engine_calls"].items():
            ms = f"{s['engine_ms_per_step'][name]:>10.2f}" if self.per_engine else f"{'-':>10}"
            lines.append(f"{name:10} {ms} {calls:>7}")
        overhead = "not measured (--profile)" if not self.per_engine else f"{s['overhead_fraction']:.1%}"
        lines.append(
            f"total {s['total_s']:.2f} s for {s['images']} images over {s['steps']} steps: "
            f"{s['ms_per_step']:.1f} ms/step, {s['s_per_image']:.3f} s/image, {s['images_per_s']:.2f} images/s; "
            f"bricks skipped {s['bricks_skipped']}/{s['brick_evaluations']} ({s['flops_saved']:.1%} of brick FLOPs); "
            f"runtime overhead {overhead}; bricks in {s['precision']}"
        )
        return "\n".join(lines)


@dataclass
class SampleResult:
    images: np.ndarray  # (N, C, H, W) float32 in [-1, 1]; decoded images for a latent model
    labels: np.ndarray | None  # (N,) class per image; None for an unconditional model
    plan: list[StepPlan]
    timing: Timing
    latents: np.ndarray | None = None  # a latent model's raw samples, before the decoder


class _Timed:
    """Wraps a runner: counts (and, where it costs nothing, times) every call, and splits batches
    larger than the engine's N range."""

    def __init__(self, name: str, runner: Runner, max_n: int, timing_ref: Callable[[], Timing], arrays):
        self.name, self.runner, self.max_n, self.timing_ref, self.arrays = name, runner, max_n, timing_ref, arrays

    def infer(self, feeds: dict, output: str):
        n = next(iter(feeds.values())).shape[0]
        timing = self.timing_ref()
        parts = []
        for start in range(0, n, self.max_n):
            chunk = {k: self.arrays.contiguous(v[start : start + self.max_n]) for k, v in feeds.items()}
            t0 = time.perf_counter()
            parts.append(self.runner.infer(chunk)[output])
            if timing.per_engine:
                # GPU calls return before the work is done: per-engine times need a wait, which is
                # why they are taken there only when profiling.
                self.arrays.synchronize()
                timing.add(self.name, time.perf_counter() - t0)
            else:
                timing.engine_calls[self.name] = timing.engine_calls.get(self.name, 0) + 1
        return parts[0] if len(parts) == 1 else self.arrays.concat(parts)


class LegoPipeline:
    """Sampling from a folder of brick engines with one backend."""

    def __init__(self, manifest: Manifest, backend=None, profile: bool = False):
        """backend=None gives a pipeline that can only plan (see :meth:`plan`). profile: time every
        engine call on GPU backends too (a device wait after each call; always done on the CPU)."""
        self.manifest = manifest
        self.backend = backend
        self.cfg = cfg = manifest.model
        self.channels = cfg.img_channels
        self.resolution = cfg.img_resolution
        self.num_classes = cfg.num_classes
        self.edm = cfg.edm
        self.brick_sizes = [b.size for b in cfg.bricks]
        self.canvas_multiple = cfg.canvas_multiple
        self.brick_flops = model_brick_flops(cfg)
        self.arrays = getattr(backend, "arrays", None) or NumpyArrays()
        self.per_engine_timing = profile or not getattr(self.arrays, "device", "cpu").startswith("cuda")
        self.precision = getattr(backend, "precision", "fp32")
        self._timing = Timing(per_engine=self.per_engine_timing, precision=self.precision)
        self._finite, self._step = [], 0  # (step, engine, all finite) per engine call of the current sample
        if backend is None:  # planning only
            return
        timing_ref = lambda: self._timing  # noqa: E731 - runners report into the current call's Timing

        def timed(spec, arrays=self.arrays):
            return _Timed(spec.name, backend.runner(spec), spec.batch["max"], timing_ref, arrays)

        self.embedder = timed(manifest.embedder)
        self.bricks = [timed(s) for s in manifest.bricks]
        # The decoder runs once per sample on host arrays (its runner takes NumPy on every backend).
        self.decoder = timed(manifest.decoder, NumpyArrays()) if manifest.decoder is not None else None

    @classmethod
    def from_engines(
        cls,
        folder: str | Path,
        backend: str = "onnxruntime",
        ckpt: str | None = None,
        device: str = "cpu",
        threads: int = 0,
        cuda_graphs: bool = False,
        profile: bool = False,
        precision: str = "fp32",
    ) -> LegoPipeline:
        """Load manifest.json, check every engine file's sha256, and open the chosen backend.

        device is the torch backend's; threads ONNX Runtime's; cuda_graphs TensorRT's; profile as in
        the constructor; precision the bricks' (fp32, int8 or bf16, see backends.PRECISIONS).
        """
        folder = Path(folder)
        manifest = Manifest.read(folder)
        # Every backend reads each engine file once, checks its sha256 and loads those bytes.
        return cls(
            manifest,
            make_backend(
                backend,
                folder,
                manifest,
                ckpt=ckpt,
                device=device,
                threads=threads,
                cuda_graphs=cuda_graphs,
                precision=precision,
            ),
            profile,
        )

    def reset_timing(self) -> Timing:
        """Start a fresh Timing that the engine runners report into (done by every __call__)."""
        self._timing = Timing(per_engine=self.per_engine_timing, precision=self.precision)
        return self._timing

    # -- planning -------------------------------------------------------------------------------

    def skip_policy(self, skip: str | SkipPolicy | None, t_break: float = DEFAULT_T_BREAK) -> SkipPolicy:
        """None: full chain; "late": drop the last brick (see schedule.py); else an explicit SPEC."""
        if isinstance(skip, SkipPolicy):
            return skip
        if skip is None or skip == "none":
            return SkipPolicy()
        if skip == "late":
            return late_brick_policy(self.brick_sizes, t_break, self.edm)
        return parse_policy(skip, len(self.brick_sizes))

    def plan(
        self,
        steps: int,
        skip: str | SkipPolicy | None = None,
        t_break: float = DEFAULT_T_BREAK,
        resolution: tuple[int, int] | None = None,
        tile_shift: bool | None = None,
        seed: int = 0,
    ) -> list[StepPlan]:
        """The per-step table of bricks run and tile-grid offsets, without running anything."""
        if steps < 1:
            raise LegoError(f"--steps must be at least 1, got {steps}")
        h, w = resolution or (self.resolution, self.resolution)
        check_canvas(h, w, self.canvas_multiple)
        if tile_shift is None:  # on by default for canvases larger than the training size
            tile_shift = h > self.resolution or w > self.resolution
        period = max(self.brick_sizes) if tile_shift else None
        sigmas = self.sigmas(steps)
        return make_plan(sigmas, len(self.brick_sizes), self.skip_policy(skip, t_break), period, seed)

    def sigmas(self, steps: int) -> np.ndarray:
        """The Karras schedule with the model's EDM constants."""
        return self.edm.sigmas(steps)

    def flops_saved(self, plan: list[StepPlan]) -> float:
        return flop_fraction_saved(plan, self.brick_flops)

    # -- sampling -------------------------------------------------------------------------------

    def labels_for(self, num: int, classes: Sequence[int] | None, indices: Sequence[int]) -> np.ndarray | None:
        """Class of each image index: the given classes in turn, or by default every class in equal
        consecutive blocks of the num images (so a grid with num / classes columns has a row per class)."""
        if not self.num_classes:
            if classes:
                raise LegoError("this model is unconditional: --class cannot be used")
            return None
        if not classes:
            return np.array([i * self.num_classes // num for i in indices], dtype=np.int64)
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if bad:
            raise LegoError(f"class {bad[0]} is out of range: this model has classes 0 to {self.num_classes - 1}")
        return np.array([classes[i % len(classes)] for i in indices], dtype=np.int64)

    def __call__(
        self,
        num: int = 16,
        steps: int = 50,
        sampler: str = "heun",
        skip: str | SkipPolicy | None = None,
        t_break: float = DEFAULT_T_BREAK,
        resolution: tuple[int, int] | None = None,
        classes: Sequence[int] | None = None,
        guidance: float = 1.0,
        seed: int = 0,
        batch: int = 16,
        tile_shift: bool | None = None,
        indices: Sequence[int] | None = None,
        progress: Callable[[int], None] | None = None,
        churn: Churn | None = None,
        reuse_residual: bool = False,
    ) -> SampleResult:
        """Generate images. indices (default 0..num-1) pick each image's noise and class, so any
        split of the indices (batches, processes) yields the same images for the same seed.
        churn: EDM's stochastic sampler (see edm.Churn); its fresh noise also depends only on
        (seed, index, step). reuse_residual: where the plan skips bricks, add the correction they
        made at the most recent full-chain evaluation instead of dropping it (see denoiser.denoise)."""
        if sampler not in SAMPLERS:
            raise LegoError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
        if not math.isfinite(guidance):
            raise LegoError(f"--cfg must be a finite number, got {guidance}")
        if guidance != 1.0 and not self.num_classes:
            raise LegoError("classifier-free guidance (--cfg) needs a class-conditional model; this one is not")
        h, w = resolution or (self.resolution, self.resolution)
        check_request(num, batch, seed, steps, (h, w), self.channels)
        if churn is not None:
            churn.validate()
        plan = self.plan(steps, skip, t_break, (h, w), tile_shift, seed)
        indices = list(range(num)) if indices is None else list(indices)
        labels = self.labels_for(num, classes, indices)
        sigmas = self.sigmas(steps)

        timing = self.reset_timing()
        self._finite = []
        start = time.perf_counter()
        images = []
        for lo in range(0, len(indices), batch):
            chunk = indices[lo : lo + batch]
            noise = initial_noise(seed, chunk, (self.channels, h, w))
            onehot = None if labels is None else np.eye(self.num_classes, dtype=np.float32)[labels[lo : lo + batch]]
            noise = self.arrays.from_numpy(noise)
            onehot = None if onehot is None else self.arrays.from_numpy(onehot)

            reuse = {} if reuse_residual else None  # one per batch: the corrections of its own images

            def denoise(x, sigma, step, onehot=onehot, reuse=reuse):
                return self.denoise(x, sigma, plan[step], onehot, guidance, reuse)

            def fresh_noise(step, chunk=chunk):
                return self.arrays.from_numpy(churn_noise(seed, chunk, (self.channels, h, w), step))

            x = sample(denoise, noise, sigmas, sampler, progress, churn, fresh_noise)
            images.append(self.arrays.to_numpy(x))
        timing.total_s = time.perf_counter() - start
        timing.steps = steps
        timing.images = len(indices)
        timing.flops_saved = self.flops_saved(plan)
        out = np.concatenate(images)
        if not np.isfinite(out).all():
            raise LegoError(self._first_non_finite())
        latents = None
        if self.decoder is not None:
            latents, out = out, self.decode(out)
            timing.total_s = time.perf_counter() - start
        return SampleResult(np.clip(out, -1, 1).astype(np.float32), labels, plan, timing, latents)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """A latent model's samples (N, C, h, w) to images (N, 3, f h, f w), on the host, in chunks of
        the decoder's N range."""
        images = self.decoder.infer({contract.LATENTS: np.ascontiguousarray(latents)}, contract.IMAGES)
        if not np.isfinite(images).all():
            raise LegoError("the decoder returned NaN or infinity: check the decoder engine (lego-export verify)")
        return images

    def _first_non_finite(self) -> str:
        """Where NaN or infinity first appeared: an engine's output at some step, or the sampler."""
        for step, name, finite in self._finite:
            if not bool(finite):
                return (
                    f"{name} returned NaN or infinity at step {step}: the engine or its inputs are broken "
                    "(run lego-export verify --ckpt to check it against PyTorch)"
                )
        return "the sampler produced NaN or infinity (no engine output was non-finite); check the model's EDM constants"

    def denoise(self, x, sigma: float, step: StepPlan, onehot=None, guidance: float = 1.0, reuse=None):
        """D(x; sigma) from the first step.bricks bricks with step.shift; guided when guidance != 1.

        x and onehot are arrays of this pipeline's kind (``self.arrays``).
        """
        timing = self._timing
        self._step = step.step
        timing.brick_evaluations += len(self.brick_sizes)
        timing.bricks_skipped += len(self.brick_sizes) - step.bricks
        return denoise(
            x,
            sigma,
            onehot,
            embed=self._embed,
            bricks=[functools.partial(self._brick, k) for k in range(len(self.bricks))],
            brick_sizes=self.brick_sizes,
            edm=self.edm,
            num_bricks=step.bricks,
            shift=step.shift,
            guidance=guidance,
            reuse=reuse,
            arrays=self.arrays,
        )

    def _embed(self, c_noise, onehot):
        feeds = {contract.C_NOISE: c_noise}
        if self.num_classes:  # the engine takes a one-hot always: all zeros is the null label
            zeros = np.zeros((c_noise.shape[0], self.num_classes), np.float32)
            feeds[contract.CLASS_ONEHOT] = onehot if onehot is not None else self.arrays.from_numpy(zeros)
        return self._checked("embedder", self.embedder.infer(feeds, contract.COND))

    def _brick(self, k: int, tiles, cond):
        return self._checked(
            f"brick{k}", self.bricks[k].infer({contract.TILES: tiles, contract.COND: cond}, contract.OUT)
        )

    def _checked(self, name: str, out):
        """Note whether an engine output is finite (read only if the images are not: no device wait)."""
        self._finite.append((self._step, name, self.arrays.all_finite(out)))
        return out
