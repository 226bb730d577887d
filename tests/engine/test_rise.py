from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from difflens.engine import rise
from difflens.engine.options import GenerationParams, RiseOptions
from difflens.engine.runner import UNetRunner
from difflens.engine.sampler import StepState, generate
from difflens.errors import InvalidArgument


def capture_state(model, guidance: float, index: int = 1) -> StepState:
    states: list[StepState] = []
    generate(model, GenerationParams("a red circle on the left", seed=2, steps=3, guidance_scale=guidance,
                                     scheduler="euler"), on_step=states.append)
    return states[index]


@pytest.fixture(scope="module")
def cfg_state(tiny_model):
    return capture_state(tiny_model, 4.0)


@pytest.fixture(scope="module")
def nocfg_state(tiny_model):
    return capture_state(tiny_model, 1.0)


class CountingRunner(UNetRunner):
    """The real eager runner, recording the batch of every UNet call."""

    def __init__(self, unet):
        super().__init__(unet)
        self.calls: list[int] = []

    def raw(self, latents, timestep, embeds, added=None):
        self.calls.append(latents.shape[0])
        return super().raw(latents, timestep, embeds, added)


# --- batched == one mask per call ----------------------------------------------------------------------------

SCORES = [("structure", False), ("structure", True), ("cosine", False)]
COMBOS = list(itertools.product(["pixel", "grid"], ["zero", "blur"], SCORES, ["eps", "x_prev"]))


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("mask,substrate,score,target", COMBOS,
                         ids=["-".join([m, s, sc + ("2x" if two else ""), t]) for m, s, (sc, two), t in COMBOS])
def test_batched_equals_one_mask_per_call(cfg_state, nocfg_state, cfg, mask, substrate, score, target):
    state = cfg_state if cfg else nocfg_state
    opts = RiseOptions(num_masks=10, batch_size=4, mask=mask, grid_size=3, substrate=substrate, score=score[0],
                       structure_2x=score[1], target=target, seed=7)
    masks = rise.make_masks(opts, tuple(state.latent_in.shape[-2:]), "cpu")
    batched = rise.explain_step(state, opts, masks)
    looped = rise.explain_step_reference(state, opts, masks)
    for name in ("rise", "rise_raw", "rise_mean"):
        assert batched[name].shape == (16, 16) and batched[name].dtype == torch.float32
        assert torch.isfinite(batched[name]).all()
    # The UNet alone differs by ~4e-6 between batch 8 and batch 2 (x the CFG scale): the tolerance is 1e-5 per
    # mask score, so 1e-5 on the normalised map and 1e-5 * (number of masks summed) on the raw one.
    assert (batched["rise"] - looped["rise"]).abs().max() <= 1e-5
    assert (batched["rise_mean"] - looped["rise_mean"]).abs().max() <= 1e-5
    assert ((batched["rise_raw"] - looped["rise_raw"]).abs() <= 1e-5 * masks.sum(0).clamp_min(1)).all()
    assert batched["rise"].std() > 1e-4  # a real map, not a constant that would match trivially


@pytest.mark.parametrize("cfg,per_mask", [(True, 2), (False, 1)])
def test_one_unet_call_per_chunk_with_both_branches(tiny_model, cfg_state, nocfg_state, cfg, per_mask):
    runner = CountingRunner(tiny_model.unet)
    state = dataclasses.replace(cfg_state if cfg else nocfg_state, runner=runner)
    opts = RiseOptions(num_masks=10, batch_size=4)
    masks = rise.make_masks(opts, (16, 16), "cpu")
    rise.explain_step(state, opts, masks)
    assert runner.calls == [4 * per_mask, 4 * per_mask, 2 * per_mask]
    runner.calls.clear()
    rise.explain_step_reference(state, opts, masks)
    assert runner.calls == [per_mask] * 10


def test_normalised_map_is_raw_over_mask_counts_and_zero_where_never_kept(cfg_state):
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 16, 16, generator=g)
    masks[:, 2, 3] = 0  # a pixel no mask keeps
    masks[:, 0, :] = (torch.rand(5, 16, generator=g) < 0.5).float()
    opts = RiseOptions(batch_size=3)
    out = rise.explain_step(cfg_state, opts, masks)
    count = masks.sum(0)
    kept = count > 0
    assert out["rise"][2, 3] == 0 and torch.isfinite(out["rise"]).all()
    assert torch.allclose(out["rise"][kept], out["rise_raw"][kept] / count[kept], atol=1e-6)
    assert (out["rise"][~kept] == 0).all()


