import numpy as np
import pytest

from lego_export.edm import EDMConfig
from lego_export.errors import LegoError
from lego_export.plan import (
    late_brick_policy,
    make_plan,
    parse_policy,
    tile_shift,
)

EDM = EDMConfig()


def test_continuous_schedule_matches_the_discrete_one():
    sigmas = EDM.sigmas(11)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002) and sigmas[-1] == 0
    for i, s in enumerate(sigmas[:-1]):
        assert EDM.sigma_at(i / 10) == pytest.approx(s)


def test_late_brick_threshold_follows_the_models_sigma_range():
    narrow = EDMConfig(sigma_min=0.01, sigma_max=10.0)
    for edm in (EDM, narrow):
        policy = late_brick_policy([4, 16, 32], 0.5, edm)
        threshold = policy.windows[0].lo
        assert threshold == pytest.approx(edm.sigma_at(0.5))
        plan = make_plan(edm.sigmas(20), 3, policy)
        assert sum(p.bricks == 2 for p in plan) == 10
    assert (
        late_brick_policy([4, 16, 32], 0.5, narrow).windows[0].lo
        < late_brick_policy([4, 16, 32], 0.5, EDM).windows[0].lo
    )


def test_pg_skips_the_global_brick_late_and_pr_the_local_brick_early():
    pg = late_brick_policy([4, 16, 32], 0.3, EDM)
    pr = late_brick_policy([32, 16, 4], 0.3, EDM)
    assert pg.bricks_at(80.0, 3) == 3 and pg.bricks_at(0.01, 3) == 2
    assert pr.bricks_at(80.0, 3) == 2 and pr.bricks_at(0.01, 3) == 3


@pytest.mark.parametrize("steps", [20, 50, 200])
@pytest.mark.parametrize("t_break", [0.3, 0.5])
def test_t_break_is_a_fraction_of_steps_at_any_step_count(steps, t_break):
    plan = make_plan(EDM.sigmas(steps), 3, late_brick_policy([4, 16, 32], t_break, EDM))
    skipped = sum(p.bricks == 2 for p in plan)
    assert abs(skipped / steps - t_break) <= 1.5 / steps
    # a prefix: every skipping step comes after every full step
    assert all(p.bricks == 3 for p in plan[: steps - skipped])


def test_explicit_spec():
    policy = parse_policy("2@0.5:, 1@:40", 3)
    assert policy.bricks_at(60.0, 3) == 1  # brick 1 not allowed above 40 -> brick 2 cannot run either
    assert policy.bricks_at(10.0, 3) == 3
    assert policy.bricks_at(0.1, 3) == 2


@pytest.mark.parametrize(
    "spec,message",
    [
        ("2-0.5", "cannot be read"),
        ("5@0.1:", "brick index must be 0 to 2"),
        ("0@1:", "brick 0 always runs"),
        ("2@3:1", "lower bound above upper bound"),
        ("2@nan:nan", "bounds must be numbers"),
        ("1@nan:1", "bounds must be numbers"),
        ("2@inf:", "bounds must be numbers"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(LegoError, match=message):
        parse_policy(spec, 3)


def test_bad_t_break_and_single_brick_are_checked_once_by_the_options_naming_fields():
    """The t-break range and the single-brick rule live in SamplingOptions (windows.py parses, plan.py
    plans); the errors name fields, never a command-line flag."""
    from dataclasses import replace

    from lego_export.config import get_preset
    from lego_export.options import OptionError, SamplingOptions

    model = get_preset("pg-tiny")
    with pytest.raises(OptionError, match="^t_break must be") as bad:
        SamplingOptions(skip="late", t_break=1.5).validate(model)
    assert bad.value.field == "t_break" and "--" not in str(bad.value)
    single = replace(model, bricks=model.bricks[:1])
    with pytest.raises(OptionError, match="single brick") as one:
        SamplingOptions(skip="late").validate(single)
    assert one.value.field == "skip.late" and "--" not in str(one.value)


def test_tile_shifts_are_reproducible_and_vary():
    shifts = [tile_shift(i, 32) for i in range(20)]
    assert shifts == [tile_shift(i, 32) for i in range(20)]
    assert len(set(shifts)) > 10 and all(0 <= d < 32 for s in shifts for d in s)
    assert all(p.shift == (0, 0) for p in make_plan(np.array([80.0, 1.0, 0.0]), 3, late_brick_policy([4, 8], 0, EDM)))


def test_guided_steps_are_those_in_the_interval_and_their_rows_and_flops_count_twice():
    from lego_export.config import get_preset
    from lego_export.options import SamplingOptions
    from lego_export.plan import describe_saving, engine_work, flop_fraction_saved, plan

    model = get_preset("pg-tiny")
    options = SamplingOptions(sampler="dpm2m", steps=6, guidance=1.5, guidance_interval="1:20")
    steps = plan(options, model, (16, 16))
    assert [p.guided for p in steps] == [1 <= p.sigma <= 20 for p in steps] and 0 < sum(p.guided for p in steps) < 6
    work = engine_work(options, model, (16, 16), num=3)
    assert [w["embedder"] for w in work] == [6 if p.guided else 3 for p in steps]
    assert all(w["brick0"] == w["embedder"] * 16 for w in work)  # 4-pixel tiles of a 16 x 16 canvas
    saved = flop_fraction_saved(steps, [1.0, 1.0, 1.0])
    assert saved == pytest.approx(-sum(p.guided for p in steps) / 6)
    assert describe_saving(saved).endswith("more brick FLOPs than unguided")
    unguided = plan(SamplingOptions(sampler="dpm2m", steps=6), model, (16, 16))
    assert not any(p.guided for p in unguided) and describe_saving(0.25) == "25.0% of brick FLOPs saved"
