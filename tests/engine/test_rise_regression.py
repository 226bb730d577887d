"""DF-RISE's regression estimator (engine/rise_regression.py): what it estimates, its design expectations, its
fallbacks, and its place in a step's run. How many masks it saves is bench.masks' business, not a unit test's."""

from __future__ import annotations

import pytest
import torch

from difflens.engine import rise
from difflens.engine.options import GenerationParams, RiseOptions
from difflens.engine.rise_regression import RegressionFit
from difflens.engine.sampler import StepState, generate
from difflens.engine.ssim import gaussian_filter
from difflens.errors import InvalidArgument

H, W, C = 12, 10, 3


def fields(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, C, H, W, generator=g, dtype=torch.float64)
    sub = torch.randn(1, C, H, W, generator=g, dtype=torch.float64) * 0.3
    ref = torch.randn(1, C, H, W, generator=g, dtype=torch.float64)
    return x, sub, ref


def bernoulli(n: int, p: float, seed: int) -> torch.Tensor:
    return (torch.rand(n, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < p).double()


@pytest.mark.parametrize("padding", ["reflect", "zero"])
@pytest.mark.parametrize("p", [0.5, 0.3])
@pytest.mark.parametrize("with_sub", [False, True], ids=["zero-substrate", "blur-substrate"])
def test_the_covariates_expectation_given_a_kept_pixel_is_the_designs(padding, p, with_sub):
    """E[X(u) | M(u) = 1] = p X[all kept](u) + (1 - p) a(u, u), against the mean over 40,000 drawn masks."""
    x, sub, ref = fields(1)
    fit = RegressionFit(x, sub if with_sub else None, ref, p, padding)
    masks = bernoulli(40_000, p, 2)
    cov = torch.cat([fit.covariates(chunk) for chunk in masks.split(5000)])  # (N, h, w, 2)
    kept = masks[..., None]
    empirical = (cov * kept).sum(dim=0) / kept.sum(dim=0)
    spread = cov.std(dim=0)  # the standard error of the empirical mean is ~ spread / sqrt(20,000)
    assert torch.all((empirical - fit.at_kept[..., 2:]).abs() <= 5 * spread / (40_000 * p) ** 0.5 + 1e-12)
    assert torch.equal(fit.at_kept[..., :2], torch.ones(H, W, 2, dtype=torch.float64))


def test_scores_linear_in_its_covariates_give_their_conditional_mean_exactly():
    """Where s is exactly b0 + b1 M + b' X, the fit recovers the coefficients from any masks that identify them,
    and the map is b0 + b1 + b' E[X | M = 1], the true E[s | M = 1]."""
    x, sub, ref = fields(3)
    fit = RegressionFit(x, None, ref, 0.5, "reflect", halves=1)
    g = torch.Generator().manual_seed(4)
    b = torch.randn(H, W, 4, generator=g, dtype=torch.float64)
    masks = bernoulli(24, 0.5, 5)
    design = torch.cat([torch.ones(24, H, W, 1, dtype=torch.float64), masks[..., None], fit.covariates(masks)], -1)
    scores = (design * b).sum(dim=-1)
    fit.add(masks, scores, torch.zeros(24, dtype=torch.int64))
    ratio = rise.normalise((scores * masks).sum(dim=0).float(), masks)
    identified = (masks.sum(dim=0) > 1) & (masks.sum(dim=0) < 23)
    got = fit.map(ratio).double()
    want = (b * fit.at_kept).sum(dim=-1)
    assert torch.allclose(got[identified], want[identified], atol=1e-4, rtol=1e-4)


def test_it_converges_to_what_the_ratio_converges_to():
    """Same quantity, E[s(u) | M(u) = 1], for a score that is not linear in the covariates (a saturating function of
    a masked window statistic, plus noise): both estimates from 6000 masks agree to within their noise."""
    x, sub, ref = fields(6)
    fit = RegressionFit(x, None, ref, 0.5, "reflect", halves=1)
    masks = bernoulli(6000, 0.5, 7)
    noise = torch.randn(6000, H, W, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 0.05
    window = gaussian_filter((x * masks[:, None]).square().mean(dim=1, keepdim=True), 5, 1.0, "reflect")[:, 0]
    scores = torch.tanh(3 * window) - 0.2 * masks * window + noise
    fit.add(masks, scores, torch.zeros(6000, dtype=torch.int64))
    ratio = (scores * masks).sum(dim=0) / masks.sum(dim=0)
    got = fit.map(ratio.float()).double()
    assert (got - ratio).abs().max() < 0.02, float((got - ratio).abs().max())
    assert float(torch.corrcoef(torch.stack([got.flatten(), ratio.flatten()]))[0, 1]) > 0.99


def test_a_pixel_the_fit_cannot_identify_falls_back_to_the_ratio():
    x, sub, ref = fields(9)
    fit = RegressionFit(x, None, ref, 0.5, "reflect", halves=1)
    masks = bernoulli(20, 0.5, 10)
    masks[:, 0, 0] = 0  # never kept: the ratio's 0
    masks[:, 1, 1] = 1  # always kept: M is the intercept
    scores = torch.randn(20, H, W, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    fit.add(masks, scores, torch.zeros(20, dtype=torch.int64))
    ratio = rise.normalise((scores * masks).sum(dim=0).float(), masks)
    got = fit.map(ratio)
    assert got[0, 0] == 0 and got[1, 1] == ratio[1, 1]
    few = RegressionFit(x, None, ref, 0.5, "reflect", halves=1)
    few.add(masks[:3], scores[:3], torch.zeros(3, dtype=torch.int64))  # 3 masks, 4 coefficients: no pixel fits
    r3 = rise.normalise((scores[:3] * masks[:3]).sum(dim=0).float(), masks[:3])
    assert torch.equal(few.map(r3), r3)


# --- in a step ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state(tiny_model) -> StepState:
    states: list[StepState] = []
    generate(tiny_model, GenerationParams("a red circle on the left", seed=2, steps=3, guidance_scale=4.0),
             on_step=states.append)
    return states[1]


@pytest.mark.parametrize("substrate", ["zero", "blur"])
def test_a_step_with_the_regression_estimator_changes_only_the_rise_map(state, substrate):
    ratio = RiseOptions(num_masks=24, batch_size=8, seed=3, sampler="stratified", substrate=substrate)
    regression = RiseOptions(num_masks=24, batch_size=8, seed=3, sampler="stratified", substrate=substrate,
                             estimator="regression")
    masks = rise.make_masks(ratio, tuple(state.latent_in.shape[-2:]), "cpu")
    assert torch.equal(masks, rise.make_masks(regression, tuple(state.latent_in.shape[-2:]), "cpu"))
    a, b = rise.explain_step(state, ratio, masks), rise.explain_step(state, regression, masks)
    assert torch.equal(a["rise_raw"], b["rise_raw"]) and torch.equal(a["rise_mean"], b["rise_mean"])
    assert not torch.allclose(a["rise"], b["rise"])
    assert torch.isfinite(b["rise"]).all()
    # the fit's sufficient statistics do not depend on how the masks were chunked
    one = rise.explain_step_reference(state, regression, masks)
    assert torch.allclose(one["rise"], b["rise"], atol=1e-5)


def test_early_stopping_reads_the_split_half_r_off_the_halves_fits(state):
    opts = RiseOptions(num_masks=64, batch_size=16, seed=1, sampler="stratified", estimator="regression",
                       stop_at_r=0.0, min_masks=32)
    run = rise.run_step(state, opts, rise.make_masks(opts, tuple(state.latent_in.shape[-2:]), "cpu"))
    assert run.stats.masks_used == 32 and run.stats.split_half_r is not None
    full = rise.run_step(state, RiseOptions(num_masks=64, batch_size=16, seed=1, sampler="stratified",
                                            estimator="regression"),
                         rise.make_masks(opts, tuple(state.latent_in.shape[-2:]), "cpu"))
    ratio = rise.run_step(state, RiseOptions(num_masks=64, batch_size=16, seed=1, sampler="stratified"),
                          rise.make_masks(opts, tuple(state.latent_in.shape[-2:]), "cpu"))
    assert full.stats.masks_used == 64 and full.stats.split_half_r != ratio.stats.split_half_r


@pytest.mark.parametrize(("kw", "field", "text"), [
    ({"mask": "grid"}, "rise.estimator", "mask 'grid'"),
    ({"masks": torch.ones(16, 8, 8)}, "rise.estimator", "explicit masks"),
    ({"num_masks": 15}, "rise.num_masks", "at least 16"),
    ({"estimator": "ols"}, "rise.estimator", "allowed: ratio, regression"),
])
def test_what_the_regression_estimator_refuses(kw, field, text):
    with pytest.raises(InvalidArgument) as err:
        RiseOptions(**{"estimator": "regression", **kw})
    assert err.value.field == field and text in err.value.message
