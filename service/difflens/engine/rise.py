"""DF-RISE: perturbation saliency of one denoising step (METHOD.md, section DF-RISE).

Masks multiply the step's UNet input; the guided outputs of the masked latents are compared, pixel by pixel, with
a reference (the unmasked eps_w, or x_{t_next} for parity with the reference code); H = sum_k M_k * s_k.
Masks are evaluated `batch_size` at a time, one UNet call per chunk holding both CFG branches, and H is
accumulated chunk by chunk so memory does not grow with the number of masks. Pure torch, no I/O.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from difflens.engine.options import RiseOptions, SsimPadding, check_range
from difflens.engine.sampler import StepState
from difflens.errors import InvalidArgument

SSIM_WINDOW = 15
SSIM_SIGMA = 1.5
SSIM_C2 = (0.03 * 1.0) ** 2  # dynamic range L = 1, as the reference code
SSIM_C3 = SSIM_C2 / 2
BLUR_SIZE = 11
BLUR_SIGMA = 5.0


# --- masks -----------------------------------------------------------------------------------------------------


def make_masks(opts: RiseOptions, size: tuple[int, int], device: torch.device | str) -> torch.Tensor:
    """The N masks of a request: (N, h, w) float32 in [0, 1] on `device`, with size = (h, w) the latent size.

    Explicit `opts.masks` (N, h, w) are checked and used as given; otherwise they are drawn from a CPU generator
    seeded with `opts.seed`, so the same options give the same masks on any device.
    """
    if opts.masks is not None:
        return _checked_masks(opts.masks, size).to(device=device, dtype=torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    if opts.mask == "grid":
        check_range("rise.grid_size", opts.grid_size, 1, min(size))  # no cell smaller than a latent pixel
        masks = grid_masks(opts.num_masks, size, opts.grid_size, opts.p, gen)
    else:
        masks = pixel_masks(opts.num_masks, size, opts.p, gen)
    return masks.to(device)


def _checked_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """masks: (N, h, w), must match the latent size and lie in [0, 1] (NaN fails the range check)."""
    h, w = size
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (h, w) or masks.shape[0] == 0:
        raise InvalidArgument("rise.masks", f"expected shape (N, {h}, {w}) with N >= 1 (the latent size), "
                                            f"got {tuple(masks.shape)}")
    if not bool(((masks >= 0) & (masks <= 1)).all()):
        raise InvalidArgument("rise.masks", "values must lie in [0, 1]")
    return masks


def pixel_masks(n: int, size: tuple[int, int], p: float, gen: torch.Generator) -> torch.Tensor:
    """Binary masks at latent resolution, M = (U < p): (n, h, w) float32 (the reference code's masks)."""
    return (torch.rand(n, *size, generator=gen) < p).float()


def grid_masks(n: int, size: tuple[int, int], s: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Original RISE masks: (n, h, w) float32 in [0, 1].

    An s x s Bernoulli(p) grid is bilinearly upsampled to ((s+1) * ceil(h/s), (s+1) * ceil(w/s)) and cropped to
    h x w at a random offset in [0, ceil(h/s)) x [0, ceil(w/s)), one offset per mask. Upsampling uses torch's
    half-pixel bilinear (align_corners=False), which replicates the border where RISE's skimage resize mirrors it:
    only the outer half cell differs.
    """
    h, w = size
    ch, cw = math.ceil(h / s), math.ceil(w / s)
    cells = (torch.rand(n, 1, s, s, generator=gen) < p).float()
    up = F.interpolate(cells, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp_(0, 1)  # interpolation weights can round 1 up to 1 + 1 ulp
    dy = torch.randint(0, ch, (n,), generator=gen).tolist()
    dx = torch.randint(0, cw, (n,), generator=gen).tolist()
    return torch.stack([up[k, y:y + h, x:x + w] for k, (y, x) in enumerate(zip(dy, dx, strict=True))])


# --- scores ----------------------------------------------------------------------------------------------------


def gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian window: (size,). The 2-D window is its outer product (also normalised)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(device=device, dtype=dtype)


def gaussian_filter(z: torch.Tensor, size: int, sigma: float, padding_mode: str = "zeros") -> torch.Tensor:
    """Depthwise Gaussian filter of every channel, output the same size. z: (B, C, h, w) -> (B, C, h, w).

    The separable window applied as two matrix products, K_h @ z @ K_w^T, where row i of K_n holds the 1-D taps
    around i with the padding folded in (zero: taps past the edge dropped; reflect: mirrored back inside as
    F.pad's "reflect" does). The same linear operator as the padded 2-D outer-product window, and 4-13x faster
    than a grouped convolution on a CPU for maps of 16 to 128 pixels a side.
    """
    h, w = z.shape[-2:]
    k_h = filter_matrix(h, size, sigma, padding_mode, z.dtype, z.device)
    k_w = k_h if w == h else filter_matrix(w, size, sigma, padding_mode, z.dtype, z.device)
    return k_h @ z @ k_w.T


@functools.lru_cache(maxsize=32)
def filter_matrix(n: int, size: int, sigma: float, padding_mode: str, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """(n, n) matrix of the 1-D Gaussian filter over n samples: out = K @ z. padding_mode: zeros | reflect."""
    pad = size // 2
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding_mode: got {padding_mode!r}; allowed: zeros, reflect")
    if padding_mode == "reflect" and pad >= n:
        raise ValueError(f"reflect padding of a {size}-tap window needs more than {pad} samples a side, got {n}")
    src = torch.arange(n)[:, None] + torch.arange(size)[None, :] - pad  # (n, size): the sample each tap reads
    taps = gaussian_1d(size, sigma, torch.float64, torch.device("cpu")).expand(n, size)
    if padding_mode == "reflect":
        src = torch.where(src < 0, -src, torch.where(src >= n, 2 * (n - 1) - src, src))
    inside = (src >= 0) & (src < n)
    k = torch.zeros(n, n, dtype=torch.float64)
    k.index_put_((torch.arange(n)[:, None].expand(n, size)[inside], src[inside]), taps[inside], accumulate=True)
    return k.to(device=device, dtype=dtype)


def _local_stats(z: torch.Tensor, mode: str = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian-weighted local mean and variance (clamped at 0). z: (B, C, h, w) -> two (B, C, h, w)."""
    c = z.shape[1]
    both = gaussian_filter(torch.cat([z, z * z], dim=1), SSIM_WINDOW, SSIM_SIGMA, mode)
    mu, mean_sq = both[:, :c], both[:, c:]
    return mu, (mean_sq - mu * mu).clamp_min(0)


def ssim_structure(x: torch.Tensor, y: torch.Tensor, *, double_covariance: bool = False,
                   padding: SsimPadding = "zero") -> torch.Tensor:
    """SSIM structure term per pixel, averaged over channels. x, y: (B, C, h, w) -> (B, h, w).

    Per channel S = (sigma_xy + C3) / (sigma_x * sigma_y + C3) with C3 = C2 / 2, C2 = (0.03 * 1)^2; local
    statistics from the normalised 15 x 15 Gaussian window (sigma 1.5) with zero padding 7, so the map keeps the
    input size. Variances are clamped at 0 before the square root (the reference code can produce NaN there).
    Statistics are computed in float64 (E[z^2] - E[z]^2 cancels in float32 where the local variance is small
    against the mean); the result comes back in the inputs' dtype. Either batch may be 1 and is then broadcast
    against the other (its statistics are computed once).
    double_covariance: the reference code's 2 * sigma_xy numerator (parity option).
    padding: "reflect" mirrors the border pixels into the window instead of zeros (needs h, w > 7).
    """
    mode = "zeros" if padding == "zero" else "reflect"
    dtype = torch.promote_types(x.dtype, y.dtype)
    x, y = x.double(), y.double()
    mu_x, var_x = _local_stats(x, mode)
    mu_y, var_y = _local_stats(y, mode)
    cov = gaussian_filter(x * y, SSIM_WINDOW, SSIM_SIGMA, mode) - mu_x * mu_y
    num = (2 * cov if double_covariance else cov) + SSIM_C3
    return (num / (var_x.sqrt() * var_y.sqrt() + SSIM_C3)).mean(dim=1).to(dtype)


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


def masked_contribution(state: StepState, opts: RiseOptions, sub: torch.Tensor | None, ref: torch.Tensor,
                        masks: torch.Tensor, real: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_k M_k * s_k and sum_k s_k over one chunk of masks, in ONE guided UNet call (both CFG branches).

    sub: (1, C, h, w) or None; ref: (1, C, h, w) float32; masks: (B, h, w) -> two (h, w) float32. `real`: only
    the first `real` masks count toward sum_k s_k (the rest pad a compiled batch). Scores are computed in
    float32 whatever the model's dtype (local variances in fp16 lose everything).
    """
    eps = state.runner.guided(perturb(state.latent_in, masks, sub), state.t, state.cond)
    s = score(ref, eps.float(), opts)
    return (masks.float() * s).sum(dim=0), s[:real].sum(dim=0)


def explain_step(state: StepState, opts: RiseOptions, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """DF-RISE maps of one step, masks evaluated `opts.batch_size` per UNet call. masks: (N, h, w) in [0, 1].

    Returns rise: (h, w) H / sum_k M_k (0 where no mask covers a pixel), rise_raw: (h, w) H = sum_k M_k s_k, and
    rise_mean: (h, w) sum_k s_k / N, the score whatever the pixel's own mask. The score is a 15 x 15 window
    statistic, so rise can be dominated by rise_mean (how much masking anything disturbs the prediction there);
    rise - rise_mean is what the pixel's own mask adds.
    """
    return _explain(state, opts, masks, opts.batch_size)


def explain_step_reference(state: StepState, opts: RiseOptions, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference code's loop: one mask per UNet call (batch 2 with CFG). Same maps as `explain_step`.

    masks: (N, h, w). Kept as the equivalence oracle for tests and the benchmark's baseline.
    """
    return _explain(state, opts, masks, 1)


def _explain(state: StepState, opts: RiseOptions, masks: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """masks: (N, h, w) -> {"rise", "rise_raw", "rise_mean"}: (h, w) each; `batch_size` masks per UNet call."""
    # no_grad, not inference_mode: the conditioning cache filled here is reused by DF-CAM under autograd.
    with torch.no_grad():
        masks = masks.to(state.latent_in.device)
        sub = substrate(state.latent_in, opts)
        ref = reference(state, opts)
        raw = torch.zeros(masks.shape[1:], dtype=torch.float32, device=masks.device)
        total = torch.zeros_like(raw)
        for chunk in masks.split(batch_size):
            real = len(chunk)
            if state.runner.backend == "compile" and real < batch_size:
                # A compiled UNet recompiles for every new batch shape; all-zero masks pad the last chunk to
                # the compiled one at no cost to the map (their weight M_k is 0 everywhere).
                chunk = torch.cat([chunk, chunk.new_zeros(batch_size - real, *chunk.shape[1:])])
            weighted, summed = masked_contribution(state, opts, sub, ref, chunk, real)
            raw += weighted
            total += summed
        return {"rise": normalise(raw, masks), "rise_raw": raw, "rise_mean": total / len(masks)}


def normalise(raw: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """RISE's conditional expectation H / sum_k M_k, 0 where the masks never keep a pixel.

    raw: (h, w); masks: (N, h, w) -> (h, w).
    """
    count = masks.float().sum(dim=0)
    return torch.where(count > 0, raw / count.where(count > 0, torch.ones_like(count)), torch.zeros_like(raw))
