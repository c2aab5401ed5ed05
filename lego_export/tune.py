"""Map a model's frontier of sampling settings and name points on it: `fast`, `balanced`, `best`.

A setting is a point (brick FLOPs per image, FID, class accuracy). Brick FLOPs follow from the plan
without sampling; quality needs sampling, so the search spends its samples where the frontier is:

1. Coarse: every sampler x step count of the grid (the full chain, each option variant: residual
   reuse, guidance, brick caching, whatever the caller lists), on fixed search seeds and classes
   (every trial sees the same noise).
2. Skips: for the sampler and step counts on the Pareto set of (1), each per-brick skip window of a
   coarse grid (fractions of the trajectory; global bricks at low noise, local ones at high noise,
   as in the LEGO paper: plan.skip_window).
3. Refine: the neighbours of every Pareto point (a step more or fewer, a brick's window a notch wider
   or narrower, another variant or sampler) until a round adds no Pareto point, or the rounds or
   trials run out. Two settings with the same plan are sampled once. Each stage first screens its
   settings on a third of the images and samples in full only those no other screened setting
   clearly beats (as cheap, no less accurate, a FID lower by more than a fifth).
4. Validate: the Pareto points are measured again on seeds the search never saw. The named points
   are chosen from points that meet their rule on both seed sets, so a choice fitted to one set of
   seeds does not pass:
     best      the lowest validated FID (at or above --min-accuracy, where one is given);
     balanced  the fewest brick FLOPs whose FID is at most (1 + max_fid_increase) x best's and whose
               class accuracy is at most max_accuracy_drop below best's;
     fast      the cheap end of the ladder: the fewest brick FLOPs whose FID is at most
               rung_fid_ratio x balanced's, class accuracy at most rung_accuracy_drop below it.
   When no point meets a budget on the validation seeds the tuner stops with the check that failed
   and by how much (:class:`ValidationFailed`); nothing is written.
5. The ladder (lego-serve steps down it under load): validated Pareto points cheaper than the
   recommended setting (balanced unless the author picks another name) within the rung rule, none
   beaten on FID by a cheaper one; its cheap end is `fast`.

FID is measured in the feature space of an ONNX feature extractor the user provides (images in, one
feature vector per image out; optionally a second output `logits`, one score per class) against
reference statistics (mean and covariance of the real data's features), as EDM's and pytorch-fid's
reference files are. No PyTorch needed.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lego_export.config import LegoConfig
from lego_export.edm import SAMPLERS, evaluations
from lego_export.errors import LegoError
from lego_export.fid import FeatureStats, frechet_distance
from lego_export.flops import model_brick_flops
from lego_export.manifest import Recommended, Rung
from lego_export.options import SamplingOptions
from lego_export.plan import flop_fraction_saved, plan, skip_window
from lego_export.runtime.pipeline import LegoPipeline

NOTCH = 0.1  # refinement moves a brick's skip window by this fraction of the trajectory
NAMES = ("best", "balanced", "fast")  # the named points, dearest first
MAX_FEATURE_FILE = 512 << 20
MAX_REFERENCE_FILE = 1 << 30
MAX_FEATURE_DIM = 8192


class ValidationFailed(LegoError):
    """No setting meets a budget (on the search seeds, or again on the validation seeds): the message
    says which check and by how much."""


@dataclass(frozen=True)
class Setting:
    """A point of the search: sampling options with the skip windows held as the fraction of the
    trajectory each brick 1..K-1 is skipped, the coordinates the search moves (base.skip unused)."""

    base: SamplingOptions
    skipped: tuple[float, ...] = ()

    def but(self, skipped: tuple[float, ...] | None = None, **fields) -> Setting:
        """This setting with other skip fractions and option fields."""
        return Setting(dataclasses.replace(self.base, **fields), self.skipped if skipped is None else skipped)

    def options(self, model: LegoConfig) -> SamplingOptions:
        """The sampling options this setting stands for: its skip fractions as sigma windows."""
        sizes = [b.size for b in model.bricks]
        windows = [skip_window(sizes, k, f, model.edm) for k, f in enumerate(self.skipped, start=1) if f > 0]
        reuse = self.base.reuse_residual and bool(windows)  # with nothing skipped there is nothing to reuse
        return dataclasses.replace(self.base, skip=policy_spec(windows) or "none", reuse_residual=reuse)

    def label(self) -> str:
        b = self.base
        skip = "/".join(f"{f:.1f}" for f in self.skipped) if any(self.skipped) else "none"
        guided = f", cfg {b.guidance:g} at sigma {b.guidance_interval}" if b.guidance != 1.0 else ""
        extra = "".join(f", {k} {v}" for k, v in _variant_fields(b).items())
        reuse = ", reuse" if b.reuse_residual and any(self.skipped) else ""
        return f"{b.sampler} {b.steps} steps, skipped {skip}{reuse}{guided}{extra}"


_LABELLED = {"sampler", "steps", "skip", "reuse_residual", "guidance", "guidance_interval"}


def _variant_fields(options: SamplingOptions) -> dict:
    """Option fields other than those a label already shows, where they differ from the defaults."""
    default = SamplingOptions()
    return {
        f.name: getattr(options, f.name)
        for f in dataclasses.fields(options)
        if f.name not in _LABELLED and getattr(options, f.name) != getattr(default, f.name)
    }


def policy_spec(windows) -> str:
    """Windows in lego-run's --skip-policy syntax."""
    parts = []
    for w in windows:
        lo = f"{w.lo:.6g}" if w.lo > 0 else ""
        hi = f"{w.hi:.6g}" if np.isfinite(w.hi) else ""
        parts.append(f"{w.index}@{lo}:{hi}")
    return ",".join(parts)


