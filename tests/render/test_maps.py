from __future__ import annotations

import numpy as np
import pytest
import torch

from difflens.render.maps import display_map, jet, overlay


def test_overlay_is_image_sized_uint8():
    image = np.full((40, 24, 3), 100, np.uint8)
    out = overlay(image, torch.rand(5, 3))
    assert out.shape == (40, 24, 3) and out.dtype == np.uint8


def test_display_rule_one_hot_pixel_gives_a_hot_spot_there():
    m = torch.zeros(8, 8)
    m[2, 5] = 7.0
    d = display_map(m, (32, 32))
    assert d.shape == (32, 32) and d.dtype == np.float32
    assert d.min() == 0.0 and d.max() == pytest.approx(1.0)
    r, c = np.unravel_index(d.argmax(), d.shape)
    assert 8 <= r < 12 and 20 <= c < 24  # inside latent pixel (2, 5)'s 4 x 4 block
    tile = overlay(np.zeros((32, 32, 3), np.uint8), m)
    hot, cold = tile[r, c], tile[0, 0]
    assert hot[0] >= 60 and hot[1] == hot[2] == 0  # jet's top: red
    assert cold[0] == cold[1] == 0 and cold[2] >= 60  # jet's bottom: blue


def test_display_rule_relu_then_min_max():
    m = np.array([[-5.0, 0.0], [1.0, 3.0]], np.float32)
    d = display_map(m, (2, 2))
    assert np.allclose(d, [[0.0, 0.0], [1 / 3, 1.0]])  # negatives clipped to 0 before min-max


@pytest.mark.parametrize("m", [np.zeros((4, 4)), np.full((4, 4), 2.0), -np.ones((4, 4)), np.full((4, 4), np.nan)])
def test_nothing_to_show_is_all_zero_not_nan(m):
    d = display_map(m, (8, 8))
    assert np.array_equal(d, np.zeros((8, 8), np.float32))


def test_display_map_rejects_stacks():
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        display_map(np.zeros((2, 4, 4)), (8, 8))


def test_jet_ends():
    assert np.allclose(jet(np.array([0.0, 1.0])), [[0, 0, 0.5], [0.5, 0, 0]])
