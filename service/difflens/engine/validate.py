"""Checks that need the model (resolution multiples, step counts) and filling in the model's defaults."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from difflens.engine.options import GenerationParams, check_choice, check_range
from difflens.engine.schedule import check_uniform_steps, schedulers_for
from difflens.errors import InvalidArgument

if TYPE_CHECKING:  # the front validates on config-only CatalogModels, without torch
    from difflens.engine.loading import Model

MAX_SIDE = 4096


def model_max_side(model: Model, max_side: int = MAX_SIDE) -> int:
    """The largest width or height `model` takes under a deployment's `max_side`."""
    own = model.defaults.max_side
    return max_side if own is None else min(own, max_side)


def resolve_generation(model: Model, params: GenerationParams, *, max_side: int = MAX_SIDE,
                       max_steps: int | None = None) -> GenerationParams:
    """Fill unset fields from the model's recommended defaults and validate against the model. A deployment
    passes its own (tighter) max_side and max_steps, so an error names the range it allows; the model's own
    max_side (difflens.json) applies where smaller."""
    d = model.defaults
    w_default, h_default = model.default_size
    p = dataclasses.replace(
        params,
        steps=params.steps if params.steps is not None else d.steps,
        guidance_scale=params.guidance_scale if params.guidance_scale is not None else d.guidance_scale,
        width=params.width if params.width is not None else w_default,
        height=params.height if params.height is not None else h_default,
        scheduler=params.scheduler if params.scheduler is not None else d.scheduler,  # type: ignore[arg-type]
    )
    check_choice("scheduler", str(p.scheduler), schedulers_for(model.scheduler_config))
    if p.negative_prompt and not model.family.cfg:
        raise InvalidArgument("negative_prompt", f"must be empty for this model: a {model.family.name} model is "
                                                 "guidance-distilled, with no negative branch to condition")
    m = model.size_multiple
    top = model_max_side(model, max_side)
    for name in ("width", "height"):
        v = getattr(p, name)
        if top < max_side and v > top:
            raise InvalidArgument(name, f"got {v}; allowed range [{m}, {top}] (this model's max_side, in its "
                                        "difflens.json)")
        check_range(name, v, m, top)
        if v % m:
            raise InvalidArgument(name, f"got {v}; must be a multiple of {m} (VAE factor {model.vae_scale_factor} x 8)")
    if p.sampling.kind in ("uniform", "early", "late"):
        top = model.num_train_timesteps if max_steps is None else min(max_steps, model.num_train_timesteps)
        check_range("steps", int(p.steps or 0), 1, top)
    if p.sampling.kind == "uniform":  # what the scheduler's own spacing makes of that many steps
        check_uniform_steps(model.scheduler_config, str(p.scheduler), int(p.steps or 0), model.num_train_timesteps)
    return p
