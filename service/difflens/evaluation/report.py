"""The suite's outputs: a markdown report (printed), summary.json and the PNG charts.

Targets (issue 3) are compared with what was measured and marked met / MISSED; nothing is adjusted to meet them.
NaN (nothing measurable, e.g. no step where the object had formed) is written as null and shown as n/a.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from difflens.evaluation import plots
from difflens.evaluation.metrics import DIAGNOSTICS, METHODS, REFERENCES, REGIONS, TOKEN_METHODS

FIDELITY_ATTRS = ("count", "color", "position", "shape", "size", "texture")
NAMES = {"rise": "DF-RISE", "cam": "DF-CAM", "attention": "attention (colour+shape)",
         "attention_color": "attention (colour word)", "attention_shape": "attention (shape word)",
         "rise_own": "diagnostic: DF-RISE minus its mean score",
         "object_mask": "reference: the ground-truth object mask as the map"}


def targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    """[{"name", "measured", "target", "met"}] for every target of the issue."""
    fid = s.get("fidelity", {})
    rows = [
        ("fidelity colour", fid.get("color"), ">= 0.90", lambda v: v >= 0.90),
        ("fidelity position", fid.get("position"), ">= 0.90", lambda v: v >= 0.90),
        ("fidelity shape", fid.get("shape"), ">= 0.80", lambda v: v >= 0.80),
        ("fidelity exactly one object", fid.get("count"), ">= 0.95", lambda v: v >= 0.95),
        ("DF-RISE pointing game (steps where the object has formed)", s["rise"]["pointing_game_formed"],
         ">= 0.95", lambda v: v >= 0.95),
    ]
    for m in METHODS:
        rows.append((f"{NAMES[m]} deletion AUC below random by", s[m]["deletion_vs_random"], ">= 0.30",
                     lambda v: v >= 0.30))
    for m in METHODS:
        # Judged on |rho| (Adebayo et al. report absolute correlations): a map that turns into its negative under
        # randomisation has not stopped depending on it, and signed values of both signs would cancel in a mean.
        # No "|" in the name: it is a markdown table cell.
        rows.append((f"{NAMES[m]} sanity Spearman, mean of absolute values", s[m]["sanity_spearman_abs"], "< 0.30",
                     lambda v: v < 0.30))
    return [{"name": n, "measured": v, "target": t, "met": bool(v is not None and not math.isnan(v) and ok(v))}
            for n, v, t, ok in rows]


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                             for r in rows]


def markdown(s: dict[str, Any]) -> str:
    """The report as markdown: fidelity (R3), faithfulness per method, early vs late mass, targets, timing."""
    r3, ex = s["r3"], s["explained"]
    lines = [f"# difflens evaluate: {s['model']}", "",
             f"Defaults: {s['defaults']['scheduler']}, {s['defaults']['steps']} steps, guidance "
             f"{s['defaults']['guidance_scale']}. Fidelity: {r3['images']} images of {r3['distinct_captions']} "
             f"held-out captions. Explained: {ex['accepted']} images ({ex['screened']} generated, excluded "
             f"{ex['excluded'] or 'none'}), steps {ex['steps']}, {s['config']['masks']} masks "
             f"(DF-RISE mask {s['config'].get('rise_mask', 'pixel')}, "
             f"score {s['config'].get('rise_score', 'structure')}, "
             f"SSIM padding {s['config'].get('rise_ssim_padding', 'zero')}).",
             "",
             f"## Prompt fidelity per schedule (R3, lambda = {r3['shift']})", ""]
    lines += _table(["schedule", *FIDELITY_ATTRS],
                    [[k, *(_f(acc.get(a)) for a in FIDELITY_ATTRS)] for k, acc in r3["fidelity"].items()])
    for n, few in r3.get("few_steps", {}).items():
        lines += ["", f"With {n} steps, lambda {few['shift']:g} (timesteps: "
                  + "; ".join(f"{k} {v}" for k, v in few["timesteps"].items()) + "):", ""]
        lines += _table(["schedule", *FIDELITY_ATTRS],
                        [[k, *(_f(acc.get(a)) for a in FIDELITY_ATTRS)] for k, acc in few["fidelity"].items()])
    lines += ["", "## Faithfulness (mean over explained images and steps)", ""]
    keys = ("pointing_game", "pointing_game_formed", "deletion_auc", "random_deletion_auc", "insertion_auc",
            "random_insertion_auc", "sanity_spearman", "sanity_spearman_abs", "sanity_chance_abs", "object_ratio",
            "edge_ratio", "texture_ratio")
    lines += _table(["method", *keys], [[NAMES[m], *(_f(s[m].get(k)) for k in keys)]
                                       for m in METHODS + TOKEN_METHODS + DIAGNOSTICS + REFERENCES
                                       if m in s])
    lines += ["", f"Steps where the x0 prediction already shows the object: {s['rise']['n_formed']} of "
                  f"{s['rise']['n']}. AUCs: SSIM of the decoded x0 prediction (cosine of x_t-1 in summary.json).",
              "", "sanity_chance_abs: the sanity Spearman's chance level, each map against the randomised UNet's "
                  "map of another image at the same step (maps sharing neither input nor weights). A sanity value "
                  "at this level means randomising the weights changed the map as much as changing the image did; "
                  "smooth maps sit well above 0 here.",
              *_calibration(s),
              "", f"DF-RISE map vs its mask-independent mean score E_k[s_k] (Spearman): "
                  f"{_f(s['rise'].get('baseline_spearman'))}. Near 1, the map says where masking anything disturbs "
                  "the prediction, not which pixels matter; the diagnostic row judges rise - rise_mean instead.",
              "", "## Where the mass sits: early vs late steps (mass ratio, 1 = no preference)", ""]
    c = s["claim"]
    lines += [f"Early steps {c['early_steps']}, late steps {c['late_steps']}.", ""]
    lines += _table(["method", *(f"{side} {r}" for side in ("early", "late") for r in REGIONS),
                     "object higher early", "edge higher late", "texture higher late"],
                    [[NAMES[m], *(_f(c[m][side][r]) for side in ("early", "late") for r in REGIONS),
                      _f(c[m]["object_higher_early"]), _f(c[m]["edge_higher_late"]),
                      _f(c[m]["texture_higher_late"])] for m in METHODS])
    lines += ["", "## Targets", ""]
    lines += _table(["target", "measured", "wanted", "status"],
                    [[t["name"], _f(t["measured"]), t["target"],
                      "not measured" if t["measured"] is None else "met" if t["met"] else "MISSED"]
                     for t in s["targets"]])
    sec = s["seconds"]
    lines += ["", f"Time: {sec['total']:.0f} s (fidelity {sec['fidelity']:.0f} s, explanation "
                  f"{sec['explanation']:.0f} s)."]
    return "\n".join(lines) + "\n"


def _calibration(s: dict[str, Any]) -> list[str]:
    """What the deletion metric gives the ground truth itself: how far ranking the object's pixels first can go."""
    ref = s.get("object_mask")
    if not ref:
        return []
    below = ref.get("deletion_vs_random")
    below_text = "n/a" if below is None or math.isnan(below) else f"{below * 100:.1f}%"
    return ["", f"Calibration: the ground-truth object mask used as the map scores deletion {below_text} below "
                f"random and insertion {_f(ref.get('insertion_auc'))} (random {_f(ref.get('random_insertion_auc'))})."
                " No map ranks the object's pixels better; a method that scores far above this on deletion does so "
                "by ranking something other than the object."]


def _json_ready(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {str(k): _json_ready(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_ready(x) for x in v]
    return v


def write_outputs(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    """Add the targets to `summary`, write summary.json, report.md and the charts into `out`; -> name: path."""
    out.mkdir(parents=True, exist_ok=True)
    summary["targets"] = targets(summary)
    written = {"summary.json": out / "summary.json", "report.md": out / "report.md"}
    written["summary.json"].write_text(json.dumps(_json_ready(summary), indent=1, allow_nan=False) + "\n")
    written["report.md"].write_text(markdown(summary))
    written |= plots.write_charts(summary, out)
    return written
