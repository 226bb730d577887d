"""Classical attribute checker: which objects an image shows, and each one's shape, colour, texture, size, position.

No learned weights, so it cannot share a learned bias with the model it judges. On an (H, W, 3) image:
1. background = per-channel median of the one-pixel frame; object pixels differ from it by more than half the
   object contrast in some channel (the objects are saturated colours, the background a light grey);
2. 8-connected components; specks below MIN_AREA and blobs above MAX_AREA_SHARE are dropped (an image whose
   frame is not a plain background has no objects); what is left is the object count;
3. per object, on a soft mask (distance from the background over the object's own contrast, so edge pixels count
   by how much they are covered): position = soft centroid against the canvas centre; shape = the renderer's
   template (same area, same centroid) nearest in L1; size = the extent that template needs, from the soft area
   (which blur preserves); colour = nearest reference hue of the chroma-weighted mean hue; texture = amplitude
   of the texture period of the interior's brightness along y and along x: none (plain), y only (stripes),
   both (dots).
Thresholds sit halfway between the renderer's classes at 32 px and scale with the resolution.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from difflens.scenes.render import BASE, PERIOD, RGB, TRIANGLE_HEIGHT, ObjectSpec, Scene, dilate, erode, shape_coverage

MIN_AREA = 14.0  # px at 32 px; a small triangle is ~55 px
MAX_AREA_SHARE = 0.45  # of the image; the largest object (a large square) covers ~30%
MAX_FRAME_SPREAD = 25.0  # median absolute deviation (0-255) of the frame above which there is no background
SIZE_SPLIT = 14.0  # extent between small (~11) and large (~17), px at 32 px
CENTER_RADIUS = 3.0  # centroid this close to the centre (px at 32 px): "center"
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": TRIANGLE_HEIGHT / 2}  # area / extent^2
TEXTURE_AMPLITUDE = 0.025  # amplitude of the texture period (relative brightness, x and y) above which: textured
STRIPE_RATIO = 0.5  # x amplitude below this share of the y amplitude: stripes, else dots
HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in RGB.items()}
# Mean chroma (max - min channel, 0-255) below which an object has no colour: the renderer's colours have 120-200.
MIN_CHROMA = 30.0


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image. mask: (H, W) bool; centroid: (x, y) in pixels. `colorless`: the object has no
    colour (attributes.color is then only the nearest hue, and never counts as right)."""

    attributes: ObjectSpec
    area: int
    centroid: tuple[float, float]
    mask: np.ndarray
    colorless: bool = False


@dataclass(frozen=True)
class CheckResult:
    """Objects found, largest first. foreground: (H, W) bool, every pixel that differs from the background."""

    objects: tuple[DetectedObject, ...]
    foreground: np.ndarray

    @property
    def count(self) -> int:
        return len(self.objects)


def _as_float255(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) integers in [0, 255] or floats in [0, 1] -> (H, W, 3) float64 on the 0-255 scale. Anything else
    is a ValueError (a 0-255 float image read as 0-1 would come out as no objects at all, silently)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image: expected (H, W, 3), got shape {img.shape}")
    if img.dtype.kind in "ui":
        if img.size and (img.min() < 0 or img.max() > 255):
            raise ValueError(f"image: integer images must be in [0, 255], got [{img.min()}, {img.max()}]")
        return img.astype(float)
    if img.dtype.kind != "f":
        raise ValueError(f"image: expected integers in [0, 255] or floats in [0, 1], got dtype {img.dtype}")
    if img.size and (np.nanmin(img) < 0.0 or np.nanmax(img) > 1.0):
        raise ValueError(f"image: float images must be in [0, 1], got [{np.nanmin(img):g}, {np.nanmax(img):g}]")
    return img.astype(float) * 255.0


