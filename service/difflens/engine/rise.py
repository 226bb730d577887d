"""DF-RISE: perturbation saliency of one denoising step (docs/method.md, section DF-RISE).

Masks multiply the step's UNet input; the guided outputs of the masked latents are compared, pixel by pixel, with
a reference (the unmasked eps_w, or x_{t_next} for parity with the reference code); H = sum_k M_k * s_k.
Masks (engine/masks.py) are evaluated `batch_size` at a time, one UNet call per chunk holding both CFG branches,
and H is accumulated chunk by chunk so memory does not grow with the number of masks. The map of the even-numbered
masks and that of the odd-numbered ones are accumulated beside it: their Pearson r (split-half r) says how far the
map has settled, and with `stop_at_r` ends the step early once it is high enough. Pure torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from difflens.engine.masks import grid_masks, make_masks, pixel_masks  # noqa: F401 - rise.make_masks, as before
from difflens.engine.options import RiseOptions, RiseStats
from difflens.engine.rise_regression import RegressionFit
from difflens.engine.sampler import StepState
from difflens.engine.ssim import gaussian_filter, ssim_structure

BLUR_SIZE = 11
BLUR_SIGMA = 5.0


# --- scores ----------------------------------------------------------------------------------------------------


def score(ref: torch.Tensor, out: torch.Tensor, opts: RiseOptions) -> torch.Tensor:
    """Per-pixel similarity of each output to the reference. ref: (1, C, h, w); out: (B, C, h, w) -> (B, h, w)."""
    if opts.score == "cosine":
        return F.cosine_similarity(out, ref, dim=1)
    return ssim_structure(ref, out, double_covariance=opts.structure_2x, padding=opts.ssim_padding)


# --- one step --------------------------------------------------------------------------------------------------


def substrate(x: torch.Tensor, opts: RiseOptions) -> torch.Tensor | None:
    """What masked-out pixels become. x: (1, C, h, w) -> (1, C, h, w), or None for zero.

    blur: 11 x 11 Gaussian (sigma 5) per channel with reflect padding, so the border keeps the latent's own
    statistics instead of being pulled to 0 (needs h, w > 5; latents are at least 8 x 8).
    """
    if opts.substrate == "zero":
        return None
    return gaussian_filter(x, BLUR_SIZE, BLUR_SIGMA, padding_mode="reflect")


def perturb(x: torch.Tensor, masks: torch.Tensor, sub: torch.Tensor | None) -> torch.Tensor:
    """Masked latents, one per mask, the same 2-D mask on every channel.

    x: (1, C, h, w); masks: (B, h, w); sub: (1, C, h, w) or None (zero substrate) -> (B, C, h, w).
    """
    m = masks[:, None].to(x.dtype)
    if sub is None:
        return m * x
    return torch.lerp(sub, x, m)  # M x + (1 - M) sub, exactly x where M = 1 and sub where M = 0


def reference(state: StepState, opts: RiseOptions) -> torch.Tensor:
    """What the masked outputs are compared with: (1, C, h, w) float32."""
    ref = state.eps if opts.target == "eps" else state.latent_next
    return ref.float()


def masked_scores(state: StepState, opts: RiseOptions, sub: torch.Tensor | None, ref: torch.Tensor,
                  masks: torch.Tensor) -> torch.Tensor:
    """s_k, each mask's score map, from ONE guided UNet call (both CFG branches): (B, h, w) float32.

    sub: (1, C, h, w) or None; ref: (1, C, h, w) float32; masks: (B, h, w). Scores are computed in float32
    whatever the model's dtype (local variances in fp16 lose everything).
    """
    eps = state.runner.guided(perturb(state.latent_in, masks, sub), state.t, state.cond)
    return score(ref, eps.float(), opts)


def masked_contribution(state: StepState, opts: RiseOptions, sub: torch.Tensor | None, ref: torch.Tensor,
                        masks: torch.Tensor, real: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """M_k * s_k for each mask of one chunk, and sum_k s_k, from one guided UNet call (`masked_scores`).

    masks: (B, h, w) -> (B, h, w) and (h, w) float32. `real`: only the first `real` masks count toward sum_k s_k
    (the rest pad a compiled batch).
    """
    s = masked_scores(state, opts, sub, ref, masks)
    return masks.float() * s, s[:real].sum(dim=0)


@dataclass
class RiseRun:
    """One step's DF-RISE result: maps ("rise", "rise_raw", "rise_mean": (h, w) each) and what it used."""

    maps: dict[str, torch.Tensor]
    stats: RiseStats


