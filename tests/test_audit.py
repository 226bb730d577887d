"""Audit records: the hash rule, what a worker's record holds, and `difflens replay` (match, tamper, bad input)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from difflens import audit
from difflens.cli import main
from difflens.jobs import Completed
from tests.worker.helpers import run_one, settings, spec


def test_array_hash_covers_dtype_shape_and_little_endian_bytes():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = hashlib.sha256(b"float32:2x3:" + a.astype("<f4").tobytes()).hexdigest()
    assert audit.array_sha256(a) == expected
    assert audit.array_sha256(a.reshape(3, 2)) != expected  # same bytes, other shape
    assert audit.array_sha256(a.astype(">f4")) == expected  # byte order normalised
    assert audit.array_sha256(torch.from_numpy(a)) == expected
    assert audit.array_sha256(a.astype(np.float16), "float32") == expected  # maps always hashed as float32


def test_image_hashes_reject_anything_but_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        audit.image_hashes(np.zeros((4, 4, 3), np.float32), b"")


def test_compare_lists_items_missing_on_either_side():
    rec = {"image": {"rgb_uint8": "a", "png": "b"}, "maps": {"0": {"rise": "x"}, "1": {"rise": "y"}}}
    rep = {"image": {"rgb_uint8": "a", "png": "c"}, "maps": {"0": {"rise": "x", "cam": "z"}}}
    assert audit.compare_hashes(rec, rep) == [
        ("image.rgb_uint8", "a", "a", True), ("image.png", "b", "c", False),
        ("step000/cam", "-", "z", False), ("step000/rise", "x", "x", True), ("step001/rise", "y", "-", False)]


@pytest.fixture(scope="module")
def record(tiny_dir, tiny_model):
    """The audit record of one job run by a Worker (DF-RISE, DF-CAM and attention on every step)."""
    events = run_one(tiny_model, settings(tiny_dir), spec("a red circle", seed=7, steps=2,
                                                          methods=("rise", "cam", "attn")))
    assert isinstance(events[-1], Completed)
    return json.loads(events[-1].audit_json)


def test_record_holds_the_job_its_model_runtime_and_hashes(record, tiny_dir):
    from difflens.models import weights_sha256

    assert record["schema"] == audit.SCHEMA and record["attempt"] == 1
    assert record["model"]["weights_sha256"] == weights_sha256(tiny_dir)
    assert record["request"]["params"]["prompt"] == "a red circle" and record["seed"] == 7
    assert record["resolved"]["timesteps"] == [s["timestep"] for s in record["timings"]["steps"]]
    assert set(record["versions"]) >= {"python", "torch", "diffusers", "transformers", "numpy", "difflens"}
    assert record["runtime"]["device"] == "cpu" and record["runtime"]["unet_backend"] == "eager"
    t = record["timings"]
    assert t["total_s"] >= t["run_s"] > 0 and all(s["denoise_s"] > 0 and s["rise_s"] > 0 for s in t["steps"])
    assert set(record["hashes"]["maps"]) == {"0", "1"}
    assert {"rise", "rise_raw", "cam", "attn", "attn_relevance"} <= set(record["hashes"]["maps"]["0"])
    assert "little-endian" in record["hash_rule"]


def _write(tmp_path, record) -> str:
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(record))
    return str(path)


def test_replay_of_a_worker_job_matches_every_item(record, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["replay", _write(tmp_path, record), "--model", f"tiny={tiny_dir}", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith(("image.", "step"))]
    assert len(rows) == 2 + sum(len(m) for m in record["hashes"]["maps"].values())
    assert all(line.rstrip().endswith("yes") for line in rows)
    assert (out / "image.png").read_bytes() and (out / "explanation.npz").exists()


def test_a_tampered_hash_is_reported_as_a_mismatch(record, tiny_dir, tmp_path, capsys):
    bad = json.loads(json.dumps(record))
    bad["hashes"]["maps"]["1"]["cam"] = "0" * 64
    assert main(["replay", _write(tmp_path, bad), "--model-dir", str(tiny_dir)]) == 1
    text = capsys.readouterr().out
    [row] = [line for line in text.splitlines() if line.startswith("step001/cam ")]
    assert row.split()[-1] == "NO" and row.split()[1] == "0" * 12
    assert f"{len(text.splitlines()) - 3}/" in text.splitlines()[-1]  # every other item still matches


def test_replay_refuses_other_weights(record, tiny_dir, tmp_path, capsys):
    bad = json.loads(json.dumps(record))
    bad["model"]["weights_sha256"]["unet/diffusion_pytorch_model.safetensors"] = "f" * 64
    assert main(["replay", _write(tmp_path, bad), "--model-dir", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert "--model-dir" in err and "weights differ" in err and "unet/diffusion_pytorch_model.safetensors" in err


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("{not json", "not a readable JSON file"),
    ('{"schema": "other/1"}', "schema 'other/1'; expected 'difflens.audit/1'"),
])
def test_replay_rejects_bad_records_with_exit_2(content, message, tmp_path, capsys):
    path = tmp_path / "audit.json"
    if content is not None:
        path.write_text(content)
    assert main(["replay", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_replay_needs_the_records_model(record, tmp_path, capsys):
    assert main(["replay", _write(tmp_path, record), "--model", "other=/x"]) == 2
    assert "the record's model 'tiny' is not configured" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_replay_of_a_cuda_record_without_cuda_asks_for_a_device(record, tiny_dir, tmp_path, capsys):
    gpu = json.loads(json.dumps(record))
    gpu["runtime"]["device"] = "cuda"
    assert main(["replay", _write(tmp_path, gpu), "--model-dir", str(tiny_dir)]) == 2
    assert "--device: the record ran on cuda" in capsys.readouterr().err
