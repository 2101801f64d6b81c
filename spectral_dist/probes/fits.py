"""Power-law fits of a layer's curvature spectrum: h_k ~ sigma_k^alpha, sigma_k ~ k^-gamma, h_k ~ k^-s.

Fit rule (one index set K for all three fits, so that for an exact power law s = alpha * gamma holds
algebraically and the measured ``rel_err`` tests the data, not the bookkeeping):

    K = { k : h_k > 0  and  sigma_k > rel_floor * sigma_1 }

Indices with h_k <= 0 are excluded from the log-log fits but reported through ``negative_fraction`` (the
fraction of the k with sigma_k > rel_floor * sigma_1 where h_k < 0), so negative curvature is visible rather than
hidden; the participation ratio uses the positive h_k among those k. The default floor 1e-6 only drops
directions where the gradient is numerically rank deficient (e.g. beyond the batch's rank). Fewer than ``MIN_POINTS`` indices in K give
NaN exponents.

Transfer test on independent data (:func:`fit_mask`, :func:`transfer_fit`): alpha, gamma and s may come from
different measurements (alpha from one batch's h_k along its gradient directions, gamma from another batch's
gradient spectrum, s from a third batch's curvature spectrum), all fitted on one explicit index set K that
:func:`fit_mask` builds from a k range and every vector involved.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DEFAULT_REL_FLOOR",
    "MIN_POINTS",
    "fit_index_set",
    "fit_mask",
    "loglog_fit",
    "loglog_slope",
    "participation_ratio",
    "pr_bound",
    "spectrum_fits",
    "transfer_fit",
]

DEFAULT_REL_FLOOR = 1e-6
MIN_POINTS = 3


def fit_index_set(sigma: torch.Tensor, h: torch.Tensor, rel_floor: float = DEFAULT_REL_FLOOR) -> torch.Tensor:
    """Boolean mask of the indices used by the fits (see the module docstring)."""
    if not 0 <= rel_floor < 1:
        raise ValueError(f"rel_floor must be in [0, 1), got {rel_floor!r}")
    sigma, h = sigma.double(), h.double()
    if sigma.numel() == 0 or sigma[0] <= 0:
        return torch.zeros_like(sigma, dtype=torch.bool)
    return (h > 0) & (sigma > rel_floor * sigma[0]) & torch.isfinite(h)


def loglog_slope(x: torch.Tensor, y: torch.Tensor) -> float:
    """Least-squares slope of log y on log x (x, y > 0); NaN for fewer than ``MIN_POINTS`` points or
    a constant x."""
    x, y = x.double(), y.double()
    if x.numel() < MIN_POINTS:
        return math.nan
    lx, ly = x.log(), y.log()
    lx = lx - lx.mean()
    denom = (lx * lx).sum()
    if denom <= 1e-24:
        return math.nan
    return float((lx * (ly - ly.mean())).sum() / denom)


def participation_ratio(h: torch.Tensor) -> float:
    """(sum h_k)^2 / sum h_k^2 over the positive h_k (an effective number of curved directions)."""
    h = h.double()
    h = h[h > 0]
    if h.numel() == 0:
        return math.nan
    return float(h.sum() ** 2 / (h * h).sum())


def pr_bound(s: float) -> float:
    """zeta(s)^2 / zeta(2 s): the participation ratio of h_k = k^-s summed over all k (infinite for s <= 1)."""
    if not math.isfinite(s):
        return math.nan
    if s <= 1.0:
        return math.inf
    x = torch.tensor([s, 2.0 * s], dtype=torch.float64)
    z = torch.special.zeta(x, torch.ones_like(x))  # Hurwitz zeta at q = 1: Riemann's zeta (as scipy's)
    return float(z[0] ** 2 / z[1])


def spectrum_fits(sigma: torch.Tensor, h: torch.Tensor, rel_floor: float = DEFAULT_REL_FLOOR) -> dict:
    """alpha, gamma, s, s_pred = alpha * gamma, rel_err, participation ratio and its bound, negative fraction.

    Args:
        sigma: singular values of the layer's gradient, descending (length top_k).
        h: curvature along the matching singular directions, h_k = <E_k, H E_k>.
        rel_floor: singular values at or below ``rel_floor * sigma_1`` are left out of the fits.
    """
    sigma, h = sigma.detach().double().cpu(), h.detach().double().cpu()
    mask = fit_index_set(sigma, h, rel_floor)
    k = torch.arange(1, sigma.numel() + 1, dtype=torch.float64)
    alpha = loglog_slope(sigma[mask], h[mask])
    gamma = -loglog_slope(k[mask], sigma[mask])
    s = -loglog_slope(k[mask], h[mask])
    s_pred = alpha * gamma
    rel_err = abs(s - s_pred) / abs(s) if math.isfinite(s) and s != 0 else math.nan
    measured = torch.isfinite(h) & (sigma > rel_floor * sigma[0]) if sigma.numel() else torch.isfinite(h)
    nmeas = int(measured.sum())
    neg = float((h[measured] < 0).sum()) / nmeas if nmeas else math.nan
    return dict(
        alpha=alpha,
        gamma=gamma,
        s=s,
        s_pred=s_pred,
        rel_err=rel_err,
        participation_ratio=participation_ratio(h[measured]),
        pr_bound=pr_bound(s),
        negative_fraction=neg,
        n_fit=int(mask.sum()),
    )


def loglog_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(slope, R^2) of the least-squares fit of log y on log x (x, y > 0); (NaN, NaN) as for
    :func:`loglog_slope`. R^2 near 1 says y is close to a power of x over these points."""
    slope = loglog_slope(x, y)
    if not math.isfinite(slope):
        return math.nan, math.nan
    lx, ly = x.double().log(), y.double().log()
    lx, ly = lx - lx.mean(), ly - ly.mean()
    ss = float((ly * ly).sum())
    if ss <= 1e-24:
        return slope, 1.0
    res = ly - slope * lx
    return slope, 1.0 - float((res * res).sum()) / ss