def _background(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (3,): median colour of the image's one-pixel frame."""
    frame = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    return np.median(frame, axis=0)


def _frame_spread(img: np.ndarray, bg: np.ndarray) -> float:
    """img: (H, W, 3); bg: (3,) -> the largest per-channel median absolute deviation of the frame from bg."""
    frame = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    return float(np.median(np.abs(frame - bg), axis=0).max())


def components(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) int labels of 8-connected components (0 = background, then 1, 2, ... by first pixel)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:  # propagate each component's smallest index until nothing changes (<= diameter rounds)
        p = np.pad(labels, 1, constant_values=big)
        nxt = np.min([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
        nxt = np.where(mask, nxt, big)
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    if mask.all():
        return np.ones((h, w), int)
    _, dense = np.unique(np.where(mask, labels, 0), return_inverse=True)  # 0 (background) stays 0
    return dense.reshape(h, w)


def _colorless(px: np.ndarray) -> bool:
    """px: (N, 3) object pixels, 0-255 -> whether the object has no colour to speak of (black, grey, white): its
    nearest hue is then noise, and zero chroma reads as hue 0, red."""
    return float((px.max(axis=1) - px.min(axis=1)).mean()) < MIN_CHROMA


def _color(px: np.ndarray) -> str:
    """px: (N, 3) object pixels, 0-255 -> nearest reference colour by chroma-weighted circular mean hue."""
    mx, mn = px.max(axis=1), px.min(axis=1)
    chroma = mx - mn
    hsv = np.array([colorsys.rgb_to_hsv(*(p / 255)) for p in px])
    ang = hsv[:, 0] * 2 * np.pi
    hue = np.degrees(np.arctan2((chroma * np.sin(ang)).sum(), (chroma * np.cos(ang)).sum())) % 360
    return min(HUES, key=lambda n: min(abs(hue - HUES[n]), 360 - abs(hue - HUES[n])))


def _soft_alpha(img: np.ndarray, bg: np.ndarray, region: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1]: how much of each pixel of `region` (H, W) bool the object covers.

    The channel-wise distance from the background, over the object's own contrast (the lower quartile over its
    interior `inner` (H, W) bool: its base colour, since stripes and dots only ever lie further away).
    """
    diff = np.abs(img - bg).max(axis=2)
    contrast = max(float(np.percentile(diff[inner], 25)), 1.0)
    return np.where(region, np.clip(diff / contrast, 0.0, 1.0), 0.0)


def _fit_shape(alpha: np.ndarray, cx: float, cy: float) -> tuple[str, float]:
    """alpha: (H, W) soft object mask; (cx, cy) its centroid in pixel-edge coordinates. -> (shape, extent px).

    Each shape's template of the same area, centred on the centroid, is compared with `alpha` (L1); the nearest
    wins. Area is what blur preserves, so extent and size are read from it.
    """
    area = float(alpha.sum())
    best: tuple[float, str, float] | None = None
    for shape, per_extent2 in FILL.items():
        extent = float(np.sqrt(area / per_extent2))
        err = float(np.abs(alpha - shape_coverage(shape, cx, cy, extent, *alpha.shape)).sum())
        if best is None or err < best[0]:
            best = (err, shape, extent)
    assert best is not None
    return best[1], best[2]


def _texture(img: np.ndarray, inner: np.ndarray, scale: float) -> str:
    """img: (H, W, 3) 0-255; inner: (H, W) bool, the object's interior.

    Amplitude of the texture period along y and along x of the brightness relative to the object's base colour:
    stripes (horizontal) vary along y only, dots along both, plain objects along neither.
    """
    px = img[inner]
    base = np.percentile(px, 90, axis=0)  # the undarkened colour (patterns darken at most half the pixels)
    rel = px @ base / max(1e-6, float(base @ base))  # 1 on the base colour, ~0.45 on stripes and dots
    rel = rel - rel.mean()
    ys, xs = np.nonzero(inner)
    period = max(2, round(PERIOD * scale))
    amp_y = abs(np.mean(rel * np.exp(2j * np.pi * ys / period)))
    amp_x = abs(np.mean(rel * np.exp(2j * np.pi * xs / period)))
    if np.hypot(amp_y, amp_x) < TEXTURE_AMPLITUDE:
        return "plain"
    return "striped" if amp_x < STRIPE_RATIO * amp_y else "dotted"


def _position(cx: float, cy: float, size_hw: tuple[int, int], scale: float) -> str:
    h, w = size_hw
    dx, dy = cx - w / 2, cy - h / 2
    if max(abs(dx), abs(dy)) < CENTER_RADIUS * scale:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _describe(img: np.ndarray, bg: np.ndarray, m: np.ndarray, others: np.ndarray, scale: float) -> DetectedObject:
    """m: (H, W) bool, one component; others: (H, W) bool, every other foreground pixel."""
    inner = erode(m, max(1, round(scale)), border_is_edge=True)
    if inner.sum() < 6:
        inner = m
    alpha = _soft_alpha(img, bg, dilate(m, 1) & ~others, inner)
    h, w = m.shape
    yy, xx = np.mgrid[:h, :w]
    area = float(alpha.sum())
    cx, cy = float((alpha * xx).sum() / area) + 0.5, float((alpha * yy).sum() / area) + 0.5
    shape, extent = _fit_shape(alpha, cx, cy)
    spec = ObjectSpec(
        shape=shape,  # type: ignore[arg-type]
        color=_color(img[m]),  # type: ignore[arg-type]
        texture=_texture(img, inner, scale),  # type: ignore[arg-type]
        size="large" if extent >= SIZE_SPLIT * scale else "small",
        position=_position(cx, cy, (h, w), scale),  # type: ignore[arg-type]
    )
    return DetectedObject(spec, int(m.sum()), (cx, cy), m, colorless=_colorless(img[m]))


def foreground(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 or float in [0, 1] -> (H, W) bool: pixels that differ clearly from the background."""
    img = _as_float255(image)
    return _foreground(img, _background(img))


def _foreground(img: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """img: (H, W, 3) float on the 0-255 scale; bg: (3,) -> (H, W) bool."""
    diff = np.abs(img - bg).max(axis=2)
    # Half the object contrast (objects sit 150-200 levels off the background), but never down in the noise.
    thr = float(np.clip(0.5 * np.percentile(diff, 99), 45.0, 90.0))
    return diff > thr


def check_image(image: np.ndarray) -> CheckResult:
    """Find the objects in `image` (H, W, 3), uint8 or float in [0, 1], and read off their attributes."""
    img = _as_float255(image)
    scale = min(img.shape[:2]) / BASE  # the renderer's canvas is square; a wider image keeps its objects' scale
    bg = _background(img)
    fg = _foreground(img, bg)
    if _frame_spread(img, bg) > MAX_FRAME_SPREAD:  # no plain background to tell objects from (e.g. noise)
        return CheckResult((), np.zeros_like(fg))
    labels = components(fg)
    objects = []
    for k in range(1, int(labels.max()) + 1):
        m = labels == k
        if MIN_AREA * scale * scale <= m.sum() <= MAX_AREA_SHARE * m.size:
            objects.append(_describe(img, bg, m, fg & ~m, scale))
    objects.sort(key=lambda o: -o.area)
    return CheckResult(tuple(objects), fg)


ATTRS = ("count", "shape", "color", "texture", "size", "position")


def score(image: np.ndarray, expected: Scene | ObjectSpec) -> dict[str, bool]:
    """Per-attribute agreement of `image` (H, W, 3) with what it should show: count, shape, color, texture, size,
    position. One expected object is compared with the largest found; of two, each with the largest found at its
    position (else the largest). An attribute is right only if it is right for every expected object."""
    scene = expected if isinstance(expected, Scene) else Scene((expected,))
    found = check_image(image)
    out = {"count": found.count == len(scene.objects)}
    names = ATTRS[1:]
    if not found.objects:
        return out | {n: False for n in names}
    if len(scene.objects) == 1:
        pairs = [(scene.objects[0], found.objects[0])]
    else:
        pairs = [(o, _at(found.objects, o.position)) for o in scene.objects]
    right = {n: all(getattr(e, n) == getattr(d.attributes, n) for e, d in pairs) for n in names}
    right["color"] = right["color"] and not any(d.colorless for _, d in pairs)
    return out | right


def accuracy(images: np.ndarray, scenes: Sequence[Scene]) -> dict[str, float]:
    """images: (N, H, W, 3) in [0, 1]. Share of images right on each attribute (ATTRS)."""
    rows = [score(img, s) for img, s in zip(images, scenes, strict=True)]
    return {a: float(np.mean([r[a] for r in rows])) for a in ATTRS}


def _at(objects: tuple[DetectedObject, ...], position: str) -> DetectedObject:
    same = [o for o in objects if o.attributes.position == position]
    return same[0] if same else objects[0]
