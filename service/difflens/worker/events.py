"""An explained step's tensors -> the Step event a worker publishes (maps and token maps in the request's map
dtype, the x0 preview decoded when asked for). Apart from job.py, which runs the job and decides when to publish."""

from __future__ import annotations

import numpy as np

from difflens.engine.explain import StepExplanation
from difflens.engine.loading import Model
from difflens.engine.sampler import decode
from difflens.jobs import OutputOptions, Step, TokenMap


def step_event(se: StepExplanation, words: list[str], output: OutputOptions, model: Model,
               latency_s: float, num_steps: int) -> Step:
    """StepExplanation -> the Step event. Maps (h, w) and token maps (h, w) in output.map_dtype; the x0 preview
    (3, H, W) in [0, 1], decoded with the VAE (pixel-space models: x0 is the image), when asked for."""
    dtype = np.dtype(output.map_dtype)
    maps = {k: v.numpy().astype(dtype) for k, v in se.maps.items() if k not in ("attn", "attn_relevance")}
    tokens: tuple[TokenMap, ...] = ()
    if "attn" in se.maps:
        attn, rel = se.maps["attn"].numpy(), se.maps["attn_relevance"].numpy()
        tokens = tuple(TokenMap(w, attn[j].astype(dtype), float(rel[j])) for j, w in enumerate(words))
    preview = None
    if output.include_x0_previews and se.x0 is not None:
        preview = decode(model, se.x0).transpose(2, 0, 1).astype(dtype)
    return Step(index=se.index, timestep=se.timestep, num_steps=num_steps, maps=maps, tokens=tokens,
                latency_s=latency_s, x0_preview=preview, rise=se.rise)
