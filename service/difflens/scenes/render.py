"""Deterministic renderer of one- or two-object scenes with pixel-exact ground truth.

A scene is a light, mildly noisy background with one object (optionally a second). Every object has five
categorical attributes (shape, colour, texture, size, position); everything continuous (exact size, position
jitter, shade, background tint, noise) comes from the seed, so `render_scene(spec, size, seed)` is a pure function.

Geometry is defined on a 32-pixel canvas and scaled to `size`. At 32 px an object's extent (bounding-box side) is
about 11 px (small) or 17 px (large): small enough that a large object fits beside the image centre in every
position, large enough that a small one holds two or three texture periods (period 4 px: stripes 2 px wide, dots
2 x 2 px). Shapes are drawn with 4 x 4 supersampling (anti-aliased edges); the mask is coverage >= 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import numpy as np

Shape = Literal["circle", "square", "triangle"]
Color = Literal["red", "green", "blue", "yellow"]
Texture = Literal["plain", "striped", "dotted"]
Size = Literal["small", "large"]
Position = Literal["left", "right", "top", "bottom", "center"]

SHAPES: tuple[str, ...] = get_args(Shape)
COLORS: tuple[str, ...] = get_args(Color)
TEXTURES: tuple[str, ...] = get_args(Texture)
SIZES: tuple[str, ...] = get_args(Size)
POSITIONS: tuple[str, ...] = get_args(Position)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "color": COLORS, "texture": TEXTURES, "size": SIZES, "position": POSITIONS,
}
# Two objects always sit on opposite sides; only these pairs fit without overlapping at 32 px.
OPPOSITE_PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))

RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40), "green": (45, 165, 70), "blue": (45, 85, 215), "yellow": (235, 195, 35),
}
BASE = 32.0  # geometry below is in pixels of a 32-pixel canvas
EXTENT = {"small": 11.0, "large": 17.0}  # bounding-box side (triangle: base; its height is 0.9 of it)
EXTENT_JITTER = 0.5
# How far a side-placed object's centre sits from the canvas centre: small ones hug the border, so that a small
# and a large object on opposite sides keep a clear pixel between them.
OFFSET = {"small": 10.0, "large": 6.0}
POSITION_JITTER = 1.0
BORDER = 0.5  # an object's bounding box stays this far inside the image
MIN_GAP = 2.0  # between the bounding boxes of two objects on opposite sides
PERIOD = 4  # texture period in pixels at 32 px
PATTERN_SHADE = 0.45  # stripes and dots: the object's colour darkened to this fraction (hue unchanged)
COLOR_JITTER = 12
BACKGROUND_LEVEL = (212, 242)
BACKGROUND_TINT = 6
NOISE_STD = 3.0  # on the 0-255 scale, over the whole image
SUPERSAMPLE = 4
TRIANGLE_HEIGHT = 0.9


@dataclass(frozen=True)
class ObjectSpec:
    """One object's categorical attributes."""

    shape: Shape
    color: Color
    texture: Texture = "plain"
    size: Size = "large"
    position: Position = "center"

    def __post_init__(self) -> None:
        for name, allowed in ATTRIBUTES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: got {getattr(self, name)!r}; allowed: {', '.join(allowed)}")

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


@dataclass(frozen=True)
class Scene:
    """One object, or two on opposite sides (positions differ)."""

    objects: tuple[ObjectSpec, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"objects: a scene holds 1 or 2 objects, got {len(self.objects)}")
        if len(self.objects) == 2 and self.objects[0].position == self.objects[1].position:
            raise ValueError("objects: two objects need different positions")


@dataclass(frozen=True)
class GroundTruth:
    """Pixel-exact truth of a rendered scene, all bool arrays at the image's resolution.

    mask: (H, W) union of the objects' visible pixels; edge_band: (H, W) pixels within `band` px of a mask
    boundary, on either side; texture_region: (H, W) the stripe / dot pixels inside the mask (empty for plain
    objects); object_masks: (N, H, W) each object's visible pixels, in `attributes` order.
    """

    mask: np.ndarray
    edge_band: np.ndarray
    texture_region: np.ndarray
    attributes: tuple[ObjectSpec, ...]
    object_masks: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class _Placed:
    """An object's continuous geometry in pixels of the output image."""

    spec: ObjectSpec
    cx: float
    cy: float
    extent: float
    rgb: np.ndarray  # (3,) float

    def bbox_offsets(self) -> tuple[float, float, float, float]:
        """Distances from (cx, cy) to the left, right, top and bottom of the bounding box."""
        h = self.extent / 2
        if self.spec.shape == "triangle":
            th = TRIANGLE_HEIGHT * self.extent
            return h, h, 2 * th / 3, th / 3  # (cx, cy) is the centroid
        return h, h, h, h