# --- saliency sanity: a "UNet" that only looks at one region ---------------------------------------------------

REGION = (slice(3, 5), slice(11, 13))  # rows 3-4, columns 11-12 of a 12 x 16 latent (asymmetric: catches transposes)


class RegionRunner:
    """eps(x) = g(x) * P with g = 1 - (a0 - a(x)), a(x) the mean of channel 0 over REGION (a0: unmasked).

    Both scores of g * P against P are sign(g), the same at every pixel, so only the masks' effect on REGION can
    shape the map: REGION holds 3.0, so g > 0 (score +1) iff at least 3 of its 4 pixels are kept.
    """

    backend = "eager"

    def __init__(self, x: torch.Tensor):
        self.p = torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(1))
        self.a0 = self.region_mean(x)

    @staticmethod
    def region_mean(x):
        return x[:, 0, REGION[0], REGION[1]].mean(dim=(1, 2))

    def guided(self, latents, t, cond):
        return self.p * (1 - (self.a0 - self.region_mean(latents)))[:, None, None, None]


def region_state() -> StepState:
    x = 0.1 * torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(2))
    x[:, :, REGION[0], REGION[1]] = 3.0
    runner = RegionRunner(x)
    zero = torch.zeros_like(x)
    return StepState(0, 1, 500, torch.tensor(500), x, runner.p.clone(), zero, zero, None, runner)  # type: ignore[arg-type]


@pytest.mark.parametrize("score,substrate", [("structure", "zero"), ("cosine", "zero"), ("structure", "blur")])
def test_map_points_at_the_only_region_the_model_reads(score, substrate):
    state = region_state()
    opts = RiseOptions(num_masks=1024, batch_size=256, score=score, substrate=substrate, seed=3)
    masks = rise.make_masks(opts, (12, 16), "cpu")
    sal = rise.explain_step(state, opts, masks)["rise"]
    inside = torch.zeros(12, 16, dtype=torch.bool)
    inside[REGION] = True
    # E[s | pixel kept] is 2 * 4/8 - 1 = 0 inside REGION and 2 * 5/16 - 1 = -0.375 outside (+- ~0.04 sampling noise)
    assert sal[inside].min() > sal[~inside].max() + 0.1
    assert abs(sal[inside].mean() - 0.0) < 0.1 and abs(sal[~inside].mean() + 0.375) < 0.05


# --- ssim_structure against an independent float64 reference ----------------------------------------------------


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    w = np.outer(g, g)
    return w / w.sum()


def windows(a: np.ndarray, size: int, mode: str) -> np.ndarray:
    """(B, C, h, w) -> (B, C, h, w, size, size) padded windows centred on each pixel."""
    r = size // 2
    padded = np.pad(a, ((0, 0), (0, 0), (r, r), (r, r)), mode=mode)
    return np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(2, 3))


def structure_reference(x: np.ndarray, y: np.ndarray, two: bool, mode: str = "constant") -> np.ndarray:
    """Centred weighted moments over each 15 x 15 window, padded with zeros (which count as values) or, with
    mode "reflect", with the border's pixels mirrored (numpy's reflect: the edge pixel itself not repeated)."""
    w = gaussian_window(15, 1.5)
    wx, wy = windows(x, 15, mode), windows(y, 15, mode)
    mx = (w * wx).sum(axis=(-2, -1), keepdims=True)
    my = (w * wy).sum(axis=(-2, -1), keepdims=True)
    vx = (w * (wx - mx) ** 2).sum(axis=(-2, -1))
    vy = (w * (wy - my) ** 2).sum(axis=(-2, -1))
    cov = (w * (wx - mx) * (wy - my)).sum(axis=(-2, -1))
    c3 = (0.03**2) / 2
    s = ((2 if two else 1) * cov + c3) / (np.sqrt(vx) * np.sqrt(vy) + c3)
    return s.mean(axis=1)


