"""Orchestration: run a generation and, at the selected steps, every requested explainer.

Explainers are functions of the step's StepState and their options; they return named maps (tensors) and do no
I/O. Nothing here changes the trajectory: explainers get read-only tensors and their own RNGs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from difflens.engine import attention, cam, families, rise
from difflens.engine.loading import Model
from difflens.engine.options import ExplainOptions, GenerationParams, RiseOptions, RiseStats
from difflens.engine.runner import UNetRunner
from difflens.engine.sampler import Generation, StepState, generate
from difflens.engine.tokens import prompt_tokens
from difflens.engine.validate import resolve_generation


@dataclass
class StepExplanation:
    """The maps of one explained step. Map names and shapes (h, w = latent size, T = prompt tokens):

    rise: (h, w) count-normalised DF-RISE map; rise_raw: (h, w) sum_k M_k s_k; rise_mean: (h, w) sum_k s_k / N;
    cam: (h, w) sum over layers of min-max maps; cam/<layer path>: (h, w) per layer;
    attn: (T, h, w) token maps; attn_relevance: (T,) token relevance in [0, 1].
    x0: (1, C, h, w) the step's predicted clean latent (previews), or None.
    rise: what DF-RISE used at this step (masks, split-half r), or None when it did not run.
    """

    index: int
    timestep: int
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    x0: torch.Tensor | None = None
    rise: RiseStats | None = None


@dataclass
class Explanation:
    """image: (H, W, 3) uint8. `tokens` are the prompt's words (BPE pieces merged) that attn maps index."""

    image: np.ndarray
    timesteps: list[int]
    steps: list[StepExplanation]
    tokens: list[str]
    params: dict[str, Any]
    generation: Generation

    def series(self, name: str) -> torch.Tensor:
        """Stack one map over the explained steps: (S, ...)."""
        return torch.stack([s.maps[name] for s in self.steps])


StepCallback = Callable[[StepExplanation], None]
ProgressCallback = Callable[[int, int, int], None]  # (step index, number of steps, timestep)
# Entered around each explainer of a step with its name ("rise", "cam", "attn"): a service sharing one UNet
# between threads serialises the hooked explainers there (DF-CAM and attention install hooks on the module).
ExplainerGuard = Callable[[str], AbstractContextManager[object]]


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().clip(0, 255).astype(np.uint8)


def run_explanation(
    model: Model,
    params: GenerationParams,
    options: ExplainOptions,
    *,
    runner: UNetRunner | None = None,
    on_step: StepCallback | None = None,
    on_progress: ProgressCallback | None = None,
    check: Callable[[int], None] | None = None,
    guard: ExplainerGuard | None = None,
) -> Explanation:
    """Generate and explain. `on_step` receives each explained step as soon as its maps exist (streaming);
    `on_progress` is called after every denoising step, explained or not (progress bars); `guard(method)` is
    entered around each explainer call (its timing excludes the time spent entering the guard)."""
    runner = runner or families.runner(model)
    tokens = prompt_tokens(model.tokenizer, params.prompt)
    explained: list[StepExplanation] = []
    # Everything that can be wrong with the request is checked before the first UNet call.
    resolved = resolve_generation(model, params)
    n = len(resolved.sampling.timesteps or ()) if resolved.sampling.kind == "explicit" else int(resolved.steps or 0)
    selected = set(options.steps.select(n))
    cam_layers = cam.resolve_layers(model.unet, options.cam.layers) if options.cam else ()
    f = model.vae_scale_factor
    latent_size = (int(resolved.height or 0) // f, int(resolved.width or 0) // f)
    # One mask set for every explained step: cross-step comparisons see identical perturbations.
    masks = rise.make_masks(options.rise, latent_size, model.device) if options.rise else None

    rise_opts, cam_opts = options.rise, options.cam

    def hook(state: StepState) -> None:
        if not options.methods or state.index not in selected:
            if on_progress is not None:
                on_progress(state.index, state.num_steps, state.timestep)
            return
        out = StepExplanation(state.index, state.timestep, x0=state.x0.detach())
        if rise_opts is not None and masks is not None:
            _timed(out, "rise", lambda: _rise(out, state, rise_opts, masks), guard)
        if cam_opts is not None:
            _timed(out, "cam", lambda: cam.explain_step(state, cam_opts, cam_layers), guard)
        if options.attention is not None:
            _timed(out, "attn", lambda: attention.explain_step(state, tokens), guard)
        explained.append(out)
        if on_step is not None:
            on_step(out)
        if on_progress is not None:
            on_progress(state.index, state.num_steps, state.timestep)

    gen = generate(model, params, runner=runner, on_step=hook, check=check)
    record = {
        "generation": _plain(gen.params), "explain": _plain(options), "model": str(model.path),
        "family": model.family.name,
        "unet_backend": runner.backend, "timesteps": gen.timesteps, "methods": list(options.methods),
        "explained_steps": [s.index for s in explained],
        "tokens": [t.text for t in tokens],  # the prompt's words as the model's tokenizer split them (attn's rows)
        "latent_size": list(latent_size),  # (h, w) of every map
    }
    if any(s.rise is not None for s in explained):  # per explained step: masks used, split-half r
        record["rise_stats"] = {str(s.index): dataclasses.asdict(s.rise) for s in explained if s.rise is not None}
    return Explanation(to_uint8(gen.image), gen.timesteps, explained, [t.text for t in tokens], record, gen)


def _rise(out: StepExplanation, state: StepState, opts: RiseOptions, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    run = rise.run_step(state, opts, masks)
    out.rise = run.stats
    return run.maps


def _timed(out: StepExplanation, name: str, fn: Callable[[], dict[str, torch.Tensor]],
           guard: ExplainerGuard | None) -> None:
    with guard(name) if guard is not None else nullcontext():
        t0 = time.perf_counter()
        maps = fn()
        out.seconds[name] = time.perf_counter() - t0
    out.maps.update({k: v.detach().float().cpu() for k, v in maps.items()})


def _plain(obj: Any) -> Any:
    """Dataclasses -> JSON-ready dicts (tensors dropped: explicit masks are recorded by shape only)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, torch.Tensor):
        return {"tensor_shape": list(obj.shape)}
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    return obj