@dataclass
class Trial:
    setting: Setting
    fid: float
    flops: float  # brick FLOPs per image, in full-chain evaluations
    images_per_s: float
    class_accuracy: float | None = None  # None: the feature extractor has no logits
    seed: int = 0
    images: int = 0


@dataclass(frozen=True)
class Space:
    """The settings the search may visit. variants: option fields every setting is also tried with
    (e.g. {"reuse_residual": True}, a guidance scale and interval, a brick-cache mode); the search
    treats them as opaque SamplingOptions fields."""

    samplers: tuple[str, ...] = ("dpm2m", "heun")
    steps: tuple[int, ...] = (4, 6, 8, 12, 16)  # the coarse grid; refinement visits the counts between
    skip_fractions: tuple[float, ...] = (0.3, 0.6)  # coarse skip windows per brick (none is always tried)
    variants: tuple[Mapping, ...] = ({},)
    refine_rounds: int = 2
    max_trials: int = 80  # settings sampled in full in the search, all stages together
    screen: int = 3  # each stage samples its settings on 1/screen of the images first (1: no screening)
    screen_margin: float = 0.2  # and drops those another beats by this much FID (module docstring)


@dataclass(frozen=True)
class Rules:
    """How the named points and the ladder are chosen from the validated frontier."""

    max_fid_increase: float = 0.05  # balanced: FID at most (1 + this) x best's
    max_accuracy_drop: float = 0.01  # balanced: class accuracy at most this below best's
    min_accuracy: float | None = None  # every named point and rung at least this
    rung_fid_ratio: float = 2.0  # fast and each rung: FID at most this x the one above's (a rung trades quality)
    rung_accuracy_drop: float = 0.03  # fast and each rung: class accuracy at most this below the one above's
    rungs: int = 3  # most rungs of the ladder


@dataclass
class Point:
    """A Pareto point of the search, measured on the search seeds and again on the validation seeds."""

    search: Trial
    validation: Trial

    @property
    def setting(self) -> Setting:
        return self.search.setting

    @property
    def flops(self) -> float:
        return self.validation.flops


@dataclass
class Frontier:
    """What the tuner found: every search trial, the Pareto set, its validated points, the named points."""

    searched: list[Trial] = field(default_factory=list)
    pareto: list[Trial] = field(default_factory=list)  # of the search, cheapest first
    points: list[Point] = field(default_factory=list)  # the validated Pareto points, cheapest first
    named: dict[str, Point] = field(default_factory=dict)
    reference: Trial | None = None  # measured on the validation seeds, for comparison only
    reference_flops: float = 0.0  # its brick FLOPs (from its plan), measured or not
    rejected: list[str] = field(default_factory=list)  # points that met a rule on one seed set only


