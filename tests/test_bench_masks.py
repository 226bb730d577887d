"""bench.masks' summary: the headline masks_ratio is only a figure where the ladder resolves both crossings. A curve
already at r >= 0.95 at the ladder's first N says "that many masks or fewer", not "that many". It is read per case,
over the cases that can tell (plain MC needs more than the first N), as a geometric mean; the mean-curve figure
is kept beside it."""

from __future__ import annotations

import math

from bench.masks import summarise, table

POINTS = [16, 32, 64, 128, 256]


def case(curves: dict[str, list[float]]) -> dict:
    return {"prompt": "p", "timestep": 999, "reference": {"split_half_r": 0.99},
            "curves": {name: {str(n): {"r": r, "r_own": r} for n, r in zip(POINTS, rs, strict=True)}
                       for name, rs in curves.items()} | {"sobol+antithetic": {"refused": "antithetic: no"}},
            "early_stop": {}}


RISING = [0.80, 0.90, 0.96, 0.98, 0.99]  # crosses 0.95 between 32 and 64
AT_ONCE = [0.97, 0.98, 0.99, 0.99, 0.99]  # already >= 0.95 at 16


def test_no_ratio_when_plain_mc_is_already_at_the_target_at_the_first_point():
    s = summarise([case({"mc": AT_ONCE, "mc+antithetic": AT_ONCE, "stratified": AT_ONCE,
                         "stratified+antithetic": AT_ONCE, "sobol": AT_ONCE})], POINTS)
    assert s["masks_ratio"] is None and s["masks_ratio_bound"] is None
    shown = table(s)
    assert "| <= 16 | - |" in shown and "| 1.00 |" not in shown  # no "as many as plain MC" for a bound


def test_a_best_sampler_at_the_first_point_gives_an_upper_bound():
    s = summarise([case({"mc": RISING, "mc+antithetic": RISING, "stratified": AT_ONCE,
                         "stratified+antithetic": RISING, "sobol": RISING})], POINTS)
    assert s["best"] == "stratified" and s["masks_ratio_bound"] == "upper"
    assert 16 / 64 < s["masks_ratio"] < 16 / 32  # 16 over mc's interpolated crossing


def test_a_ratio_both_crossings_resolve_is_a_figure():
    later = [0.70, 0.80, 0.90, 0.96, 0.99]  # crosses between 64 and 128
    s = summarise([case({"mc": later, "mc+antithetic": later, "stratified": RISING,
                         "stratified+antithetic": later, "sobol": later})], POINTS)
    assert s["best"] == "stratified" and s["masks_ratio_bound"] == "exact"
    assert s["masks_ratio"] == s["masks_to_target"]["stratified"] / s["masks_to_target"]["mc"] < 1


def test_the_headline_is_the_per_case_geometric_mean_over_the_cases_that_can_tell():
    later = [0.70, 0.80, 0.90, 0.96, 0.99]  # crosses between 64 and 128
    cases = [case({"mc": RISING, "mc+antithetic": RISING, "stratified": AT_ONCE, "stratified+antithetic": RISING,
                   "sobol": RISING}),
             case({"mc": later, "mc+antithetic": later, "stratified": RISING, "stratified+antithetic": later,
                   "sobol": later}),
             case({"mc": AT_ONCE, "mc+antithetic": AT_ONCE, "stratified": AT_ONCE,  # tells nothing: left out
                   "stratified+antithetic": AT_ONCE, "sobol": AT_ONCE})]
    s = summarise(cases, POINTS)
    per = [c["masks_to_target"] for c in s["per_case"][:2]]
    ratios = [c["stratified"] / c["mc"] for c in per]
    assert s["cases_telling"] == 2 and s["best"] == "stratified"
    assert s["masks_ratio_per_case"]["stratified"] == ratios
    assert math.isclose(s["masks_ratio"], math.sqrt(ratios[0] * ratios[1]))
    assert s["masks_ratio_bound"] == "upper"  # stratified is at the first point in the first case
    # the mean curve counts the third case too, and says something else
    assert s["masks_ratio_mean_curve"] is not None and not math.isclose(s["masks_ratio_mean_curve"], s["masks_ratio"])
    assert "| <= " + f"{s['masks_ratio']:.2f} |" in table(s)
