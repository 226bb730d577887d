from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflens.engine import faithfulness as fa
from difflens.engine.options import GenerationParams
from difflens.engine.sampler import decode, generate


def test_pointing_game_with_tolerance():
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:4, 2:4] = True
    m = torch.zeros(8, 8)
    m[3, 3] = 1
    assert fa.pointing_game(m, region)
    m = torch.zeros(8, 8)
    m[4, 4] = 1  # one pixel diagonally off the region
    assert fa.pointing_game(m, region, tolerance=1)
    assert not fa.pointing_game(m, region, tolerance=0)
    m = torch.zeros(8, 8)
    m[7, 0] = 1
    assert not fa.pointing_game(m, region)


def test_mass_ratio():
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2] = True  # half the area
    assert fa.mass_ratio(torch.ones(4, 4), region) == pytest.approx(1.0)
    m = torch.zeros(4, 4)
    m[0, 0] = 3.0
    m[3, 3] = -5.0  # negative saliency is ReLU'd away
    assert fa.mass_ratio(m, region) == pytest.approx(2.0)
    assert math.isnan(fa.mass_ratio(torch.zeros(4, 4), region))


def test_spearman_against_an_independent_computation():
    g = np.random.default_rng(0)
    a, b = g.normal(size=50), g.normal(size=50)
    b[:10] = a[:10]  # some correlation
    a[5] = a[6]  # a tie

    def rank(v):  # average ranks, by hand
        out = np.empty(len(v))
        for i, x in enumerate(v):
            out[i] = (v < x).sum() + ((v == x).sum() - 1) / 2
        return out

    ra, rb = rank(a), rank(b)
    expected = np.corrcoef(ra, rb)[0, 1]
    assert fa.spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, abs=1e-9)
    assert fa.spearman(torch.tensor(a), torch.tensor(a)) == pytest.approx(1.0)
    assert fa.spearman(torch.tensor(a), -torch.tensor(a)) == pytest.approx(-1.0)


def test_ssim_identity_and_degradation():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fa.ssim(x, x), torch.ones(2, dtype=x.dtype))
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    assert (fa.ssim(x, noisy) < 0.9).all()


def test_auc():
    f = torch.linspace(0, 1, 5, dtype=torch.float64)
    assert fa.auc(f, torch.ones(5, dtype=torch.float64)) == pytest.approx(1.0)
    assert fa.auc(f, 1 - f) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def step_state(tiny_model):
    states = []
    generate(tiny_model, GenerationParams("a red circle", steps=4, guidance_scale=3.0), on_step=states.append)
    return states[1]


def _decode(model):
    def run(x0):
        return torch.stack([torch.from_numpy(decode(model, x[None])).permute(2, 0, 1) for x in x0])
    return run


@pytest.mark.parametrize("kind", ["deletion", "insertion"])
def test_perturbation_curves_end_points(tiny_model, step_state, kind):
    sal = torch.rand(16, 16, generator=torch.Generator().manual_seed(1))
    c = fa.perturbation_curve(step_state, sal, kind, _decode(tiny_model), chunks=4)
    assert c["fraction"].tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    intact = 0 if kind == "deletion" else -1  # nothing deleted / everything restored
    assert c["ssim"][intact] == pytest.approx(1.0, abs=1e-5)
    assert c["cosine"][intact] == pytest.approx(1.0, abs=1e-5)
    other = -1 if kind == "deletion" else 0
    assert c["cosine"][other] < 0.999


def test_custom_order_is_used(tiny_model, step_state):
    sal = torch.rand(16, 16, generator=torch.Generator().manual_seed(1))
    by_map = fa.perturbation_curve(step_state, sal, "deletion", _decode(tiny_model), chunks=4)
    order = torch.argsort(sal.flatten(), descending=True)
    same = fa.perturbation_curve(step_state, sal, "deletion", _decode(tiny_model), chunks=4, order=order)
    flipped = fa.perturbation_curve(step_state, sal, "deletion", _decode(tiny_model), chunks=4, order=order.flip(0))
    assert torch.allclose(by_map["cosine"], same["cosine"])
    assert not torch.allclose(by_map["cosine"][1:-1], flipped["cosine"][1:-1])


def test_tied_pixels_go_in_the_tie_break_order_not_raster_order(tiny_model, step_state):
    """A two-valued map (the object mask as a reference) has long runs of ties; a stable sort would take them top
    row first, a spatial sweep that scores on its own. With tie_break they follow that permutation."""
    mask = torch.zeros(16, 16)
    mask[4:8, 4:8] = 1
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    decode_ = _decode(tiny_model)
    fair = fa.perturbation_curve(step_state, mask, "deletion", decode_, chunks=4, tie_break=perm)
    flat = mask.flatten()
    expected = torch.cat([perm[flat[perm] == 1], perm[flat[perm] == 0]])  # the object first, each part by perm
    by_order = fa.perturbation_curve(step_state, mask, "deletion", decode_, chunks=4, order=expected)
    assert torch.equal(fair["cosine"], by_order["cosine"])
    raster = fa.perturbation_curve(step_state, mask, "deletion", decode_, chunks=4)
    assert not torch.allclose(fair["cosine"][1:-1], raster["cosine"][1:-1])
    sal = torch.rand(16, 16, generator=torch.Generator().manual_seed(1))  # no ties: tie_break changes nothing
    assert torch.equal(fa.perturbation_curve(step_state, sal, "deletion", decode_, chunks=4)["cosine"],
                       fa.perturbation_curve(step_state, sal, "deletion", decode_, chunks=4, tie_break=perm)["cosine"])
