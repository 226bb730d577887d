"""The model-randomisation sanity check (Adebayo et al. 2018): explain the same step with a UNet whose weights
are all re-initialised, and compare with the trained model's maps (Spearman rank correlation).

"The same step" means the same input: the trained trajectory's latent x_t, timestep and prompt conditioning; only
the network that is explained changes (its own guided eps is the DF-RISE reference). Re-initialising every layer
is the end point of cascading randomisation.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from difflens.engine import attention, cam, rise
from difflens.engine.options import CamOptions, RiseOptions
from difflens.engine.runner import UNetRunner
from difflens.engine.sampler import StepState
from difflens.engine.tokens import Token


def randomised_copy(unet: Any, seed: int) -> Any:
    """A copy of `unet` with every parameter re-drawn from its layer's default initialisation (fixed seed).

    Raises RuntimeError if some parameter belongs to a module that cannot re-initialise itself (the check would
    then silently keep trained weights)."""
    rand = copy.deepcopy(unet)
    covered: set[int] = set()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in rand.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in module.parameters(recurse=False))
    missed = [name for name, p in rand.named_parameters() if id(p) not in covered]
    if missed:
        raise RuntimeError(f"cannot re-initialise {len(missed)} parameters, e.g. {missed[:3]}")
    return rand.eval().requires_grad_(False)


def on_runner(state: StepState, runner: UNetRunner) -> StepState:
    """The step's state as another network sees it: same x_t, t and conditioning; eps, x0 and x_{t_next} from
    `runner`'s UNet."""
    with torch.no_grad():
        eps = runner.guided(state.latent_in, state.t, state.cond)
        nxt = state.step(eps, state.sample) if state.step is not None and state.sample is not None \
            else state.latent_next
        x0 = state.to_x0(state.latent_in, eps) if state.to_x0 is not None else state.x0
    return dataclasses.replace(state, runner=runner, eps=eps, latent_next=nxt, x0=x0)


def explain_state(state: StepState, rise_opts: RiseOptions, masks: torch.Tensor, cam_opts: CamOptions,
                  cam_layers: tuple[str, ...], tokens: list[Token]) -> dict[str, torch.Tensor]:
    """All three explainers on one StepState (what run_explanation's per-step hook runs), maps on the CPU.

    masks: (N, h, w). -> {"rise": (h, w), "cam": (h, w), "attn": (T, h, w), ...} as in StepExplanation.maps.
    """
    maps = rise.explain_step(state, rise_opts, masks)
    maps |= cam.explain_step(state, cam_opts, cam_layers)
    maps |= attention.explain_step(state, tokens)
    return {k: v.detach().float().cpu() for k, v in maps.items()}
