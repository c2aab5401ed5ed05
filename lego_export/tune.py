"""Choose a model's recommended sampling setting, the fewest brick FLOPs whose FID (and class
accuracy) stays in budget, and the quality ladder of cheaper settings below it.

The search, on a fixed set of seeds and classes (every trial sees the same noise):

1. The reference setting (default Heun, 50 steps, full chain) sets the budget:
   FID <= FID_reference * (1 + max_fid_increase), and, where the feature extractor is a classifier
   too, class accuracy >= accuracy_reference - max_accuracy_drop (FID alone can let a skip setting
   lose two points of class accuracy), and >= min_accuracy where one is given.
2. For each candidate sampler and step count (unless even brick 0 alone at every step would cost
   more than the best setting found so far): the full chain, then per-brick skip windows found
   greedily. Each round tries widening each brick's skipped stretch of the trajectory by one notch
   (a tenth of it) and keeps the move that saves the most brick FLOPs while staying in budget; the
   search stops when no move does. Global bricks (tiles no smaller than brick 0's) are skipped at
   low noise, local ones at high noise, as in the LEGO paper (plan.skip_window). With a guidance
   scale to search (--guidance), the candidate is then tried guided at one step, each step in turn
   (a guided step costs twice), from its cheapest setting in budget or else its full chain; the
   best of those in budget is widened again. Guiding one step can bring a cheap step count back
   within the budget: it raises class accuracy more than any skip window lowers it.
3. The winner is the trial in budget with the fewest brick FLOPs per image (counted, so it does not
   drift with the machine as wall time does).
4. The winner and the reference are measured again on a second, disjoint set of seeds; those FIDs
   are the ones recorded, so the recorded numbers are not the ones the choice was fitted to.
5. The ladder: the winner with fewer steps and, if it guides, without its guidance, and the
   search's cheaper trials near its FID, measured with the winner on a third set of seeds; those
   within the rung rule (FID at most a ratio of the winner's, class accuracy at most
   max_accuracy_drop below it) and not beaten on FID by a cheaper one become the rungs lego-serve steps
   down under load (where more qualify than are asked for: evenly from the mildest to the cheapest).

FID is measured in the feature space of an ONNX feature extractor the user provides (images in, one
feature vector per image out; optionally a second output `logits`, one score per class) against
reference statistics (mean and covariance of the real data's features), as EDM's and pytorch-fid's
reference files are. No PyTorch needed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
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
from lego_export.plan import plan, skip_window
from lego_export.runtime.pipeline import LegoPipeline

NOTCH = 0.1  # the search moves a brick's skip window by this fraction of the trajectory
MAX_FEATURE_FILE = 512 << 20
MAX_REFERENCE_FILE = 1 << 30
MAX_FEATURE_DIM = 8192


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
        return f"{b.sampler} {b.steps} steps, skipped {skip}{', reuse' if b.reuse_residual else ''}{guided}"


def one_step_interval(sigmas, step: int) -> str:
    """A guidance interval ("lo:hi") holding exactly one step's sigma: its bounds are the geometric
    means with the neighbouring steps' sigmas (open at the ends of the schedule)."""
    steps = len(sigmas) - 1  # the schedule ends with sigma 0
    lo = f"{np.sqrt(sigmas[step] * sigmas[step + 1]):.6g}" if step + 1 < steps else ""
    hi = f"{np.sqrt(sigmas[step - 1] * sigmas[step]):.6g}" if step > 0 else ""
    return f"{lo}:{hi}"


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
    in_budget: bool = False
    class_accuracy: float | None = None  # None: the feature extractor has no logits


@dataclass
class TuneResult:
    reference: Trial
    budget: float
    max_accuracy_drop: float = 0.01  # class accuracy at most this far below the reference's
    accuracy_floor: float | None = None  # and at least this (--min-accuracy)
    trials: list[Trial] = field(default_factory=list)  # every setting sampled, in order
    by_plan: dict = field(default_factory=dict)  # (sampler, steps, reuse, plan) -> its trial
    winner: Trial | None = None
    validation: dict = field(default_factory=dict)

    @property
    def min_accuracy(self) -> float | None:
        ref = self.reference.class_accuracy
        if ref is None:
            return None
        floor = ref - self.max_accuracy_drop
        return floor if self.accuracy_floor is None else max(floor, self.accuracy_floor)

    def admits(self, fid: float, accuracy: float | None) -> bool:
        """Within the budget: FID, and class accuracy where it is measured."""
        return fid <= self.budget and (self.min_accuracy is None or accuracy >= self.min_accuracy)


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


