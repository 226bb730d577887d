from __future__ import annotations

import numpy as np
import pytest

from difflens.scenes.checker import check_image, components, score
from difflens.scenes.render import ObjectSpec, Scene, render_scene, sample_scene

ATTRS = ("count", "shape", "color", "texture", "size", "position")


def accuracy(n: int, two_object_prob: float, size: int = 32, degrade=None, blur: float = 0.0,
             noise: float = 0.0) -> dict[str, float]:
    rng = np.random.default_rng(123)
    hits = dict.fromkeys(ATTRS, 0)
    for i in range(n):
        scene = sample_scene(rng, two_object_prob)
        img, _ = render_scene(scene, size, 1000 + i)
        if degrade is not None:
            img = degrade(img, blur, noise, rng)
        for k, v in score(img, scene).items():
            hits[k] += v
    return {k: v / n for k, v in hits.items()}


def test_at_least_98_percent_on_every_attribute():
    acc = accuracy(400, two_object_prob=0.0)
    assert min(acc.values()) >= 0.98, acc


def test_two_object_scenes():
    acc = accuracy(150, two_object_prob=1.0)
    assert min(acc.values()) >= 0.98, acc


def test_tolerates_blur_and_noise(degrade):
    acc = accuracy(250, two_object_prob=0.2, degrade=degrade, blur=0.6, noise=8.0)
    assert min(acc.values()) >= 0.98, acc


def test_works_at_64_pixels():
    acc = accuracy(60, two_object_prob=0.2, size=64)
    assert min(acc.values()) >= 0.98, acc


def test_reads_off_every_attribute_of_one_object():
    spec = ObjectSpec("triangle", "yellow", "striped", "large", "bottom")
    img, gt = render_scene(spec, 32, 4)
    found = check_image(img)
    assert found.count == 1
    obj = found.objects[0]
    assert obj.attributes == spec
    assert (obj.mask == gt.mask).mean() > 0.97


def test_float_images_in_unit_range_are_read_like_uint8():
    img, _ = render_scene(ObjectSpec("circle", "green", "dotted", "small", "top"), 32, 2)
    a, b = check_image(img), check_image(img.astype(np.float32) / 255)
    assert [o.attributes for o in a.objects] == [o.attributes for o in b.objects]


def test_integer_images_of_any_width_read_like_uint8_and_other_scales_are_refused():
    """A 0-255 image as float (or int64) was read as 0-1 and gave zero objects, with no error."""
    img, _ = render_scene(ObjectSpec("square", "blue", "striped", "large", "left"), 32, 3)
    want = [o.attributes for o in check_image(img).objects]
    assert [o.attributes for o in check_image(img.astype(np.int64)).objects] == want
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\], got \["):
        check_image(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"integer images must be in \[0, 255\]"):
        check_image(img.astype(np.int64) * 2)


def test_an_object_without_colour_is_never_right_on_colour():
    """Zero chroma reads as hue 0, which is red: a black silhouette drawn for 'red' must not pass the colour check."""
    spec = ObjectSpec("square", "red", "plain", "large", "center")
    img, gt = render_scene(spec, 32, 1)
    black = img.copy()
    black[gt.mask] = (20, 20, 20)
    (obj,) = check_image(black).objects
    assert obj.colorless and obj.attributes.shape == "square"
    assert score(black, spec)["color"] is False and score(img, spec)["color"] is True


def test_a_non_square_image_is_read(tmp_path):
    """A model may generate 32 x 48: the shape templates follow the image's own height and width."""
    spec = ObjectSpec("circle", "yellow", "dotted", "small", "left")
    img, _ = render_scene(spec, 32, 5)
    wide = np.concatenate([img, np.repeat(img[:, -1:], 16, axis=1)], axis=1)  # background added on the right
    (obj,) = check_image(wide).objects
    a = obj.attributes
    assert (a.shape, a.color, a.texture, a.size) == (spec.shape, spec.color, spec.texture, spec.size)


def test_an_empty_background_has_no_object():
    img, _ = render_scene(ObjectSpec("circle", "red"), 32, 0)
    empty = np.broadcast_to(img[0, 0], img.shape).copy()
    assert check_image(empty).count == 0
    s = score(empty, ObjectSpec("circle", "red"))
    assert not any(s.values())


def test_an_object_drawn_twice_fails_the_count():
    a, _ = render_scene(ObjectSpec("circle", "red", "plain", "small", "left"), 32, 0)
    b, gb = render_scene(ObjectSpec("circle", "red", "plain", "small", "right"), 32, 0)
    twice = np.where(gb.mask[..., None], b, a)
    s = score(twice, ObjectSpec("circle", "red", "plain", "small", "left"))
    assert not s["count"] and s["color"] and s["shape"]


def test_two_objects_are_matched_by_position():
    scene = Scene((ObjectSpec("square", "blue", "plain", "small", "top"),
                   ObjectSpec("circle", "red", "striped", "large", "bottom")))
    img, _ = render_scene(scene, 32, 9)
    assert all(score(img, scene).values())
    swapped = Scene((ObjectSpec("square", "red", "plain", "small", "top"),
                     ObjectSpec("circle", "blue", "striped", "large", "bottom")))
    s = score(img, swapped)
    assert s["count"] and not s["color"] and s["shape"]


def test_components_labels_8_connected_blobs():
    m = np.zeros((6, 6), bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours: one component
    m[4:6, 3:6] = True
    labels = components(m)
    assert labels.max() == 2
    assert labels[0, 0] == labels[1, 1] != labels[5, 5]
    assert (labels[~m] == 0).all()
    assert components(np.ones((3, 3), bool)).max() == 1


def test_rejects_non_rgb_arrays():
    with pytest.raises(ValueError, match="H, W, 3"):
        check_image(np.zeros((8, 8)))
