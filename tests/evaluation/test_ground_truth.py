from __future__ import annotations

import numpy as np
import pytest

from difflens.evaluation.ground_truth import exclusion_reason, object_formed, regions_from_image, to_latent
from difflens.scenes.render import ObjectSpec, edge_band, render_scene


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("texture", ["striped", "dotted"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regions_of_a_render_match_its_ground_truth(texture, seed):
    spec = ObjectSpec("square", "blue", texture, "large", "center")
    image, gt = render_scene(spec, 32, seed)
    r = regions_from_image(image, spec)
    assert not isinstance(r, str)
    assert iou(r.object, gt.mask) > 0.9
    # The checker's threshold (half the contrast) can drop a row of barely-half-covered pixels that the render's
    # coverage >= 1/2 keeps: the band then shifts by a pixel along that side.
    assert iou(r.edge, gt.edge_band) > 0.7
    # The render's texture region includes pattern pixels on the border; ours is the interior's only.
    assert r.texture.any() and (r.texture & ~gt.texture_region).sum() <= 0.1 * r.texture.sum()
    assert (r.texture & gt.texture_region).sum() > 0.5 * gt.texture_region.sum()
    assert not (r.texture & r.edge).any()  # texture lies in the interior, clear of the edge band


def test_plain_objects_have_no_texture_region_and_the_edge_band_follows_the_object():
    spec = ObjectSpec("circle", "red", "plain", "large", "left")
    image, _ = render_scene(spec, 32, 0)
    r = regions_from_image(image, spec)
    assert not isinstance(r, str)
    assert not r.texture.any()
    assert np.array_equal(r.edge, edge_band(r.object, 1))


def test_a_caption_asking_for_texture_the_image_lacks_gets_no_texture_region():
    image, _ = render_scene(ObjectSpec("circle", "red", "plain", "large", "center"), 32, 0)
    r = regions_from_image(image, ObjectSpec("circle", "red", "striped", "large", "center"))
    assert not isinstance(r, str) and not r.texture.any()


def test_exclusions():
    image, _ = render_scene(ObjectSpec("circle", "red", "plain", "large", "center"), 32, 0)
    assert regions_from_image(image, ObjectSpec("circle", "green")) == "wrong color"
    assert regions_from_image(image, ObjectSpec("square", "green")) == "wrong color and shape"
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert regions_from_image(noise, ObjectSpec("circle", "red")) == "0 objects"
    assert exclusion_reason(2, ObjectSpec("circle", "red"), ObjectSpec("circle", "red")) == "2 objects"


def test_to_latent_pools_blocks_at_half():
    m = np.zeros((4, 4), bool)
    m[:2, :2] = True
    m[2, 2] = True  # a quarter of its block: out
    m[2:4, 0] = True  # half of its block: in
    assert to_latent(m, 2).tolist() == [[True, False], [True, False]]
    assert np.array_equal(to_latent(m, 1), m)


def test_object_formed():
    spec = ObjectSpec("triangle", "yellow", "plain", "large", "center")
    image, gt = render_scene(spec, 32, 0)
    assert object_formed(image, gt.mask)
    assert not object_formed(image, np.roll(gt.mask, 12, axis=1))  # somewhere else
    flat = np.full_like(image, 200)
    assert not object_formed(flat, gt.mask)
