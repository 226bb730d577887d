"""Per-step measurements of the maps of one explained step, and their aggregation over captions and steps.

One record per (caption, explained step):
  {"caption", "seed", "step", "timestep", "formed",
   "random": {"deletion": curve, "insertion": curve},
   "methods": {name: {"pointing_game", "object", "edge", "texture", "sanity_spearman", "sanity_chance_spearman",
                      "deletion": curve, "insertion": curve}}}
with curve = {"fraction", "ssim", "cosine"} lists (engine.faithfulness.perturbation_curve). Methods: rise, cam,
attention (the colour-token map plus the shape-token map), and attention_color / attention_shape (each token's
map alone; no perturbation curves). Diagnostic: rise_own = rise - rise_mean, what each pixel's own mask adds to
the DF-RISE map beyond the mask-independent mean score (no curves; not a method the targets judge), and for rise
"baseline_spearman", the rank correlation of the DF-RISE map with that mean score. Reference: object_mask, the
ground-truth object mask itself used as a saliency map (no sanity check), which calibrates the deletion and
insertion metric: no map can rank the object's pixels better. The random ordering's curves
are the same function with a random pixel order, one order per record, shared by every method of that record.
sanity_chance_spearman: the map against the randomised UNet's map of another image at the same step (absent on
the first image), the value the sanity Spearman takes when randomisation changed the map as much as changing
the image does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from difflens.engine import faithfulness as fa
from difflens.engine.sampler import StepState
from difflens.evaluation.ground_truth import Regions
from difflens.scenes.render import ObjectSpec

METHODS = ("rise", "cam", "attention")
TOKEN_METHODS = ("attention_color", "attention_shape")
DIAGNOSTICS = ("rise_own",)
REFERENCES = ("object_mask",)  # the ground truth as a map: what the metrics give a map that is exactly right
CURVED = METHODS + REFERENCES  # the maps that get deletion / insertion curves
REGIONS = ("object", "edge", "texture")
KINDS = ("deletion", "insertion")
Curve = dict[str, list[float]]


def method_maps(maps: dict[str, torch.Tensor], tokens: Sequence[str], spec: ObjectSpec) -> dict[str, torch.Tensor]:
    """The saliency map (h, w) each method is judged by, and the diagnostic rise_own.
    maps: a StepExplanation's maps (rise, rise_mean, cam: (h, w); attn (T, h, w)); tokens: the prompt's T words."""
    color, shape = maps["attn"][word_index(tokens, spec.color)], maps["attn"][word_index(tokens, spec.shape)]
    return {"rise": maps["rise"], "cam": maps["cam"], "attention": color + shape,
            "attention_color": color, "attention_shape": shape, "rise_own": maps["rise"] - maps["rise_mean"]}


def word_index(tokens: Sequence[str], word: str) -> int:
    try:
        return list(tokens).index(word)
    except ValueError:
        raise ValueError(f"the prompt's words {list(tokens)} do not include {word!r}") from None


def region_scores(saliency: torch.Tensor, regions: Regions) -> dict[str, Any]:
    """Pointing game on the object (1 latent pixel tolerance) and mass ratios of the three regions.
    saliency: (h, w)."""
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a)

    out: dict[str, Any] = {"pointing_game": fa.pointing_game(saliency, t(regions.object))}
    for name in REGIONS:
        out[name] = fa.mass_ratio(saliency, t(getattr(regions, name)))
    return out


def curves(state: StepState, saliency: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], chunks: int,
           order: torch.Tensor | None = None, tie_break: torch.Tensor | None = None) -> dict[str, Curve]:
    """Deletion and insertion curves of one map (or of `order`, a permutation of the h*w pixels) at one step;
    pixels of equal saliency in the order of `tie_break` (faithfulness.perturbation_curve). saliency: (h, w)."""
    sal = saliency.to(state.latent_in.device)
    out = {}
    for kind in KINDS:
        c = fa.perturbation_curve(state, sal, kind, decode, chunks=chunks, order=order,  # type: ignore[arg-type]
                                  tie_break=tie_break)
        out[kind] = {k: v.cpu().tolist() for k, v in c.items()}
    return out


def curve_auc(curve: Curve, score: str = "ssim") -> float:
    return fa.auc(torch.tensor(curve["fraction"], dtype=torch.float64), torch.tensor(curve[score], dtype=torch.float64))


def present(records: Sequence[dict[str, Any]], names: Sequence[str]) -> tuple[str, ...]:
    """The `names` every record has a map for (a reference such as object_mask is absent from older records)."""
    return tuple(n for n in names if records and all(n in r["methods"] for r in records))


def _mean(values: Sequence[float]) -> float:
    v = [x for x in values if not (x is None or math.isnan(x))]
    return float(np.mean(v)) if v else float("nan")


def _method_values(records: Sequence[dict[str, Any]], method: str, key: str) -> list[float]:
    return [float(r["methods"][method][key]) for r in records if key in r["methods"].get(method, {})]


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Means over all records of each method's scores (NaN entries left out).

    Keys per method: pointing_game, pointing_game_formed (only steps whose x0 prediction already shows the
    object), n, n_formed, {object,edge,texture}_ratio, sanity_spearman (signed), sanity_spearman_abs, the same
    for sanity_chance (the chance level of the sanity Spearman: maps of different images); for rise,
    cam and attention also deletion_auc, insertion_auc, random_deletion_auc, random_insertion_auc (SSIM of the
    decoded x0 prediction), the same with a _cosine suffix (cosine of x_{t_next}), and deletion_vs_random
    = 1 - deletion_auc / random_deletion_auc (the share by which deletion is below random).
    """
    out: dict[str, dict[str, float]] = {}
    formed = [r for r in records if r["formed"]]
    for m in METHODS + TOKEN_METHODS + DIAGNOSTICS + present(records, REFERENCES):
        s: dict[str, float] = {
            "n": len(records), "n_formed": len(formed),
            "pointing_game": _mean(_method_values(records, m, "pointing_game")),
            "pointing_game_formed": _mean(_method_values(formed, m, "pointing_game")),
        }
        for region in REGIONS:
            s[f"{region}_ratio"] = _mean(_method_values(records, m, region))
        rho = _method_values(records, m, "sanity_spearman")
        s["sanity_spearman"], s["sanity_spearman_abs"] = _mean(rho), _mean([abs(x) for x in rho])
        chance = _method_values(records, m, "sanity_chance_spearman")
        s["sanity_chance"], s["sanity_chance_abs"] = _mean(chance), _mean([abs(x) for x in chance])
        if m == "rise":
            s["baseline_spearman"] = _mean(_method_values(records, m, "baseline_spearman"))
        if m in CURVED:
            for score, suffix in (("ssim", ""), ("cosine", "_cosine")):
                for kind in KINDS:
                    s[f"{kind}_auc{suffix}"] = _mean([curve_auc(r["methods"][m][kind], score) for r in records])
                    s[f"random_{kind}_auc{suffix}"] = _mean([curve_auc(r["random"][kind], score) for r in records])
            s["deletion_vs_random"] = 1 - s["deletion_auc"] / s["random_deletion_auc"] \
                if s["random_deletion_auc"] else float("nan")
        out[m] = s
    return out


