"""DF-RISE's masks (docs/method.md, DF-RISE step 1): how the N masks of a request are drawn. Pure torch, no I/O.

A mask value comes from a uniform draw U per latent pixel (pixel masks) or per grid cell (grid masks): kept where
U < p. The sampler decides how the draws of the N masks relate to each other:
- mc: independent draws from a CPU generator seeded with the request's seed (the reference code's masks; the
  default, bit for bit the masks of every earlier release, so old audit records replay);
- stratified: for each pixel (cell) an independent random permutation gives each of the N draws its own stratum
  [j / N, (j + 1) / N), jittered inside it (Latin hypercube): every pixel is kept round(N p) times, to within 1;
- sobol: scrambled Sobol points (torch.quasirandom.SobolEngine, scrambled with the seed), one dimension per pixel
  (cell); at most SOBOL_MAX_DIM of them. Sobol's balance holds for power-of-two prefixes: N = 2^k suits it. At
  p = 0.5 only a point's first binary digit decides, an affine function of the point's index bits: mask 2j + 1 is
  exactly 1 - mask 2j, another seed flips whole pixels' patterns, and the N masks give each pixel one of at most N
  patterns (up to complement N/2), so pixels share patterns where N/2 < h w.
Antithetic masks come in pairs from one draw U: M keeps where U < p, its partner where U >= 1 - p (for p = 0.5
exactly 1 - M); the pair is adjacent (masks 2j, 2j + 1) and shares a grid mask's crop offset.
Everything is drawn on the CPU, so the same options give the same masks on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from difflens.engine.options import RiseOptions
from difflens.errors import InvalidArgument

STRATA_CHUNK = 1024  # pixels whose strata are permuted at once: bounds the memory of a large stratified draw


def make_masks(opts: RiseOptions, size: tuple[int, int], device: torch.device | str) -> torch.Tensor:
    """The N masks of a request: (N, h, w) float32 in [0, 1] on `device`, with size = (h, w) the latent size.

    Explicit `opts.masks` (N, h, w) are checked and used as given; otherwise they are drawn on the CPU from the
    seed `opts.seed` by `opts.sampler` (antithetic pairs with `opts.antithetic`).
    """
    if opts.masks is not None:
        return checked_masks(opts.masks, size).to(device=device, dtype=torch.float32)
    opts.check_latent(size)
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    if opts.sampler == "mc" and not opts.antithetic:  # the reference's draws, in their order
        if opts.mask == "grid":
            return grid_masks(opts.num_masks, size, opts.grid_size, opts.p, gen).to(device)
        return pixel_masks(opts.num_masks, size, opts.p, gen).to(device)
    draws = opts.num_masks // 2 if opts.antithetic else opts.num_masks
    s = opts.grid_size
    u = uniforms(opts.sampler, draws, s * s if opts.mask == "grid" else size[0] * size[1], gen, opts.seed)
    kept = keep(u, opts.p, opts.antithetic)  # (N, dims)
    if opts.mask == "grid":
        cells = kept.float().view(-1, 1, s, s)
        dy, dx = crop_offsets(draws, size, s, gen)
        if opts.antithetic:
            dy, dx = dy.repeat_interleave(2), dx.repeat_interleave(2)
        return upsampled_crops(cells, size, dy.tolist(), dx.tolist()).to(device)
    return kept.float().view(-1, *size).to(device)


def checked_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
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
    cells = (torch.rand(n, 1, s, s, generator=gen) < p).float()
    dy, dx = crop_offsets(n, size, s, gen)
    return upsampled_crops(cells, size, dy.tolist(), dx.tolist())


def crop_offsets(n: int, size: tuple[int, int], s: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n row offsets in [0, ceil(h/s)), then n column offsets in [0, ceil(w/s)): two (n,) int64."""
    dy = torch.randint(0, math.ceil(size[0] / s), (n,), generator=gen)
    dx = torch.randint(0, math.ceil(size[1] / s), (n,), generator=gen)
    return dy, dx


def upsampled_crops(cells: torch.Tensor, size: tuple[int, int], dy: list[int], dx: list[int]) -> torch.Tensor:
    """cells: (n, 1, s, s) in [0, 1] -> (n, h, w): each upsampled as `grid_masks` says and cropped at (dy, dx)."""
    h, w = size
    s = cells.shape[-1]
    ch, cw = math.ceil(h / s), math.ceil(w / s)
    up = F.interpolate(cells, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp_(0, 1)  # interpolation weights can round 1 up to 1 + 1 ulp
    return torch.stack([up[k, y:y + h, x:x + w] for k, (y, x) in enumerate(zip(dy, dx, strict=True))])


def uniforms(sampler: str, n: int, dims: int, gen: torch.Generator, seed: int) -> torch.Tensor:
    """n draws of `dims` uniforms on [0, 1): (n, dims) float32 (mc) or float64 (stratified, sobol)."""
    if sampler == "mc":
        return torch.rand(n, dims, generator=gen)
    if sampler == "stratified":
        return stratified_uniforms(n, dims, gen)
    if sampler == "sobol":
        return torch.quasirandom.SobolEngine(dims, scramble=True, seed=seed).draw(n, dtype=torch.float64)
    raise ValueError(f"sampler: got {sampler!r}")


def stratified_uniforms(n: int, dims: int, gen: torch.Generator) -> torch.Tensor:
    """Latin hypercube: (n, dims) float64 where column d holds one draw from each stratum [j/n, (j+1)/n), in a
    random order of its own (a permutation per column, from argsort of uniforms), jittered within the stratum."""
    out = torch.empty(n, dims, dtype=torch.float64)
    for lo in range(0, dims, STRATA_CHUNK):
        hi = min(dims, lo + STRATA_CHUNK)
        # (n, chunk): draw k's stratum. float64 and a stable sort: no ties to order differently elsewhere
        strata = torch.rand(hi - lo, n, generator=gen, dtype=torch.float64).argsort(dim=1, stable=True).T
        jitter = torch.rand(n, hi - lo, generator=gen, dtype=torch.float64)
        out[:, lo:hi] = (strata + jitter) / n
    return out


def keep(u: torch.Tensor, p: float, antithetic: bool) -> torch.Tensor:
    """u: (n, dims) uniforms -> (n, dims) bool, U < p; antithetic: (2n, dims), each draw's U < p followed by its
    partner U >= 1 - p (the mirrored draw 1 - U <= p: exactly the complement for p = 0.5)."""
    kept = u < p
    if not antithetic:
        return kept
    return torch.stack([kept, u >= 1 - p], dim=1).flatten(0, 1)