class Tuner:
    """Runs trials (sample, featurise, FID and class accuracy) on one fixed set of seeds and classes."""

    def __init__(
        self,
        pipe: LegoPipeline,
        features: FeatureNet,
        reference: FeatureStats,
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
        self.num, self.batch, self.seed, self.log = num, batch, seed, log

    def trial(self, setting: Setting, seed: int | None = None) -> Trial:
        start = time.perf_counter()
        options = setting.options(self.model)
        result = self.pipe(options, num=self.num, batch=self.batch, seed=self.seed if seed is None else seed)
        seconds = time.perf_counter() - start
        features, logits = self.features.run(result.images)
        score = frechet_distance(FeatureStats.of(features), self.reference)
        accuracy = class_accuracy(logits, result.labels) if self.classify else None
        flops = evaluations(setting.base.sampler, setting.base.steps) * (1.0 - result.timing.flops_saved)
        return Trial(setting, score, flops, self.num / seconds, class_accuracy=accuracy)

    def run(
        self,
        reference: Setting,
        candidates: list[tuple[str, int]],
        max_fid_increase: float,
        reuse: bool,
        max_accuracy_drop: float = 0.01,
        min_accuracy: float | None = None,
        guidance: float = 1.0,
    ) -> TuneResult:
        """The search (the module's docstring, steps 1-3). guidance: other than 1, each candidate is
        also tried guided at one step, each step in turn, from its cheapest setting in budget (else
        its full chain), and the best guided one in budget has its skip windows widened again."""
        ref = self.trial(reference)
        result = TuneResult(ref, ref.fid * (1.0 + max_fid_increase), max_accuracy_drop, min_accuracy)
        ref.in_budget = True
        floor = "" if result.min_accuracy is None else f", class accuracy at least {result.min_accuracy:.3f}"
        self.log(f"reference {reference.label()}: {_scores(ref)}; budget: FID at most {result.budget:.3f}{floor}")
        skippable = len(self.model.bricks) - 1
        flops = model_brick_flops(self.model)
        brick0_share = flops[0] / sum(flops)
        for sampler, steps in candidates:
            # Even brick 0 alone at every step would cost no less than the best setting found: skip it.
            best = min(t.flops for t in [ref, *result.trials] if t.in_budget)
            if evaluations(sampler, steps) * brick0_share >= best:
                self.log(f"  {sampler} {steps} steps: cannot beat {best:.1f} full-chain evaluations/image; not tried")
                continue
            full = self._measure(result, Setting(SamplingOptions(sampler, steps), (0.0,) * skippable))
            cheapest = self._widen(result, full, reuse)
            if guidance != 1.0:
                start = (cheapest or full).setting
                sigmas = self.model.edm.sigmas(steps)
                guided = [
                    self._measure(result, start.but(guidance=guidance, guidance_interval=one_step_interval(sigmas, i)))
                    for i in range(steps)
                ]
                self._widen(result, cheapest_in_budget(guided), reuse)
        result.winner = cheapest_in_budget([ref, *result.trials])
        return result

    def _widen(self, result: TuneResult, current: Trial | None, reuse: bool) -> Trial | None:
        """Greedy skip windows from a trial (the module's docstring, step 2): the cheapest trial in
        budget on the way, or None if the first is not (or is None)."""
        best = None
        while current is not None and current.in_budget:
            best = current
            moves, current_plan = [], self._plan(current.setting)
            for k in range(len(current.setting.skipped)):
                skipped = list(current.setting.skipped)
                skipped[k] = round(skipped[k] + NOTCH, 6)
                move = current.setting.but(tuple(skipped), reuse_residual=reuse)
                # A brick skipped inside a stretch where an earlier one already is changes nothing
                # (a step runs a prefix of the chain): widen it without a trial.
                while skipped[k] <= 1.0 and self._plan(move) == current_plan:
                    skipped[k] = round(skipped[k] + NOTCH, 6)
                    move = move.but(tuple(skipped))
                if skipped[k] <= 1.0:
                    moves.append(self._measure(result, move))
            current = cheapest_in_budget(moves)
        return best

    def _plan(self, setting: Setting) -> tuple[tuple[int, bool], ...]:
        """Bricks run at each step, and whether it is guided: two settings with the same plan (and
        guidance scale) sample the same images."""
        canvas = (self.model.img_resolution, self.model.img_resolution)
        return tuple((p.bricks, p.guided) for p in plan(setting.options(self.model), self.model, canvas))

    def _unguided_if_idle(self, setting: Setting) -> Setting:
        """The setting without guidance when its interval holds no step of its schedule (the winner
        with fewer steps, say): it guides nothing, and a rung should not say it does."""
        if setting.base.guidance != 1.0 and not any(guided for _, guided in self._plan(setting)):
            return setting.but(guidance=1.0, guidance_interval=None)
        return setting

    def _key(self, setting: Setting) -> tuple:
        """Settings with the same key sample the same images (a guidance interval that holds no step
        of the schedule is no guidance)."""
        steps = self._plan(setting)
        b = setting.base
        guidance = b.guidance if any(guided for _, guided in steps) else 1.0
        return b.sampler, b.steps, b.reuse_residual, guidance, steps

    def _measure(self, result: TuneResult, setting: Setting) -> Trial:
        """A trial of setting, or the earlier trial of the same plan (a move can reach a plan an
        earlier round already sampled)."""
        key = self._key(setting)
        earlier = result.by_plan.get(key)
        if earlier is not None:
            return dataclasses.replace(earlier, setting=setting)
        result.by_plan[key] = self._keep(result, self.trial(setting))
        return result.by_plan[key]

    def _keep(self, result: TuneResult, trial: Trial) -> Trial:
        trial.in_budget = result.admits(trial.fid, trial.class_accuracy)
        result.trials.append(trial)
        verdict = "in budget" if trial.in_budget else "over budget"
        self.log(
            f"  {trial.setting.label()}: {_scores(trial)} ({verdict}), "
            f"{trial.flops:.1f} full-chain evaluations/image, {trial.images_per_s:.1f} images/s"
        )
        return trial

    def validate(self, result: TuneResult, seed: int) -> None:
        """Measure the winner and the reference again on seeds the search never saw."""
        ref, win = self.trial(result.reference.setting, seed), self.trial(result.winner.setting, seed)
        in_budget = win.fid <= ref.fid * result.budget / result.reference.fid
        if ref.class_accuracy is not None:
            in_budget &= win.class_accuracy >= ref.class_accuracy - result.max_accuracy_drop
            in_budget &= result.accuracy_floor is None or win.class_accuracy >= result.accuracy_floor
        result.validation = {
            "seed": seed,
            "reference_fid": ref.fid,
            "fid": win.fid,
            "fid_vs_reference": win.fid / ref.fid,
            "reference_images_per_s": ref.images_per_s,
            "images_per_s": win.images_per_s,
            "in_budget": bool(in_budget),
        }
        if ref.class_accuracy is not None:
            result.validation.update(reference_class_accuracy=ref.class_accuracy, class_accuracy=win.class_accuracy)
        verdict = "within" if in_budget else "OVER (the choice may be fitted to the seeds: try more --num)"
        self.log(
            f"validation on seed {seed}: {_scores(win)} vs reference {_scores(ref)} "
            f"(FID {win.fid / ref.fid:.3f}x), {verdict} the budget"
        )

    def ladder(self, result: TuneResult, seed: int, most: int, max_fid_ratio: float) -> list[Rung]:
        """Up to `most` rungs below the winner, measured with it on seeds neither the search nor the
        validation saw (see the module's docstring, step 5)."""
        win = result.winner
        bases = [win.setting]
        if win.setting.base.guidance != 1.0:  # guidance is a cost like any other: the winner without it
            bases.append(win.setting.but(guidance=1.0, guidance_interval=None))
        candidates = [b.but(steps=b.base.steps - k) for b in bases for k in (0, 1, 2, 3)]
        near = [t for t in result.trials if t.flops < win.flops and t.fid <= max_fid_ratio * win.fid]
        candidates += [t.setting for t in sorted(near, key=lambda t: -t.flops)]
        seen, unique = {self._key(win.setting)}, []
        for setting in candidates:
            if setting.base.steps >= 1 and self._key(setting) not in seen and len(unique) < 2 * most:
                seen.add(self._key(setting))
                unique.append(self._unguided_if_idle(setting))
        if not unique:  # also when most is 0
            return []
        self.log(f"ladder: {len(unique)} cheaper settings measured with the winner on seed {seed}")
        top, *trials = (self.trial(s, seed) for s in [win.setting, *unique])
        for t in trials:
            self.log(f"  {t.setting.label()}: {_scores(t)}, {t.flops:.1f} full-chain evaluations/image")
        rungs = spread(select_rungs(top, trials, max_fid_ratio, result.max_accuracy_drop), most)
        self.log(f"ladder: {len(rungs)} rungs, {', '.join(t.setting.label() for t in rungs) or 'none within the rule'}")
        measured = {"images": self.num, "seed": seed, "top_fid": top.fid, "top_class_accuracy": top.class_accuracy}
        return [
            Rung(
                t.setting.options(self.model),
                {
                    "fid": t.fid,
                    "class_accuracy": t.class_accuracy,
                    "brick_flops_vs_reference": t.flops / result.reference.flops,
                    **measured,
                },
            )
            for t in rungs
        ]


def cheapest_in_budget(trials: list[Trial]) -> Trial | None:
    """The trial in budget with the fewest brick FLOPs (then the lowest FID); None if none is."""
    fitting = [t for t in trials if t.in_budget]
    return min(fitting, key=lambda t: (t.flops, t.fid)) if fitting else None


def select_rungs(top: Trial, trials: list[Trial], max_fid_ratio: float, max_accuracy_drop: float) -> list[Trial]:
    """The trials that become rungs, most expensive first: cheaper than the top, FID at most
    max_fid_ratio times the top's, class accuracy at most max_accuracy_drop below it, and none
    beaten by a cheaper one on FID. Accuracy is a floor, not a rank: a rung kept for a little more
    accuracy than a cheaper one with a lower FID would make the ladder's FID rise and fall as a
    server steps down it."""

    def accuracy(t: Trial) -> float:
        return 0.0 if t.class_accuracy is None else t.class_accuracy

    ok = [
        t
        for t in trials
        if t.flops < top.flops and t.fid <= max_fid_ratio * top.fid and accuracy(t) >= accuracy(top) - max_accuracy_drop
    ]
    return sorted((t for t in ok if not any(c.flops < t.flops and c.fid <= t.fid for c in ok)), key=lambda t: -t.flops)


def spread(rungs: list[Trial], most: int) -> list[Trial]:
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


def recommendation(
    result: TuneResult, pipe: LegoPipeline, checkpoint_sha256: str, measured: dict, ladder: list[Rung] | None = None
) -> Recommended:
    """The winner as the manifest's recommended setting (and its ladder), with what was measured."""
    win, ref = result.winner, result.reference
    accuracy = {}
    if ref.class_accuracy is not None:
        accuracy = {"class_accuracy": win.class_accuracy, "max_accuracy_drop": result.max_accuracy_drop}
        if result.accuracy_floor is not None:
            accuracy["min_accuracy"] = result.accuracy_floor
    return Recommended(
        options=win.setting.options(pipe.cfg),
        checkpoint_sha256=checkpoint_sha256,
        measured={
            "fid": win.fid,
            **accuracy,
            "reference": {"setting": ref.setting.label(), "fid": ref.fid, "class_accuracy": ref.class_accuracy},
            "budget": result.budget,
            "brick_flops_vs_reference": win.flops / ref.flops,
            "speedup_in_flops": ref.flops / win.flops,
            "images_per_s": win.images_per_s,
            "reference_images_per_s": ref.images_per_s,
            "trials": len(result.trials) + 1,
            "validation": result.validation,
            **measured,
        },
        ladder=list(ladder or []),
    )
