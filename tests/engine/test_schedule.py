from __future__ import annotations

import pytest

from difflens.engine.schedule import check_timesteps, exponential_timesteps
from difflens.errors import InvalidArgument


def reference(stage, n, lam, T=1000):
    # docs/method.md, written out independently of the module.
    a = T ** (1 / (n + lam))
    if stage == "late":
        t = sorted([int(a ** (k + 1 + lam)) for k in range(n)], reverse=True)
        if t[0] == 1000:
            t[0] = 999
        return t
    return [999] + [T - int(a ** (k + 1 + lam)) for k in range(n - 1)]


@pytest.mark.parametrize("stage", ["early", "late"])
@pytest.mark.parametrize("n", [5, 10, 30, 50])
@pytest.mark.parametrize("lam", [30, 60, 100, 290])
def test_matches_reference_strictly_decreasing_right_length(stage, n, lam):
    ts = exponential_timesteps(stage, n, lam)
    assert ts == reference(stage, n, lam)
    assert len(ts) == n
    assert all(b < a for a, b in zip(ts, ts[1:], strict=False))
    assert ts[0] == 999 and ts[-1] >= 0


def test_known_values_at_lambda_60():
    late = exponential_timesteps("late", 30, 60)
    early = exponential_timesteps("early", 30, 60)
    assert late[:4] == [999, 926, 857, 794] and late[-3:] == [125, 116, 107]
    assert early[:4] == [999, 893, 884, 875] and early[-3:] == [206, 143, 74]
    # late packs toward 0 (small gaps at the end), early toward T (small gaps at the start)
    assert late[-2] - late[-1] < late[0] - late[1]
    assert early[1] - early[2] < early[-2] - early[-1]


def test_known_values_at_lambda_30():
    assert exponential_timesteps("late", 10, 30)[:3] == reference("late", 10, 30)[:3]
    assert exponential_timesteps("early", 10, 30) == reference("early", 10, 30)


def test_lambda_zero_repeats_are_rejected_naming_n_and_lambda():
    with pytest.raises(InvalidArgument) as e:
        exponential_timesteps("late", 30, 0)
    assert e.value.field == "sampling.shift"
    assert "n=30" in e.value.message and "lambda=0" in e.value.message


@pytest.mark.parametrize(("stage", "n", "lam", "hint", "then"), [
    ("late", 30, 0, "use a larger lambda (e.g. 10)", 10), ("early", 200, 5, "use a larger lambda (e.g. 470)", 470),
    ("late", 5, 10_000, "use a smaller lambda (e.g. 5000)", 5000),  # crowded near T: larger was the wrong way
    # the value printed is the one tried: 218.237, the rounding of a tried 218.2373671842174, fails
    ("late", 170, 18.529683592108693, "use a larger lambda (e.g. 222)", 222),
])
def test_the_error_says_which_way_to_move_lambda_and_the_suggestion_works(stage, n, lam, hint, then):
    with pytest.raises(InvalidArgument) as e:
        exponential_timesteps(stage, n, lam)
    assert e.value.message.endswith(f"; {hint} or fewer steps")
    assert len(exponential_timesteps(stage, n, then)) == n


def test_lambda_zero_small_n_is_fine():
    assert exponential_timesteps("late", 3, 0) == reference("late", 3, 0)


@pytest.mark.parametrize("bad,why", [([999, 999], "strictly decreasing"), ([10, 20], "strictly decreasing"),
                                     ([1000, 5], "out of range"), ([5, -1], "out of range"), ([], "empty")])
def test_explicit_lists_are_checked(bad, why):
    with pytest.raises(InvalidArgument, match=why):
        check_timesteps(bad)


# ---------------------------------------------------------------- spacing without diffusers (the torch-free front)

SPACING_CONFIGS = {
    "sd1 (PNDM-saved, leading, offset 1)": {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                            "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                                            "timestep_spacing": "leading", "_class_name": "PNDMScheduler"},
    "no spacing key (class defaults)": {"num_train_timesteps": 1000},
    "linspace": {"num_train_timesteps": 1000, "timestep_spacing": "linspace"},
    "trailing": {"num_train_timesteps": 1000, "timestep_spacing": "trailing", "steps_offset": 1},
    "short schedule": {"num_train_timesteps": 37, "timestep_spacing": "leading", "steps_offset": 2},
}


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmsolver++", "euler"])
@pytest.mark.parametrize("config", SPACING_CONFIGS)
def test_spacing_without_diffusers_equals_the_schedulers_own(config, scheduler):
    from difflens.engine.schedule import _spaced, new_scheduler, spacing

    cfg = SPACING_CONFIGS[config]
    made = new_scheduler(cfg, scheduler)
    T = int(cfg["num_train_timesteps"])
    # every count up to 120 (where rounding differs most), then a spread up to T (every n took 40 s)
    for n in sorted({*range(1, min(T, 120) + 1), *range(121, T + 1, 11), T - 1, T}):
        assert spacing(cfg, scheduler, n) == _spaced(made, n), n


@pytest.mark.parametrize(("scheduler", "flag"), [("dpmsolver++", {"use_karras_sigmas": True}),
                                                 ("euler", {"use_karras_sigmas": True}),
                                                 ("dpmsolver++", {"lambda_min_clipped": -5.1}),
                                                 ("euler", {"timestep_type": "continuous"}),
                                                 ("ddim", {"timestep_spacing": "sideways"})])
def test_spacing_declines_what_it_does_not_reproduce(scheduler, flag):
    from difflens.engine.schedule import spacing

    assert spacing({"num_train_timesteps": 1000, **flag}, scheduler, 20) is None
