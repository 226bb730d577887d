from __future__ import annotations

import json
import math

import numpy as np
import pytest

from difflens.evaluation.ground_truth import Regions
from difflens.evaluation.report import markdown, write_outputs
from difflens.evaluation.suite import EvalConfig, explained_steps, run_suite
from difflens.scenes.render import render_scene

PNG = b"\x89PNG\r\n\x1a\n"
METHOD_KEYS = ("pointing_game", "deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc",
               "sanity_spearman")


def rendered_truth(image, spec, factor):
    """The untrained fixture draws no objects, so the checker would exclude every image; score the maps against
    the render of the caption instead (the suite's ground-truth seam), so every metric has something to measure."""
    _, gt = render_scene(spec, image.shape[0], 0)
    return Regions(gt.mask, gt.edge_band, gt.texture_region, spec)


@pytest.fixture(scope="module")
def run(pixel_model, tmp_path_factory):
    cfg = EvalConfig(fidelity_images=6, explain_captions=3, masks=16, steps=3, chunks=4, seed=0, r3_steps=(2,))
    summary = run_suite(pixel_model, cfg, ground_truth=rendered_truth)
    out = tmp_path_factory.mktemp("eval")
    return summary, write_outputs(summary, out), out


def test_summary_json_has_every_key_in_range(run):
    _, written, out = run
    s = json.loads((out / "summary.json").read_text())
    for attr in ("color", "position", "shape", "size", "texture", "count"):
        assert 0.0 <= s["fidelity"][attr] <= 1.0
    assert s["fidelity"]["images"] == 6
    for m in ("rise", "cam", "attention"):
        for k in METHOD_KEYS:
            v = s[m][k]
            assert v is not None and (-1.0 <= v <= 1.0 if k == "sanity_spearman" else 0.0 <= v <= 1.0), (m, k)
        for k in ("object_ratio", "edge_ratio"):
            assert s[m][k] >= 0.0
        # the chance level pairs maps of different images (3 different scenes here), so it is not the sanity value
        assert 0.0 <= s[m]["sanity_chance_abs"] <= 1.0 and s[m]["sanity_chance_abs"] != s[m]["sanity_spearman_abs"]
        assert len(s["series"][m]["sanity_chance_abs"]) == 3
    ref = s["object_mask"]  # the ground truth as a map calibrates deletion / insertion
    assert ref["pointing_game"] == 1.0 and ref["sanity_spearman"] is None
    assert 0.0 <= ref["deletion_auc"] <= 1.0 and ref["random_deletion_auc"] == s["rise"]["random_deletion_auc"]
    assert len(s["series"]["object_mask"]["deletion_auc"]) == 3
    assert s["explained"]["accepted"] == 3 and s["explained"]["steps"] == [0, 2, 3]
    assert set(s["r3"]["fidelity"]) == {"uniform", "early", "late"}
    early, late = s["r3"]["timesteps"]["early"], s["r3"]["timesteps"]["late"]
    assert early[0] == late[0] == 999 and len(late) == 4 and early[1] < late[1]  # early drops fast from T
    few = s["r3"]["few_steps"]["2"]
    assert few["steps"] == 2 and set(few["fidelity"]) == {"uniform", "early", "late"}
    assert len(few["timesteps"]["late"]) == 2 and 0.0 <= few["fidelity"]["late"]["texture"] <= 1.0
    assert few["shift"] == pytest.approx(s["r3"]["shift"] * 2 / s["r3"]["steps"])  # same packing shape
    series = s["series"]
    assert series["steps"] == [0, 2, 3] and len(series["rise"]["pointing_game"]) == 3
    assert len(series["cam"]["deletion_auc"]) == 3 and series["timesteps"][0] > series["timesteps"][-1]
    assert s["claim"]["early_steps"] == [0] and s["claim"]["late_steps"] == [3]
    name = "DF-RISE sanity Spearman, mean of absolute values"
    assert {t["name"] for t in s["targets"]} >= {"fidelity colour", name}
    sanity = next(t for t in s["targets"] if t["name"] == name)
    assert sanity["measured"] == s["rise"]["sanity_spearman_abs"]  # judged on |rho|: signs cannot cancel
    assert all(isinstance(t["met"], bool) for t in s["targets"])


