"""Ground truth for a GENERATED image: the object the checker finds in it, its edge band and its texture region.

The model drew the image from a caption, so where the object is comes from the final image itself
(scenes/checker.py), not from a render. An image counts only when the checker sees exactly one object with the
caption's colour and shape (the words whose attention maps are measured); anything else is excluded and the reason
recorded. Regions, all bool at the latent's resolution (h, w):

- object: the checker's object mask (pixels further from the background than half the object contrast);
- edge: pixels within one latent pixel of the object's boundary, inside and outside (render.edge_band);
- texture: for a striped or dotted object whose texture the checker confirms, the pattern's dark pixels in the
  object's interior (the mask eroded by one pixel, so the texture and edge regions do not overlap), i.e. interior
  pixels whose brightness along the object's base colour is below the midpoint between the base colour (1) and
  the renderer's pattern shade. This is the generated-image analogue of render.GroundTruth.texture_region.
  Empty for plain objects (their texture ratio is NaN and left out of means).

Latent-space models (VAE factor f > 1): image masks are pooled over f x f blocks (share >= 1/2), the edge band is
taken on the pooled object mask. The shapes model is pixel-space (f = 1): latent pixels are image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from difflens.scenes.checker import check_image
from difflens.scenes.render import BASE, PATTERN_SHADE, ObjectSpec, edge_band, erode

TEXTURE_SPLIT = (1.0 + PATTERN_SHADE) / 2  # relative brightness between the base colour and the pattern shade
FORMED_IOU = 0.5  # an x0 prediction "has formed" the object when the checker finds it with this IoU


@dataclass(frozen=True)
class Regions:
    """Ground-truth regions of one generated image, (h, w) bool each at latent resolution; `detected` is what
    the checker read off the object."""

    object: np.ndarray
    edge: np.ndarray
    texture: np.ndarray
    detected: ObjectSpec


def to_latent(mask: np.ndarray, factor: int) -> np.ndarray:
    """(H, W) bool -> (H / f, W / f) bool: a latent pixel is in when at least half its f x f block is."""
    if factor == 1:
        return mask.copy()
    h, w = mask.shape
    return mask.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3)) >= 0.5


def texture_pixels(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The dark pattern pixels of an object's interior. image: (H, W, 3) uint8; mask: (H, W) bool -> (H, W) bool.

    Brightness is measured along the object's base colour (the 90th percentile of its interior, which patterns
    never reach since they darken at most half the pixels), as the checker does.
    """
    scale = image.shape[1] / BASE
    interior = erode(mask, max(1, round(scale)), border_is_edge=True)
    if not interior.any():
        return interior
    img = image.astype(float)
    base = np.percentile(img[interior], 90, axis=0)
    rel = img @ base / max(1e-6, float(base @ base))  # (H, W): 1 on the base colour
    return interior & (rel < TEXTURE_SPLIT)


def exclusion_reason(found_count: int, detected: ObjectSpec | None, expected: ObjectSpec) -> str | None:
    """Why an image cannot be scored (None: it can): not exactly one object, or the wrong colour or shape."""
    if found_count != 1 or detected is None:
        return f"{found_count} objects"
    wrong = [a for a in ("color", "shape") if getattr(detected, a) != getattr(expected, a)]
    return f"wrong {' and '.join(wrong)}" if wrong else None


def regions_from_image(image: np.ndarray, expected: ObjectSpec, factor: int = 1) -> Regions | str:
    """Ground truth of a generated image (H, W, 3) uint8 for the caption's object, at latent resolution (image
    size / factor); or the reason the image is excluded."""
    found = check_image(image)
    detected = found.objects[0].attributes if found.objects else None
    reason = exclusion_reason(found.count, detected, expected)
    if reason is not None:
        return reason
    assert detected is not None
    mask = found.objects[0].mask
    textured = expected.texture != "plain" and detected.texture == expected.texture
    texture = texture_pixels(image, mask) if textured else np.zeros_like(mask)
    obj = to_latent(mask, factor)
    return Regions(obj, edge_band(obj, 1), to_latent(texture, factor), detected)


def object_formed(image: np.ndarray, final_object: np.ndarray, factor: int = 1) -> bool:
    """Whether an intermediate prediction already shows the final object: the checker finds an object in `image`
    (H, W, 3) uint8 (e.g. the step's decoded x0 prediction) whose mask overlaps `final_object` (h, w) bool, at
    latent resolution, with IoU >= FORMED_IOU."""
    for o in check_image(image).objects:
        m = to_latent(o.mask, factor)
        union = (m | final_object).sum()
        if union and (m & final_object).sum() / union >= FORMED_IOU:
            return True
    return False