def per_step(records: Sequence[dict[str, Any]], steps: Sequence[int]) -> dict[str, Any]:
    """The same aggregation for each explained step index: {"steps": [...], "timesteps": [...], method:
    {key: [value per step]}} (timesteps are those of the first record at each step)."""
    by_step = [aggregate([r for r in records if r["step"] == i]) for i in steps]
    out: dict[str, Any] = {"steps": list(steps),
                           "timesteps": [next((r["timestep"] for r in records if r["step"] == i), None)
                                         for i in steps]}
    for m in METHODS + TOKEN_METHODS + DIAGNOSTICS + present(records, REFERENCES):
        out[m] = {k: [agg[m][k] for agg in by_step] for k in by_step[0][m]} if by_step else {}
    return out


def early_late(records: Sequence[dict[str, Any]], steps: Sequence[int]) -> dict[str, Any]:
    """The paper's claim as numbers: each method's mean mass ratios in the early half of the explained steps
    (high noise) against the late half (the middle step of an odd count belongs to neither).

    Per method: {"early": {object, edge, texture}, "late": {...}, "object_higher_early": bool,
    "edge_higher_late": bool, "texture_higher_late": bool} (False when a side is NaN).
    """
    ordered = sorted(steps)
    half = len(ordered) // 2
    early_steps, late_steps = set(ordered[:half]), set(ordered[len(ordered) - half:])
    out: dict[str, Any] = {"early_steps": sorted(early_steps), "late_steps": sorted(late_steps)}
    for m in METHODS:
        sides = {}
        for side, chosen in (("early", early_steps), ("late", late_steps)):
            rs = [r for r in records if r["step"] in chosen]
            sides[side] = {region: _mean(_method_values(rs, m, region)) for region in REGIONS}
        e, late = sides["early"], sides["late"]
        out[m] = sides | {"object_higher_early": bool(e["object"] > late["object"]),
                          "edge_higher_late": bool(late["edge"] > e["edge"]),
                          "texture_higher_late": bool(late["texture"] > e["texture"])}
    return out


def mean_curves(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Curve]]:
    """Mean SSIM curve per method (and "random") and kind, for the plots: {name: {kind: {fraction, ssim}}}."""
    out: dict[str, dict[str, Curve]] = {}
    if not records:
        return out
    for name in (*METHODS, *present(records, REFERENCES), "random"):
        out[name] = {}
        for kind in KINDS:
            cs = [(r["random"] if name == "random" else r["methods"][name])[kind] for r in records]
            out[name][kind] = {"fraction": cs[0]["fraction"],
                               "ssim": np.mean([c["ssim"] for c in cs], axis=0).tolist()}
    return out
