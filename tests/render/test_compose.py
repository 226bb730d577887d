from __future__ import annotations

import io

import numpy as np
from PIL import Image

from difflens.render import compose
from difflens.render.maps import jet
from tests.render.conftest import make_explanation


def scale_bar(img: Image.Image) -> np.ndarray:
    """The colour bar's pixels, (n, 3) uint8, read from a middle row of the band where it must sit (the bottom
    SCALE_H + PAD rows): the run of non-background pixels there. Empty when there is none."""
    rgb = np.asarray(img.convert("RGB"))
    row = rgb[img.height - compose.SCALE_H - compose.PAD + compose.SCALE_BAR_H // 2]
    coloured = np.flatnonzero((row != compose.BACKGROUND).any(axis=1))
    return row[coloured[0]:coloured[-1] + 1] if coloured.size else row[:0]


def assert_carries_the_scale(img: Image.Image) -> None:
    """The bar is the heat map's own colours from 0 (left) to 1 (right), over most of the picture's width."""
    bar = scale_bar(img).astype(int)
    assert len(bar) > img.width // 2, "no colour bar under the picture"
    want = (jet(np.linspace(0.0, 1.0, len(bar), dtype=np.float32)) * 255.0).round()
    assert np.abs(bar - want).max() <= 1
    assert bar[0, 2] > bar[0, 0] and bar[-1, 0] > bar[-1, 2]  # blue = low on the left, red = high on the right


def ink_in(img: Image.Image, box: tuple[int, int, int, int]) -> int:
    """How many pixels in box (left, top, right, bottom) are dark (text)."""
    return int((np.asarray(img.convert("L").crop(box)) < 100).sum())


def test_tile_display_size():
    assert compose.display_size(32, 32) == (128, 128)  # small: whole-factor enlargement
    assert compose.display_size(512, 256) == (256, 128)  # large: fits MAX_SIDE
    assert compose.display_size(200, 160) == (200, 160)


SCALE = compose.SCALE_H + compose.PAD  # the colour scale's band under a picture


def test_strip_has_one_tile_per_step(explanation):
    tiles = compose.step_tiles(explanation, "rise")
    assert len(tiles) == len(explanation.steps) == 3
    assert {t.size for t in tiles} == {(128, 128 + compose.LABEL_H)}
    img = compose.strip(tiles)
    assert img.size == (compose.PAD + 3 * (128 + compose.PAD), 2 * compose.PAD + 128 + compose.LABEL_H + SCALE)
    assert_carries_the_scale(img)


def test_strip_wraps_long_runs():
    exp = make_explanation(n_steps=12, explained=tuple(range(12)), methods=("cam",))
    img = compose.strip(compose.step_tiles(exp, "cam"), per_row=10)
    cell_w, cell_h = 128 + compose.PAD, 128 + compose.LABEL_H + compose.PAD
    assert img.size == (compose.PAD + 10 * cell_w, compose.PAD + 2 * cell_h + SCALE)


def test_a_labelled_strip_names_its_method_in_a_column_left_of_the_tiles(explanation):
    tiles = compose.step_tiles(explanation, "rise")
    bare, named = compose.strip(tiles), compose.strip(tiles, label="DF-RISE")
    extra = named.width - bare.width
    assert extra > compose.font().getlength("DF-RISE") and named.height == bare.height
    tiles_h = bare.height - SCALE
    assert ink_in(named, (0, 0, extra, tiles_h)) > 20  # the name is drawn there
    assert ink_in(bare, (0, 0, compose.PAD, tiles_h)) == 0
    assert np.array_equal(np.asarray(named)[:tiles_h, extra:], np.asarray(bare)[:tiles_h])  # the same tiles
    bar_row = np.asarray(named)[named.height - SCALE + compose.SCALE_BAR_H // 2]
    assert (bar_row[:extra + compose.PAD] == compose.BACKGROUND).all()  # the bar starts under the tiles
    assert len(scale_bar(named)) == len(scale_bar(bare))
    assert_carries_the_scale(named)


def test_a_wrapped_strip_names_its_method_once():
    exp = make_explanation(n_steps=12, explained=tuple(range(12)), methods=("cam",))
    img = compose.strip(compose.step_tiles(exp, "cam"), per_row=10, label="DF-CAM")
    extra = img.width - compose.strip(compose.step_tiles(exp, "cam"), per_row=10).width
    cell_h = 128 + compose.LABEL_H + compose.PAD
    assert ink_in(img, (0, compose.PAD, extra, compose.PAD + cell_h)) > 20
    assert ink_in(img, (0, compose.PAD + cell_h, extra, compose.PAD + 2 * cell_h)) == 0


def test_the_colour_scale_is_the_heat_maps_colours_with_its_range():
    bar = compose.colour_scale(300, left=40)
    assert bar.size == (300, compose.SCALE_H)
    assert_carries_the_scale(compose.with_scale(Image.new("RGB", (300, 10), compose.BACKGROUND), left=40))
    assert ink_in(bar, (0, 0, 300, compose.SCALE_H)) > ink_in(bar, (0, 0, 300, compose.SCALE_BAR_H))  # words
    assert ink_in(bar, (0, 0, 40, compose.SCALE_BAR_H)) == 0  # nothing left of `left`


def test_overview_is_the_image_over_one_labelled_row_per_method(explanation):
    img = compose.overview(explanation)
    assert img is not None
    labels = ["image"] + [compose.ROW_LABELS[m] for m in ("rise", "cam", "attn")]
    label_w = compose.label_width(labels)
    cell_h = 128 + compose.LABEL_H + compose.PAD
    assert img.size == (label_w + compose.PAD + 3 * (128 + compose.PAD), compose.PAD + 4 * cell_h + SCALE)
    for r in range(4):  # every row is named in the label column
        assert ink_in(img, (0, compose.PAD + r * cell_h, label_w, compose.PAD + (r + 1) * cell_h)) > 20
    first_tile = np.asarray(img)[compose.PAD:compose.PAD + 128, label_w + compose.PAD:label_w + compose.PAD + 128]
    assert np.array_equal(first_tile, np.asarray(Image.fromarray(explanation.image).resize((128, 128), 0)))
    rise = compose.strip(compose.step_tiles(explanation, "rise"))
    row = np.asarray(img)[compose.PAD + cell_h:compose.PAD + 2 * cell_h - compose.PAD, label_w:]
    assert np.array_equal(row, np.asarray(rise)[compose.PAD:compose.PAD + 128 + compose.LABEL_H])
    assert_carries_the_scale(img)
    assert compose.overview(make_explanation(methods=(), explained=())) is None
    one = compose.overview(make_explanation(methods=("cam",)))
    assert one is not None and one.height == compose.PAD + 2 * cell_h + SCALE


def test_gif_has_one_frame_per_explained_step(explanation):
    gif = Image.open(io.BytesIO(compose.gif_bytes(compose.step_tiles(explanation, "attn"))))
    assert gif.format == "GIF" and gif.n_frames == len(explanation.steps)


def test_methods_present_follows_the_maps():
    assert compose.methods_present(make_explanation(methods=("cam", "rise"))) == ["rise", "cam"]
    assert compose.methods_present(make_explanation(methods=(), explained=())) == []


def test_token_grid_is_steps_by_words(explanation):
    img = compose.token_grid(explanation)
    assert img is not None
    rows, cols = len(explanation.steps), len(explanation.tokens)
    assert img.height == compose.PAD + rows * (128 + compose.LABEL_H + compose.PAD) + SCALE
    assert img.width > cols * (128 + compose.PAD)  # plus the row labels
    assert_carries_the_scale(img)
    assert compose.token_grid(make_explanation(methods=("rise",))) is None
    assert compose.token_grid(make_explanation(tokens=())) is None
