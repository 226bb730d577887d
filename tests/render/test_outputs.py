from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from difflens.render import outputs, write_outputs
from tests.render.conftest import LAYERS, make_explanation

ALL_FILES = {"image.png", "params.json", "report.html", "explanation.npz", "attn_tokens.png",
             "strip_rise.png", "strip_cam.png", "strip_attn.png", "rise.gif", "cam.gif", "attn.gif", "overview.png"}


def test_writes_every_output(explanation, tmp_path):
    out = tmp_path / "run"
    written = write_outputs(explanation, out)
    assert set(written) == ALL_FILES == {p.name for p in out.iterdir()}
    assert all(p.parent == out and p.stat().st_size > 0 for p in written.values())
    image = np.asarray(Image.open(written["image.png"]))
    assert np.array_equal(image, explanation.image)
    assert Image.open(written["rise.gif"]).n_frames == len(explanation.steps)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left beside it


def test_npz_holds_every_map_with_its_shape(explanation, tmp_path):
    written = write_outputs(explanation, tmp_path / "run")
    with np.load(written["explanation.npz"]) as z:
        keys = set(z.files)
        for s in explanation.steps:
            for name, value in s.maps.items():
                key = f"step{s.index:03d}/{name}"
                assert z[key].shape == tuple(value.shape) and z[key].dtype == np.float32
                assert np.allclose(z[key], value.numpy())
        assert f"step002/cam/{LAYERS[1]}" in keys and "step004/attn" in keys
        assert z["step000/attn"].shape == (3, 8, 8) and z["step000/attn_relevance"].shape == (3,)
        assert z["timesteps"].tolist() == explanation.timesteps
        assert z["explained_steps"].tolist() == [0, 2, 4]
        assert z["explained_timesteps"].tolist() == [s.timestep for s in explanation.steps]
        assert z["tokens"].tolist() == explanation.tokens
        assert np.array_equal(z["image"], explanation.image)
    n_maps = sum(len(s.maps) for s in explanation.steps)
    assert len(keys) == n_maps + 5


def test_params_json_round_trips(explanation, tmp_path):
    written = write_outputs(explanation, tmp_path / "run")
    assert json.loads(written["params.json"].read_text()) == explanation.params


def test_methods_none_writes_image_params_report_only(tmp_path):
    exp = make_explanation(methods=(), explained=())
    written = write_outputs(exp, tmp_path / "run")
    assert set(written) == {"image.png", "params.json", "report.html"}
    html = written["report.html"].read_text()
    assert html.count("<img ") == 1 and "<svg" not in html


def test_only_present_methods_are_drawn(tmp_path):
    written = write_outputs(make_explanation(methods=("cam",)), tmp_path / "run")
    assert set(written) == {"image.png", "params.json", "report.html", "explanation.npz", "strip_cam.png", "cam.gif",
                            "overview.png"}


def test_a_second_run_replaces_the_first_and_clears_its_leftovers(explanation, tmp_path):
    out = tmp_path / "run"
    write_outputs(explanation, out)
    (out / "notes.txt").write_text("mine")
    write_outputs(make_explanation(methods=("rise",)), out)
    names = {p.name for p in out.iterdir()}
    assert names == {"image.png", "params.json", "report.html", "explanation.npz", "strip_rise.png", "rise.gif",
                     "overview.png", "notes.txt"}  # files that are not ours stay
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("breaks", ["npz_bytes", "_move_into_place"])
def test_an_error_midway_leaves_nothing(explanation, tmp_path, monkeypatch, breaks):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(outputs, breaks, boom)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(explanation, tmp_path / "new" / "nested" / "run")
    assert list(tmp_path.iterdir()) == []  # not even the parent folders it created


def test_an_error_midway_leaves_an_existing_folder_as_it_was(explanation, tmp_path, monkeypatch):
    out = tmp_path / "run"
    write_outputs(make_explanation(methods=("rise",)), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(outputs, "_move_into_place", boom)
    with pytest.raises(OSError):
        write_outputs(explanation, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_refuses_a_file_as_out_dir(explanation, tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        write_outputs(explanation, f)
    assert f.read_text() == "x"


def test_companion_files_are_written_with_the_outputs_and_cleared_with_them(explanation, tmp_path):
    out = tmp_path / "run"
    written = write_outputs(explanation, out, companions={"audit.json": b'{"job_id": "j1"}'})
    assert (out / "audit.json").read_bytes() == b'{"job_id": "j1"}' and written["audit.json"] == out / "audit.json"
    write_outputs(explanation, out)  # a later run without a record: the old one no longer describes the image
    assert not (out / "audit.json").exists()


def test_an_unknown_companion_is_refused_before_anything_is_written(explanation, tmp_path):
    with pytest.raises(ValueError, match=r"\['notes.txt'\]; allowed: audit.json, replay.json"):
        write_outputs(explanation, tmp_path / "run", companions={"notes.txt": b"x"})
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_on_another_filesystem_is_written(explanation, tmp_path, monkeypatch):
    """`out` may be a mount point (a container volume): a file moved into it from outside would cross
    filesystems, which rename refuses (EXDEV). Simulated: any move into `out` from outside it fails so."""
    import errno
    import os
    from pathlib import Path

    out = tmp_path / "volume"
    out.mkdir()
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).parent == out and out not in Path(src).parents:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    written = write_outputs(explanation, out)
    assert set(written) == ALL_FILES and {p.name for p in out.iterdir()} == ALL_FILES
