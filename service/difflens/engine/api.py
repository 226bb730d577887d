"""The one-call Python API: a model folder (or a loaded Model) and a prompt -> an Explanation."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from difflens.engine import families
from difflens.engine.explain import Explanation, ProgressCallback, StepCallback, run_explanation
from difflens.engine.loading import Model, load_model
from difflens.engine.options import (
    METHODS,
    AttentionOptions,
    CamOptions,
    ExplainOptions,
    GenerationParams,
    RiseOptions,
    Sampling,
    StepSelector,
)
from difflens.engine.runner import Backend, RemoteUNet
from difflens.errors import InvalidArgument


def explain(
    model: str | os.PathLike[str] | Model,
    prompt: str,
    *,
    methods: Iterable[str] = ("rise", "cam", "attn"),
    generation: dict[str, Any] | None = None,
    rise: RiseOptions | None = None,
    cam: CamOptions | None = None,
    steps: StepSelector | None = None,
    backend: Backend = "eager",
    device: str = "cpu",
    on_step: StepCallback | None = None,
    on_progress: ProgressCallback | None = None,
    remote: RemoteUNet | None = None,
) -> Explanation:
    """Generate `prompt` with the model and explain the selected steps with `methods` (rise, cam, attn).

    generation: GenerationParams fields (negative_prompt, seed, steps, guidance_scale, width, height,
    scheduler, sampling=Sampling(...)); unset ones take the model's recommended defaults. remote: with backend
    "triton", the UNet that takes the batched calls (difflens.triton.client.connect_unet).
    """
    methods = tuple(methods)
    for m in methods:
        if m not in METHODS:
            raise InvalidArgument("methods", f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
    loaded = model if isinstance(model, Model) else load_model(model, device=device, dtype=torch.float32)
    gen_kw = dict(generation or {})
    if isinstance(gen_kw.get("sampling"), dict):
        gen_kw["sampling"] = Sampling(**gen_kw["sampling"])
    params = GenerationParams(prompt, **gen_kw)
    options = ExplainOptions(
        steps=steps or StepSelector(),
        rise=(rise or RiseOptions()) if "rise" in methods else None,
        cam=(cam or CamOptions()) if "cam" in methods else None,
        attention=AttentionOptions() if "attn" in methods else None,
    )
    return run_explanation(loaded, params, options, runner=families.runner(loaded, backend, remote),
                           on_step=on_step, on_progress=on_progress)