def fit_mask(
    length: int,
    k_range: tuple[int, int] | None = None,
    rel_floor: float = DEFAULT_REL_FLOOR,
    sigmas=(),
    curvatures=(),
) -> torch.Tensor:
    """The one index set K (boolean mask over k = 1..length) shared by every fit of a transfer test:

        K = { k in [k_lo, k_hi] :  sigma_k > rel_floor * sigma_1 for every gradient spectrum in ``sigmas``,
                                   h_k finite and > 0 for every curvature vector in ``curvatures`` }

    ``k_range`` is 1-based and inclusive (None: every k). Vectors shorter than ``length`` leave the
    missing k out. Using one K for the same-point and the independent fits keeps the two comparable."""
    if not 0 <= rel_floor < 1:
        raise ValueError(f"rel_floor must be in [0, 1), got {rel_floor!r}")
    mask = torch.ones(length, dtype=torch.bool)
    if k_range is not None:
        lo, hi = int(k_range[0]), int(k_range[1])
        if lo < 1 or hi < lo:
            raise ValueError(f"k_range must be (k_lo, k_hi) with 1 <= k_lo <= k_hi, got {k_range!r}")
        k = torch.arange(1, length + 1)
        mask &= (k >= lo) & (k <= hi)

    def pad(v):
        v = v.detach().double().cpu().reshape(-1)[:length]
        out = torch.full((length,), math.nan, dtype=torch.float64)
        out[: v.numel()] = v
        return out

    for sig in sigmas:
        sig = pad(sig)
        ok = torch.isfinite(sig) & (sig > 0)
        mask &= ok & (sig > rel_floor * sig[0]) if bool(ok[0]) else torch.zeros_like(mask)
    for h in curvatures:
        h = pad(h)
        mask &= torch.isfinite(h) & (h > 0)
    return mask


def transfer_fit(
    sigma_alpha: torch.Tensor,
    h_alpha: torch.Tensor,
    sigma_gamma: torch.Tensor,
    h_s: torch.Tensor,
    mask: torch.Tensor,
) -> dict:
    """The transfer identity s = alpha * gamma from (possibly) different measurements, all fitted on ``mask``:

    * alpha: slope of log h_alpha on log sigma_alpha (curvature along one batch's gradient directions);
    * gamma: minus the slope of log sigma_gamma on log k (a gradient spectrum);
    * s: minus the slope of log h_s on log k (a curvature spectrum);
    * s_pred = alpha * gamma, rel_err = abs(s - s_pred) / abs(s), alpha_r2 (R^2 of the alpha fit), n_fit.

    With all four vectors from one batch (h_s = h_alpha, sigma_gamma = sigma_alpha) and an exact power law
    sigma_k = k^-gamma, s = alpha * gamma holds for any h (the regressions on log sigma and on log k are the same
    regression): only measurements from independent data test the identity."""
    vecs = [v.detach().double().cpu().reshape(-1) for v in (sigma_alpha, h_alpha, sigma_gamma, h_s)]
    n = min([int(mask.numel())] + [v.numel() for v in vecs])
    mask = mask[:n].cpu()
    sa, ha, sg, hs = (v[:n][mask] for v in vecs)
    k = torch.arange(1, n + 1, dtype=torch.float64)[mask]
    alpha, r2 = loglog_fit(sa, ha)
    gamma = -loglog_slope(k, sg)
    s = -loglog_slope(k, hs)
    s_pred = alpha * gamma
    rel_err = abs(s - s_pred) / abs(s) if math.isfinite(s) and math.isfinite(s_pred) and s != 0 else math.nan
    return dict(
        alpha=alpha, gamma=gamma, s=s, s_pred=s_pred, rel_err=rel_err, alpha_r2=r2, n_fit=int(mask.sum())
    )
