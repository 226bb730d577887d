"""Audit records: the hash rule, what a worker's record holds, and `difflens replay` (match, tamper, bad input)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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
    configs = record["model"]["config_sha256"]
    assert {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json"} \
        <= set(configs) and "difflens.json" not in configs  # the resolved defaults are pinned instead
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
    rows = [line for line in text.splitlines() if line.split()[-1:] in (["yes"], ["NO"])]
    assert f"{len(rows) - 1}/{len(rows)} items match" in text.splitlines()[-1]  # every other item still matches


def test_replay_refuses_other_weights(record, tiny_dir, tmp_path, capsys):
    bad = json.loads(json.dumps(record))
    bad["model"]["weights_sha256"]["unet/diffusion_pytorch_model.safetensors"] = "f" * 64
    assert main(["replay", _write(tmp_path, bad), "--model-dir", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert "--model-dir" in err and "weights differ" in err and "unet/diffusion_pytorch_model.safetensors" in err


def _copy_with(tiny_dir, tmp_path, name: str, **changes) -> str:
    """A copy of the tiny model folder (same weights) with keys of one of its JSON config files changed."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_dir, folder)
    f = folder / name
    f.parent.mkdir(exist_ok=True)
    f.write_text(json.dumps({**(json.loads(f.read_text()) if f.exists() else {}), **changes}))
    return str(folder)


def test_replay_runs_the_record_s_resolved_defaults_not_today_s(record, tiny_dir, tmp_path, capsys):
    """The request left scheduler and size to the model's defaults; the folder's difflens.json (not hashed with
    the weights) now says other ones. The replay still runs what the job ran."""
    assert record["request"]["params"]["scheduler"] is None and record["request"]["params"]["width"] is None
    folder = _copy_with(tiny_dir, tmp_path, "difflens.json", scheduler="euler", width=64, height=64)
    assert main(["replay", _write(tmp_path, record), "--model-dir", folder]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows and set(rows.values()) == {"yes"}


def test_replay_with_a_changed_scheduler_config_says_the_timesteps_differ(record, tiny_dir, tmp_path, capsys):
    folder = _copy_with(tiny_dir, tmp_path, "scheduler/scheduler_config.json", timestep_spacing="trailing")
    assert main(["replay", _write(tmp_path, record), "--model-dir", folder]) == 1
    text = capsys.readouterr().out
    [row] = [line for line in text.splitlines() if line.startswith("timesteps ")]
    assert row.split()[-1] == "NO"
    assert f"recorded {record['resolved']['timesteps']}" in text and "scheduler config changed" in text


def test_replay_with_a_changed_unet_config_names_the_file(record, tiny_dir, tmp_path, capsys):
    """Only the weights were hashed: a changed UNet config gave image mismatches and nothing said why."""
    folder = _copy_with(tiny_dir, tmp_path, "unet/config.json", norm_eps=0.5)
    assert main(["replay", _write(tmp_path, record), "--model-dir", folder]) == 1
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[3] for line in text.splitlines() if line.startswith("config/")}
    assert rows["config/unet/config.json"] == "NO" and rows["config/model_index.json"] == "yes"
    assert "config files differ from the record's (unet/config.json)" in text


def test_without_model_flags_replay_uses_the_folder_the_record_names(record, tiny_dir, tmp_path, capsys):
    """A job served as 'default' from another folder (or a local run in a folder named so) was replayed against the
    shipped model, whose weights differ, though the record names the folder it ran from and that folder is here."""
    served_as_default = json.loads(json.dumps(record))
    served_as_default["model"]["name"] = "default"
    assert served_as_default["model"]["folder"] == str(Path(tiny_dir).resolve())
    assert main(["replay", _write(tmp_path, served_as_default)]) == 0
    gone = json.loads(json.dumps(served_as_default))
    gone["model"]["folder"] = str(tmp_path / "not-here")  # elsewhere (another worker's disk): by name, as before
    assert main(["replay", _write(tmp_path, gone)]) == 2
    assert "weights differ from the record's" in capsys.readouterr().err


