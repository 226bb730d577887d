"""Fewer DF-RISE masks for the same map: mask samplers and estimators against a plain Monte Carlo reference (issue 22).

On the shipped model (models/shapes), at steps spread over the trajectory of a few prompts: a reference map from
many plain Monte Carlo masks; then, for each variant (the samplers mc, stratified, sobol, each with and without
antithetic pairs, read off by RISE's ratio; and mc and stratified read off by the regression estimator), the Pearson
r of the map from N masks against the reference as N grows, averaged over mask seeds; the masks each needs to
reach r >= 0.95; and the headline masks_ratio = the best variant's masks / plain MC's (target <= 0.25). Also early
stopping at split-half r >= 0.95: the masks used and the r against the reference then.

The map compared is DF-RISE's "rise"; "own" (rise - rise_mean, what a pixel's own mask adds) is reported beside
it: it is the harder one to pin down. Samplers whose draws nest (mc, sobol, antithetic pairs) are read at every N
from one run's prefixes; stratified masks are a Latin hypercube over exactly N draws, so they are drawn anew for
each N.

    PYTHONPATH=service .venv/bin/python -m bench.masks            # 3 cases, 2000-mask references (~10 min, 2 CPUs)
    PYTHONPATH=service .venv/bin/python -m bench.masks --full     # 3 prompts x 3 steps, 4000-mask references
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from difflens.engine import rise
from difflens.engine.loading import load_model
from difflens.engine.options import GenerationParams, RiseOptions
from difflens.engine.rise_regression import RegressionFit
from difflens.engine.sampler import StepState, generate
from difflens.errors import InvalidArgument

MODEL = Path(__file__).resolve().parents[1] / "models" / "shapes"
RESULTS = Path(__file__).parent / "results"
PROMPTS = ("a large red striped circle in the center", "a small blue square on the left",
           "a large green dotted triangle at the top")
STEPS = (0, 12, 24)  # of the shipped model's 25: t = 999, 519, 39
VARIANTS = (("mc", False, "ratio"), ("mc", True, "ratio"), ("stratified", False, "ratio"),
            ("stratified", True, "ratio"), ("sobol", False, "ratio"), ("sobol", True, "ratio"),
            ("mc", False, "regression"), ("stratified", False, "regression"))
TARGET_R = 0.95
REF_SEED = 1_000_000  # the reference's masks share no generator stream with the samplers' seeds 1, 2, ...


def name_of(sampler: str, antithetic: bool, estimator: str = "ratio") -> str:
    return sampler + ("+antithetic" if antithetic else "") + ("+regression" if estimator == "regression" else "")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.square().sum() * b.square().sum()).sqrt())


def capture(model: Any, prompt: str, steps: tuple[int, ...]) -> list[StepState]:
    states: list[StepState] = []
    generate(model, GenerationParams(prompt, seed=0), on_step=lambda s: states.append(s) if s.index in steps else None)
    return states


def own(maps: dict[str, torch.Tensor]) -> torch.Tensor:
    return maps["rise"] - maps["rise_mean"]


def prefix_maps(state: StepState, opts: RiseOptions, points: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """The maps of the first n masks of one draw of max(points) masks, for each n in points (one UNet pass: chunks
    end at every point); with the regression estimator, its fit over those n masks."""
    masks = rise.make_masks(dataclasses.replace(opts, num_masks=max(points)), tuple(state.latent_in.shape[-2:]), "cpu")
    sub, ref = rise.substrate(state.latent_in, opts), rise.reference(state, opts)
    fit = RegressionFit(state.latent_in, sub, ref, opts.p, opts.ssim_padding, halves=1) \
        if opts.estimator == "regression" else None
    raw = torch.zeros(masks.shape[1:])
    total = torch.zeros_like(raw)
    out, used = {}, 0
    with torch.no_grad():
        for point in sorted(points):
            while used < point:
                chunk = masks[used:min(point, used + opts.batch_size)]
                s = rise.masked_scores(state, opts, sub, ref, chunk)
                raw += (chunk * s).sum(dim=0)
                total += s.sum(dim=0)
                if fit is not None:
                    fit.add(chunk, s, torch.zeros(len(chunk), dtype=torch.int64))
                used += len(chunk)
            maps = {"rise": rise.normalise(raw, masks[:used]), "rise_mean": total / used}
            if fit is not None:
                maps["rise"] = fit.map(maps["rise"])
            out[point] = {"rise": maps["rise"], "own": own(maps)}
    return out


def fresh_maps(state: StepState, opts: RiseOptions, points: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """The maps of a draw of exactly n masks, for each n in points (stratified: a Latin hypercube over n draws)."""
    out = {}
    for n in points:
        o = dataclasses.replace(opts, num_masks=n)
        maps = rise.explain_step(state, o, rise.make_masks(o, tuple(state.latent_in.shape[-2:]), "cpu"))
        out[n] = {"rise": maps["rise"], "own": own(maps)}
    return out


def run_case(state: StepState, args: argparse.Namespace, points: list[int], log: Any) -> dict[str, Any]:
    size = tuple(state.latent_in.shape[-2:])
    t0 = time.perf_counter()
    ref_opts = RiseOptions(num_masks=args.ref_masks, batch_size=args.batch, seed=REF_SEED)
    ref = rise.run_step(state, ref_opts, rise.make_masks(ref_opts, size, "cpu"))
    case: dict[str, Any] = {"timestep": state.timestep, "index": state.index, "reference": {
        "masks": args.ref_masks, "split_half_r": ref.stats.split_half_r,
        "seconds": round(time.perf_counter() - t0, 1)}, "curves": {}, "early_stop": {}}
    log(f"  reference: {args.ref_masks} masks, split-half r {ref.stats.split_half_r:.4f} "
        f"({case['reference']['seconds']} s)")
    ref_maps = {"rise": ref.maps["rise"], "own": own(ref.maps)}
    for sampler, antithetic, estimator in VARIANTS:
        name = name_of(sampler, antithetic, estimator)
        try:
            base = RiseOptions(batch_size=args.batch, sampler=sampler, antithetic=antithetic, estimator=estimator)
        except InvalidArgument as e:
            case["curves"][name] = {"refused": f"{e.field}: {e.message}"}
            continue
        per_seed = []
        for seed in range(1, args.seeds + 1):
            opts = dataclasses.replace(base, seed=seed)
            maps = fresh_maps(state, opts, points) if sampler == "stratified" else prefix_maps(state, opts, points)
            per_seed.append({n: {k: pearson(m[k], ref_maps[k]) for k in ("rise", "own")} for n, m in maps.items()})
        case["curves"][name] = {str(n): {"r": mean([s[n]["rise"] for s in per_seed]),
                                         "r_own": mean([s[n]["own"] for s in per_seed]),
                                         "r_per_seed": [s[n]["rise"] for s in per_seed]} for n in points}
        if args.stop_at_r is not None:
            stop = dataclasses.replace(base, seed=1, num_masks=max(points), batch_size=args.stop_batch,
                                       stop_at_r=args.stop_at_r, min_masks=args.stop_batch)
            run = rise.run_step(state, stop, rise.make_masks(stop, size, "cpu"))
            case["early_stop"][name] = {"masks_used": run.stats.masks_used, "split_half_r": run.stats.split_half_r,
                                        "r": pearson(run.maps["rise"], ref_maps["rise"])}
        log(f"  {name}: r " + " ".join(f"{n}:{case['curves'][name][str(n)]['r']:.3f}" for n in points)
            + (f"; early stop {case['early_stop'][name]['masks_used']} masks" if case["early_stop"] else ""))
    return case


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def crossing(points: list[int], rs: list[float], target: float = TARGET_R) -> float | None:
    """Masks where r first reaches `target`, interpolated linearly in log2(masks) between ladder points; the
    first point when it already does; None when it never does within the ladder."""
    for i, (n, r) in enumerate(zip(points, rs, strict=True)):
        if r >= target:
            if i == 0:
                return float(n)
            n0, r0 = points[i - 1], rs[i - 1]
            return 2 ** (math.log2(n0) + (target - r0) / (r - r0) * (math.log2(n) - math.log2(n0)))
    return None


def summarise(cases: list[dict[str, Any]], points: list[int]) -> dict[str, Any]:
    names = [n for n in (name_of(*v) for v in VARIANTS) if cases and n in cases[0]["curves"]]  # older JSONs: fewer
    curves, needed = {}, {}
    for name in names:
        if any("refused" in c["curves"][name] for c in cases):
            continue
        for key in ("r", "r_own"):
            curves.setdefault(key, {})[name] = [mean([c["curves"][name][str(n)][key] for c in cases])
                                                for n in points]
        needed[name] = crossing(points, curves["r"][name])
    early = {name: {"masks_used": mean([c["early_stop"][name]["masks_used"] for c in cases]),
                    "r": mean([c["early_stop"][name]["r"] for c in cases]),
                    "stopped": sum(c["early_stop"][name]["masks_used"] < points[-1] for c in cases)}
             for name in names if cases and name in cases[0]["early_stop"]}
    per_case = [{"prompt": c["prompt"], "timestep": c["timestep"],
                 "masks_to_target": {name: crossing(points, [c["curves"][name][str(n)]["r"] for n in points])
                                     for name in needed}} for c in cases]
    return {"points": points, "curves": curves, "masks_to_target": needed, **headline(per_case, needed, points),
            "per_case": per_case,
            "refused": {n: cases[0]["curves"][n]["refused"] for n in names if "refused" in cases[0]["curves"][n]},
            "early_stop": early,
            "reference_split_half_r": mean([c["reference"]["split_half_r"] for c in cases])}


def headline(per_case: list[dict[str, Any]], needed: dict[str, float | None], points: list[int]) -> dict[str, Any]:
    """masks_ratio: per case, a variant's masks to r >= 0.95 over plain MC's, geometric mean over the cases that
    can tell (plain MC needs more than the ladder's first point there, and reaches it within the ladder); the best
    variant is the one with the smallest mean. A crossing at the ladder's first point means "that many masks or
    fewer", so where the best variant's is, the ratio is an upper bound. Also the same read off the mean curve over
    all cases (masks_ratio_mean_curve): cases where every variant is already at r >= 0.95 with 16 masks pull the
    mean curve up and plain MC's crossing down, which makes that figure a weak bound when the best variant sits at
    the ladder's first point."""
    first = points[0]
    telling = [c["masks_to_target"] for c in per_case if (c["masks_to_target"].get("mc") or 0) > first]
    ratios = {name: [c[name] / c["mc"] for c in telling] for name in needed
              if name != "mc" and telling and all(c[name] is not None for c in telling)}
    geo = {name: math.exp(mean([math.log(r) for r in rs])) for name, rs in ratios.items()}
    best = min(geo, key=lambda k: geo[k]) if geo else None
    others = {k: v for k, v in needed.items() if k != "mc" and v is not None}
    best_curve = min(others, key=lambda k: others[k]) if others else None
    curve_ratio = others[best_curve] / needed["mc"] \
        if best_curve is not None and needed.get("mc") and needed["mc"] > first else None  # type: ignore[operator]
    return {"best": best, "masks_ratio": geo.get(best) if best else None,
            "masks_ratio_bound": None if best is None else
            "upper" if any(c[best] <= first for c in telling) else "exact",
            "masks_ratio_per_case": {name: rs for name, rs in ratios.items()}, "cases_telling": len(telling),
            "best_mean_curve": best_curve, "masks_ratio_mean_curve": curve_ratio,
            "masks_ratio_mean_curve_bound": None if curve_ratio is None else
            "upper" if others[best_curve] <= first else "exact"}  # type: ignore[index]


def table(summary: dict[str, Any]) -> str:
    points = summary["points"]
    head = "| variant | " + " | ".join(f"r @ {n}" for n in points) \
        + " | masks to r >= 0.95 (mean curve) | vs mc (mean curve) | vs mc, per case (geometric mean) |"
    lines = [head, "|" + " --- |" * (len(points) + 4)]
    mc = summary["masks_to_target"].get("mc")
    per_case = summary.get("masks_ratio_per_case", {})
    for name, rs in summary["curves"]["r"].items():
        need = summary["masks_to_target"][name]
        ratio = "-" if need is None or not mc or mc <= points[0] else \
            ("<= " if need <= points[0] else "") + f"{need / mc:.2f}"
        cases = per_case.get(name)
        geo = ("1.00" if summary.get("cases_telling") else "-") if name == "mc" else "-" if not cases else \
            ("<= " if name_bounded(summary, name) else "") + f"{math.exp(mean([math.log(r) for r in cases])):.2f}"
        lines.append(f"| {name} | " + " | ".join(f"{r:.3f}" for r in rs)
                     + f" | {'> ' + str(points[-1]) if need is None else shown(need, points)} | {ratio} | {geo} |")
    for name, why in summary["refused"].items():
        lines.append(f"| {name} | refused: {why} |")
    names = list(summary["masks_to_target"])
    lines += ["", "| case: masks to r >= 0.95 | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for c in summary["per_case"]:
        lines.append(f"| t={c['timestep']} {c['prompt']} | " + " | ".join(
            f"> {points[-1]}" if v is None else shown(v, points) for v in c["masks_to_target"].values()) + " |")
    if summary["early_stop"]:
        lines += ["", "| sampler | early stop: mean masks used | steps stopped | mean r vs reference |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {v['masks_used']:.0f} | {v['stopped']} | {v['r']:.3f} |"
                  for k, v in summary["early_stop"].items()]
    return "\n".join(lines)


def name_bounded(summary: dict[str, Any], name: str) -> bool:
    """Whether a variant's per-case ratio is an upper bound: it is at the ladder's first point in a telling case."""
    first = summary["points"][0]
    return any(c["masks_to_target"][name] is not None and c["masks_to_target"][name] <= first
               for c in summary["per_case"] if (c["masks_to_target"].get("mc") or 0) > first)


def shown(masks: float, points: list[int]) -> str:
    """Masks to the target as a table shows them: at the ladder's first point, "that many or fewer"."""
    return f"<= {points[0]}" if masks <= points[0] else f"{masks:.0f}"


def plot(summary: dict[str, Any], path: Path) -> Path:
    from difflens.evaluation.plots import line_chart

    points = summary["points"]
    xs = list(range(len(points)))
    series: dict[str, Any] = {name: (xs, rs) for name, rs in summary["curves"]["r"].items()}
    series["r = 0.95"] = (xs, [TARGET_R] * len(points))
    return line_chart(series, "DF-RISE map vs a plain MC reference", "masks", "Pearson r", path,
                      dashed=("r = 0.95",), x_labels=[str(n) for n in points])


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root, check=True)
        return sha.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.masks", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true",
                   help="every prompt at every step (9 cases), 4000-mask references, 2 seeds")
    p.add_argument("--ref-masks", type=int, help="plain MC masks of each reference (default 2000; --full 4000)")
    p.add_argument("--seeds", type=int, help="mask seeds per sampler, averaged (default 1; --full 2)")
    p.add_argument("--max-masks", type=int, default=256, help="largest N, the ladder doubles from 16 (default 256)")
    p.add_argument("--stop-at-r", type=float, default=TARGET_R, help="early stopping's split-half r (default 0.95)")
    p.add_argument("--stop-batch", type=int, default=32, help="masks per batch of the early-stopping runs (32)")
    p.add_argument("--batch", type=int, default=128, help="masks per UNet call (default 128)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--out", type=Path, default=RESULTS / "masks.json", help="JSON path; the plot goes beside it")
    p.add_argument("--from-json", type=Path, metavar="PATH",
                   help="no run: summarise an earlier run's JSON again (tables, plot and summary rewritten in it)")
    args = p.parse_args(argv)
    args.ref_masks = args.ref_masks or (4000 if args.full else 2000)
    args.seeds = args.seeds or (2 if args.full else 1)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        result["summary"] = summarise(result["cases"], result["summary"]["points"])
        args.from_json.write_text(json.dumps(result, indent=2))
        report(result, args.from_json)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    points = [16 * 2**k for k in range(int(math.log2(args.max_masks // 16)) + 1)]
    model = load_model(args.model)
    started = time.perf_counter()
    planned = len(PROMPTS) * (len(STEPS) if args.full else 1)
    result = {"benchmark": "masks", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commit": git_commit(),
              "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                          "platform": platform.platform(), "processor": platform.processor() or platform.machine()},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "target_r": TARGET_R, "cases_planned": planned, "cases": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(PROMPTS):
        steps = STEPS if args.full else (STEPS[i],)  # the quick profile: one step per prompt, spread over them
        for state in capture(model, prompt, steps):
            print(f"{prompt!r} step {state.index} (t={state.timestep})", flush=True)
            result["cases"].append({"prompt": prompt, **run_case(state, args, points, lambda m: print(m, flush=True))})
            # After every case, so that a run cut short (hours with --full) leaves what it measured.
            result.update(seconds=round(time.perf_counter() - started, 1),
                          complete=len(result["cases"]) == planned, summary=summarise(result["cases"], points))
            args.out.write_text(json.dumps(result, indent=2))
    report(result, args.out)


def report(result: dict[str, Any], path: Path) -> None:
    summary = result["summary"]
    png = plot(summary, path.with_suffix(".png"))
    print()
    print(table(summary))
    print(f"\nmasks_ratio (best variant {summary['best']} / mc, masks to r >= {TARGET_R} per case, geometric mean "
          f"over the {summary.get('cases_telling', 0)} cases where plain MC needs more than {summary['points'][0]}): "
          + ratio_text(summary.get("masks_ratio"), summary.get("masks_ratio_bound")) + " (target <= 0.25)")
    print(f"on the mean curve over all cases ({summary.get('best_mean_curve')}): "
          + ratio_text(summary.get("masks_ratio_mean_curve"), summary.get("masks_ratio_mean_curve_bound")))
    print(f"reference split-half r (mean): {summary['reference_split_half_r']:.4f}")
    done = len(result["cases"])
    print(f"wrote {path} and {png} (run: {result['seconds']:.0f} s"
          + ("" if result.get("complete", True) else f"; incomplete: {done} of {result['cases_planned']} cases") + ")")


def ratio_text(ratio: float | None, bound: str | None) -> str:
    return "n/a (the ladder does not resolve it)" if ratio is None else ("<= " if bound == "upper" else "") \
        + f"{ratio:.2f}"


if __name__ == "__main__":
    main()
