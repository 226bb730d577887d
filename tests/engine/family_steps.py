"""What the family engine tests share: the first denoising step's state of a short run."""

from __future__ import annotations

from typing import Any

from difflens.engine.options import GenerationParams
from difflens.engine.sampler import StepState, generate

PROMPT = "a red circle on the left"


def first_state(model: Any, guidance: float = 5.0) -> StepState:
    """The first step of a 2-step euler run of PROMPT (seed 1) at `guidance`."""
    states: list[StepState] = []
    generate(model, GenerationParams(PROMPT, seed=1, steps=2, guidance_scale=guidance, scheduler="euler"),
             on_step=states.append)
    return states[0]
