"""Pictures of an Explanation: per-method strips and GIFs over the explained steps, the token-map grid, the
overview (the image above one labelled row per method: the README's picture).

Tiles are shown at a display size (longer side between MIN_SIDE and MAX_SIDE px): the image is resized to it and
each map is upsampled straight to it, so the display rule's "bilinear to image size" holds at the shown size.
Every still picture of maps ends in the colour scale (colour_scale): the heat map's colours over the display
rule's range, so a reader can tell low from high without knowing the colour map.
"""

from __future__ import annotations

import io
import math
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from difflens.render.maps import as_array, jet, overlay, resize_image

if TYPE_CHECKING:
    from difflens.engine.explain import Explanation, StepExplanation

MIN_SIDE, MAX_SIDE = 128, 256
TOKEN_SIDE = 128  # token-grid tiles stay small: the grid is steps x words, easily 50 x 20
PER_ROW = 10  # a strip wraps after this many tiles, so 50 explained steps stay viewable
PAD = 4
LABEL_H = 20
GIF_FRAME_MS = 500
METHODS = ("rise", "cam", "attn")  # the order strips, GIFs and report sections appear in
TITLES = {"rise": "DF-RISE", "cam": "DF-CAM", "attn": "Cross-attention (mean over words)"}
ROW_LABELS = {"rise": "DF-RISE", "cam": "DF-CAM", "attn": "attention"}  # short: a strip's left column
SCALE_BAR_H = 10
SCALE_H = SCALE_BAR_H + 2 * LABEL_H  # the bar, its ends' values, what the values are
SCALE_TEXT = "each map after ReLU, min-max scaled in its own tile"
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