def test_curves_start_and_end_where_they_must(run):
    summary, _, _ = run
    for name, c in summary["curves"].items():
        assert c["deletion"]["fraction"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert c["deletion"]["ssim"][0] == pytest.approx(1.0, abs=1e-4), name  # nothing deleted yet
        assert c["insertion"]["ssim"][-1] == pytest.approx(1.0, abs=1e-4), name  # everything restored
    # the random baseline is one curve, shared by every method
    assert summary["rise"]["random_deletion_auc"] == summary["cam"]["random_deletion_auc"]


def test_plots_are_pngs_and_the_report_names_targets(run):
    summary, written, _ = run
    pngs = [p for n, p in written.items() if n.endswith(".png")]
    assert {"deletion_curves.png", "insertion_curves.png", "ratios_rise.png", "pointing_game.png",
            "sanity_spearman.png", "r3_fidelity.png"} <= {p.name for p in pngs}
    assert all(p.read_bytes()[:8] == PNG for p in pngs)
    md = markdown(summary)
    assert "| DF-RISE |" in md and all(t["name"] in md for t in summary["targets"])
    assert "sanity_chance_abs" in md.split("## Faithfulness")[1].splitlines()[2]  # a column of the table
    assert "| reference: the ground-truth object mask as the map |" in md
    below = summary["object_mask"]["deletion_vs_random"] * 100
    assert f"Calibration: the ground-truth object mask used as the map scores deletion {below:.1f}% below" in md
    assert md.count("MISSED") == sum(not t["met"] and t["measured"] is not None for t in summary["targets"])
    unmeasured = {**summary, "targets": [{**t, "measured": None, "met": False} for t in summary["targets"]]}
    table = markdown(unmeasured).split("## Targets")[1]  # a run without fidelity images misses nothing there
    assert "MISSED" not in table and table.count("not measured") == len(summary["targets"])


def test_explained_steps():
    assert explained_steps(25, 6) == [0, 5, 10, 14, 19, 24]
    assert explained_steps(4, 10) == [0, 1, 2, 3]
    assert explained_steps(25, (3, 1, 3)) == [1, 3]
    with pytest.raises(Exception, match="out of range"):
        explained_steps(5, (7,))


def test_cli_with_the_checker_excludes_what_it_cannot_score(pixel_dir, tmp_path, capsys):
    from difflens.cli import main

    rc = main(["evaluate", str(pixel_dir), "--out", str(tmp_path / "e"), "--captions", "2",
               "--explain-captions", "1", "--masks", "4", "--steps", "2", "--chunks", "2"])
    assert rc == 0
    s = json.loads((tmp_path / "e" / "summary.json").read_text())
    ex = s["explained"]
    assert ex["accepted"] == 0 and ex["screened"] == 4 and sum(ex["excluded"].values()) == 4
    assert s["rise"]["pointing_game"] is None  # nothing measured is null, not 0
    assert "# difflens evaluate" in capsys.readouterr().out
    assert not math.isnan(np.mean([s["fidelity"]["count"]]))


def test_steps_flag_parses_a_count_or_indices():
    from difflens.commands.evaluate import parse_steps

    assert parse_steps("6") == 6
    assert parse_steps("0,12,24") == (0, 12, 24)
    assert parse_steps("5,") == (5,)


def test_cli_names_the_flag_of_a_bad_size(pixel_dir, tmp_path, capsys):
    from difflens.cli import main

    assert main(["evaluate", str(pixel_dir), "--out", str(tmp_path / "e"), "--masks", "0"]) == 2
    assert "difflens: error: --masks:" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("flags,named", [(["--mask", "grid", "--grid-size", "0"], "--grid-size"),
                                         (["--masks", "0"], "--masks"), (["--r3-steps", "3,0"], "--r3-steps"),
                                         (["--r3-steps", "three"], "--r3-steps")])
def test_cli_names_the_flag_of_a_bad_rise_option(pixel_dir, tmp_path, capsys, flags, named):
    from difflens.cli import main

    assert main(["evaluate", str(pixel_dir), "--out", str(tmp_path / "e"), *flags]) == 2
    assert f"difflens: error: {named}:" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_the_rise_variant_becomes_the_explainer_options():
    from difflens.evaluation.suite import EvalConfig

    opts = EvalConfig(masks=8, rise_mask="grid", rise_grid_size=4, rise_score="cosine").rise_options()
    assert (opts.num_masks, opts.mask, opts.grid_size, opts.score) == (8, "grid", 4, "cosine")
