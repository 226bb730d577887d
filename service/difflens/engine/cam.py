"""DF-CAM: Grad-CAM maps from inside the UNet at one denoising step (docs/method.md, DF-CAM).

One eager forward over both CFG branches with gradients on, one backward for all requested layers, activations
and gradients of the same step. Capture is hooks.capture_outputs; this module only does the math.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from difflens.engine.hooks import Capture, capture_outputs, first_tensor, image_stream
from difflens.engine.model_config import BLOCK_ORDER, LAYER_PATTERN, TRANSFORMER_LAYER_PATTERN
from difflens.engine.options import CamOptions, CamTarget
from difflens.engine.runner import CFGConditioning
from difflens.engine.sampler import StepState
from difflens.errors import HookError, InvalidArgument


def is_transformer(denoiser: Any) -> bool:
    """Whether the denoiser is a transformer over patch tokens (FLUX, SD3) rather than a UNet: its blocks' outputs
    are token sequences (N, tokens, C), not feature maps."""
    return hasattr(denoiser, "transformer_blocks")


def camable_layers(unet: Any) -> tuple[str, ...]:
    """Every module path DF-CAM accepts on `unet`: down, mid, then up blocks (registration order within); on a
    transformer, its blocks in forward order (FLUX: transformer_blocks.N, then single_transformer_blocks.N)."""
    if is_transformer(unet):
        return tuple(name for name, _ in unet.named_modules() if TRANSFORMER_LAYER_PATTERN.fullmatch(name))
    names = [name for name, _ in unet.named_modules() if LAYER_PATTERN.fullmatch(name)]
    return tuple(sorted(names, key=lambda n: BLOCK_ORDER[n.split(".")[0]]))


def capture_layers(unet: Any, layers: tuple[str, ...]) -> Any:
    """hooks.capture_outputs on `layers`, capturing what DF-CAM explains of each: a UNet block's output, a
    transformer block's image tokens (its second stream; the first is the text's)."""
    return capture_outputs(unet, layers, select=image_stream if is_transformer(unet) else first_tensor)


def token_grid(n: int, size: tuple[int, int]) -> tuple[int, int]:
    """(h_l, w_l) of a layer with n = h_l * w_l positions, from the latent size (h, w): a UNet halves each side
    (rounding up, as its stride-2 convolutions do) once per resolution level; a transformer's 2 x 2 patches halve it
    once."""
    h, w = size
    while h * w > n:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != n:
        raise ValueError(f"{n} attention queries (or tokens) match no resolution level of a "
                         f"{size[0]}x{size[1]} latent")
    return h, w


def as_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A layer's activation or gradient as feature maps: (K, h_l, w_l) as it is, or tokens (n, K) of a transformer
    folded back to their row-major patch grid (K, h_l, w_l) (token_grid of the latent size (h, w))."""
    if x.dim() == 3:
        return x
    n, k = x.shape
    return x.T.reshape(k, *token_grid(n, size))


def resolve_layers(unet: Any, layers: tuple[str, ...]) -> tuple[str, ...]:
    """The layer paths to explain: `layers` (duplicates dropped), or all of `camable_layers` when empty.

    Raises InvalidArgument("cam.layers") naming unknown paths and listing the valid ones.
    """
    valid = camable_layers(unet)
    if not layers:
        return valid
    known = set(valid)
    bad = [p for p in layers if p not in known]
    if bad:
        raise InvalidArgument("cam.layers", f"unknown layer path(s) {', '.join(map(repr, bad))}; "
                                            f"valid paths: {', '.join(valid)}")
    return tuple(dict.fromkeys(layers))


def cfg_combine(x: torch.Tensor, cond: CFGConditioning) -> torch.Tensor:
    """Combine a per-branch tensor like CFG. x: (2, ...) = [uncond; cond] with CFG, else (1, ...). -> (...)."""
    if not cond.cfg:
        return x[0]
    uncond, text = x[0], x[1]
    return uncond + cond.scale * (text - uncond)


def target_scalar(out: torch.Tensor, cond: CFGConditioning, target: CamTarget) -> torch.Tensor:
    """The scalar y whose gradient DF-CAM uses. out: (2, C, h, w) UNet output [uncond; cond] ((1, C, h, w) without
    CFG). output_sum: sum over both branches (reference); guided_sum / guided_sqnorm: sum / squared norm of eps_w."""
    if target == "output_sum":
        return out.sum()
    eps_w = cfg_combine(out, cond)
    return eps_w.sum() if target == "guided_sum" else eps_w.square().sum()


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the last two axes. maps: (..., h_l, w_l) -> (..., h, w)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(1, -1, *maps.shape[-2:])
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)


def min_max(m: torch.Tensor) -> torch.Tensor:
    """Rescale to [0, 1] over all elements. A constant (or empty) tensor maps to zeros, not NaN. m: any shape."""
    if m.numel() == 0:
        return m.clone()
    lo, hi = m.min(), m.max()
    span = hi - lo
    return (m - lo) / span if span > 0 else torch.zeros_like(m)


def grad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k alpha_k A_k), alpha_k = mean over pixels of G_k. activation, gradient: (K, h_l, w_l) -> (h_l, w_l)."""
    alpha = gradient.mean(dim=(1, 2))
    return torch.relu(torch.einsum("k,kuv->uv", alpha, activation))


def forward_backward(state: StepState, layers: tuple[str, ...], target: CamTarget) -> Capture:
    """One eager forward of both CFG branches on a leaf copy of the latent and one backward of the target.

    Returns the hooks.Capture: activations and gradients (2, K, h_l, w_l) per layer ((1, ...) without CFG; a
    transformer block's image tokens (2, n, K)).
    """
    unet, cond = state.runner.unet, state.cond
    with torch.enable_grad(), capture_layers(unet, layers) as cap:
        # The UNet's parameters do not require grad: the leaf latent is what makes the graph exist.
        x = state.latent_in.detach().clone().requires_grad_(True)
        batch = torch.cat([x, x]) if cond.cfg else x  # runner.guided's layout, [uncond; cond]
        out = state.runner.eager(batch, state.t, cond.batch(1), cond.added_batch(1))
        # inputs=[x]: nothing accumulates into parameter .grad even if a caller left requires_grad on.
        torch.autograd.backward(target_scalar(out, cond, target), inputs=[x])
    missing = [p for p in layers if p not in cap.gradients]
    if missing:
        raise HookError(f"no gradient reached layer(s) {', '.join(missing)}: "
                        "their output does not depend on the latent")
    return cap


def explain_step(state: StepState, opts: CamOptions, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """DF-CAM maps of one step, at latent size (h, w) of state.latent_in (1, C, h, w).

    -> {"cam": (h, w) sum over layers of the per-layer maps, "cam/<path>": (h, w) min-max normalised per layer}.
    `layers` come from resolve_layers. The sampler's tensors, RNGs and the UNet are left as they were.
    """
    size = (int(state.latent_in.shape[-2]), int(state.latent_in.shape[-1]))
    cap = forward_backward(state, layers, opts.target)
    maps: dict[str, torch.Tensor] = {}
    total = torch.zeros(size, device=state.latent_in.device)
    for path in layers:
        a = as_grid(cfg_combine(cap.activations[path].float(), state.cond), size)
        g = as_grid(cfg_combine(cap.gradients[path].float(), state.cond), size)
        layer_map = min_max(upsample(grad_cam(a, g), size))
        maps[f"cam/{path}"] = layer_map
        total += layer_map
    maps["cam"] = total
    return maps