def _accuracy(t: Trial) -> float:
    return -1.0 if t.class_accuracy is None else t.class_accuracy


def dominates(a: Trial, b: Trial) -> bool:
    """a is no worse than b on brick FLOPs, FID and class accuracy, and better on one."""
    no_worse = a.flops <= b.flops and a.fid <= b.fid and _accuracy(a) >= _accuracy(b)
    return no_worse and (a.flops < b.flops or a.fid < b.fid or _accuracy(a) > _accuracy(b))


def pareto(trials: Sequence[Trial]) -> list[Trial]:
    """The trials no other dominates, cheapest first."""
    return sorted((t for t in trials if not any(dominates(o, t) for o in trials)), key=lambda t: (t.flops, t.fid))


class FeatureNet:
    """An ONNX feature extractor (float32 N x C x H x W in [-1, 1] -> N x D), run by ONNX Runtime;
    with a second output named ``logits`` (N x classes) a classifier too."""

    def __init__(self, path: str | Path, image_shape: tuple[int, int, int], threads: int = 0):
        """image_shape: the model's C, H, W; a fixed input size of the extractor must match it."""
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise LegoError(f"--features {path}: no such file")
        if path.stat().st_size > MAX_FEATURE_FILE:
            raise LegoError(f"--features {path}: larger than {MAX_FEATURE_FILE >> 20} MB")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime raises its own types for files it cannot read
            raise LegoError(f"--features {path}: not an ONNX model ONNX Runtime can load ({str(e)[:200]})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise LegoError(f"--features {path}: expected one input of shape N x C x H x W")
        self.input = inputs[0].name
        fixed = inputs[0].shape[1:]  # ints where the graph fixes a size, names or None where it does not
        if any(isinstance(d, int) and d != want for d, want in zip(fixed, image_shape, strict=True)):
            shown = " x ".join(str(d) for d in fixed)
            raise LegoError(
                f"--features {path}: takes images of {shown}; the model makes {' x '.join(map(str, image_shape))}"
            )
        names = [o.name for o in self.session.get_outputs()]
        features = [n for n in names if n != "logits"]
        if len(names) > 2 or not features:
            raise LegoError(f"--features {path}: expected the outputs features and (optionally) logits, got {names}")
        self.outputs = [features[0], *(["logits"] if "logits" in names else [])]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run(images)[0]

    def run(self, images: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
        """Features (float64) and, from a classifier, logits of the images."""
        parts = []
        for i in range(0, len(images), chunk):
            batch = np.ascontiguousarray(images[i : i + chunk], np.float32)
            try:
                out = self.session.run(self.outputs, {self.input: batch})
            except Exception as e:  # ONNX Runtime's own types, e.g. reference images of another size
                reason = str(e).splitlines()[0][:200]
                raise LegoError(f"the feature extractor cannot take images of {images.shape[1:]}: {reason}") from None
            for name, array in zip(self.outputs, out, strict=True):
                if array.ndim != 2 or len(array) != len(batch) or array.shape[1] > MAX_FEATURE_DIM:
                    raise LegoError(f"the feature extractor's {name} have shape {array.shape}; expected N x D")
            parts.append(out)
        features, *logits = (np.concatenate(p).astype(np.float64) for p in zip(*parts, strict=True))
        if not (np.isfinite(features).all() and all(np.isfinite(a).all() for a in logits)):
            raise LegoError("the feature extractor returned NaN or infinity")
        return features, logits[0] if logits else None


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean over the classes asked for of the share of their images the classifier puts in them."""
    predicted = logits.argmax(1)
    return float(np.mean([(predicted[labels == k] == k).mean() for k in np.unique(labels)]))


def load_reference(path: str | Path, features: FeatureNet) -> FeatureStats:
    """Reference statistics from an .npz: either `mu` and `sigma` (as EDM's reference files), or
    `images` (uint8, N x H x W or N x H x W x C, or N x C x H x W) whose features are computed here."""
    path = Path(path)
    if not path.is_file():
        raise LegoError(f"--reference {path}: no such file")
    if path.stat().st_size > MAX_REFERENCE_FILE:
        raise LegoError(f"--reference {path}: larger than {MAX_REFERENCE_FILE >> 30} GB")
    try:
        with np.load(path, allow_pickle=False) as data:
            wanted = [k for k in data.files if k in ("mu", "sigma", "images")]
            # An .npz is a zip: a small file can hold a huge array. Its stated size is checked first.
            if any(data.zip.getinfo(f"{k}.npy").file_size > MAX_REFERENCE_FILE for k in wanted):
                raise LegoError(f"--reference {path}: an array larger than {MAX_REFERENCE_FILE >> 30} GB")
            arrays = {k: data[k] for k in wanted}
    except LegoError:
        raise
    except (OSError, ValueError) as e:
        raise LegoError(f"--reference {path}: not a readable .npz ({e})") from None
    if "images" in arrays:
        images = arrays["images"]
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) < 2:
            raise LegoError(f"--reference {path}: images must be uint8, N x H x W (x C), at least 2")
        if images.ndim == 3:
            images = images[:, None]
        elif images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
            images = images.transpose(0, 3, 1, 2)
        return FeatureStats.of(features(images.astype(np.float32) / 127.5 - 1))
    if "mu" not in arrays or "sigma" not in arrays:
        raise LegoError(f"--reference {path}: expected arrays mu and sigma, or images")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise LegoError(f"--reference {path}: mu must be D and sigma D x D, finite (got {mu.shape}, {sigma.shape})")
    return FeatureStats(mu, sigma)


def parse_settings(text: str) -> list[tuple[str, int]]:
    """'dpm2m:12,heun:18' -> [(sampler, steps), ...]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        sampler, _, steps = part.partition(":")
        if sampler not in SAMPLERS or not steps.isdigit() or not 1 <= int(steps) <= 1000:
            raise LegoError(f"cannot read {part!r}: write SAMPLER:STEPS with a sampler of {', '.join(SAMPLERS)}")
        out.append((sampler, int(steps)))
    if not out:
        raise LegoError("no sampler:steps given")
    return out


def parse_list(text: str, flag: str, kind: type, lo: float, hi: float) -> tuple:
    """'4,6,8' -> (4, 6, 8), every value of kind and in [lo, hi]; LegoError naming the flag."""
    values = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            value = kind(part)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise LegoError(f"{flag}: cannot read {part!r}; expected numbers from {lo:g} to {hi:g}, comma-separated")
        values.append(value)
    if not values:
        raise LegoError(f"{flag}: no value given")
    return tuple(sorted(set(values)))


def parse_samplers(text: str) -> tuple[str, ...]:
    """'dpm2m,heun' -> ('dpm2m', 'heun')."""
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [n for n in names if n not in SAMPLERS]
    if bad or not names:
        raise LegoError(f"--samplers: {bad[0] if bad else text!r} is not a sampler; choose from {', '.join(SAMPLERS)}")
    return names


class Tuner:
    """Runs trials (sample, featurise, FID and class accuracy) on fixed seeds and classes, and maps the frontier."""

    def __init__(
        self,
        pipe: LegoPipeline,
        features: FeatureNet,
        reference: FeatureStats,
        *,
        num: int,
        batch: int = 64,
        seed: int = 0,
        log: Callable[[str], None] = lambda _m: None,
    ):
        feats, logits = features.run(np.zeros((2, pipe.channels, pipe.resolution, pipe.resolution)))
        if len(reference.mu) != feats.shape[1]:
            raise LegoError("the reference statistics and the feature extractor have different feature sizes")
        classes = pipe.cfg.num_classes
        if logits is not None and classes and logits.shape[1] != classes:
            raise LegoError(f"the feature extractor scores {logits.shape[1]} classes; the model has {classes}")
        self.pipe, self.features, self.reference = pipe, features, reference
        self.classify = logits is not None and bool(classes)  # class accuracy needs labels to compare with
        self.model = pipe.cfg
        self.flops = model_brick_flops(self.model)
        self.num, self.batch, self.seed, self.log = num, batch, seed, log

    # -- one measurement ------------------------------------------------------------------------

    def trial(self, setting: Setting, seed: int | None = None, num: int | None = None) -> Trial:
        """Sample num images (default: the search's) of setting on seed and score them."""
        seed = self.seed if seed is None else seed
        num = num or self.num
        start = time.perf_counter()
        result = self.pipe(setting.options(self.model), num=num, batch=self.batch, seed=seed)
        seconds = time.perf_counter() - start
        features, logits = self.features.run(result.images)
        score = frechet_distance(FeatureStats.of(features), self.reference)
        accuracy = class_accuracy(logits, result.labels) if self.classify else None
        # measured, not planned: a brick cache may decide per image what runs
        flops = evaluations(setting.base.sampler, setting.base.steps) * (1.0 - result.timing.flops_saved)
        return Trial(setting, score, flops, num / seconds, accuracy, seed, num)

    def planned_flops(self, setting: Setting) -> float:
        """Brick FLOPs per image (full-chain evaluations) from the plan alone, without sampling."""
        canvas = (self.model.img_resolution, self.model.img_resolution)
        saved = flop_fraction_saved(plan(setting.options(self.model), self.model, canvas), self.flops)
        return evaluations(setting.base.sampler, setting.base.steps) * (1.0 - saved)

    def key(self, setting: Setting) -> tuple:
        """Settings with the same key sample the same images: the options but for how the skip windows
        and guidance interval are written, and the plan (bricks run and guidance, per step)."""
        canvas = (self.model.img_resolution, self.model.img_resolution)
        options = setting.options(self.model)
        steps = tuple((p.bricks, p.guided) for p in plan(options, self.model, canvas))
        guidance = options.guidance if any(guided for _, guided in steps) else 1.0
        return dataclasses.replace(options, skip="none", guidance=guidance, guidance_interval=None), steps

    # -- the search ------------------------------------------------------------------------------

    def search(self, space: Space, rules: Rules) -> Frontier:
        """Steps 1-3 of the module's docstring, on the search seeds."""
        frontier = Frontier()
        measured: dict[tuple, Trial | None] = {}  # None: screened out
        skippable = len(self.model.bricks) - 1

        def measure(settings: list[Setting], stage: str, cheapest_first: bool = True) -> None:
            fresh = {}
            for s in settings:
                k = self.key(s)
                if k not in measured and k not in fresh:
                    fresh[k] = s
            room = space.max_trials - len(frontier.searched)
            if len(fresh) > room:
                self.log(f"{stage}: {len(fresh)} settings, {room} left of --max-trials; the cheapest are sampled")
            todo = list(fresh.items())
            if cheapest_first:
                todo.sort(key=lambda kv: self.planned_flops(kv[1]))
            if space.screen > 1 and len(todo) > 2 and room > 0:  # at most twice as many screened as there is room for
                todo = self._screen(todo[: 2 * max(room, 0)], space, measured, stage)
            todo = todo[: max(room, 0)]
            if todo:
                self.log(f"{stage}: {len(todo)} settings on seed {self.seed}, {self.num} images each")
            for k, s in todo:
                t = measured[k] = self.trial(s)
                frontier.searched.append(t)
                self.log(f"  {s.label()}: {_scores(t)}, {t.flops:.2f} full-chain evaluations/image")

        zeros = (0.0,) * skippable
        variants = [dict(v) for v in space.variants] or [{}]
        chains = [
            Setting(SamplingOptions(sampler, steps, **variant), zeros)
            for sampler in space.samplers
            for steps in space.steps
            for variant in variants
        ]
        measure(chains, "coarse: full chains")
        if skippable:
            grid = [f for f in itertools.product((0.0, *space.skip_fractions), repeat=skippable) if any(f)]
            heads = {(t.setting.base.sampler, t.setting.base.steps) for t in pareto(frontier.searched)}
            skips = [
                Setting(SamplingOptions(sampler, steps, **variant), fractions)
                for sampler, steps in sorted(heads)
                for variant in variants
                for fractions in grid
            ]
            measure(skips, "coarse: skip windows of the Pareto chains")
        for round_ in range(space.refine_rounds):
            before = {id(t) for t in pareto(frontier.searched)}
            # round-robin over the Pareto points, so that a trial cap leaves no end of the frontier unrefined
            moves = [neighbours(t.setting, space, variants) for t in pareto(frontier.searched)]
            near = [n for group in itertools.zip_longest(*moves) for n in group if n is not None]
            measure(near, f"refine {round_ + 1}: neighbours of the Pareto points", cheapest_first=False)
            if {id(t) for t in pareto(frontier.searched)} == before:
                break
        frontier.pareto = pareto(frontier.searched)
        self.log(f"search: {len(frontier.searched)} settings sampled, {len(frontier.pareto)} on the Pareto set")
        if rules.min_accuracy is not None and self.classify:
            top = max(frontier.searched, key=_accuracy)
            if _accuracy(top) < rules.min_accuracy:
                raise ValidationFailed(
                    f"no setting searched reaches the class accuracy budget {rules.min_accuracy:.3f} (--min-accuracy) "
                    f"on the search seeds: the most accurate, {top.setting.label()}, has "
                    f"{top.class_accuracy:.3f}, {rules.min_accuracy - top.class_accuracy:.3f} below it"
                )
        return frontier

    def _screen(self, todo: list, space: Space, measured: dict, stage: str) -> list:
        """Successive halving: every setting on 1/screen of the search images (the first of the same
        seeds); a setting another of them beats (no more brick FLOPs, class accuracy at most 0.01
        lower, FID lower by more than screen_margin) is dropped before its full trial. Only settings
        screened together are compared: FID's bias depends on the number of images."""
        num = max(self.num // space.screen, 2)
        self.log(f"{stage}: screening {len(todo)} settings on {num} images each")
        quick = [(k, s, self.trial(s, num=num)) for k, s in todo]
        kept = []
        for k, s, t in quick:
            beaten = next((o for _, _, o in quick if _screens_out(o, t, space.screen_margin)), None)
            if beaten is None:
                kept.append((k, s))
                continue
            measured[k] = None
            self.log(f"  screened out: {s.label()}: {_scores(t)}; {beaten.setting.label()}: {_scores(beaten)}")
        return kept

    def validate(self, frontier: Frontier, rules: Rules, seed: int, num: int, most: int) -> None:
        """Step 4: measure up to `most` Pareto points on unseen seeds and choose the named points."""
        chosen = spread_frontier(frontier.pareto, most)
        self.log(f"validation: {len(chosen)} Pareto points on seed {seed}, {num} images each")
        frontier.points = []
        for t in chosen:
            v = self.trial(t.setting, seed, num)
            frontier.points.append(Point(t, v))
            self.log(f"  {t.setting.label()}: {_scores(v)} (search: {_scores(t)})")
        frontier.named = name_points(frontier.points, rules, self.classify, frontier.rejected)
        for line in frontier.rejected:
            self.log(f"  {line}")

    def measure_reference(self, frontier: Frontier, reference: Setting, seed: int, num: int, sample: bool) -> None:
        """The reference setting's brick FLOPs (from its plan) and, when sample, its scores on the validation seeds."""
        frontier.reference_flops = self.planned_flops(reference)
        if sample:
            frontier.reference = self.trial(reference, seed, num)
            self.log(f"reference {reference.label()} on seed {seed}: {_scores(frontier.reference)}")


def _screens_out(a: Trial, b: Trial, margin: float) -> bool:
    """a beats b clearly enough to skip b's full trial: no more FLOPs, FID lower by the margin, class
    accuracy at most 0.01 lower."""
    return a.flops <= b.flops and a.fid * (1.0 + margin) < b.fid and _accuracy(a) >= _accuracy(b) - 0.01


def neighbours(setting: Setting, space: Space, variants: list[dict]) -> list[Setting]:
    """The settings one move away: a step more or fewer (within the grid's range), one brick's skip
    window a notch wider or narrower, another variant, another sampler."""
    b, out = setting.base, []
    for steps in (b.steps - 1, b.steps + 1):
        if min(space.steps) <= steps <= max(space.steps):
            out.append(setting.but(steps=steps))
    for k, f in enumerate(setting.skipped):
        for moved in (round(f - NOTCH, 6), round(f + NOTCH, 6)):
            if 0.0 <= moved <= 1.0:
                out.append(setting.but(tuple(moved if i == k else g for i, g in enumerate(setting.skipped))))
    keys = {name for v in variants for name in v}
    plain = {name: getattr(SamplingOptions(), name) for name in keys}
    out += [setting.but(**{**plain, **v}) for v in variants]
    out += [setting.but(sampler=s) for s in space.samplers if s != b.sampler]
    return out


def spread_frontier(points: list[Trial], most: int) -> list[Trial]:
    """At most `most` (at least 3) of the Pareto points (cheapest first), evenly over the list, always
    with its cheapest and its lowest-FID point (the ends of the frontier the named points come from)."""
    if len(points) <= most:
        return list(points)
    last = len(points) - 1
    keep = {0, last, min(range(len(points)), key=lambda i: points[i].fid)}
    for i in range(most):
        if len(keep) >= most:
            break
        keep.add(round(i * last / (most - 1)))
    return [points[i] for i in sorted(keep)]


def _within(p: Point, top: Point, fid_ratio: float, drop: float) -> str | None:
    """None when p meets the rule against top on both seed sets; else which check failed, by how much."""
    for name, t, ref in (("search", p.search, top.search), ("validation", p.validation, top.validation)):
        if t.fid > fid_ratio * ref.fid:
            return (
                f"FID {t.fid:.3f} on the {name} seeds, {t.fid / ref.fid - 1:.1%} above {ref.fid:.3f} "
                f"(budget {fid_ratio - 1:.1%})"
            )
        if t.class_accuracy is not None and t.class_accuracy < ref.class_accuracy - drop:
            budget = ref.class_accuracy - drop
            return (
                f"class accuracy {t.class_accuracy:.3f} on the {name} seeds, {budget - t.class_accuracy:.3f} "
                f"below the budget {budget:.3f}"
            )
    return None


def _floor_failure(p: Point, floor: float) -> str | None:
    for name, t in (("search", p.search), ("validation", p.validation)):
        if t.class_accuracy is not None and t.class_accuracy < floor:
            return (
                f"class accuracy {t.class_accuracy:.3f} on the {name} seeds, {floor - t.class_accuracy:.3f} "
                f"below the budget {floor:.3f} (--min-accuracy)"
            )
    return None


def name_points(points: list[Point], rules: Rules, classify: bool, notes: list[str] | None = None) -> dict[str, Point]:
    """best, balanced and fast (module docstring, step 4) among validated points; each meets its rule
    on both seed sets. ValidationFailed when none meets the accuracy floor."""
    notes = [] if notes is None else notes
    eligible = points
    if rules.min_accuracy is not None and classify:
        eligible = [p for p in points if _floor_failure(p, rules.min_accuracy) is None]
        if not eligible:
            closest = max(points, key=lambda p: min(_accuracy(p.search), _accuracy(p.validation)))
            raise ValidationFailed(
                f"validation failed: {_floor_failure(closest, rules.min_accuracy)}, for the most accurate "
                f"setting validated ({closest.setting.label()}); nothing written"
            )
    best = min(eligible, key=lambda p: (p.validation.fid, p.flops))

    def cheapest(top: Point, ratio: float, name: str, drop: float = rules.max_accuracy_drop) -> Point:
        fitting = []
        for p in sorted(eligible, key=lambda p: (p.flops, p.validation.fid)):
            failed = _within(p, top, ratio, drop)
            if failed is None:
                fitting.append(p)
            elif p.flops < top.flops and not fitting:
                notes.append(f"not {name}: {p.setting.label()}: {failed}")
        return fitting[0]  # top itself always fits

    balanced = cheapest(best, 1.0 + rules.max_fid_increase, "balanced")
    fast = cheapest(balanced, rules.rung_fid_ratio, "fast", rules.rung_accuracy_drop)
    return {"best": best, "balanced": balanced, "fast": fast}


def ladder_points(frontier: Frontier, top: Point, rules: Rules) -> list[Point]:
    """Step 5: validated points cheaper than top within the rung rule on both seed sets (and the accuracy
    floor), none beaten on validated FID by a cheaper one, most expensive first, at most rules.rungs."""
    ok = [
        p
        for p in frontier.points
        if p.flops < top.flops
        and _within(p, top, rules.rung_fid_ratio, rules.rung_accuracy_drop) is None
        and (rules.min_accuracy is None or _floor_failure(p, rules.min_accuracy) is None)
    ]
    kept = [p for p in ok if not any(c.flops < p.flops and c.validation.fid <= p.validation.fid for c in ok)]
    return spread(sorted(kept, key=lambda p: -p.flops), rules.rungs)


def spread(rungs: list, most: int) -> list:
    """At most `most` of the rungs (most expensive first), evenly over the list and always with its
    cheapest: the first `most` alone would keep the mildest rungs and drop the one that sheds the
    most work, which is the rung a server needs most under overload."""
    if len(rungs) <= most:
        return rungs
    if most <= 1:
        return rungs[-1:] if most == 1 else []
    last = len(rungs) - 1
    return [rungs[round(i * last / (most - 1))] for i in range(most)]


def _scores(trial: Trial) -> str:
    accuracy = "" if trial.class_accuracy is None else f", class accuracy {trial.class_accuracy:.3f}"
    return f"FID {trial.fid:.3f}{accuracy}"


def point_measured(p: Point, reference_flops: float) -> dict:
    """What a named point or rung records: its validated scores, its search scores, its cost."""
    v, s = p.validation, p.search
    return {
        "fid": v.fid,
        "class_accuracy": v.class_accuracy,
        "full_chain_evaluations": v.flops,
        "brick_flops_vs_reference": v.flops / reference_flops if reference_flops else None,
        "images": v.images,
        "seed": v.seed,
        "images_per_s": v.images_per_s,
        "search": {"fid": s.fid, "class_accuracy": s.class_accuracy, "images": s.images, "seed": s.seed},
    }


def frontier_rows(frontier: Frontier, model: LegoConfig) -> list[dict]:
    """The validated frontier for people (the manifest's measured.frontier, the command's table)."""
    names = {id(p): [n for n in NAMES if frontier.named.get(n) is p] for p in frontier.points}
    return [
        {
            "setting": p.setting.options(model).describe(),
            "names": names[id(p)],
            "full_chain_evaluations": p.flops,
            "fid": p.validation.fid,
            "class_accuracy": p.validation.class_accuracy,
            "search_fid": p.search.fid,
            "search_class_accuracy": p.search.class_accuracy,
        }
        for p in frontier.points
    ]


def recommendation(
    frontier: Frontier, model: LegoConfig, checkpoint_sha256: str, rules: Rules, recommend: str, measured: dict
) -> Recommended:
    """The named points, the recommended one (balanced unless the author picks another) and the ladder below it."""
    top = frontier.named[recommend]
    ref = frontier.reference_flops
    best = frontier.named["best"]
    budget = (
        rules.rung_fid_ratio * frontier.named["balanced"].validation.fid
        if recommend == "fast"
        else (1.0 + rules.max_fid_increase) * best.validation.fid
    )
    reference = {}
    if frontier.reference is not None:
        r = frontier.reference
        reference = {"reference": {"setting": r.setting.label(), "fid": r.fid, "class_accuracy": r.class_accuracy}}
    return Recommended(
        options=top.setting.options(model),
        checkpoint_sha256=checkpoint_sha256,
        measured={
            **point_measured(top, ref),
            "name": recommend,
            "budget": budget,
            "rules": dataclasses.asdict(rules),
            **reference,
            "speedup_in_flops": ref / top.flops if ref else None,
            "trials": len(frontier.searched),
            "validation": {"seed": top.validation.seed, "images": top.validation.images, "in_budget": True},
            "frontier": frontier_rows(frontier, model),
            **measured,
        },
        ladder=[Rung(p.setting.options(model), point_measured(p, ref)) for p in ladder_points(frontier, top, rules)],
        points={n: Rung(p.setting.options(model), point_measured(p, ref)) for n, p in frontier.named.items()},
    )
