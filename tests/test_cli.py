from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from difflens import cli
from difflens.commands import explain_flags

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "service")}
    return subprocess.run([sys.executable, "-m", "difflens", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_help_does_not_import_torch():
    code = "import sys, difflens.cli as c; c.build_parser().format_help(); assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "service")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_make_tiny_model_writes_the_family_asked_for(tmp_path, capsys):
    from difflens.cli import main

    assert main(["make-tiny-model", str(tmp_path / "xl"), "--family", "sdxl"]) == 0
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert (tmp_path / "xl" / "tokenizer_2" / "vocab.json").exists()
    assert "tiny sdxl model written to" in capsys.readouterr().out


def test_make_tiny_model_writes_a_flux_folder_with_its_t5_tokenizer(tmp_path, capsys):
    from difflens.cli import main

    assert main(["make-tiny-model", str(tmp_path / "flux"), "--family", "flux"]) == 0
    index = json.loads((tmp_path / "flux" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"][1] == "FluxTransformer2DModel"
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert (tmp_path / "flux" / "tokenizer_2" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "flux" / "difflens.json").read_text())["guidance_scale"] == 3.5
    assert "tiny flux model written to" in capsys.readouterr().out


def test_make_tiny_model_writes_an_sd3_folder_with_t5(tmp_path, capsys):
    from difflens.cli import main

    assert main(["make-tiny-model", str(tmp_path / "sd3"), "--family", "sd3"]) == 0
    index = json.loads((tmp_path / "sd3" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["transformer"][1] == "SD3Transformer2DModel"
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert (tmp_path / "sd3" / "tokenizer_3" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "sd3" / "difflens.json").read_text())["scheduler"] == "euler"
    assert "tiny sd3 model written to" in capsys.readouterr().out


@pytest.mark.slow
def test_make_tiny_model_then_explain_without_methods(tmp_path):
    model = tmp_path / "tiny"
    made = _run("make-tiny-model", str(model), "--seed", "1")
    assert made.returncode == 0, made.stderr
    assert (model / "model_index.json").exists()
    out = tmp_path / "run"
    res = _run("explain", str(model), "a red circle", "--out", str(out), "--methods", "none", "--steps", "2",
               "--guidance", "2")
    assert res.returncode == 0, res.stderr
    assert {p.name for p in out.iterdir()} == {"image.png", "params.json", "report.html", "audit.json"}
    assert str(out) in res.stdout
    assert "2/2" in res.stderr  # the progress bar saw every denoising step
    params = json.loads((out / "params.json").read_text())
    assert params["generation"]["steps"] == 2 and params["methods"] == []
    assert params["generation"]["scheduler"] == "ddim"  # unset: the model's default, recorded
    bad = _run("explain", str(model), "a red circle", "--out", str(tmp_path / "bad"), "--width", "40")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("difflens: error: --width: ")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args,flag", [
    (["--scheduler", "foo"], "--scheduler"),
    (["--width", "40"], "--width"),
    (["--methods", "bogus"], "--methods"),
    (["--methods", "rise,none"], "--methods"),
    (["--explain-steps", "99"], "--explain-steps"),
    (["--explain-steps", "every:x"], "--explain-steps"),
    (["--explain-steps", "every:2,3"], "--explain-steps"),
    (["--sampling", "explicit"], "--timesteps"),
    (["--timesteps", "900,x"], "--timesteps"),
    (["--timesteps", "500,900"], "--timesteps"),
    (["--sampling", "late", "--shift", "0", "--steps", "30"], "--shift"),
    (["--shift", "30"], "--shift"),  # uniform: the shift means nothing, and the served request cannot carry it
    (["--timesteps", "900,500", "--shift", "30"], "--shift"),
    (["--masks", "0"], "--masks"),
    (["--mask-seed", "-1"], "--mask-seed"),  # the service refuses it too
    (["--mask", "grid", "--grid-size", "17"], "--grid-size"),  # finer than the tiny model's 16 x 16 latent
    (["--mask", "stars"], "--mask"),
    (["--cam-target", "x"], "--cam-target"),
    (["--methods", "cam", "--cam-layers", "up_blocks.9"], "--cam-layers"),
    (["--methods", "cam", "--masks", "8"], "--masks"),  # a DF-RISE option without DF-RISE is not dropped silently
    (["--backend", "jit"], "--backend"),
    (["--triton-url", "127.0.0.1:8001"], "--triton-url"),  # without --backend triton: refused, not ignored
    (["--backend", "triton"], "--triton-url"),
    (["--backend", "triton", "--triton-url", "127.0.0.1:8001", "--triton-model", "=x"], "--triton-model"),
    (["--guidance", "-1"], "--guidance"),
    (["--sampler", "halton"], "--sampler"),
    (["--antithetic", "--masks", "7"], "--masks"),  # pairs
    (["--stop-at-r", "2"], "--stop-at-r"),
    (["--stop-at-r", "0.9", "--min-masks", "300"], "--min-masks"),  # more than the 256 masks
    (["--min-masks", "1"], "--min-masks"),
    (["--methods", "cam", "--sampler", "sobol"], "--sampler"),
    (["--estimator", "ols"], "--estimator"),
    (["--estimator", "regression", "--mask", "grid"], "--estimator"),  # needs pixel masks
    (["--estimator", "regression", "--masks", "8"], "--masks"),  # needs 16
])
def test_bad_values_exit_2_naming_the_option_and_write_nothing(tiny_dir, tmp_path, capsys, args, flag):
    out = tmp_path / "run"
    code = cli.main(["explain", str(tiny_dir), "a red circle", "--out", str(out), "--steps", "2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"difflens: error: {flag}: "), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    code = cli.main(["explain", str(tmp_path / "nope"), "x", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("difflens: error: MODEL_DIR: ") and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_out_must_be_a_folder(tiny_dir, tmp_path, capsys):
    f = tmp_path / "run"
    f.write_text("keep")
    assert cli.main(["explain", str(tiny_dir), "x", "--out", str(f), "--methods", "none"]) == 2
    assert capsys.readouterr().err.startswith("difflens: error: --out: ")
    assert f.read_text() == "keep"


def test_sampling_flags_reach_the_rise_options_and_padding_defaults_to_reflect():
    parse = cli.build_parser().parse_args
    args = parse(["explain", "m", "p", "--out", "o", "--sampler", "stratified", "--antithetic", "--stop-at-r",
                  "0.95", "--min-masks", "16", "--estimator", "regression"])
    rise = explain_flags.explanation_options(args).rise
    assert (rise.sampler, rise.antithetic, rise.stop_at_r, rise.min_masks) == ("stratified", True, 0.95, 16)
    assert rise.estimator == "regression"
    plain = explain_flags.explanation_options(parse(["explain", "m", "p", "--out", "o"])).rise
    assert (plain.sampler, plain.antithetic, plain.stop_at_r, plain.ssim_padding) == ("mc", False, None, "reflect")
    assert plain.estimator == "ratio"
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["explain"].format_help()
    assert "zero: the paper's" in " ".join(help_text.split())


def test_a_run_that_stops_early_says_so_and_its_record_holds_what_was_used(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["explain", str(tiny_dir), "a red circle", "--out", str(out), "--steps", "2", "--masks", "16",
                     "--batch", "4", "--methods", "rise", "--sampler", "stratified", "--antithetic",
                     "--stop-at-r", "0.5", "--min-masks", "4"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("difflens: DF-RISE step")]
    record = json.loads((out / "audit.json").read_text())
    stats = record["resolved"]["rise_stats"]
    assert set(stats) == {"0", "1"} and len(lines) == 2
    for line, (step, s) in zip(lines, sorted(stats.items()), strict=True):
        assert s["masks_planned"] == 16 and 4 <= s["masks_used"] <= 16 and s["stop_at_r"] == 0.5
        assert f"step {step} " in line and f"masks used: {s['masks_used']} of 16" in line
    assert record["request"]["explain"]["rise"]["sampler"] == "stratified"  # replay: tests/test_audit.py


def test_step_selector_parsing():
    assert explain_flags.parse_step_selector("all").kind == "all"
    assert explain_flags.parse_step_selector("every:4").every == 4
    assert explain_flags.parse_step_selector("9,3,5").indices == (9, 3, 5)
    assert explain_flags.parse_methods("cam, rise,cam") == ("cam", "rise")
    assert explain_flags.parse_methods("none") == ()


def test_a_local_run_leaves_an_audit_record_that_replays_without_flags(tiny_dir, tmp_path, capsys):
    """Every image gets an audit record: the local CLI wrote none, so its images could not be replayed. The
    record names the folder, which replay uses when the model's name is not configured."""
    import hashlib

    out = tmp_path / "run"
    assert cli.main(["explain", str(tiny_dir), "a red circle", "--out", str(out), "--steps", "2", "--masks", "4",
                     "--batch", "4", "--methods", "rise,attn", "--seed", "3"]) == 0
    record = json.loads((out / "audit.json").read_text())
    assert record["model"]["folder"] == str(Path(tiny_dir).resolve()) and record["model"]["name"] == "tiny"
    assert record["request"]["params"]["seed"] == 3 and record["rise_exact"] == {"0": True, "1": True}
    assert record["hashes"]["image"]["png"] == hashlib.sha256((out / "image.png").read_bytes()).hexdigest()
    assert len(record["timings"]["steps"]) == 2 and all(s["denoise_s"] > 0 for s in record["timings"]["steps"])
    capsys.readouterr()
    assert cli.main(["replay", str(out / "audit.json")]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.endswith(" items match") and last.split()[-3].split("/")[0] == last.split()[-3].split("/")[1]


def test_explain_with_every_method(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["explain", str(tiny_dir), "a large red circle", "--out", str(out), "--steps", "3",
                     "--guidance", "2", "--explain-steps", "0,2", "--masks", "4", "--batch", "4",
                     "--methods", "rise,cam,attn"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "3/3" in captured.err  # all denoising steps counted, not only the explained ones
    names = {p.name for p in out.iterdir()}
    assert names == {"image.png", "params.json", "report.html", "explanation.npz", "attn_tokens.png",
                     "strip_rise.png", "strip_cam.png", "strip_attn.png", "rise.gif", "cam.gif", "attn.gif",
                     "overview.png", "audit.json"}
    with np.load(out / "explanation.npz") as z:
        assert z["explained_steps"].tolist() == [0, 2]
        assert z["tokens"].tolist() == ["a", "large", "red", "circle"]
        assert z["step002/rise"].shape == (16, 16) and z["step000/attn"].shape == (4, 16, 16)
    params = json.loads((out / "params.json").read_text())
    assert params["explain"]["rise"]["num_masks"] == 4 and params["methods"] == ["rise", "cam", "attn"]
    html = (out / "report.html").read_text()
    assert html.count('<polyline class="relevance"') == 4
