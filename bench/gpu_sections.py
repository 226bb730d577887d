"""The timed sections of `python -m bench.gpu` (DF-RISE loop, batches, backends, DF-CAM) and their time budget.

Every section returns a plain dict for the JSON; `ratios` in it holds the figures that compare two things timed in
the same run (never an absolute rate), which is what the goals read.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.gpu_model import Inputs, Shape, make_state
from bench.rise import paired_ratio
from difflens.engine import cam, rise
from difflens.engine.options import CamOptions, RiseOptions
from difflens.engine.runner import UNetRunner
from difflens.engine.sampler import StepState


class Budget:
    """A run's time limit, shared out among the sections still to come in proportion to their planned weights.

    A section asks how many timed rounds it may make once it knows what one round costs; a section that ran long
    (a slow compile) leaves the later ones fewer rounds, never fewer than `least`."""

    def __init__(self, total_s: float, weights: dict[str, float]) -> None:
        self.total_s = total_s
        self.start = time.perf_counter()
        self.weights = dict(weights)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allowance(self, section: str) -> float:
        """Seconds `section` may take: its share of what is left, against the sections not yet done."""
        left = max(0.0, self.total_s - self.elapsed())
        return left * self.weights.get(section, 0.0) / max(sum(self.weights.values()), 1e-9)

    def repeats(self, section: str, round_s: float, wanted: int, least: int = 2) -> int:
        return max(least, min(wanted, int(self.allowance(section) / max(round_s, 1e-9))))

    def done(self, section: str) -> None:
        self.weights.pop(section, None)


@dataclass(frozen=True)
class Plan:
    """How much work each section does (the tiny CPU run and the SD1.5 GPU run differ only here)."""

    loop_masks: int  # masks of the reference loop's timed run (one UNet call each)
    batches: tuple[int, ...]  # masks per UNet call in the sweep
    min_masks: int  # masks per timed batched run (rounded up to whole chunks)
    repeats: int  # timed rounds wanted per measurement (the budget may trim them)
    precision_masks: int
    service_runs: int  # bench.service --runs and --warmup
    service_warmup: int


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    shape: Shape
    inputs: Inputs
    plan: Plan
    budget: Budget

    def state(self, runner: UNetRunner, dtype: torch.dtype | None = None) -> StepState:
        """The step's state for `runner`, the inputs in `dtype` (default: the run's)."""
        return make_state(runner, self.inputs, self.device, dtype or self.dtype)

    def masks(self, n: int, batch: int, seed: int = 1) -> tuple[RiseOptions, torch.Tensor]:
        opts = RiseOptions(num_masks=n, batch_size=batch, seed=seed)
        return opts, rise.make_masks(opts, self.shape.latent[1:], self.device)

    def synced(self, fn: Callable[[], object]) -> Callable[[], None]:
        """`fn`, returning only once the device has finished its work (CUDA runs asynchronously)."""
        cuda = self.device.type == "cuda"

        def run() -> None:
            fn()
            if cuda:
                torch.cuda.synchronize(self.device)

        return run


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rounds(env: Env, section: str, *fns: Callable[[], object], parts: int = 1) -> tuple[list[list[float]], float, int]:
    """Wall times of each (synced) function over timed rounds, a, b, a, b, ...: a drift in load hits a round
    alike. The first call of each is untimed warm-up (its time returned for the first function: with compile or
    CUDA graphs it includes building them); the first timed round prices a round for the budget, of which this
    measurement may take 1 / `parts` (the section's measurements still to come, this one included).
    -> (times per function, first call's seconds, rounds made)."""
    synced = [env.synced(f) for f in fns]
    first = seconds(synced[0])
    for f in synced[1:]:
        f()
    times = [[seconds(f)] for f in synced]
    n = env.budget.repeats(section, sum(t[0] for t in times) * parts, env.plan.repeats)
    for _ in range(n - 1):
        for f, ts in zip(synced, times, strict=True):
            ts.append(seconds(f))
    return times, first, n


def rate(count: int, times: list[float]) -> float:
    return statistics.median(count / t for t in times)


# --- sections ----------------------------------------------------------------------------------------------------


def reference_loop(env: Env, state: StepState) -> dict[str, Any]:
    """1. The reference code's loop: one mask per UNet call (batch 2 with CFG), engine.rise.explain_step_reference."""
    opts, masks = env.masks(env.plan.loop_masks, 1)
    (times,), _, n = rounds(env, "reference_loop", lambda: rise.explain_step_reference(state, opts, masks))
    return {"masks": env.plan.loop_masks, "repeats": n, "masks_per_s": rate(env.plan.loop_masks, times)}


def whole_chunks(batch: int, min_masks: int) -> int:
    """Masks per timed run: at least `min_masks`, whole chunks of `batch` (no odd-sized last UNet call)."""
    return batch * max(1, -(-min_masks // batch))


def batched(env: Env, state: StepState, loop_masks_per_s: float) -> dict[str, Any]:
    """2. DF-RISE (engine.rise.explain_step) at each batch size of the sweep; the best batch against the loop."""
    rows = []
    for i, b in enumerate(env.plan.batches):
        masks_n = whole_chunks(b, env.plan.min_masks)
        opts, masks = env.masks(masks_n, b)
        (times,), _, n = rounds(env, "batched", lambda o=opts, m=masks: rise.explain_step(state, o, m),
                                parts=len(env.plan.batches) - i)
        rows.append({"batch": b, "masks": masks_n, "repeats": n, "masks_per_s": rate(masks_n, times)})
        print(f"  batch {b:>4}: {rows[-1]['masks_per_s']:9.1f} masks/s", flush=True)
    best = max(rows, key=lambda r: r["masks_per_s"])
    return {"rows": rows, "best_batch": best["batch"], "masks_per_s": best["masks_per_s"],
            "ratios": {"best_vs_loop": best["masks_per_s"] / loop_masks_per_s}}


def bare_unet(state: StepState, batch: int, calls: int) -> Callable[[], None]:
    """`calls` guided UNet calls on a (batch, C, h, w) latent: DF-RISE's UNet work without masks or scores."""
    x = state.latent_in.expand(batch, *state.latent_in.shape[1:]).contiguous()

    def run() -> None:
        with torch.no_grad():
            for _ in range(calls):
                state.runner.guided(x, state.t, state.cond)

    return run


def against_bare(env: Env, section: str, state: StepState, batch: int) -> dict[str, Any]:
    """DF-RISE at `batch` masks per call against the bare UNet at the same batch on the same runner, timed in
    alternating rounds (used by 6. eager, 3. compile, 4. CUDA graphs). explainer_vs_bare: the median over rounds
    of DF-RISE's time over the bare UNet's for the same UNet work (1.05 = the explainer adds 5%)."""
    masks_n = whole_chunks(batch, env.plan.min_masks)
    opts, masks = env.masks(masks_n, batch)
    (unet_t, rise_t), first, n = rounds(env, section, bare_unet(state, batch, masks_n // batch),
                                        lambda: rise.explain_step(state, opts, masks))
    return {"batch": batch, "masks": masks_n, "repeats": n, "first_call_s": first,
            "masks_per_s": rate(masks_n, rise_t), "unet_masks_per_s": rate(masks_n, unet_t),
            "effective_backend": state.runner.backend,
            "ratios": {"explainer_vs_bare": paired_ratio(rise_t, unet_t)}}


def backend(env: Env, section: str, eager: StepState, runner: UNetRunner, batch: int,
            eager_masks_per_s: float) -> dict[str, Any]:
    """3./4. A faster runner at the best batch: against its own bare UNet and against eager DF-RISE.

    The eager state's tensors (its eps the DF-RISE reference) with `runner` swapped in: making a state would call
    the runner at batch 1, one more compile or capture, for a shape DF-RISE never uses. first_call_s: the first
    bare UNet run at `batch`, compiling or capturing included."""
    out = against_bare(env, section, dataclasses.replace(eager, runner=runner), batch)
    out["ratios"]["speedup_vs_eager"] = out["masks_per_s"] / eager_masks_per_s
    return out


def dfcam(env: Env, state: StepState, unet_call_s: float) -> dict[str, Any]:
    """5. One DF-CAM step (engine.cam.explain_step, every camable layer: one forward of both CFG branches with
    gradients, one backward), against one guided no-grad UNet call at batch 1."""
    layers = cam.resolve_layers(state.runner.unet, ())
    (times,), _, n = rounds(env, "cam", lambda: cam.explain_step(state, CamOptions(), layers))
    step_s = statistics.median(times)
    return {"layers": len(layers), "repeats": n, "step_s": step_s,
            "ratios": {"cam_vs_guided_call": step_s / unet_call_s}}


def guided_call_s(env: Env, state: StepState) -> float:
    """Median seconds of one guided no-grad UNet call at batch 1 (both CFG branches: batch 2)."""
    (times,), _, _ = rounds(env, "cam", bare_unet(state, 1, 1), parts=2)
    return statistics.median(times)
