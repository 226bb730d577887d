from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflens.evaluation import metrics
from difflens.evaluation.ground_truth import Regions
from difflens.scenes.render import ObjectSpec


def curve(scores):
    return {"fraction": np.linspace(0, 1, len(scores)).tolist(), "ssim": list(scores), "cosine": list(scores)}


def record(step, formed, pg, obj, tex, rho, deletion, random_deletion=(1.0, 1.0, 0.0)):
    m = {"pointing_game": pg, "object": obj, "edge": 1.0, "texture": tex, "sanity_spearman": rho,
         "deletion": curve(deletion), "insertion": curve((0.0, 1.0, 1.0))}
    token = {k: m[k] for k in ("pointing_game", "object", "edge", "texture", "sanity_spearman")}
    return {"caption": "c", "seed": 0, "step": step, "timestep": 999 - step, "formed": formed,
            "random": {"deletion": curve(random_deletion), "insertion": curve((0.0, 0.0, 1.0))},
            "methods": {"rise": m | {"baseline_spearman": rho}, "cam": m, "attention": m, "attention_color": token,
                        "attention_shape": token, "rise_own": token}}


def test_aggregate_by_hand():
    rs = [record(0, False, False, 2.0, float("nan"), 0.5, (1.0, 0.0, 0.0)),
          record(5, True, True, 4.0, 3.0, -0.1, (1.0, 0.5, 0.0))]
    a = metrics.aggregate(rs)["rise"]
    assert a["pointing_game"] == 0.5 and a["pointing_game_formed"] == 1.0 and a["n_formed"] == 1
    assert a["object_ratio"] == 3.0 and a["texture_ratio"] == 3.0  # NaN left out
    assert a["sanity_spearman"] == pytest.approx(0.2) and a["sanity_spearman_abs"] == pytest.approx(0.3)
    # trapezoid AUCs: (1,0,0) -> 0.25, (1,0.5,0) -> 0.5; random (1,1,0) -> 0.75
    assert a["deletion_auc"] == pytest.approx(0.375)
    assert a["random_deletion_auc"] == pytest.approx(0.75)
    assert a["deletion_vs_random"] == pytest.approx(0.5)
    assert a["insertion_auc"] == pytest.approx(0.75) and a["random_insertion_auc"] == pytest.approx(0.25)
    assert "deletion_auc" not in metrics.aggregate(rs)["attention_color"]
    assert a["baseline_spearman"] == pytest.approx(0.2)
    own = metrics.aggregate(rs)["rise_own"]  # the diagnostic: judged like a token map, no curves
    assert own["pointing_game"] == 0.5 and "deletion_auc" not in own and "baseline_spearman" not in own


def test_the_sanity_chance_level_is_aggregated_signed_and_absolute_where_measured():
    rs = [record(0, True, True, 1.0, 1.0, 0.5, (1, 0, 0)) for _ in range(3)]
    for r, rho in zip(rs[1:], (0.4, -0.2), strict=True):  # the first image has no other image to pair with
        r["methods"]["cam"] = r["methods"]["cam"] | {"sanity_chance_spearman": rho}
    a = metrics.aggregate(rs)
    assert a["cam"]["sanity_chance"] == pytest.approx(0.1) and a["cam"]["sanity_chance_abs"] == pytest.approx(0.3)
    assert a["cam"]["sanity_spearman_abs"] == pytest.approx(0.5)  # the sanity figure itself is unchanged
    assert math.isnan(a["rise"]["sanity_chance"]) and math.isnan(a["rise"]["sanity_chance_abs"])


