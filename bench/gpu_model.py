"""The UNets and step state of `python -m bench.gpu`: SD1.5's UNet shape with random weights, or a tiny one.

Everything is built in code with a fixed seed (no hub, no network): the weights' values do not matter to speed,
only the architecture does, and the precision section compares one set of weights with itself in other dtypes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from difflens.engine.runner import CFGConditioning, UNetRunner
from difflens.engine.sampler import StepState

GUIDANCE = 7.5
TIMESTEP = 500

# runwayml/stable-diffusion-v1-5's unet/config.json, the keys that differ from diffusers' defaults or that define
# the shape (attention_head_dim is diffusers' legacy name for the number of heads: 8 at every level).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "mid_block_scale_factor": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SD15_PARAMETERS = 859_520_964  # the published SD1.5 UNet's parameter count

# The same block types at toy widths, one resnet per block: every code path of the SD1.5 run in seconds on a CPU.
# 16 x 16 latents: the SSIM window (15 x 15) still fits, as at 64 x 64.
TINY_UNET: dict[str, Any] = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64, 64), "cross_attention_dim": 32, "attention_head_dim": (1, 2, 2),
    "norm_num_groups": 32,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Shape:
    """What one configuration feeds the UNet: latent (C, h, w) and prompt embeddings (L, D)."""

    name: str
    config: dict[str, Any]

    @property
    def latent(self) -> tuple[int, int, int]:
        side = int(self.config["sample_size"])
        return (int(self.config["in_channels"]), side, side)

    @property
    def embed(self) -> tuple[int, int]:
        return (TEXT_TOKENS, int(self.config["cross_attention_dim"]))


SD15 = Shape("sd15", SD15_UNET)
TINY = Shape("tiny", TINY_UNET)


def build_unet(shape: Shape, device: torch.device | str = "cpu", seed: int = 0) -> Any:
    """UNet2DConditionModel of `shape` with random float32 weights drawn on `device` from `seed`; eval mode, no
    grad. On the meta device nothing is allocated (shapes and parameter count only)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[] if torch.device(device).type != "cuda" else None):
        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**shape.config)
    return unet.eval().requires_grad_(False)


def in_dtype(unet: Any, dtype: torch.dtype) -> Any:
    """A copy of `unet` in `dtype` (the original is left as it is)."""
    from diffusers.utils import logging

    # diffusers warns on every ModelMixin.to(dtype) that from_pretrained(torch_dtype=) would be safer; it names no
    # module to keep in float32 for this UNet, so the cast is what from_pretrained would do
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return copy.deepcopy(unet).to(dtype)
    finally:
        logging.set_verbosity(level)


def parameter_count(unet: Any) -> int:
    return sum(p.numel() for p in unet.parameters())


@dataclass(frozen=True)
class Inputs:
    """One denoising step's inputs, float32 on the CPU: latent (1, C, h, w), embeds (2, L, D) = [uncond; cond]."""

    latent: torch.Tensor
    embeds: torch.Tensor


def make_inputs(shape: Shape, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    return Inputs(torch.randn(1, *shape.latent, generator=g), torch.randn(2, *shape.embed, generator=g))


def make_state(runner: UNetRunner, inputs: Inputs, device: torch.device | str, dtype: torch.dtype) -> StepState:
    """The step's state for `runner`: the inputs in `dtype` on `device`, its own guided eps as the reference.

    The timestep is a tensor on `device`: a CPU one would be copied to the GPU inside every UNet call, which a
    CUDA graph cannot capture."""
    x = inputs.latent.to(device=device, dtype=dtype)
    cond = CFGConditioning(inputs.embeds.to(device=device, dtype=dtype), GUIDANCE)
    t = torch.tensor(TIMESTEP, device=device)
    with torch.no_grad():
        eps = runner.guided(x, t, cond)
    return StepState(0, 1, TIMESTEP, t, x, eps, torch.zeros_like(x), x - eps, cond, runner)
