"""How faithful a saliency map is (docs/faithfulness.md): pure functions over maps, masks and a StepState.

- pointing_game: the map's maximum lies in the ground-truth region (with a pixel tolerance);
- mass_ratio: the share of saliency inside a region over the region's share of the area;
- perturbation_curve / auc: deletion and insertion on the latent at one step, scored per image;
- spearman: rank correlation of two maps (the weight-randomisation sanity check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from difflens.engine.rise import BLUR_SIGMA, BLUR_SIZE
from difflens.engine.sampler import StepState
from difflens.engine.ssim import gaussian_1d, gaussian_filter
from difflens.errors import InvalidArgument

CurveKind = Literal["deletion", "insertion"]


def pointing_game(saliency: torch.Tensor, region: torch.Tensor, tolerance: int = 1) -> bool:
    """saliency: (h, w); region: (h, w) bool at the same size. True when the argmax is within `tolerance`
    pixels (Chebyshev) of the region."""
    _check_same(saliency, region)
    idx = int(torch.argmax(saliency))
    y, x = divmod(idx, saliency.shape[1])
    if tolerance > 0:
        k = 2 * tolerance + 1
        region = F.max_pool2d(region[None, None].float(), k, stride=1, padding=tolerance)[0, 0] > 0
    return bool(region[y, x])


def mass_ratio(saliency: torch.Tensor, region: torch.Tensor) -> float:
    """(sum of ReLU(saliency) inside region / total) / (region area / total area); 1 = no preference.
    saliency: (h, w); region: (h, w) bool. NaN when the map has no positive mass or the region is empty."""
    _check_same(saliency, region)
    s = saliency.clamp(min=0).double()
    total, area = s.sum(), region.double().mean()
    if total <= 0 or area <= 0:
        return float("nan")
    return float((s[region].sum() / total) / area)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two maps of the same shape (average ranks for ties)."""
    ra, rb = _ranks(a.flatten().double()), _ranks(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _ranks(v: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=v.dtype)
    # average the ranks of tied values
    uniq, inverse = torch.unique(v, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=v.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=v.dtype).index_add_(0, inverse, torch.ones_like(v))
    return (sums / counts)[inverse]


def gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    """The insertion baseline: 11 x 11 Gaussian, sigma 5, reflect padding. x: (B, C, h, w) -> (B, C, h, w)."""
    return gaussian_filter(x, BLUR_SIZE, BLUR_SIGMA, padding_mode="reflect")


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, valid region).
    x, y: (B, C, H, W) -> (B,)."""
    c = x.shape[1]
    g = gaussian_1d(11, 1.5, x.dtype, x.device)
    w = (g[:, None] * g[None, :]).expand(c, 1, 11, 11)
    k = min(11, x.shape[-1], x.shape[-2])
    if k < 11:  # images smaller than the window: shrink it (centre crop of the kernel, renormalised)
        o = (11 - k) // 2
        w = w[..., o:o + k, o:o + k]
        w = w / w.sum(dim=(-1, -2), keepdim=True)

    def f(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def perturbation_curve(
    state: StepState,
    saliency: torch.Tensor,
    kind: CurveKind,
    decode: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunks: int = 16,
    order: torch.Tensor | None = None,
    tie_break: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Deletion or insertion on the latent at one step (docs/faithfulness.md).

    Latent pixels are taken in order of decreasing saliency (or `order`, a permutation of h*w pixel indices,
    e.g. random for the baseline); pixels of equal saliency go in the order of `tie_break` (a permutation of the
    h*w indices, e.g. the random baseline's), else in raster order - which for a map with large flat regions (a
    binary mask) is a top-to-bottom sweep that scores by itself. Deletion sets them to zero in `chunks` equal
    parts; insertion starts from a blurred latent (11x11, sigma 5) and restores them. At each of the chunks+1
    points the guided UNet runs at t_i, the scheduler steps, and the result is scored against the unperturbed
    one: "ssim" on the decoded x0 prediction (decode: (B, C, h, w) latents -> (B, 3, H, W) images in [0, 1]) and
    "cosine" on x_{t_next}.
    saliency: (h, w). Returns {"fraction": (K+1,), "ssim": (K+1,), "cosine": (K+1,)}.
    """
    if state.step is None or state.scale is None or state.sample is None or state.to_x0 is None:
        raise InvalidArgument("state", "needs a StepState from sampler.generate (with step replay)")
    if kind not in ("deletion", "insertion"):
        raise InvalidArgument("kind", f"got {kind!r}; allowed: deletion, insertion")
    sample = state.sample  # (1, C, h, w)
    h, w = sample.shape[-2:]
    if saliency.shape != (h, w):
        raise InvalidArgument("saliency", f"shape {tuple(saliency.shape)}; expected {(h, w)}")
    if order is None:
        flat = saliency.flatten().float()
        if tie_break is None:
            order = torch.argsort(flat, descending=True, stable=True)
        else:
            tie_break = tie_break.to(flat.device)
            order = tie_break[torch.argsort(flat[tie_break], descending=True, stable=True)]
    counts = torch.linspace(0, h * w, chunks + 1).round().long()
    taken = torch.zeros(chunks + 1, h * w, dtype=sample.dtype, device=sample.device)
    for k, n in enumerate(counts.tolist()):
        taken[k, order[:n]] = 1
    taken = taken.view(chunks + 1, 1, h, w)
    base = torch.zeros_like(sample) if kind == "deletion" else gaussian_blur(sample)
    # deletion: the taken pixels become the substrate; insertion: the taken pixels are restored
    keep = 1 - taken if kind == "deletion" else taken
    perturbed = keep * sample + (1 - keep) * base  # (K+1, C, h, w)
    batch = torch.cat([sample, perturbed])  # index 0: the unperturbed reference
    with torch.no_grad():
        latent_in = state.scale(batch)
        eps = state.runner.guided(latent_in, state.t, state.cond)
        nxt = state.step(eps, batch)
        x0 = state.to_x0(latent_in, eps)
        images = decode(x0)
    ref_img, imgs = images[:1], images[1:]
    ref_lat, lats = nxt[:1].flatten(1), nxt[1:].flatten(1)
    return {
        "fraction": counts.double() / (h * w),
        "ssim": ssim(imgs, ref_img.expand_as(imgs)).double(),
        "cosine": F.cosine_similarity(lats, ref_lat.expand_as(lats), dim=1).double(),
    }


def auc(fraction: torch.Tensor, score: torch.Tensor) -> float:
    """Normalised area under a curve over fraction in [0, 1] (trapezoid)."""
    return float(torch.trapezoid(score, fraction) / (fraction[-1] - fraction[0]))


def _check_same(saliency: torch.Tensor, region: torch.Tensor) -> None:
    if saliency.shape != region.shape:
        raise InvalidArgument("region", f"shape {tuple(region.shape)} differs from the map's {tuple(saliency.shape)}")