def test_the_ground_truth_mask_is_aggregated_as_a_reference_with_curves_and_no_sanity_check():
    rs = [record(0, True, True, 2.0, 1.0, 0.5, (1.0, 0.5, 0.0)), record(5, True, True, 4.0, 1.0, 0.5, (1, 0, 0))]
    for r in rs:
        ref = {k: v for k, v in r["methods"]["cam"].items() if k != "sanity_spearman"}
        r["methods"]["object_mask"] = ref | {"deletion": curve((1.0, 0.0, 0.0))}
    a = metrics.aggregate(rs)
    ref = a["object_mask"]
    assert ref["deletion_auc"] == pytest.approx(0.25) and ref["deletion_vs_random"] == pytest.approx(1 - 0.25 / 0.75)
    assert math.isnan(ref["sanity_spearman"])  # a ground truth has no weight-randomised counterpart
    assert metrics.per_step(rs, [0, 5])["object_mask"]["deletion_auc"] == [0.25, 0.25]
    assert metrics.mean_curves(rs)["object_mask"]["deletion"]["ssim"] == [1.0, 0.0, 0.0]
    # records without it (an older run's) aggregate as before
    assert "object_mask" not in metrics.aggregate([record(0, True, True, 1.0, 1.0, 0.0, (1, 0, 0))])


def test_no_formed_steps_gives_nan_not_zero():
    a = metrics.aggregate([record(0, False, True, 1.0, 1.0, 0.0, (1, 0, 0))])["rise"]
    assert math.isnan(a["pointing_game_formed"]) and a["pointing_game"] == 1.0


def test_early_late_halves_skip_the_middle_step():
    rs = [record(0, False, True, 3.0, 1.0, 0, (1, 0, 0)), record(5, False, True, 9.0, 9.0, 0, (1, 0, 0)),
          record(9, False, True, 1.0, 2.0, 0, (1, 0, 0))]
    c = metrics.early_late(rs, [0, 5, 9])
    assert c["early_steps"] == [0] and c["late_steps"] == [9]
    assert c["rise"]["early"]["object"] == 3.0 and c["rise"]["late"]["object"] == 1.0
    assert c["rise"]["object_higher_early"] and c["rise"]["texture_higher_late"]
    assert not c["rise"]["edge_higher_late"]  # equal is not higher


def test_per_step_series_and_mean_curves():
    rs = [record(0, False, True, 2.0, 1.0, 0, (1, 0, 0)), record(3, False, False, 4.0, 1.0, 0, (1, 1, 0))]
    s = metrics.per_step(rs, [0, 3])
    assert s["steps"] == [0, 3] and s["timesteps"] == [999, 996]
    assert s["rise"]["pointing_game"] == [1.0, 0.0] and s["cam"]["object_ratio"] == [2.0, 4.0]
    c = metrics.mean_curves(rs)
    assert c["rise"]["deletion"]["ssim"] == [1.0, 0.5, 0.0] and set(c) == {"rise", "cam", "attention", "random"}


def test_method_maps_pick_the_colour_and_shape_words():
    attn = torch.arange(5 * 4).float().reshape(5, 2, 2)
    maps = {"rise": torch.ones(2, 2), "rise_mean": torch.full((2, 2), 0.25), "cam": torch.zeros(2, 2), "attn": attn}
    words = ["a", "large", "red", "circle", "left"]
    out = metrics.method_maps(maps, words, ObjectSpec("circle", "red"))
    assert torch.equal(out["attention_color"], attn[2]) and torch.equal(out["attention"], attn[2] + attn[3])
    assert torch.equal(out["rise_own"], torch.full((2, 2), 0.75))
    with pytest.raises(ValueError, match="blue"):
        metrics.method_maps(maps, words, ObjectSpec("circle", "blue"))


def test_region_scores():
    obj = np.zeros((4, 4), bool)
    obj[:2, :2] = True
    r = Regions(obj, ~obj, np.zeros_like(obj), ObjectSpec("circle", "red"))
    sal = torch.zeros(4, 4)
    sal[0, 0] = 1.0
    s = metrics.region_scores(sal, r)
    assert s["pointing_game"] and s["object"] == pytest.approx(4.0) and s["edge"] == 0.0
    assert math.isnan(s["texture"])