def _as_scene(spec: Scene | ObjectSpec) -> Scene:
    return spec if isinstance(spec, Scene) else Scene((spec,))


def _place(spec: ObjectSpec, size: int, rng: np.random.Generator, paired: bool) -> _Placed:
    """Exact geometry of one object. `paired`: one of two, so no jitter along the pair's axis (keeps them apart)."""
    s = size / BASE
    extent = (EXTENT[spec.size] + rng.uniform(-EXTENT_JITTER, EXTENT_JITTER)) * s
    offset = OFFSET[spec.size]
    dx, dy = {"left": (-offset, 0.0), "right": (offset, 0.0), "top": (0.0, -offset), "bottom": (0.0, offset),
              "center": (0.0, 0.0)}[spec.position]
    jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    if paired:
        jx, jy = (0.0, jy) if dx else (jx, 0.0)
    cx, cy = (BASE / 2 + dx + jx) * s, (BASE / 2 + dy + jy) * s
    rgb = np.clip(np.array(RGB[spec.color], float) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, size=3), 0, 255)
    placed = _Placed(spec, cx, cy, extent, rgb)
    left, right, top, bottom = placed.bbox_offsets()
    lo = BORDER * s  # keep the whole object inside the image
    cx = float(np.clip(cx, lo + left, size - lo - right))
    cy = float(np.clip(cy, lo + top, size - lo - bottom))
    return _Placed(spec, cx, cy, extent, rgb)


def _separate(a: _Placed, b: _Placed, size: int) -> tuple[_Placed, _Placed]:
    """Push a pair on opposite sides apart along their axis until MIN_GAP px lie between their bounding boxes.

    Needed for a triangle, whose centroid placement leaves its apex close to the image centre.
    """
    horizontal = a.spec.position in ("left", "right")
    first, second = (a, b) if a.spec.position in ("left", "top") else (b, a)
    (l1, r1, t1, b1), (l2, r2, t2, b2) = first.bbox_offsets(), second.bbox_offsets()
    c1, c2 = (first.cx, second.cx) if horizontal else (first.cy, second.cy)
    lo1, hi1, lo2, hi2 = (l1, r1, l2, r2) if horizontal else (t1, b1, t2, b2)
    s = size / BASE
    need = MIN_GAP * s - ((c2 - lo2) - (c1 + hi1))
    if need <= 0:
        return a, b
    room1, room2 = (c1 - lo1) - BORDER * s, size - BORDER * s - (c2 + hi2)
    move1 = min(room1, need / 2)
    move2 = min(room2, need - move1)
    move1 = min(room1, need - move2)
    if horizontal:
        first = replace(first, cx=first.cx - move1)
        second = replace(second, cx=second.cx + move2)
    else:
        first = replace(first, cy=first.cy - move1)
        second = replace(second, cy=second.cy + move2)
    return (first, second) if first.spec is a.spec else (second, first)


def shape_coverage(shape: str, cx: float, cy: float, extent: float, size: int,
                   width: int | None = None) -> np.ndarray:
    """(size, width or size) float in [0, 1]: the share of each pixel covered by the shape (SUPERSAMPLE^2 points
    per pixel).

    (cx, cy) in pixels with pixel i spanning [i, i + 1); the circle's and square's centre, the triangle's centroid.
    """
    n = SUPERSAMPLE
    w = size if width is None else width
    y = ((np.arange(size * n) + 0.5) / n)[:, None]
    x = ((np.arange(w * n) + 0.5) / n)[None, :]
    h = extent / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif shape == "square":
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    else:
        th = TRIANGLE_HEIGHT * extent
        top, base = cy - 2 * th / 3, cy + th / 3
        # Apex up: the half-width grows linearly from 0 at the apex to h at the base.
        inside = (y <= base) & (np.abs(x - cx) <= (y - top) * h / th)
    return inside.reshape(size, n, w, n).mean(axis=(1, 3))


