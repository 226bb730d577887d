"""`make bench-gpu`: DF-RISE, DF-CAM and the service on an SD1.5-shaped UNet on one GPU, goals as pass/fail ratios.

A random-weights UNet2DConditionModel with SD1.5's config (built in code with a fixed seed, float16 on CUDA) at
64 x 64 latents with CFG (scale 7.5). Sections, each timed against a baseline of the same run:
  1 reference_loop  one mask per UNet call (batch 2 with CFG), engine.rise.explain_step_reference
  2 batched         engine.rise.explain_step at each batch of the sweep; the best against 1
  3 compile         UNetRunner(unet, "compile") at the best batch, against its own bare UNet and against eager
  4 cuda_graphs     one CUDA graph per mask-batch shape (bench.gpu_graphs.GraphedRunner), likewise
  5 cam             one DF-CAM step (engine.cam.explain_step, every layer)
  6 bare_unet       the bare guided UNet at the best batch against DF-RISE at that batch (eager)
  7 service         bench.service: gRPC front + Redis + worker, each on CPUs of its own when there are enough
  8 precision       float16 and bfloat16 maps against float32 maps (relative L2, Spearman)
  9 families        an SDXL-shaped and a FLUX-shaped row: DF-RISE, DF-CAM and the attention maps of one step over
                    its denoising call (bench.gpu_families)
`--tiny --device cpu` runs the same code on a tiny UNet in seconds (CUDA-only sections skipped, with the reason).

    PYTHONPATH=service .venv/bin/python -m bench.gpu [--tiny] [--device cuda|cpu] [--budget-s 480] [--sections ..]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import gpu_sections as S
from bench.gpu_families import families_section
from bench.gpu_graphs import GraphedRunner
from bench.gpu_model import SD15, TINY, build_unet, in_dtype, make_inputs, parameter_count
from bench.gpu_precision import precision
from bench.rise import allow_recompiles
from difflens.engine.runner import UNetRunner

RESULTS = Path(__file__).parent / "results"
SECTIONS = {  # name: number in the list; run in this dict's order (compile late: its time is unbounded)
    "reference_loop": 1, "batched": 2, "bare_unet": 6, "cam": 5, "precision": 8, "cuda_graphs": 4, "compile": 3,
    "service": 7, "families": 9,
}
# planned seconds per section on an H100 (the budget shares what is left in these proportions)
WEIGHTS = {"reference_loop": 15, "batched": 60, "bare_unet": 30, "cam": 15, "precision": 30, "cuda_graphs": 40,
           "compile": 150, "service": 90, "families": 120}
GPU_PLAN = S.Plan(loop_masks=16, batches=(8, 16, 32, 64, 128), min_masks=128, repeats=7, precision_masks=64,
                  service_runs=50, service_warmup=5)
TINY_PLAN = S.Plan(loop_masks=2, batches=(2, 4), min_masks=4, repeats=2, precision_masks=4,
                   service_runs=2, service_warmup=1)
TINY_LEAVES_OUT = {"compile": "the tiny CPU run leaves it out (torch.compile's C++ build took ~4 min on the 2-core "
                              "CI machine); --sections all to include it"}
GOAL_OVERHEAD = 1.05  # DF-RISE's time over the bare UNet's at the same batch
GOAL_VS_LOOP = 20.0
GOAL_SERVICE_MS = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet at 16 x 16 latents and little work per section")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                    help="the timed sections' dtype (default: float16 on CUDA, float32 on the CPU)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="time for the whole run (default 480): timed rounds are trimmed to fit, never below 2")
    ap.add_argument("--sections", default="",
                    help=f"comma-separated, or 'all' (default: all; --tiny: all but compile): {', '.join(SECTIONS)}")
    ap.add_argument("--batches", help="comma-separated masks per UNet call for the sweep (default: the plan's)")
    ap.add_argument("--repeats", type=int, help="timed rounds wanted per measurement (default: the plan's)")
    ap.add_argument("--service-runs", type=int, help="bench.service --runs (default: the plan's)")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads here and in bench.service (default: torch's choice; --tiny: 1, as a "
                         "tiny UNet gains nothing from more and on a busy machine OpenMP's spin-waiting made "
                         "a 2-thread call 10-20x slower)")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/gpu-<timestamp>.json)")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    args.dtype = args.dtype or ("float16" if args.device.type == "cuda" else "float32")
    args.selected, args.left_out = selected_sections(args.sections, args.tiny)
    if args.threads is None and args.tiny:
        args.threads = 1
    return args


def selected_sections(spec: str, tiny: bool) -> tuple[set[str], dict[str, str]]:
    """-> (sections to run, {section left out: why})."""
    if spec in ("", "all"):
        left_out = dict(TINY_LEAVES_OUT) if tiny and spec == "" else {}
        return set(SECTIONS) - set(left_out), left_out
    names = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = names - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    return names, {s: "not in --sections" for s in SECTIONS if s not in names}


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"device": torch.cuda.get_device_name(device), "capability": f"{props.major}.{props.minor}",
                 "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
                 "cudnn": torch.backends.cudnn.version()}
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


class SectionRunner:
    """Runs the selected sections in turn: times each, records what it raised instead of stopping the run (a GPU
    lease is short: one broken section must not cost the others' figures), and frees the budget's share."""

    def __init__(self, env: S.Env, selected: set[str], left_out: dict[str, str]) -> None:
        self.env, self.selected, self.left_out = env, selected, left_out
        self.results: dict[str, dict[str, Any]] = {}

    def ran(self, name: str) -> bool:
        return self.results.get(name, {}).get("status") == "ran"

    def section(self, name: str, fn: Callable[[], dict[str, Any]], needs: tuple[str, ...] = (),
                cuda_only: bool = False) -> dict[str, Any]:
        reason = self.left_out.get(name)
        if reason is None and cuda_only and self.env.device.type != "cuda":
            reason = f"needs a CUDA device (this run: --device {self.env.device})"
        if reason is None:
            missing = [n for n in needs if not self.ran(n)]
            if missing:
                reason = f"needs section(s) {', '.join(missing)}, which did not run"
        label = f"[{SECTIONS[name]} {name}]"
        if reason is not None:
            print(f"{label} skipped: {reason}", flush=True)
            out: dict[str, Any] = {"status": "skipped", "reason": reason}
        else:
            out = self._run(label, fn)
        self.env.budget.done(name)
        self.results[name] = out
        return out

    def _run(self, label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        cuda = self.env.device.type == "cuda"
        print(f"{label} at {self.env.budget.elapsed():.0f} s", flush=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.env.device)
        t0 = time.perf_counter()
        try:
            out = {"status": "ran", **fn()}
        except Exception as e:  # noqa: BLE001 - recorded in the JSON and printed; the other sections go on
            traceback.print_exc()
            out = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        out["elapsed_s"] = time.perf_counter() - t0
        if cuda:
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        print(f"{label} {out['status']} in {out['elapsed_s']:.1f} s", flush=True)
        return out


def model_sections(run: SectionRunner, shape_name: str) -> dict[str, Any]:
    """Sections 1-6 and 8 (everything that holds the big UNet); returns the model's description."""
    env = run.env
    shape = env.shape
    t0 = time.perf_counter()
    unet32 = build_unet(shape, env.device)
    unet = unet32 if env.dtype == torch.float32 else in_dtype(unet32, env.dtype)
    eager = env.state(UNetRunner(unet))
    print(f"[setup] built the {shape_name} UNet and the step's state in {time.perf_counter() - t0:.1f} s", flush=True)
    model = {"shape": shape_name, "setup_s": time.perf_counter() - t0, "parameters": parameter_count(unet),
             "latent": list(shape.latent),
             "embed": list(shape.embed), "dtype": str(env.dtype).removeprefix("torch."),
             "eps_finite": bool(torch.isfinite(eager.eps).all()),  # random weights can overflow float16
             "config": {k: list(v) if isinstance(v, tuple) else v for k, v in shape.config.items()}}
    loop = run.section("reference_loop", lambda: S.reference_loop(env, eager))
    batched = run.section("batched", lambda: S.batched(env, eager, loop["masks_per_s"]), ("reference_loop",))
    best = batched.get("best_batch", max(env.plan.batches))
    run.section("bare_unet", lambda: S.against_bare(env, "bare_unet", eager, best), ("batched",))
    run.section("cam", lambda: S.dfcam(env, eager, S.guided_call_s(env, eager)))
    run.section("precision", functools.partial(precision, env, unet32, best))
    del unet32  # the float32 copy: only the precision section needs it
    gc.collect()
    eager_rate = batched.get("masks_per_s", math.nan)
    run.section("cuda_graphs", lambda: S.backend(env, "cuda_graphs", eager, GraphedRunner(unet), best, eager_rate),
                ("batched",), cuda_only=True)
    allow_recompiles(8)
    run.section("compile", lambda: S.backend(env, "compile", eager, UNetRunner(unet, "compile"), best, eager_rate),
                ("batched",))
    return model


def service_section(run: SectionRunner, out: Path, threads: int | None) -> None:
    """7. bench.service on this machine, pinned when it has the CPUs; its JSON beside ours."""
    from bench import service

    env = run.env

    def measure() -> dict[str, Any]:
        cpus = os.sched_getaffinity(0)
        # ~40 s to start the processes and warm up; then about a second per run of both jobs (three 50 ms pauses,
        # an in-process and a served run each)
        runs = min(env.plan.service_runs, max(10, int(env.budget.allowance("service") - 40)))
        argv = ["--device", env.device.type, "--dtype", str(env.dtype).removeprefix("torch."),
                "--runs", str(runs), "--warmup", str(env.plan.service_warmup),
                "--out", str(out.with_name(out.stem + "-service.json"))]
        if threads:
            argv += ["--threads", str(threads)]
        try:
            service.cpu_layout(cpus, threads or service.pin_threads_default(cpus))
            argv.append("--pin")
            not_pinned = None
        except ValueError as e:
            not_pinned = str(e)
        res = service.main(argv)
        ratios: dict[str, float] = {}
        for job, r in res["jobs"].items():
            ratios[f"{job}_added_p50_vs_target"] = r["added_p50_ms"] / GOAL_SERVICE_MS
            ratios[f"{job}_added_p50_vs_floor_limit"] = r["added_p50_ms"] / r["floor_limit_ms"]
        return {"not_pinned": not_pinned, "result": res, "ratios": ratios}

    run.section("service", measure)


def goal(name: str, value: float | None, op: str, limit: float, section: str) -> dict[str, Any]:
    met = None if value is None or not math.isfinite(value) else (value <= limit if op == "<=" else value >= limit)
    return {"goal": name, "section": section, "value": value, "op": op, "limit": limit,
            "value_over_limit": None if met is None else value / limit, "met": met}


def goals(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def ratio(section: str, key: str) -> float | None:
        r = results.get(section, {})
        return r["ratios"][key] if r.get("status") == "ran" else None

    rows = [goal(f"DF-RISE time over bare UNet, same batch ({b})", ratio(s, "explainer_vs_bare"), "<=",
                 GOAL_OVERHEAD, s) for s, b in (("bare_unet", "eager"), ("cuda_graphs", "CUDA graphs"),
                                                ("compile", "compile"))]
    rows.append(goal("batched DF-RISE over the reference loop (eager)", ratio("batched", "best_vs_loop"), ">=",
                     GOAL_VS_LOOP, "batched"))
    fastest = [results[s]["masks_per_s"] for s in ("batched", "cuda_graphs", "compile")
               if results.get(s, {}).get("status") == "ran"]
    loop = results.get("reference_loop", {})
    rows.append(goal("fastest DF-RISE over the reference loop (eager)",
                     max(fastest) / loop["masks_per_s"] if fastest and loop.get("status") == "ran" else None,
                     ">=", GOAL_VS_LOOP, "batched"))
    svc = results.get("service", {})
    jobs = svc["result"]["jobs"] if svc.get("status") == "ran" else {}
    for job in ("plain", "rise"):
        r = jobs.get(job)
        rows.append(goal(f"service added p50, {job} job (ms)", r["added_p50_ms"] if r else None, "<=",
                         GOAL_SERVICE_MS, "service"))
        rows.append(goal(f"service added p50, {job} job, vs floor + 2 ms (ms)", r["added_p50_ms"] if r else None,
                         "<=", r["floor_limit_ms"] if r else math.nan, "service"))
    return rows


def print_summary(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\ndevice: {m['device']}; torch {m['torch']}, CUDA {m['cuda']}, Python {m['python']}; "
          f"{result['model']['shape']} UNet ({result['model']['parameters'] / 1e6:.1f} M parameters, "
          f"{result['model']['dtype']}, latent {'x'.join(map(str, result['model']['latent']))})")
    print(f"{'section':<18} {'status':<8} {'seconds':>8}  figures")
    for name, r in result["sections"].items():
        figures = ", ".join(f"{k} {v:.3g}" for k, v in r.get("ratios", {}).items())
        if "masks_per_s" in r:
            figures = f"masks/s {r['masks_per_s']:.1f}" + (f", {figures}" if figures else "")
        if "first_call_s" in r:
            figures += f", first call {r['first_call_s']:.1f} s"
        if "step_s" in r:
            figures = f"step {r['step_s'] * 1000:.1f} ms, {figures}"
        print(f"{name:<18} {r['status']:<8} {r.get('elapsed_s', 0):>8.1f}  {figures or r.get('reason', '')}")
    print(f"\n{'goal':<58} {'value':>9} {'limit':>9} {'ratio':>7}  result")
    for g in result["goals"]:
        verdict = {True: "pass", False: "FAIL", None: "not run"}[g["met"]]
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        ratio = "-" if g["value_over_limit"] is None else f"{g['value_over_limit']:.2f}"
        print(f"{g['goal']:<58} {value:>9} {g['op']}{g['limit']:>7.3g} {ratio:>7}  {verdict}")
    print(f"total {result['elapsed_s']:.0f} s (budget {result['budget_s']:.0f} s)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.UTC)
    out = args.out or RESULTS / f"gpu-{started:%Y%m%d-%H%M%S}.json"
    plan = TINY_PLAN if args.tiny else GPU_PLAN
    plan = S.Plan(**{**plan.__dict__, **{k: v for k, v in (
        ("batches", tuple(int(b) for b in args.batches.split(",")) if args.batches else None),
        ("repeats", args.repeats), ("service_runs", args.service_runs)) if v is not None}})
    shape = TINY if args.tiny else SD15
    env = S.Env(args.device, getattr(torch, args.dtype), shape, make_inputs(shape), plan,
                S.Budget(args.budget_s, WEIGHTS))
    machine = machine_info(args.device)
    print(f"bench.gpu on {machine['device']}: torch {machine['torch']}, CUDA {machine['cuda']}; "
          f"{shape.name} UNet, {args.dtype}, budget {args.budget_s:.0f} s", flush=True)
    run = SectionRunner(env, args.selected, args.left_out)
    model = model_sections(run, shape.name)
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    run.section("families", lambda: families_section(env, args.tiny))
    gc.collect()
    service_section(run, out, args.threads)
    result = {"benchmark": "gpu", "started": started.isoformat(timespec="seconds"),
              "elapsed_s": env.budget.elapsed(), "budget_s": args.budget_s, "machine": machine, "model": model,
              "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.__dict__.items()},
              "sections": {name: run.results[name] for name in SECTIONS if name in run.results},
              "goals": goals(run.results)}
    print_summary(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
