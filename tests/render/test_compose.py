from __future__ import annotations

import io

from PIL import Image

from difflens.render import compose
from tests.render.conftest import make_explanation


def test_tile_display_size():
    assert compose.display_size(32, 32) == (128, 128)  # small: whole-factor enlargement
    assert compose.display_size(512, 256) == (256, 128)  # large: fits MAX_SIDE
    assert compose.display_size(200, 160) == (200, 160)


def test_strip_has_one_tile_per_step(explanation):
    tiles = compose.step_tiles(explanation, "rise")
    assert len(tiles) == len(explanation.steps) == 3
    assert {t.size for t in tiles} == {(128, 128 + compose.LABEL_H)}
    img = compose.strip(tiles)
    assert img.size == (compose.PAD + 3 * (128 + compose.PAD), 2 * compose.PAD + 128 + compose.LABEL_H)


def test_strip_wraps_long_runs():
    exp = make_explanation(n_steps=12, explained=tuple(range(12)), methods=("cam",))
    img = compose.strip(compose.step_tiles(exp, "cam"), per_row=10)
    cell_w, cell_h = 128 + compose.PAD, 128 + compose.LABEL_H + compose.PAD
    assert img.size == (compose.PAD + 10 * cell_w, compose.PAD + 2 * cell_h)


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
    assert img.height == compose.PAD + rows * (128 + compose.LABEL_H + compose.PAD)
    assert img.width > cols * (128 + compose.PAD)  # plus the row labels
    assert compose.token_grid(make_explanation(methods=("rise",))) is None
    assert compose.token_grid(make_explanation(tokens=())) is None