def structured_pair(batch_y: int = 3):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 20, 24, generator=g, dtype=torch.float64)
    y = x + 0.7 * torch.randn(batch_y, 4, 20, 24, generator=g, dtype=torch.float64)
    x[..., 2:16, 3:19] = 0.7  # constant regions: variances at the clamp, only the constants keep S finite
    y[:, :, 4:18, 0:14] = -1.3
    y[1] = -y[1]  # a negatively correlated sample
    return x, y


@pytest.mark.parametrize("two", [False, True])
def test_ssim_structure_equals_float64_reference(two):
    x, y = structured_pair()
    want = structure_reference(x.expand_as(y).numpy(), y.numpy(), two)
    got = rise.ssim_structure(x, y, double_covariance=two)  # x broadcast against the batch of y
    assert got.shape == (3, 20, 24) and got.dtype == torch.float64
    assert np.abs(got.numpy() - want).max() <= 1e-6
    swapped = rise.ssim_structure(y, x, double_covariance=two)
    assert np.abs(swapped.numpy() - want).max() <= 1e-6  # symmetric in x, y, and either side may broadcast
    got32 = rise.ssim_structure(x.float(), y.float(), double_covariance=two)
    assert torch.isfinite(got32).all()
    assert np.abs(got32.double().numpy() - want).max() <= 2e-2  # fp32 cancellation near the clamp, bounded


@pytest.mark.parametrize("two", [False, True])
def test_ssim_structure_with_reflect_padding_equals_float64_reference(two):
    x, y = structured_pair()
    want = structure_reference(x.expand_as(y).numpy(), y.numpy(), two, mode="reflect")
    got = rise.ssim_structure(x, y, double_covariance=two, padding="reflect")
    assert got.shape == (3, 20, 24) and np.abs(got.numpy() - want).max() <= 1e-6
    zero = rise.ssim_structure(x, y, double_covariance=two)
    assert np.abs(got[:, 7:-7, 7:-7].numpy() - zero[:, 7:-7, 7:-7].numpy()).max() <= 1e-9  # same inside
    assert np.abs(got.numpy() - zero.numpy()).max() > 0.1  # not at the border


def test_reflect_padding_keeps_a_constant_pair_at_one_up_to_the_border():
    # The zero-padded window sees opposite-signed constants as anti-correlated at the border (next test); the
    # mirrored window sees only the constants: S = C3 / C3 = 1 everywhere.
    s = rise.ssim_structure(torch.full((1, 4, 24, 24), 3.3), torch.full((2, 4, 24, 24), -7.1), padding="reflect")
    assert torch.allclose(s, torch.ones(2, 24, 24), atol=1e-2)


def test_batched_equals_one_mask_per_call_with_reflect_padding(cfg_state):
    opts = RiseOptions(num_masks=10, batch_size=4, ssim_padding="reflect", seed=7)
    masks = rise.make_masks(opts, tuple(cfg_state.latent_in.shape[-2:]), "cpu")
    batched, looped = rise.explain_step(cfg_state, opts, masks), rise.explain_step_reference(cfg_state, opts, masks)
    assert (batched["rise"] - looped["rise"]).abs().max() <= 1e-5 and batched["rise"].std() > 1e-4
    zero = rise.explain_step(cfg_state, RiseOptions(num_masks=10, batch_size=4, seed=7, ssim_padding="zero"), masks)
    assert (zero["rise"] - batched["rise"]).abs().max() > 1e-3  # the option reaches the score


def test_reflect_is_the_default_padding_and_zero_the_papers():
    """The default points at the object on the shipped model (faithfulness.md: pointing 0.87, 0.31 with zeros)."""
    assert RiseOptions().ssim_padding == "reflect"
    x, y = structured_pair()
    default = rise.score(x, y, RiseOptions())
    assert torch.equal(default, rise.ssim_structure(x, y, padding="reflect"))
    assert not torch.equal(default, rise.score(x, y, RiseOptions(ssim_padding="zero")))