def explain_step(state: StepState, opts: RiseOptions, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """DF-RISE maps of one step, masks evaluated `opts.batch_size` per UNet call. masks: (N, h, w) in [0, 1].

    Returns rise: (h, w) H / sum_k M_k (0 where no mask covers a pixel), rise_raw: (h, w) H = sum_k M_k s_k, and
    rise_mean: (h, w) sum_k s_k / N, the score whatever the pixel's own mask. The score is a 15 x 15 window
    statistic, so rise can be dominated by rise_mean (how much masking anything disturbs the prediction there);
    rise - rise_mean is what the pixel's own mask adds. With `opts.stop_at_r`, N is the number of masks used.
    """
    return run_step(state, opts, masks).maps


def run_step(state: StepState, opts: RiseOptions, masks: torch.Tensor) -> RiseRun:
    """`explain_step`'s maps with the masks used and the split-half r (RiseStats). masks: (N, h, w)."""
    return _explain(state, opts, masks, opts.batch_size)


def explain_step_reference(state: StepState, opts: RiseOptions, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference code's loop: one mask per UNet call (batch 2 with CFG). Same maps as `explain_step`.

    masks: (N, h, w). Kept as the equivalence oracle for tests and the benchmark's baseline.
    """
    return _explain(state, opts, masks, 1).maps


def split_halves(n: int, paired: bool) -> torch.Tensor:
    """(n,) int64: which half (0 or 1) each mask counts toward in the split-half r - alternate masks, or alternate
    pairs of masks (antithetic pairs, Sobol's consecutive points): a pair split across halves would make the two
    halves mirror each other (split-half r near 0 for Sobol at p = 0.5, where mask 2j + 1 = 1 - mask 2j)."""
    unit = 2 if paired else 1
    return (torch.arange(n) // unit) % 2


def _explain(state: StepState, opts: RiseOptions, masks: torch.Tensor, batch_size: int) -> RiseRun:
    """masks: (N, h, w) -> maps {"rise", "rise_raw", "rise_mean"}: (h, w) each, and RiseStats; `batch_size` masks
    per UNet call, stopping after a chunk once the split-half r reaches `opts.stop_at_r` (from `opts.min_masks`).
    With `opts.estimator` "regression", "rise" (and the split-half maps) come from the per-pixel fit
    (engine/rise_regression.py) instead of H / sum_k M_k."""
    # no_grad, not inference_mode: the conditioning cache filled here is reused by DF-CAM under autograd.
    with torch.no_grad():
        masks = masks.to(state.latent_in.device)
        sub = substrate(state.latent_in, opts)
        ref = reference(state, opts)
        fit = RegressionFit(state.latent_in, sub, ref, opts.p, opts.ssim_padding) \
            if opts.estimator == "regression" else None
        raw = torch.zeros(masks.shape[1:], dtype=torch.float32, device=masks.device)
        total = torch.zeros_like(raw)
        paired = opts.masks is None and (opts.antithetic or opts.sampler == "sobol")
        half = split_halves(len(masks), paired).to(masks.device)
        halves = raw.new_zeros(2, 2, *raw.shape)  # [half][sum_k M_k s_k, sum_k M_k]
        used, r, r_at = 0, None, -1
        for chunk in masks.split(batch_size):
            real = len(chunk)
            if state.runner.backend == "compile" and real < batch_size:
                # A compiled UNet recompiles for every new batch shape; all-zero masks pad the last chunk to
                # the compiled one at no cost to the map (their weight M_k is 0 everywhere).
                chunk = torch.cat([chunk, chunk.new_zeros(batch_size - real, *chunk.shape[1:])])
            s = masked_scores(state, opts, sub, ref, chunk)[:real]
            kept = chunk[:real].float()
            weighted = kept * s
            raw += weighted.sum(dim=0)
            total += s.sum(dim=0)
            which = half[used:used + real]
            halves[:, 0].index_add_(0, which, weighted)
            halves[:, 1].index_add_(0, which, kept)
            if fit is not None:
                fit.add(kept, s, which)
            used += real
            if opts.stop_at_r is not None and used >= opts.min_masks and not (paired and used % 2):
                r, r_at = split_half_r(halves, fit), used
                if r is not None and r >= opts.stop_at_r:
                    break
        if r_at != used:
            r = split_half_r(halves, fit)
        rise = normalise(raw, masks[:used])
        if fit is not None:
            rise = fit.map(rise)
        maps = {"rise": rise, "rise_raw": raw, "rise_mean": total / used}
        return RiseRun(maps, RiseStats(masks_used=used, masks_planned=len(masks), split_half_r=r,
                                       stop_at_r=opts.stop_at_r))


def split_half_r(halves: torch.Tensor, fit: RegressionFit | None = None) -> float | None:
    """Pearson r over pixels between the two halves' maps: count-normalised, or each half's regression fit.
    halves: (2, 2, h, w), per half the weighted sum and the mask count. None where undefined (a map constant,
    e.g. no mask of a half kept any pixel)."""
    maps = [normalised_by(h[0], h[1]) for h in halves]
    if fit is not None:
        maps = [fit.map(m, which=k) for k, m in enumerate(maps)]
    a, b = (m.double().flatten() for m in maps)
    a, b = a - a.mean(), b - b.mean()
    den = float((a.square().sum() * b.square().sum()).sqrt())
    return float((a * b).sum()) / den if den > 0 else None


def normalise(raw: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """RISE's conditional expectation H / sum_k M_k, 0 where the masks never keep a pixel.

    raw: (h, w); masks: (N, h, w) -> (h, w).
    """
    return normalised_by(raw, masks.float().sum(dim=0))


def normalised_by(raw: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """raw / count where count > 0, else 0. raw, count: (h, w) -> (h, w)."""
    return torch.where(count > 0, raw / count.where(count > 0, torch.ones_like(count)), torch.zeros_like(raw))
