"""What the family engine tests share: the first denoising step's state of a short run, and the check that a
family's explanations have their shapes and are deterministic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from difflens.engine.explain import Explanation, run_explanation
from difflens.engine.options import AttentionOptions, CamOptions, ExplainOptions, GenerationParams, RiseOptions
from difflens.engine.sampler import StepState, generate

PROMPT = "a red circle on the left"


def first_state(model: Any, guidance: float = 5.0) -> StepState:
    """The first step of a 2-step euler run of PROMPT (seed 1) at `guidance`."""
    states: list[StepState] = []
    generate(model, GenerationParams(PROMPT, seed=1, steps=2, guidance_scale=guidance, scheduler="euler"),
             on_step=states.append)
    return states[0]


def explained_twice_alike(model: Any, guidance: float, layers: Sequence[str]) -> Explanation:
    """Explain "a red circle" (3 steps, seed 5; DF-RISE, DF-CAM over `layers`, attention) twice: the same image and
    maps bit for bit, every map of its shape and finite, and the image that of a plain generation. The first run."""
    params = GenerationParams("a red circle", seed=5, steps=3, guidance_scale=guidance)
    options = ExplainOptions(rise=RiseOptions(num_masks=8, batch_size=4), cam=CamOptions(),
                             attention=AttentionOptions())
    a, b = (run_explanation(model, params, options) for _ in range(2))
    assert np.array_equal(a.image, b.image) and a.tokens == ["a", "red", "circle"]
    for s, t in zip(a.steps, b.steps, strict=True):
        assert set(s.maps) == {"rise", "rise_raw", "rise_mean", "cam", "attn", "attn_relevance",
                               *(f"cam/{p}" for p in layers)}
        for name, m in s.maps.items():
            want = {"attn": (3, 16, 16), "attn_relevance": (3,)}.get(name, (16, 16))
            assert m.shape == want and torch.isfinite(m).all(), name
            assert torch.equal(m, t.maps[name]), name
    assert np.array_equal(a.generation.image, generate(model, params).image)  # explaining never changes the image
    return a
