"""DF-RISE mask samplers (engine/masks.py): the defaults are the masks of every earlier release, bit for bit; the
stratified, Sobol and antithetic draws have the properties their names promise."""

from __future__ import annotations

import pytest
import torch

from difflens.engine import masks as masks_module
from difflens.engine.masks import grid_masks, make_masks, pixel_masks
from difflens.engine.options import SOBOL_MAX_DIM, RiseOptions
from difflens.errors import InvalidArgument


def test_the_default_pixel_masks_are_the_earlier_releases_bit_for_bit():
    """An audit record without the sampler fields must replay with exactly the masks its job used: those of the
    reference draw order, (torch.rand(N, h, w) < p) from a CPU generator seeded with the mask seed."""
    got = make_masks(RiseOptions(num_masks=40, p=0.3, seed=123), (12, 9), "cpu")
    gen = torch.Generator().manual_seed(123)
    assert torch.equal(got, (torch.rand(40, 12, 9, generator=gen) < 0.3).float())
    assert torch.equal(got, pixel_masks(40, (12, 9), 0.3, torch.Generator().manual_seed(123)))


def test_the_default_grid_masks_are_the_earlier_releases_bit_for_bit():
    """The earlier release's grid_masks, written out: cells, then row offsets, then column offsets."""
    n, (h, w), s, p = 12, (10, 7), 3, 0.4
    got = make_masks(RiseOptions(num_masks=n, mask="grid", grid_size=s, p=p, seed=9), (h, w), "cpu")
    gen = torch.Generator().manual_seed(9)
    cells = (torch.rand(n, 1, s, s, generator=gen) < p).float()
    up = torch.nn.functional.interpolate(cells, size=(4 * 4, 4 * 3), mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp_(0, 1)
    dy, dx = torch.randint(0, 4, (n,), generator=gen).tolist(), torch.randint(0, 3, (n,), generator=gen).tolist()
    want = torch.stack([up[k, y:y + h, x:x + w] for k, (y, x) in enumerate(zip(dy, dx, strict=True))])
    assert torch.equal(got, want)
    assert torch.equal(got, grid_masks(n, (h, w), s, p, torch.Generator().manual_seed(9)))


@pytest.mark.parametrize(("n", "p"), [(64, 0.5), (50, 0.3), (33, 0.7), (7, 0.5)])
def test_stratified_keeps_every_pixel_n_p_times_to_within_one(n, p):
    m = make_masks(RiseOptions(num_masks=n, p=p, sampler="stratified", seed=4), (16, 20), "cpu")
    kept = m.sum(dim=0)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert ((kept - n * p).abs() <= 1).all()
    if float(n * p).is_integer():
        assert (kept == n * p).all()
    mc = make_masks(RiseOptions(num_masks=n, p=p, seed=4), (16, 20), "cpu").sum(dim=0)
    assert (mc - n * p).abs().max() > 1  # what it fixes: independent draws scatter the counts


def test_stratified_draws_are_latin_hypercube_columns():
    u = masks_module.stratified_uniforms(10, 3000, torch.Generator().manual_seed(1))
    strata = (u * 10).floor().long()
    assert (strata.sort(dim=0).values == torch.arange(10)[:, None]).all()  # each stratum once per pixel
    assert not (strata[:, :1] == strata).all()  # each pixel its own order
    assert (u >= 0).all() and (u < 1).all()


def test_stratified_grid_masks_keep_every_cell_n_p_times():
    n, s = 32, 4
    opts = RiseOptions(num_masks=n, mask="grid", grid_size=s, sampler="stratified", seed=2)
    got = make_masks(opts, (16, 16), "cpu")
    gen = torch.Generator().manual_seed(2)
    cells = masks_module.stratified_uniforms(n, s * s, gen) < 0.5
    assert (cells.sum(dim=0) == n // 2).all()
    dy, dx = masks_module.crop_offsets(n, (16, 16), s, gen)
    want = masks_module.upsampled_crops(cells.float().view(n, 1, s, s), (16, 16), dy.tolist(), dx.tolist())
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["pixel", "grid"])
def test_sobol_masks_are_fixed_by_the_seed_and_differ_across_seeds(kind):
    def draw(seed):
        return make_masks(RiseOptions(num_masks=32, mask=kind, grid_size=4, sampler="sobol", seed=seed), (12, 12),
                          "cpu")

    a, b, c = draw(5), draw(5), draw(6)
    assert a.shape == (32, 12, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


def test_sobol_masks_are_scrambled_sobol_points_thresholded_at_p():
    got = make_masks(RiseOptions(num_masks=16, p=0.3, sampler="sobol", seed=8), (5, 6), "cpu")
    u = torch.quasirandom.SobolEngine(30, scramble=True, seed=8).draw(16, dtype=torch.float64)
    assert torch.equal(got, (u < 0.3).float().view(16, 5, 6))
    assert ((got.sum(dim=0) - 16 * 0.3).abs() <= 1).all()  # a power-of-two run of Sobol points is balanced


def test_sobol_refuses_more_dimensions_than_the_engine_has_naming_the_field():
    side = int(SOBOL_MAX_DIM**0.5) + 1
    with pytest.raises(InvalidArgument) as e:
        RiseOptions(sampler="sobol").check_latent((side, side))
    assert e.value.field == "rise.sampler" and str(SOBOL_MAX_DIM) in e.value.message
    RiseOptions(sampler="sobol", mask="grid", grid_size=16).check_latent((side, side))  # 256 cells: fine
    RiseOptions(sampler="stratified").check_latent((side, side))


@pytest.mark.parametrize(("sampler", "antithetic", "kind"), [
    ("mc", True, "pixel"), ("stratified", True, "pixel"), ("mc", True, "grid"), ("stratified", True, "grid"),
    ("sobol", False, "pixel")])
def test_antithetic_pairs_at_p_one_half_are_complements(sampler, antithetic, kind):
    """Sobol's own consecutive points pair up so at p = 0.5 (their first binary digits differ; as grid masks each
    is cropped at its own offset)."""
    m = make_masks(RiseOptions(num_masks=20, mask=kind, grid_size=4, sampler=sampler, antithetic=antithetic,
                               seed=3), (12, 10), "cpu")
    first, second = m[0::2], m[1::2]
    if kind == "pixel":
        assert torch.equal(first + second, torch.ones_like(first))
    else:  # bilinear upsampling is linear and the pair shares its crop: complements up to rounding
        assert (first + second - 1).abs().max() <= 1e-6 and ((first > 0.01) & (first < 0.99)).any()
    assert not torch.equal(m[0], m[2])  # each pair from its own draw


@pytest.mark.parametrize("p", [0.25, 0.75])
def test_antithetic_pairs_away_from_one_half_mirror_the_draw(p):
    """U and 1 - U: for p < 0.5 the pair never keeps a pixel twice, for p > 0.5 it never drops one twice."""
    m = make_masks(RiseOptions(num_masks=400, p=p, antithetic=True, seed=3), (8, 8), "cpu")
    both = m[0::2] + m[1::2]
    assert (both <= 1).all() if p < 0.5 else (both >= 1).all()
    assert abs(m[1::2].mean().item() - p) < 0.02  # the partner keeps at rate p too
    gen = torch.Generator().manual_seed(3)
    u = torch.rand(200, 64, generator=gen)
    assert torch.equal(m[0::2], (u < p).float().view(200, 8, 8))
    assert torch.equal(m[1::2], (u >= 1 - p).float().view(200, 8, 8))


def test_antithetic_needs_an_even_number_of_masks_naming_the_field():
    with pytest.raises(InvalidArgument) as e:
        RiseOptions(num_masks=255, antithetic=True)
    assert e.value.field == "rise.num_masks" and "even" in e.value.message


def test_antithetic_sobol_at_p_one_half_is_refused_it_would_draw_every_mask_twice():
    with pytest.raises(InvalidArgument) as e:
        RiseOptions(sampler="sobol", antithetic=True)
    assert e.value.field == "rise.antithetic" and "twice" in e.value.message
    m = make_masks(RiseOptions(num_masks=16, sampler="sobol", antithetic=True, p=0.3, seed=1), (6, 6), "cpu")
    assert len({tuple(x.flatten().tolist()) for x in m}) == 16  # away from 0.5 the pairs are new masks


@pytest.mark.parametrize(("kw", "field", "text"), [
    ({"sampler": "halton"}, "rise.sampler", "got 'halton'; allowed: mc, stratified, sobol"),
    ({"stop_at_r": 1.5}, "rise.stop_at_r", "allowed range [0.0, 1.0]"),
    ({"min_masks": 2}, "rise.min_masks", "allowed range [4, 1000000]"),
    ({"stop_at_r": 0.9, "num_masks": 32}, "rise.min_masks", "at most rise.num_masks (32)"),
    ({"antithetic": "yes"}, "rise.antithetic", "allowed: true, false"),
])
def test_bad_sampling_options_name_the_field_and_what_is_allowed(kw, field, text):
    with pytest.raises(InvalidArgument) as e:
        RiseOptions(**kw)
    assert e.value.field == field and text in e.value.message


def test_masks_are_drawn_on_the_cpu_whatever_the_device():
    """The same options give the same masks on any device: drawn on the CPU, then moved."""
    opts = RiseOptions(num_masks=8, sampler="stratified", antithetic=True, seed=1)
    on_meta = make_masks(opts, (8, 8), "meta")
    assert on_meta.device.type == "meta" and on_meta.shape == (8, 8, 8)
    assert torch.equal(make_masks(opts, (8, 8), "cpu"), make_masks(opts, (8, 8), torch.device("cpu")))