@cache
def font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=13)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def display_size(height: int, width: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The (H', W') a tile of an image of (height, width) is shown at: longer side in [MIN_SIDE, max_side]."""
    longer = max(height, width)
    if longer < MIN_SIDE:
        scale: float = math.ceil(MIN_SIDE / longer)  # whole factor: nearest upscaling keeps pixels square
    elif longer > max_side:
        scale = max_side / longer
    else:
        scale = 1
    return max(1, round(height * scale)), max(1, round(width * scale))


def methods_present(exp: Explanation) -> list[str]:
    """The methods whose display map every explained step carries, in METHODS order."""
    if not exp.steps:
        return []
    return [m for m in METHODS if all(m in s.maps for s in exp.steps)]


def method_map(step: StepExplanation, method: str) -> np.ndarray:
    """The map a strip shows for `method` at one step: (h, w). attn: the mean of the (T, h, w) word maps."""
    m = as_array(step.maps[method])
    if method == "attn":
        return m.mean(axis=0) if m.shape[0] else np.zeros(m.shape[1:], np.float32)
    return m


def label_tile(tile: np.ndarray, label: str) -> Image.Image:
    """tile: (H, W, 3) uint8 -> a PIL image (H + LABEL_H, W) with `label` centred under the tile."""
    h, w = tile.shape[:2]
    out = Image.new("RGB", (w, h + LABEL_H), BACKGROUND)
    out.paste(Image.fromarray(tile), (0, 0))
    draw = ImageDraw.Draw(out)
    draw.text((w / 2, h + LABEL_H / 2), fit_text(label, w), fill=INK, font=font(), anchor="mm")
    return out


def fit_text(text: str, width: float) -> str:
    """`text`, shortened with an ellipsis until it fits `width` px."""
    f = font()
    if f.getlength(text) <= width:
        return text
    while text and f.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def grid(cells: list[list[Image.Image]], row_labels: list[str] | None = None) -> Image.Image:
    """Lay equally sized cells out in rows (ragged last row allowed), with an optional label left of each row."""
    cw, ch = cells[0][0].size
    label_w = label_width(row_labels)
    cols = max(len(r) for r in cells)
    out = Image.new("RGB", (label_w + PAD + cols * (cw + PAD), PAD + len(cells) * (ch + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for r, row in enumerate(cells):
        y = PAD + r * (ch + PAD)
        if row_labels:
            draw.text((PAD, y + ch / 2), row_labels[r], fill=INK, font=font(), anchor="lm")
        for c, cell in enumerate(row):
            out.paste(cell, (label_w + PAD + c * (cw + PAD), y))
    return out


def label_width(row_labels: list[str] | None) -> int:
    """Width of grid's label column for these labels (0 without labels)."""
    return int(max(font().getlength(t) for t in row_labels)) + 2 * PAD if row_labels else 0


def step_tiles(exp: Explanation, method: str) -> list[Image.Image]:
    """One labelled overlay ("t=981") per explained step for `method`."""
    base = resize_image(exp.image, display_size(exp.image.shape[0], exp.image.shape[1]))
    return [label_tile(overlay(base, method_map(s, method)), f"t={s.timestep}") for s in exp.steps]


def strip(tiles: list[Image.Image], per_row: int = PER_ROW, label: str | None = None) -> Image.Image:
    """Per-step tiles (from step_tiles) left to right in step order, wrapping after `per_row` tiles, with
    `label` (the method's name) left of the first row and the colour scale underneath."""
    rows = [tiles[i:i + per_row] for i in range(0, len(tiles), per_row)]
    labels = None if label is None else first_row_label(label, len(rows))
    return with_scale(grid(rows, labels), label_width(labels) + PAD)


def first_row_label(label: str, n_rows: int) -> list[str]:
    """`label` for the first of `n_rows` rows, blank for the rest: a wrapped strip names its method once."""
    return [label] + [""] * (n_rows - 1)


def colour_scale(width: int, left: int = PAD) -> Image.Image:
    """(width x SCALE_H) the heat map's colour bar over the display rule's range [0, 1], from x = `left` to the
    right edge less PAD: "0 low" and "1 high" under its ends, SCALE_TEXT under that."""
    bar_w = max(1, width - left - PAD)
    ramp = (jet(np.linspace(0.0, 1.0, bar_w, dtype=np.float32)) * 255.0).round().astype(np.uint8)  # (bar_w, 3)
    out = Image.new("RGB", (width, SCALE_H), BACKGROUND)
    out.paste(Image.fromarray(np.repeat(ramp[None], SCALE_BAR_H, axis=0)), (left, 0))
    draw = ImageDraw.Draw(out)
    y = SCALE_BAR_H + LABEL_H / 2
    draw.text((left, y), "0 low", fill=INK, font=font(), anchor="lm")
    draw.text((left + bar_w, y), "1 high", fill=INK, font=font(), anchor="rm")
    draw.text((left, y + LABEL_H), fit_text(SCALE_TEXT, bar_w), fill=INK, font=font(), anchor="lm")
    return out


def with_scale(picture: Image.Image, left: int = PAD) -> Image.Image:
    """`picture` (a grid) with the colour scale under it, its bar starting at x = `left` (under the tiles)."""
    out = Image.new("RGB", (picture.width, picture.height + SCALE_H + PAD), BACKGROUND)
    out.paste(picture, (0, 0))
    out.paste(colour_scale(picture.width, left), (0, picture.height))
    return out


def token_grid(exp: Explanation) -> Image.Image | None:
    """Rows = explained steps ("t=981" on the left), columns = prompt words, each tile labelled
    "word relevance". None when there are no attention maps or no words."""
    if not exp.tokens or "attn" not in methods_present(exp):
        return None
    base = resize_image(exp.image, display_size(exp.image.shape[0], exp.image.shape[1], max_side=TOKEN_SIDE))
    rows = []
    for s in exp.steps:
        maps = as_array(s.maps["attn"])  # (T, h, w)
        rel = as_array(s.maps["attn_relevance"]) if "attn_relevance" in s.maps else None
        row = []
        for j, word in enumerate(exp.tokens):
            label = word if rel is None else f"{word} {float(rel[j]):.2f}"
            row.append(label_tile(overlay(base, maps[j]), label))
        rows.append(row)
    labels = [f"t={s.timestep}" for s in exp.steps]
    return with_scale(grid(rows, labels), label_width(labels) + PAD)


def overview(exp: Explanation, per_row: int = PER_ROW) -> Image.Image | None:
    """The image, then one row of per-step overlays per method present, each row labelled with the method's
    name (ROW_LABELS), a long run wrapping after `per_row` tiles; the colour scale underneath. None when no
    method was explained."""
    present = methods_present(exp)
    if not present:
        return None
    size = display_size(exp.image.shape[0], exp.image.shape[1])
    rows, labels = [[label_tile(resize_image(exp.image, size), "final image")]], ["image"]
    for m in present:
        tiles = step_tiles(exp, m)
        wrapped = [tiles[i:i + per_row] for i in range(0, len(tiles), per_row)]
        rows += wrapped
        labels += first_row_label(ROW_LABELS[m], len(wrapped))
    return with_scale(grid(rows, labels), label_width(labels) + PAD)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # optimize=True is ~5x slower for ~10% smaller
    return buf.getvalue()


def gif_bytes(frames: list[Image.Image], frame_ms: int = GIF_FRAME_MS) -> bytes:
    """An animated, looping GIF of per-step tiles (from step_tiles), one frame each."""
    # Fast octree per frame: PIL's default median cut costs more than everything else in write_outputs.
    frames = [f.quantize(256, method=Image.Quantize.FASTOCTREE) for f in frames]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return buf.getvalue()