def test_files_the_loader_does_not_read_are_not_config(record, tiny_dir, tmp_path, capsys):
    """A README or samples beside the model are not part of it: they made a matching replay fail."""
    folder = Path(_copy_with(tiny_dir, tmp_path, "samples/run.json", note=1))
    (folder / "unet" / "README.txt").write_text("notes")
    (folder / "README.md").write_text("notes")
    assert main(["replay", _write(tmp_path, record), "--model-dir", str(folder)]) == 0
    assert "config files differ" not in capsys.readouterr().out


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


@pytest.mark.parametrize(("path", "value", "message"), [
    (("model",), "tiny", "malformed record: model: expected an object, got str"),
    (("runtime",), [], "malformed record: runtime: expected an object, got list"),
    (("hashes",), [], "malformed record: hashes: expected an object, got list"),
    (("model", "weights_sha256"), ["a"], "malformed record: model.weights_sha256: expected an object"),
    (("resolved",), "x", "malformed record: resolved: expected an object"),
    (("resolved", "timesteps"), ["a"], "malformed record: resolved.timesteps: expected a list of integers"),
    (("rise_exact",), [True], "malformed record: rise_exact: expected an object"),
    (("hashes", "maps", "x"), {}, "malformed record: hashes.maps: expected an object of step index"),
    (("runtime", "torch_threads"), 0, "malformed record: runtime.torch_threads: expected an integer >= 1"),
    (("request", "params", "seed"), -1, "the record's request is malformed: request.params.seed: got -1"),
    (("request", "params", "scheduler"), "foo",
     "the record's request is malformed: request.params.scheduler: got 'foo'"),
    (("request", "explain", "rise", "p"), 2.0, "the record's request is malformed: request.explain.rise.p: got 2.0"),
    # wrong types: 3.5 steps ran as if 3 and matched; a string seed failed on "'<=' not supported"; a boolean
    # seed ended in a traceback
    (("request", "params", "steps"), 3.5, "the record's request is malformed: request.params.steps: expected an "
                                          "integer or null, got 3.5"),
    (("request", "params", "seed"), "12", "the record's request is malformed: request.params.seed: expected an "
                                          "integer, got '12'"),
    (("request", "params", "seed"), True, "the record's request is malformed: request.params.seed: expected an "
                                          "integer, got True"),
    (("request", "params", "guidance_scale"), "7", "request.params.guidance_scale: expected a number or null, "
                                                   "got '7'"),
    (("request", "params", "sampling", "timesteps"), [900, 1.5], "request.params.sampling.timesteps[1]: expected "
                                                                 "an integer, got 1.5"),
    (("request", "explain", "rise", "structure_2x"), 1, "request.explain.rise.structure_2x: expected true or "
                                                        "false, got 1"),
    (("request", "explain", "cam", "layers"), "down_blocks.0", "request.explain.cam.layers: expected a list, got "
                                                               "'down_blocks.0'"),
    (("request", "output"), [], "request.output: expected an object, got []"),
    # values only the model can judge: they were blamed on --width / --cam-layers, flags replay does not have
    (("request", "params", "width"), 40, "the record's request cannot run on this model: request.params.width: "
                                         "got 40; must be a multiple of 16"),
    (("request", "explain", "cam", "layers"), ["nope"], "the record's request cannot run on this model: "
                                                        "request.explain.cam.layers: unknown layer path(s) 'nope'"),
])
def test_a_record_with_a_wrong_value_exits_2_naming_it_before_anything_runs(record, tiny_dir, tmp_path, capsys,
                                                                           path, value, message):
    """Wrong types crashed replay in a traceback with exit 1 (the code of a mismatch), some after the whole run;
    bad request values were blamed on flags replay does not have (--seed, --scheduler)."""
    bad = json.loads(json.dumps(record))
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert main(["replay", _write(tmp_path, bad), "--model-dir", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err
    assert not any(flag in err for flag in ("--seed", "--scheduler", "--width", "--cam-layers"))


def test_a_differing_rise_map_of_a_batched_step_is_not_a_failure(record, tiny_dir, tmp_path, capsys):
    """'rise_exact' false: the step's DF-RISE calls were shared with other jobs, and its maps may differ in the
    last bits. The table said so, but the exit status still said the replay failed."""
    bad = json.loads(json.dumps(record))
    bad["hashes"]["maps"]["1"]["rise"] = "0" * 64
    bad["rise_exact"]["1"] = False
    assert main(["replay", _write(tmp_path, bad), "--model-dir", str(tiny_dir)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.endswith("; 1 DF-RISE map(s) of steps batched with other jobs differ, which the record allows")
    bad["hashes"]["maps"]["1"]["cam"] = "0" * 64  # any other map still fails it
    assert main(["replay", _write(tmp_path, bad), "--model-dir", str(tiny_dir)]) == 1


def test_replay_runs_with_the_records_torch_thread_count(tiny_dir, tiny_model, tmp_path, capsys):
    """Maps depend on torch's thread count. Replay ran at its own process's, so a faithful record of a worker with
    another (a worker counts the CPUs it may use, torch its own way; --threads) failed to match."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        events = run_one(tiny_model, settings(tiny_dir), spec("a red circle", seed=3, steps=2,
                                                              methods=("rise", "cam", "attn")))
        rec = json.loads(events[-1].audit_json)
        assert rec["runtime"]["torch_threads"] == 1
        torch.set_num_threads(2)
        assert main(["replay", _write(tmp_path, rec), "--model-dir", str(tiny_dir)]) == 0
        assert "1 torch thread" in capsys.readouterr().out
        assert torch.get_num_threads() == 2  # the process's own count again afterwards
        # --threads overrides it (the hashes then need not match)
        main(["replay", _write(tmp_path, rec), "--model-dir", str(tiny_dir), "--threads", "2"])
        assert "2 torch threads (the record's: 1)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


def test_replay_needs_the_records_model(record, tmp_path, capsys):
    assert main(["replay", _write(tmp_path, record), "--model", "other=/x"]) == 2
    assert "the record's model 'tiny' is not configured" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_replay_of_a_cuda_record_without_cuda_asks_for_a_device(record, tiny_dir, tmp_path, capsys):
    gpu = json.loads(json.dumps(record))
    gpu["runtime"]["device"] = "cuda"
    assert main(["replay", _write(tmp_path, gpu), "--model-dir", str(tiny_dir)]) == 2
    assert "--device: the record ran on cuda" in capsys.readouterr().err


def _rows(text: str) -> dict[str, str]:
    """The replay table: item -> its match column."""
    return {line.split()[0]: line.split()[3] for line in text.splitlines() if line.startswith(("image.", "step"))}


def test_re_explaining_checks_the_image_and_the_unchanged_maps_and_adds_the_new_ones(record, tiny_dir, tmp_path,
                                                                                    capsys):
    out = tmp_path / "re"
    # DF-CAM as recorded, DF-RISE with other options, attention dropped, step 0 only
    argv = ["replay", _write(tmp_path, record), "--model-dir", str(tiny_dir), "--out", str(out),
            "--methods", "cam,rise", "--masks", "16", "--explain-steps", "0"]
    assert main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    cam_items = {f"step000/{n}" for n in record["hashes"]["maps"]["0"] if n.startswith("cam")}
    assert set(rows) == {"image.rgb_uint8", "image.png"} | cam_items and len(cam_items) > 1
    assert set(rows.values()) == {"yes"}
    summary = json.loads((out / "replay.json").read_text())
    assert summary["re_explained"] and summary["mismatches"] == 0
    assert summary["explain"]["rise"]["num_masks"] == 16 and summary["explain"]["attention"] is None
    assert set(summary["new_maps"]) == {"step000/rise", "step000/rise_raw", "step000/rise_mean"}
    with np.load(out / "explanation.npz") as z:
        assert z["explained_steps"].tolist() == [0]
        assert all(audit.array_sha256(z[k], "float32") == h for k, h in summary["new_maps"].items())
        # 16 masks, not the record's 8: a different map from the recorded one
        assert audit.array_sha256(z["step000/rise"], "float32") != record["hashes"]["maps"]["0"]["rise"]


def test_re_explaining_still_catches_a_different_image(record, tiny_dir, tmp_path, capsys):
    bad = json.loads(json.dumps(record))
    bad["hashes"]["image"]["rgb_uint8"] = "0" * 64
    argv = ["replay", _write(tmp_path, bad), "--model-dir", str(tiny_dir), "--out", str(tmp_path / "re"),
            "--methods", "attn", "--explain-steps", "1"]
    assert main(argv) == 1
    rows = _rows(capsys.readouterr().out)
    assert rows["image.rgb_uint8"] == "NO" and rows["step001/attn"] == "yes"


@pytest.mark.parametrize(("flags", "message"), [
    (["--methods", "cam"], "--out: re-explaining makes maps the record does not have"),
    (["--methods", "cam", "--masks", "4", "--out", "OUT"], "--masks: a rise option, but rise is not among the "
                                                             "methods (cam)"),
    (["--explain-steps", "every:0", "--out", "OUT"], "--explain-steps: got 0"),
])
def test_bad_re_explain_flags_exit_2_before_anything_runs(record, tiny_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "re"
    argv = ["replay", _write(tmp_path, record), "--model-dir", str(tiny_dir),
            *[str(out) if f == "OUT" else f for f in flags]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_flags_that_repeat_the_record_replay_it_as_recorded(record, tiny_dir, tmp_path, capsys):
    argv = ["replay", _write(tmp_path, record), "--model-dir", str(tiny_dir), "--methods", "rise,cam,attn",
            "--masks", "8"]
    assert main(argv) == 0  # no --out needed: nothing new is made
    text = capsys.readouterr().out
    assert len(_rows(text)) == 2 + sum(len(m) for m in record["hashes"]["maps"].values())
    assert "re-explained" not in text


def test_replay_with_no_methods_needs_no_out_and_checks_the_image(record, tiny_dir, tmp_path, capsys):
    assert main(["replay", _write(tmp_path, record), "--model-dir", str(tiny_dir), "--methods", "none"]) == 0
    assert set(_rows(capsys.readouterr().out)) == {"image.rgb_uint8", "image.png"}


def test_store_writes_one_file_per_attempt_under_the_utc_date(tmp_path):
    record = {"job_id": "j1", "attempt": 2, "x": 1}
    path = audit.store(audit.dumps(record), record, tmp_path / "records")
    assert path.parent.parent == tmp_path / "records" and path.name == "j1.a2.json"
    assert len(path.parent.name) == 10 and path.parent.name[4] == "-"  # YYYY-MM-DD
    assert json.loads(path.read_text()) == record
    assert [p.name for p in path.parent.iterdir()] == ["j1.a2.json"]  # no temporary file left


def test_check_store_names_the_flag_for_a_folder_it_cannot_write(tmp_path):
    from difflens.errors import InvalidArgument

    audit.check_store(tmp_path / "new" / "folder")  # created
    assert (tmp_path / "new" / "folder").is_dir()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InvalidArgument) as e:
        audit.check_store(f)
    assert e.value.field == "--audit-dir"


def test_a_worker_with_an_audit_dir_keeps_the_delivered_record(tiny_dir, tiny_model, tmp_path):
    events = run_one(tiny_model, settings(tiny_dir, audit_dir=str(tmp_path / "audit")), spec(steps=2))
    done = events[-1]
    assert isinstance(done, Completed)
    record = json.loads(done.audit_json)
    [kept] = (tmp_path / "audit").glob(f"*/{record['job_id']}.a1.json")
    assert kept.read_text() == done.audit_json


def test_no_image_is_delivered_when_its_record_cannot_be_kept(tiny_dir, tiny_model, tmp_path):
    from difflens.jobs import Failed
    from difflens.worker.job import AUDIT_STORE_MESSAGE

    blocked = tmp_path / "audit"
    blocked.write_text("a file where the folder should be")
    events = run_one(tiny_model, settings(tiny_dir, audit_dir=str(blocked)), spec(steps=2))
    assert events[-1] == Failed("INTERNAL", AUDIT_STORE_MESSAGE)
    assert not any(isinstance(e, Completed) for e in events)


@pytest.mark.parametrize(("other", "differs"), [
    ({"torch_threads": 2}, True),  # on a CPU the thread count changes the maps
    ({"dtype": "float16"}, True),
    ({"torch_threads": None}, False),  # a record without the count: nothing to compare
    ({}, False),
])
def test_replay_on_a_server_says_when_its_runtime_differs_from_the_records(other, differs):
    from difflens.replay import runtimes_differ

    base = {"device": "cpu", "dtype": "float32", "unet_backend": "eager", "torch_threads": 1}
    changed = {k: v for k, v in {**base, **other}.items() if v is not None}
    assert runtimes_differ({"runtime": base}, {"runtime": changed}) is differs
    gpu = {**base, "device": "cuda"}
    assert not runtimes_differ({"runtime": gpu}, {"runtime": {**gpu, "torch_threads": 8}})  # CPU threads: no matter


def _rise_record(tiny_model, tiny_dir, **rise_kw) -> dict:
    """The record of a 2-step DF-RISE-only worker job with these RiseOptions."""
    import dataclasses

    from difflens.engine.options import RiseOptions

    job = spec("a red circle", seed=5, steps=2)
    rise = RiseOptions(num_masks=16, batch_size=4, seed=5, **rise_kw)
    events = run_one(tiny_model, settings(tiny_dir), dataclasses.replace(
        job, explain=dataclasses.replace(job.explain, rise=rise)))
    assert isinstance(events[-1], Completed)
    return json.loads(events[-1].audit_json)


def test_a_record_with_the_mask_sampling_fields_replays_them(tiny_dir, tiny_model, tmp_path, capsys):
    record = _rise_record(tiny_model, tiny_dir, sampler="stratified", antithetic=True, stop_at_r=0.5, min_masks=4,
                          estimator="regression")
    rise = record["request"]["explain"]["rise"]
    assert (rise["sampler"], rise["antithetic"], rise["stop_at_r"], rise["min_masks"]) == ("stratified", True, 0.5, 4)
    assert rise["estimator"] == "regression"
    assert all(s["masks_planned"] == 16 and s["stop_at_r"] == 0.5 for s in record["resolved"]["rise_stats"].values())
    assert main(["replay", _write(tmp_path, record), "--model-dir", str(tiny_dir)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert "step001/rise" in rows and set(rows.values()) == {"yes"}


def test_a_record_from_before_the_sampling_and_padding_options_replays_as_it_ran(tiny_dir, tiny_model, tmp_path,
                                                                                 capsys):
    """An older record's request has neither the sampling fields (mc masks, all of them) nor ssim_padding (zero
    padding, the default of its day): replay must run exactly that, not today's reflect default."""
    record = _rise_record(tiny_model, tiny_dir, ssim_padding="zero")
    rise = record["request"]["explain"]["rise"]
    assert not {"sampler", "antithetic", "stop_at_r", "min_masks", "estimator"} & set(rise)  # defaults left out
    del rise["ssim_padding"]
    assert main(["replay", _write(tmp_path, record), "--model-dir", str(tiny_dir)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert "step001/rise" in rows and set(rows.values()) == {"yes"}