def test_ssim_structure_is_finite_on_constant_inputs_and_zero_padded():
    # E[x^2] - E[x]^2 of a constant comes out slightly negative in float32 for many constants: clamped, not NaN.
    x = torch.full((1, 4, 24, 24), 3.3)
    y = torch.full((2, 4, 24, 24), -7.1)
    for two in (False, True):
        s = rise.ssim_structure(x, y, double_covariance=two)
        assert torch.isfinite(s).all()
        # Away from the border both windows are constant: S = C3 / C3 = 1 (up to fp32 cancellation).
        assert torch.allclose(s[:, 7:-7, 7:-7], torch.ones(2, 10, 10), atol=1e-2)
        # At the border the zero padding is part of the window: opposite-signed constants are anti-correlated.
        assert torch.allclose(s[:, 0, :], torch.full((2, 24), -2.0 if two else -1.0), atol=1e-2)


def test_cosine_score_is_per_pixel_over_channels():
    g = torch.Generator().manual_seed(5)
    ref, out = torch.randn(1, 4, 6, 7, generator=g), torch.randn(3, 4, 6, 7, generator=g)
    got = rise.score(ref, out, RiseOptions(score="cosine"))
    r, o = ref.double().numpy(), out.double().numpy()
    want = (r * o).sum(1) / np.sqrt((r * r).sum(1) * (o * o).sum(1))
    assert got.shape == (3, 6, 7) and np.abs(got.numpy() - want).max() <= 1e-5


def test_blur_substrate_is_an_11x11_sigma5_reflect_gaussian():
    x = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = rise.substrate(x, RiseOptions(substrate="blur"))
    want = (gaussian_window(11, 5.0) * windows(x.numpy(), 11, "reflect")).sum(axis=(-2, -1))
    assert np.abs(got.numpy() - want).max() <= 1e-9
    assert rise.substrate(x, RiseOptions()) is None
    const = torch.full((1, 4, 8, 8), 2.5)
    assert torch.allclose(rise.substrate(const, RiseOptions(substrate="blur")), const)  # no darkened border


def test_gaussian_filter_refuses_reflect_padding_wider_than_the_map():
    with pytest.raises(ValueError, match="more than 7 samples a side, got 7"):
        rise.gaussian_filter(torch.zeros(1, 1, 7, 9), 15, 1.5, "reflect")
    with pytest.raises(ValueError, match="padding_mode: got 'circular'"):
        rise.gaussian_filter(torch.zeros(1, 1, 9, 9), 15, 1.5, "circular")
    assert rise.gaussian_filter(torch.ones(1, 1, 3, 5), 15, 1.5).shape == (1, 1, 3, 5)  # zeros: any size


def test_targets_pick_eps_or_the_next_latent(cfg_state):
    assert torch.equal(rise.reference(cfg_state, RiseOptions()), cfg_state.eps)
    assert torch.equal(rise.reference(cfg_state, RiseOptions(target="x_prev")), cfg_state.latent_next)


# --- masks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pixel", "grid"])
def test_masks_are_reproducible_from_the_seed_and_differ_across_seeds(kind):
    a = rise.make_masks(RiseOptions(num_masks=8, mask=kind, grid_size=4, seed=11), (10, 14), "cpu")
    b = rise.make_masks(RiseOptions(num_masks=8, mask=kind, grid_size=4, seed=11), (10, 14), "cpu")
    c = rise.make_masks(RiseOptions(num_masks=8, mask=kind, grid_size=4, seed=12), (10, 14), "cpu")
    assert a.shape == (8, 10, 14) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_pixel_masks_are_binary_with_mean_p(p):
    m = rise.make_masks(RiseOptions(num_masks=200, p=p), (16, 16), "cpu")
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(m.mean().item() - p) < 0.01


@pytest.mark.parametrize("size,s", [((13, 21), 4), ((16, 16), 8), ((9, 5), 3), ((8, 8), 2)])
def test_grid_masks_are_soft_and_sized_for_any_latent(size, s):
    m = rise.make_masks(RiseOptions(num_masks=64, mask="grid", grid_size=s, p=0.5), size, "cpu")
    assert m.shape == (64, *size)
    assert m.min() >= 0 and m.max() <= 1
    assert ((m > 0.01) & (m < 0.99)).any()  # bilinear, not binary
    assert 0.35 < m.mean().item() < 0.65


