from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from difflens.scenes.render import (
    COLORS,
    EXTENT,
    EXTENT_JITTER,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    TRIANGLE_HEIGHT,
    ObjectSpec,
    Scene,
    dilate,
    edge_band,
    erode,
    render_scene,
    sample_scene,
)

AREA_PER_EXTENT2 = {"circle": np.pi / 4, "square": 1.0, "triangle": TRIANGLE_HEIGHT / 2}


def test_same_arguments_same_bytes_and_the_seed_matters():
    spec = ObjectSpec("triangle", "blue", "dotted", "large", "left")
    a, ga = render_scene(spec, 32, seed=5)
    b, gb = render_scene(spec, 32, seed=5)
    c, _ = render_scene(spec, 32, seed=6)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and np.array_equal(ga.mask, gb.mask)
    assert not np.array_equal(a, c)
    for m in (ga.mask, ga.edge_band, ga.texture_region):
        assert m.dtype == bool and m.shape == (32, 32)
    assert ga.attributes == (spec,) and ga.object_masks.shape == (1, 32, 32)


def test_sample_scene_is_a_function_of_the_generator_state():
    draw = [sample_scene(np.random.default_rng(3), 0.5) for _ in range(2)]
    assert draw[0] == draw[1]
    assert len({sample_scene(np.random.default_rng(s)) for s in range(50)}) > 30


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_mask_area_matches_the_size_class(shape, size):
    k = AREA_PER_EXTENT2[shape]
    lo, hi = k * (EXTENT[size] - EXTENT_JITTER) ** 2, k * (EXTENT[size] + EXTENT_JITTER) ** 2
    for seed in range(12):
        position = POSITIONS[seed % len(POSITIONS)]
        _, gt = render_scene(ObjectSpec(shape, "red", "plain", size, position), 32, seed)
        # Pixelisation at coverage 1/2 moves the area by well under a pixel per boundary pixel.
        assert 0.85 * lo <= gt.mask.sum() <= 1.15 * hi, (shape, size, position, gt.mask.sum(), lo, hi)


def test_every_small_object_is_smaller_than_every_large_one_of_its_shape():
    for shape in SHAPES:
        areas = {s: [render_scene(ObjectSpec(shape, "green", "plain", s), 32, i)[1].mask.sum() for i in range(10)]
                 for s in SIZES}
        assert max(areas["small"]) < min(areas["large"])


@pytest.mark.parametrize("color", COLORS)
def test_mask_covers_exactly_the_object_pixels(color):
    for seed, texture in enumerate(TEXTURES):
        img, gt = render_scene(ObjectSpec("circle", color, texture, "large", "center"), 32, seed)
        bg = np.median(img[0], axis=0)
        diff = np.abs(img.astype(float) - bg).max(axis=2)
        # Away from the anti-aliased boundary: objects sit >= 150 levels off the background, noise is ~3.
        assert diff[gt.mask & ~gt.edge_band].min() > 120
        assert diff[~gt.mask & ~gt.edge_band].max() < 30


def test_edge_band_is_the_boundary_band_of_the_mask():
    _, gt = render_scene(ObjectSpec("square", "yellow", "striped", "large", "center"), 32, 0)
    m = gt.mask
    inner_boundary = m & ~erode(m)
    outer_boundary = dilate(m) & ~m
    assert np.array_equal(gt.edge_band, inner_boundary | outer_boundary)
    assert not (gt.edge_band & erode(m)).any()
    ys, xs = np.nonzero(m)
    side = ys.max() - ys.min() + 1
    assert gt.edge_band.sum() == (side + 2) ** 2 - (side - 2) ** 2  # a square ring two pixels wide


def test_the_image_border_is_not_an_edge():
    m = np.zeros((8, 8), bool)
    m[2:6, 0:3] = True  # a block cut by the left border
    band = edge_band(m)
    assert not band[3:5, 0].any()  # the border pixels inside the block
    assert band[2, 0] and band[1, 0] and band[3:5, 3].all()
    assert erode(m, border_is_edge=True)[3:5, 0].sum() == 0


@pytest.mark.parametrize("texture", TEXTURES)
def test_texture_region_lies_in_the_mask_and_is_the_dark_pattern(texture):
    img, gt = render_scene(ObjectSpec("square", "blue", texture, "large", "center"), 32, 1)
    assert not (gt.texture_region & ~gt.mask).any()
    if texture == "plain":
        assert not gt.texture_region.any()
        return
    lum = img.astype(float).sum(axis=2)
    inside = gt.mask & ~gt.edge_band
    assert lum[inside & gt.texture_region].max() < lum[inside & ~gt.texture_region].min()
    rows = gt.texture_region[inside.any(axis=1)][:, inside.any(axis=0)]
    varies_across_a_row = (rows.any(axis=1) & ~rows.all(axis=1)).any()
    assert varies_across_a_row == (texture == "dotted")  # stripes are whole rows


@pytest.mark.parametrize("position", POSITIONS)
def test_mask_centroid_is_where_the_position_word_says(position):
    expect = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}[position]
    for seed, (shape, size) in enumerate((s, z) for s in SHAPES for z in SIZES):
        _, gt = render_scene(ObjectSpec(shape, "red", "plain", size, position), 32, seed)
        ys, xs = np.nonzero(gt.mask)
        d = np.array([xs.mean() + 0.5 - 16, ys.mean() + 0.5 - 16])
        if expect == (0, 0):
            assert np.abs(d).max() < 2.5, (shape, size, d)
        else:
            axis = 0 if expect[0] else 1
            assert d[axis] * sum(expect) > 4 and abs(d[1 - axis]) < 2.5, (shape, size, d)


def test_two_sampled_objects_never_touch():
    rng = np.random.default_rng(0)
    n = 0
    for seed in range(300):
        scene = sample_scene(rng, two_object_prob=1.0)
        _, gt = render_scene(scene, 32, seed)
        a, b = gt.object_masks
        assert a.sum() > 30 and b.sum() > 30
        assert not (dilate(a) & b).any(), scene
        assert np.array_equal(gt.mask, a | b)
        n += 1
    assert n == 300


def test_overlapping_objects_keep_only_their_visible_pixels():
    scene = Scene((ObjectSpec("square", "red", "plain", "large", "center"),
                   ObjectSpec("circle", "blue", "dotted", "small", "left")))
    _, gt = render_scene(scene, 32, 0)
    a, b = gt.object_masks
    assert not (a & b).any() and np.array_equal(a | b, gt.mask)


def test_other_resolutions_scale_the_geometry():
    spec = ObjectSpec("square", "green", "plain", "large", "center")
    areas = [render_scene(spec, size, 0)[1].mask.sum() / size**2 for size in (32, 64)]
    assert abs(areas[0] - areas[1]) < 0.02


def test_invalid_specs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        ObjectSpec("star", "red")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="different positions"):
        Scene((ObjectSpec("circle", "red"), ObjectSpec("square", "blue")))
    with pytest.raises(ValueError, match="1 or 2"):
        Scene(())


def test_scenes_do_not_import_torch():
    code = "import sys, difflens.scenes.checker, difflens.scenes.captions; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
