"""Cross-attention token maps and token relevance of one denoising step (docs/method.md, R2).

A separate no-grad eager forward of the conditional branch runs with the cross-attention processors swapped for
recorders (hooks.capture_cross_attention); the generation's own UNet call is never touched, so the image is
unchanged. This module turns the recorded probabilities into one map per prompt word (DAAM-style aggregation,
kept per step).
"""

from __future__ import annotations

from typing import Any

import torch

from difflens.engine.cam import min_max, token_grid, upsample
from difflens.engine.hooks import capture_cross_attention, capture_joint_attention
from difflens.engine.sampler import StepState
from difflens.engine.sd3 import capture_joint_text_attention
from difflens.engine.tokens import Token


def layer_grid(n: int, size: tuple[int, int]) -> tuple[int, int]:
    """(h_l, w_l) of a layer with n = h_l * w_l query pixels (or patch tokens), from the latent size (h, w)
    (cam.token_grid)."""
    return token_grid(n, size)


def capture_text_attention(unet: Any, text_len: int) -> Any:
    """The recorders of the attention from the image to the prompt's `text_len` tokens: a UNet's cross-attention
    (attn2) layers, or a FLUX transformer's joint attention (its image-query x text-key part, every block)."""
    if hasattr(unet, "single_transformer_blocks"):
        return capture_joint_attention(unet, text_len)
    if hasattr(unet, "transformer_blocks"):  # SD3's joint blocks: image queries first, then the text's
        return capture_joint_text_attention(unet)
    return capture_cross_attention(unet)


def word_selector(tokens: list[Token], seq_len: int, device: torch.device) -> torch.Tensor:
    """(S, T) 0/1 matrix: column j selects word j's token positions, so BPE pieces of one word are summed."""
    sel = torch.zeros(seq_len, len(tokens), device=device)
    for j, tok in enumerate(tokens):
        sel[list(tok.positions), j] = 1.0
    return sel


def token_maps(probs: list[torch.Tensor], tokens: list[Token], size: tuple[int, int],
               device: torch.device | None = None) -> torch.Tensor:
    """Average over layers of the head-averaged, upsampled attention of each word.

    probs: one (heads, N_l, S) attention-probability tensor per layer call; tokens: the prompt's words, whose
    positions index S. -> (T, h, w) with (h, w) = size; zeros (on `device`) if there are no layers.
    """
    device = probs[0].device if probs else device
    total = torch.zeros(len(tokens), *size, device=device)
    if not tokens:  # an empty prompt: nothing to map (and interpolate rejects empty tensors)
        return total
    for p in probs:
        per_pixel = p.float().mean(dim=0)  # (N_l, S)
        words = per_pixel @ word_selector(tokens, per_pixel.shape[-1], p.device)  # (N_l, T)
        grid = layer_grid(per_pixel.shape[0], size)
        total += upsample(words.T.reshape(len(tokens), *grid), size)
    return total / max(len(probs), 1)


def relevance(maps: torch.Tensor) -> torch.Tensor:
    """r_j = sum over pixels of word j's map, min-max over the prompt's words. maps: (T, h, w) -> (T,) in [0, 1]
    (all equal -> zeros)."""
    return min_max(maps.sum(dim=(1, 2)))


def explain_step(state: StepState, tokens: list[Token]) -> dict[str, torch.Tensor]:
    """Token maps of one step. state.latent_in: (1, C, h, w); tokens: T prompt words.

    -> {"attn": (T, h, w) one map per word, "attn_relevance": (T,)}.
    """
    unet = state.runner.unet
    size = (int(state.latent_in.shape[-2]), int(state.latent_in.shape[-1]))
    embeds, added = state.cond.conditional()
    with torch.no_grad(), capture_text_attention(unet, int(embeds.shape[1])) as records:
        state.runner.eager(state.latent_in, state.t, embeds, added)
    probs = [p[0] for calls in records.values() for p in calls]  # batch of one: the conditional branch
    maps = token_maps(probs, tokens, size, state.latent_in.device)
    return {"attn": maps, "attn_relevance": relevance(maps)}
