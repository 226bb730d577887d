"""DF-RISE's regression estimator (docs/method.md, "The regression estimator"): RISE's map from fewer masks.

RISE's ratio H / sum_k M_k averages a pixel's score over the masks that keep the pixel: it estimates
E[s(u) | M(u) = 1]. Most of the score's spread from mask to mask does not come from the pixel's own bit but from
which of its neighbours a mask keeps (the structure score is a 15 x 15 window statistic, and the UNet sees the whole
masked latent). Per pixel u this module fits, by ordinary least squares over the masks, s_k(u) on
[1, M_k(u), X_k(u)], where each covariate is linear in the mask, X(u) = sum_v a(u, v) M(v), so that its
expectation given M(u) = 1 follows from the design alone: with every pixel kept with probability p independently of
the others (the mc, stratified and sobol samplers, antithetic or not, all draw each mask so),
E[X(u) | M(u) = 1] = a(u, u) + p sum_{v != u} a(u, v) = p X[all kept](u) + (1 - p) a(u, u).
The map is b_0 + b_1 + b^T E[X(u) | M(u) = 1]. Least-squares residuals are orthogonal to 1 and M(u), so their
mean over the masks that keep u is 0: the map estimates E[s(u) | M(u) = 1], the ratio's quantity, whatever the
covariates are. Covariates that follow the score only shrink its noise.

The two covariates (Gaussian window w of the structure score, 15 x 15, sigma 1.5, the score's padding):
- energy: sum_v w(u, v) mean_c (x_c(v) - sub_c(v))^2 M(v), the part of the perturbation's energy inside u's window
  that the mask keeps (x the step's UNet input, sub what masked pixels become);
- alignment: sum_v w(u, v) mean_c (r_c(v) - mu_c(u)) / sd_c(u) M(v), the kept pixels' reference standardised
  within u's window (r the reference the scores compare with; sd_c^2 = its local variance + C3).
On the shipped model they explain 88-94% of the score's variance across masks where the pixel's own bit explains
12% (docs/benchmarks-masks.md).

Sufficient statistics (X^T X and X^T s per pixel, float64) are accumulated chunk by chunk like the ratio's H, so
memory does not grow with the masks. Where a pixel's fit is singular (fewer masks than coefficients, a pixel kept
by every mask or by none), the map falls back to the ratio there. Pure torch, no I/O.
"""

from __future__ import annotations

import torch

from difflens.engine.ssim import SSIM_C3, SSIM_SIGMA, SSIM_WINDOW, filter_matrix, gaussian_filter

COEFFICIENTS = 4  # intercept, own bit, energy, alignment
RCOND = 1e-7  # a fit whose column-scaled X^T X has eigenvalues spread wider than this falls back to the ratio


class RegressionFit:
    """Per-pixel least squares of one step's scores on [1, M(u), energy(u), alignment(u)], accumulated by chunk.

    x: (1, C, h, w) the UNet input; sub: (1, C, h, w) or None (zero substrate); ref: (1, C, h, w) the reference;
    p: the keep probability; padding: the structure score's "zero" | "reflect"; halves: how many separate fits to
    keep (the split-half r keeps two).
    """

    def __init__(self, x: torch.Tensor, sub: torch.Tensor | None, ref: torch.Tensor, p: float, padding: str,
                 halves: int = 2) -> None:
        self.mode = "zeros" if padding == "zero" else "reflect"
        x, ref = x.double(), ref.double()
        perturbation = x if sub is None else x - sub.double()
        self.energy = perturbation.square().mean(dim=1, keepdim=True)  # (1, 1, h, w)
        self.ref = ref
        mu = self._filter(ref)
        self.mu = mu
        self.sd = ((self._filter(ref * ref) - mu * mu).clamp_min(0) + SSIM_C3).sqrt()  # (1, C, h, w)
        h, w = ref.shape[-2:]
        # E[X(u) | M(u) = 1] = p X[all kept](u) + (1 - p) a(u, u); a(u, u) = w(u, u) f_u(u), w(u, u) the window's
        # own weight (the filter matrices' diagonals: their outer product, with the padding folded in).
        own = torch.outer(self._diag(h), self._diag(w))
        kept = self.covariates(torch.ones(1, h, w, dtype=torch.float64, device=ref.device))[0]  # (h, w, 2)
        own_terms = torch.stack([own * self.energy[0, 0],
                                 own * ((ref - mu) / self.sd).mean(dim=1)[0]], dim=-1)
        one = torch.ones(h, w, 1, dtype=torch.float64, device=ref.device)
        self.at_kept = torch.cat([one, one, p * kept + (1 - p) * own_terms], dim=-1)  # (h, w, 4)
        self.xtx = torch.zeros(halves, h, w, COEFFICIENTS, COEFFICIENTS, dtype=torch.float64, device=ref.device)
        self.xts = torch.zeros(halves, h, w, COEFFICIENTS, dtype=torch.float64, device=ref.device)

    def _filter(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_filter(z, SSIM_WINDOW, SSIM_SIGMA, self.mode)

    def _diag(self, n: int) -> torch.Tensor:
        return filter_matrix(n, SSIM_WINDOW, SSIM_SIGMA, self.mode, torch.float64, self.ref.device).diagonal()

    def covariates(self, masks: torch.Tensor) -> torch.Tensor:
        """masks: (B, h, w) -> (B, h, w, 2) float64: energy and alignment of each mask at each pixel."""
        m = masks.double()[:, None]
        c = self.ref.shape[1]
        # one filter call: [energy * M, ref_1 * M, ..., ref_C * M, M]
        f = self._filter(torch.cat([self.energy * m, self.ref * m, m], dim=1))
        energy = f[:, 0]
        alignment = ((f[:, 1:1 + c] - self.mu * f[:, 1 + c:]) / self.sd).mean(dim=1)
        return torch.stack([energy, alignment], dim=-1)

    def add(self, masks: torch.Tensor, scores: torch.Tensor, half: torch.Tensor) -> None:
        """masks, scores: (B, h, w); half: (B,) int64, the fit each mask counts toward."""
        design = torch.cat([torch.ones_like(masks, dtype=torch.float64)[..., None], masks.double()[..., None],
                            self.covariates(masks)], dim=-1)  # (B, h, w, 4)
        s = scores.double()
        for k in range(self.xtx.shape[0]):
            sel = half == k
            if bool(sel.any()):
                d = design[sel]
                self.xtx[k] += torch.einsum("bhwi,bhwj->hwij", d, d)
                self.xts[k] += torch.einsum("bhwi,bhw->hwi", d, s[sel])

    def map(self, ratio: torch.Tensor, which: int | None = None) -> torch.Tensor:
        """The (h, w) float32 estimate of E[s(u) | M(u) = 1] from every fit (which=None) or from one; `ratio`:
        (h, w), the ratio estimate over the same masks, used where the fit is singular."""
        xtx = self.xtx.sum(dim=0) if which is None else self.xtx[which]
        xts = self.xts.sum(dim=0) if which is None else self.xts[which]
        scale = xtx.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()  # column scaling: a unit diagonal
        a = xtx / (scale[..., :, None] * scale[..., None, :])
        eig = torch.linalg.eigvalsh(a)
        ok = eig[..., 0] > RCOND * eig[..., -1].clamp_min(1e-300)
        eye = torch.eye(COEFFICIENTS, dtype=a.dtype, device=a.device)
        b = torch.linalg.solve(torch.where(ok[..., None, None], a, eye), (xts / scale)[..., None])[..., 0] / scale
        value = (b * self.at_kept).sum(dim=-1)
        return torch.where(ok, value, ratio.double()).float()