def test_grid_mask_is_a_crop_of_the_upsampled_grid():
    """One mask recomputed by hand from the same generator draws (order: cells, then row, then column offsets)."""
    h, w, s, n = 10, 7, 3, 5
    m = rise.make_masks(RiseOptions(num_masks=n, mask="grid", grid_size=s, p=0.4, seed=9), (h, w), "cpu")
    g = torch.Generator().manual_seed(9)
    cells = (torch.rand(n, 1, s, s, generator=g) < 0.4).float()
    ch, cw = 4, 3  # ceil(10 / 3), ceil(7 / 3)
    up = torch.nn.functional.interpolate(cells, size=(4 * ch, 4 * cw), mode="bilinear", align_corners=False)
    dy, dx = torch.randint(0, ch, (n,), generator=g), torch.randint(0, cw, (n,), generator=g)
    for k in range(n):
        assert 0 <= dy[k] < ch and 0 <= dx[k] < cw
        assert torch.equal(m[k], up[k, 0, dy[k]:dy[k] + h, dx[k]:dx[k] + w])


def test_explicit_masks_are_used_verbatim():
    given = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = rise.make_masks(RiseOptions(masks=given, num_masks=99, seed=5), (16, 16), "cpu")
    assert torch.equal(got, given)


@pytest.mark.parametrize("shape", [(3, 16, 8), (3, 8, 16), (0, 16, 16)])
def test_explicit_masks_of_the_wrong_shape_name_the_field(shape):
    with pytest.raises(InvalidArgument) as e:
        rise.make_masks(RiseOptions(masks=torch.ones(shape)), (16, 16), "cpu")
    assert e.value.field == "rise.masks" and "(N, 16, 16)" in e.value.message


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_explicit_masks_outside_0_1_are_rejected(bad):
    masks = torch.ones(2, 16, 16)
    masks[1, 4, 4] = bad
    with pytest.raises(InvalidArgument) as e:
        rise.make_masks(RiseOptions(masks=masks), (16, 16), "cpu")
    assert e.value.field == "rise.masks" and "[0, 1]" in e.value.message


def test_compiled_backend_pads_the_last_chunk_without_changing_the_map(cfg_state):
    """With a compiled UNet every chunk has the compiled batch size (no recompile for the remainder)."""
    opts = RiseOptions(num_masks=10, batch_size=4)
    masks = rise.make_masks(opts, (16, 16), "cpu")
    eager = CountingRunner(cfg_state.runner.unet)
    want = rise.explain_step(dataclasses.replace(cfg_state, runner=eager), opts, masks)
    padded = CountingRunner(cfg_state.runner.unet)
    padded.backend = "compile"  # the padding rule only; the UNet itself stays eager here
    got = rise.explain_step(dataclasses.replace(cfg_state, runner=padded), opts, masks)
    assert padded.calls == [8, 8, 8] and eager.calls == [8, 8, 4]
    assert torch.allclose(got["rise"], want["rise"], atol=1e-5)
    assert torch.allclose(got["rise_raw"], want["rise_raw"], atol=1e-4)
    assert torch.allclose(got["rise_mean"], want["rise_mean"], atol=1e-5)  # the padding masks are not counted


def test_rise_mean_is_the_score_averaged_over_all_masks_whatever_each_pixel_kept():
    """Under RegionRunner every pixel of mask k scores sign(g_k), +1 iff >= 3 of REGION's 4 pixels are kept, so the
    mean map is one number, known from the masks alone; and only REGION's pixels carry an own-mask effect."""
    state = region_state()
    opts = RiseOptions(num_masks=2048, batch_size=512, seed=5)
    masks = rise.make_masks(opts, (12, 16), "cpu")
    out = rise.explain_step(state, opts, masks)
    kept = masks[:, REGION[0], REGION[1]].flatten(1).sum(dim=1)
    want = float(torch.where(kept >= 3, 1.0, -1.0).mean())
    # sign(g) up to the C3 term, which matters a little where zero padding shrinks the local variances
    assert torch.allclose(out["rise_mean"], torch.full((12, 16), want), atol=5e-3)
    own = out["rise"] - out["rise_mean"]
    inside = torch.zeros(12, 16, dtype=torch.bool)
    inside[REGION] = True
    # inside: E[s | kept] - E[s] = 0 - (2 * 5/16 - 1) = 0.375; outside 0 up to sampling noise (~0.03 sd)
    assert own[inside].min() > 0.25 and own[~inside].abs().max() < 0.12


