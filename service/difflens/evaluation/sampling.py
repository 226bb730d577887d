"""Batched generation for prompt fidelity, with any of the engine's schedules (uniform, early, late).

Many captions run through one UNet call per step. Everything the per-image sampler (engine/sampler.generate)
decides is reused from it: the scheduler class, the timestep plan (exponential packing included), the DDIM update
between arbitrary timesteps, the prompt encoding and the noise draw (each image's initial noise comes from its own
seed exactly as in `generate`, and a stochastic scheduler's step noise continues that image's own generator as
it does there), so each image is, up to batched-convolution rounding, the one `difflens explain` gives for that
caption and seed (tests check this for deterministic and stochastic schedulers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from difflens.engine.loading import Model
from difflens.engine.options import GenerationParams, Sampling
from difflens.engine.sampler import ddim_step, encode_prompt, make_scheduler, plan_timesteps
from difflens.engine.validate import resolve_generation
from difflens.scenes.captions import held_out_captions, parse_caption
from difflens.scenes.checker import accuracy
from difflens.scenes.render import ObjectSpec

UNIFORM = Sampling()


def held_out_set(n: int) -> tuple[list[str], list[int]]:
    """`n` held-out single-object captions (never trained on) with one seed each: the 76 held-out captions in a
    fixed order, cycled (a repeated caption gets a new seed). -> (captions, seeds)."""
    pool = held_out_captions(two_objects=False)
    return [pool[i % len(pool)] for i in range(n)], list(range(n))


def decode_batch(model: Model, latents: torch.Tensor) -> torch.Tensor:
    """latents: (B, C, h, w) -> images (B, 3, H, W) float in [0, 1] (pixel-space models: the latent is RGB)."""
    with torch.no_grad():
        x = latents
        if model.vae is not None:
            x = model.vae.decode(latents / model.vae.config.scaling_factor, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)


def initial_noise(model: Model, seeds: Sequence[int], size: tuple[int, int]) -> tuple[torch.Tensor,
                                                                                      list[torch.Generator]]:
    """(B, C, h, w): each row drawn from its seed exactly as sampler.generate draws it; and the B generators after
    that draw, where generate's stochastic scheduler steps take their noise from."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (1, model.unet.config.in_channels, *size)
    generators = [torch.Generator(device=model.device).manual_seed(int(s)) for s in seeds]
    noise = torch.cat([randn_tensor(shape, generator=g, device=model.device, dtype=model.dtype) for g in generators])
    return noise, generators


@torch.no_grad()
def sample_batch(model: Model, captions: Sequence[str], seeds: Sequence[int], sampling: Sampling = UNIFORM,
                 batch_size: int = 64, **generation: Any) -> np.ndarray:
    """Generate every caption with its seed. `generation`: GenerationParams fields (steps, guidance_scale,
    scheduler, ...); unset ones take the model's defaults. -> (N, H, W, 3) float32 in [0, 1]."""
    params = resolve_generation(model, GenerationParams(captions[0], sampling=sampling, **generation))
    f = model.vae_scale_factor
    size = (int(params.height or 0) // f, int(params.width or 0) // f)
    scale = float(params.guidance_scale or 0.0)
    embeds = {c: encode_prompt(model, c, params.negative_prompt)[0] for c in dict.fromkeys(captions)}
    out = []
    for lo in range(0, len(captions), batch_size):
        chunk, chunk_seeds = list(captions[lo:lo + batch_size]), list(seeds[lo:lo + batch_size])
        scheduler = make_scheduler(model, str(params.scheduler))
        timesteps = plan_timesteps(model, scheduler, params)
        noise, generators = initial_noise(model, chunk_seeds, size)
        latents = noise * scheduler.init_noise_sigma
        e = torch.stack([embeds[c] for c in chunk])  # (B, 2, L, D) = [uncond; cond] per caption
        cond = torch.cat([e[:, 0], e[:, 1]]) if scale > 1.0 else e[:, 1]  # runner.guided's layout
        for i, t in enumerate(scheduler.timesteps):
            x_in = scheduler.scale_model_input(latents, t)
            if scale > 1.0:
                u, c = model.unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=cond,
                                  return_dict=False)[0].chunk(2)
                eps = u + scale * (c - u)
            else:
                eps = model.unet(x_in, t, encoder_hidden_states=cond, return_dict=False)[0]
            if params.scheduler == "ddim":
                t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
                latents = ddim_step(scheduler, eps, int(t), t_next, latents)
            else:
                # One generator per image: diffusers' randn_tensor draws row i from generators[i].
                latents = scheduler.step(eps, t, latents, generator=generators, return_dict=False)[0]
        out.append(decode_batch(model, latents).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def fidelity(model: Model, captions: Sequence[str], seeds: Sequence[int], sampling: Sampling = UNIFORM,
             batch_size: int = 64, steps: int | None = None) -> dict[str, float]:
    """Checker accuracy per attribute (count = exactly the caption's number of objects, shape, color, texture,
    size, position) of the images generated for `captions`, with the model's default sampler and guidance (and
    step count unless `steps`)."""
    images = sample_batch(model, captions, seeds, sampling, batch_size, steps=steps)
    return accuracy(images, [parse_caption(c) for c in captions])


def caption_object(caption: str) -> ObjectSpec:
    """The single object of a one-object caption."""
    scene = parse_caption(caption)
    if len(scene.objects) != 1:
        raise ValueError(f"expected a one-object caption, got {caption!r}")
    return scene.objects[0]