def _pattern(p: _Placed, size: int) -> np.ndarray:
    """(H, W) bool: where the texture's dark pixels go, anchored to the object's bounding box."""
    period = max(2, round(PERIOD * size / BASE))
    half = period // 2
    left, _, top, _ = p.bbox_offsets()
    ay, ax = int(np.floor(p.cy - top)), int(np.floor(p.cx - left))
    yy, xx = np.mgrid[:size, :size]
    ry, rx = (yy - ay) % period, (xx - ax) % period
    if p.spec.texture == "striped":
        return ry >= half
    if p.spec.texture == "dotted":
        lo = (period - half + 1) // 2  # centre the dot in its period
        return (ry >= lo) & (ry < lo + half) & (rx >= lo) & (rx < lo + half)
    return np.zeros((size, size), bool)


def _shift_any(m: np.ndarray, r: int, outside: bool) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: binary dilation with a (2r+1) square; pixels beyond the image read `outside`."""
    h, w = m.shape
    p = np.pad(m, r, constant_values=outside)
    out = np.zeros_like(m)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy:dy + h, dx:dx + w]
    return out


def dilate(m: np.ndarray, r: int = 1) -> np.ndarray:
    """(H, W) bool -> (H, W) bool, dilated by a (2r+1) x (2r+1) square."""
    return _shift_any(m, r, outside=False)


def erode(m: np.ndarray, r: int = 1, border_is_edge: bool = False) -> np.ndarray:
    """(H, W) bool -> (H, W) bool, eroded by a (2r+1) x (2r+1) square.

    By default the image border is not an edge (an object cut by it keeps its border pixels); with
    `border_is_edge` pixels beyond the image count as outside the mask.
    """
    return ~_shift_any(~m, r, outside=border_is_edge)


def edge_band(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: pixels within r of the boundary, inside and outside."""
    return dilate(mask, r) & ~erode(mask, r)


def render_scene(spec: Scene | ObjectSpec, size: int = 32, seed: int = 0) -> tuple[np.ndarray, GroundTruth]:
    """Render `spec` at size x size. Returns (image (H, W, 3) uint8, GroundTruth). Same arguments, same bytes.

    Objects are painted in order; a later object covers an earlier one and the earlier object's mask loses those
    pixels (scenes from `sample_scene` never overlap).
    """
    scene = _as_scene(spec)
    rng = np.random.default_rng(seed)
    level = rng.uniform(*BACKGROUND_LEVEL)
    bg = np.clip(level + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3), 0, 255)
    img = np.broadcast_to(bg, (size, size, 3)).astype(float)
    placed = [_place(obj, size, rng, paired=len(scene.objects) == 2) for obj in scene.objects]
    if len(placed) == 2 and {o.position for o in scene.objects} in ({"left", "right"}, {"top", "bottom"}):
        placed = list(_separate(placed[0], placed[1], size))
    masks: list[np.ndarray] = []
    texture = np.zeros((size, size), bool)
    for p in placed:
        alpha = shape_coverage(p.spec.shape, p.cx, p.cy, p.extent, size)
        dark = _pattern(p, size)
        colour = np.where(dark[..., None], p.rgb * PATTERN_SHADE, p.rgb)
        img = img * (1 - alpha[..., None]) + colour * alpha[..., None]
        m = alpha >= 0.5
        masks = [prev & ~m for prev in masks] + [m]
        texture = (texture & ~m) | (dark & m)
    img = img + rng.normal(0.0, NOISE_STD, size=img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    mask = np.any(masks, axis=0)
    band = edge_band(mask, max(1, round(size / BASE)))
    return image, GroundTruth(mask, band, texture & mask, scene.objects, np.stack(masks))


def _random_object(rng: np.random.Generator, **fixed: str) -> ObjectSpec:
    values = {name: fixed.get(name) or allowed[rng.integers(len(allowed))] for name, allowed in ATTRIBUTES.items()}
    return ObjectSpec(**values)  # type: ignore[arg-type]


def sample_scene(rng: np.random.Generator, two_object_prob: float = 0.0) -> Scene:
    """A uniformly random single-object scene, or with probability `two_object_prob` two objects.

    Two objects take the two sides of a random opposite pair (left/right or top/bottom) and are not both large,
    which is what fits at 32 px without overlap.
    """
    if rng.random() >= two_object_prob:
        return Scene((_random_object(rng),))
    pair = OPPOSITE_PAIRS[rng.integers(len(OPPOSITE_PAIRS))]
    first, second = pair if rng.random() < 0.5 else pair[::-1]
    sizes = (("small", "small"), ("small", "large"), ("large", "small"))[rng.integers(3)]
    return Scene((_random_object(rng, position=first, size=sizes[0]),
                  _random_object(rng, position=second, size=sizes[1])))