def test_a_grid_finer_than_the_latent_is_refused_as_the_service_refuses_it():
    """The engine (local CLI) and the front agree: grid cells no smaller than one latent pixel."""
    assert rise.make_masks(RiseOptions(num_masks=2, mask="grid", grid_size=9), (9, 12), "cpu").shape == (2, 9, 12)
    with pytest.raises(InvalidArgument) as e:
        rise.make_masks(RiseOptions(num_masks=2, mask="grid", grid_size=10), (9, 12), "cpu")
    assert e.value.field == "rise.grid_size" and "[1, 9]" in e.value.message


# --- early stopping ----------------------------------------------------------------------------------------------


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.square().sum() * b.square().sum()).sqrt())


@pytest.mark.parametrize("antithetic", [False, True])
def test_split_half_r_is_the_correlation_of_the_alternate_masks_maps(cfg_state, antithetic):
    opts = RiseOptions(num_masks=24, batch_size=8, seed=3, antithetic=antithetic)
    masks = rise.make_masks(opts, (16, 16), "cpu")
    run = rise.run_step(cfg_state, opts, masks)
    half = rise.split_halves(24, antithetic)
    assert half.tolist() == ([0, 0, 1, 1] * 6 if antithetic else [0, 1] * 12)  # pairs stay whole
    a, b = (rise.explain_step(cfg_state, opts, masks[half == k])["rise"] for k in (0, 1))
    assert run.stats.masks_used == run.stats.masks_planned == 24 and run.stats.stop_at_r is None
    assert run.stats.split_half_r is not None and abs(run.stats.split_half_r - pearson(a, b)) <= 1e-4


def test_early_stopping_stops_after_the_batch_that_reaches_r_and_reports_it(cfg_state):
    masks = rise.make_masks(RiseOptions(num_masks=32, seed=3), (16, 16), "cpu")
    full = rise.run_step(cfg_state, RiseOptions(num_masks=32, batch_size=8, seed=3, stop_at_r=1.0, min_masks=8),
                         masks)
    assert full.stats.masks_used == 32 and full.stats.split_half_r < 1.0  # never reached: every mask ran
    assert full.stats.describe().endswith("< 1: all masks ran")
    # the r each prefix of whole batches reaches, from runs without stopping
    prefix_r = {n: rise.run_step(cfg_state, RiseOptions(num_masks=n, batch_size=8, seed=3), masks[:n]).stats
                .split_half_r for n in range(8, 33, 8)}
    threshold = sorted(prefix_r.values())[len(prefix_r) // 2]  # reached somewhere before the end
    first = min(n for n, r in prefix_r.items() if r >= threshold)
    opts = RiseOptions(num_masks=32, batch_size=8, seed=3, stop_at_r=threshold, min_masks=8)
    run = rise.run_step(cfg_state, opts, masks)
    assert run.stats.masks_used == first and run.stats.masks_planned == 32
    assert run.stats.split_half_r == pytest.approx(prefix_r[first], abs=1e-9) and run.stats.stop_at_r == threshold
    assert run.stats.describe() == f"masks used: {first} of 32, split-half r {prefix_r[first]:.3f} >= {threshold:g}"
    # the maps are those of the masks used, exactly
    want = rise.explain_step(cfg_state, RiseOptions(num_masks=first, batch_size=8), masks[:first])
    for name in ("rise", "rise_raw", "rise_mean"):
        assert torch.equal(run.maps[name], want[name])


def test_early_stopping_waits_for_min_masks_and_whole_antithetic_pairs(cfg_state):
    opts = RiseOptions(num_masks=32, batch_size=3, seed=3, antithetic=True, stop_at_r=0.0, min_masks=8)
    run = rise.run_step(cfg_state, opts, rise.make_masks(opts, (16, 16), "cpu"))
    # after 9 masks (>= 8, but a pair split), the first check is at 12 masks, where r >= 0 or it ran on
    assert run.stats.masks_used in (12, 18, 24, 30, 32)
