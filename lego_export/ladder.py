"""The quality ladder a server steps down under load: the tuner's, or one derived from the model.

``lego-export tune`` measures a ladder (manifest.Recommended: the recommended setting, then cheaper
validated points). A model nobody tuned still has cheaper variants of itself, and the LEGO design
says which: its last brick skipped over part of the trajectory (the global brick at low noise in a
PG stack, the local one at high noise in a PR stack: ``skip="late"``, windows.late_brick_policy),
with the skipped brick's last correction added back; DPM-Solver++(2M), which needs one evaluation
per step where Heun needs two, at the same steps; then fewer steps. :func:`serving_ladder` builds
that default ladder from the model's defaults, marked untuned, unless the manifest has the tuner's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lego_export.config import LegoConfig
from lego_export.edm import evaluations
from lego_export.flops import model_brick_flops
from lego_export.manifest import Manifest
from lego_export.options import SamplingOptions
from lego_export.plan import flop_fraction_saved, plan

# The default ladder below the model's default setting (Heun 50, full chain): (sampler, steps,
# fraction of the trajectory without the last brick). Skipping the global brick for the last 30%
# of a PG model's steps scored better than the full chain in the LEGO paper (ImageNet 256), 40-50%
# cost up to 1 FID there; DPM-Solver++(2M) is close to converged at 25 steps and usable at 8.
DEFAULT_RUNGS = (
    ("heun", 50, 0.3),
    ("dpm2m", 50, 0.3),
    ("dpm2m", 25, 0.3),
    ("dpm2m", 12, 0.4),
    ("dpm2m", 8, 0.5),
)


@dataclass(frozen=True)
class Ladder:
    """Settings from the top (rung 0: what a request with no sampling option gets) to the cheapest.
    tuned: written by lego-export tune (measured); else derived from the model (DEFAULT_RUNGS)."""

    rungs: tuple[SamplingOptions, ...]
    tuned: bool
    measured: tuple[dict, ...] = ()  # per rung from the top, what the tuner measured (FID, accuracy)


def serving_ladder(manifest: Manifest) -> Ladder:
    """The tuner's ladder when the manifest has one, else the default ladder of this model."""
    recommended = manifest.recommended
    if recommended is not None and recommended.ladder:
        measured = (recommended.measured, *(r.measured for r in recommended.ladder))
        return Ladder(tuple(recommended.rungs), tuned=True, measured=measured)
    if recommended is None:
        return Ladder(default_rungs(manifest.model, SamplingOptions()), tuned=False)
    return Ladder(default_rungs(manifest.model, recommended.options), tuned=False, measured=(recommended.measured,))


def default_rungs(model: LegoConfig, top: SamplingOptions) -> tuple[SamplingOptions, ...]:
    """top, then DEFAULT_RUNGS (the late skip only where the model has a brick to skip), each kept
    only if it costs fewer full-chain evaluations than the rung above it."""
    rungs = [top]
    for sampler, steps, fraction in DEFAULT_RUNGS:
        # The trajectory changes; guidance stays the top setting's (a request's own replaces it).
        option = SamplingOptions(
            sampler=sampler, steps=steps, guidance=top.guidance, guidance_interval=top.guidance_interval
        )
        if len(model.bricks) > 1:  # a brick to skip
            option = replace(option, skip="late", t_break=fraction, reuse_residual=True)
        if full_chain_evaluations(option, model) < full_chain_evaluations(rungs[-1], model):
            rungs.append(option)
    return tuple(rungs)


def full_chain_evaluations(options: SamplingOptions, model: LegoConfig) -> float:
    """Brick FLOPs per image at the training canvas, in evaluations of the full chain (planned: a
    per-image gate can only lower it)."""
    canvas = (model.img_resolution, model.img_resolution)
    saved = flop_fraction_saved(plan(options, model, canvas), model_brick_flops(model))
    return evaluations(options.sampler, options.steps) * (1.0 - saved)
