"""The spectral preconditioner T(sigma; alpha) = sigma / (sigma^alpha + lambda).

Newton along the rank-one direction E_k = u_k v_k^T takes a step sigma_k / h_k. When curvature follows
h_k ~ sigma_k^alpha this is sigma_k^(1 - alpha): alpha = 0 is (damped) SGD, alpha = 1 is the polar factor
(Muon's orthogonalised update), alpha = 2 a damped pseudo-inverse. lambda = damping * sigma_1^alpha keeps
the step bounded for small singular values and makes T invariant to the overall scale of G up to the
factor sigma_1^(1 - alpha).
"""

from __future__ import annotations

import math

import torch

__all__ = ["spectral_transform", "inverse_transform", "check_alpha", "check_damping", "rank_floor"]


def check_alpha(alpha) -> float:
    """Validate a numeric curvature exponent; returns it as float."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha must be a number >= 0 (or 'auto' in the optimizer), got {alpha!r}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return float(alpha)


def check_damping(damping) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    return float(damping)


def rank_floor(m: int, n: int, dtype: torch.dtype, squared: bool = False) -> float:
    """Relative floor: sigma_k <= floor * sigma_1 is numerically zero.

    LAPACK's rank rule max(m, n) * eps for singular values from an SVD; its square root for singular values
    recovered from a Gram eigendecomposition (squaring G doubles the relative error in sigma).
    """
    f = max(m, n) * torch.finfo(dtype).eps
    return math.sqrt(f) if squared else f


def inverse_transform(sigma: torch.Tensor, alpha: float, damping: float, floor: float) -> torch.Tensor:
    """T(sigma)/sigma = 1 / (sigma^alpha + lambda), zero where sigma <= floor * sigma_1.

    Written without dividing by sigma, so the Gram and tracked paths (D = G V diag(T/sigma) V^T) stay finite
    for rank-deficient G. sigma has shape (..., r), in any order; sigma_1 is its max.
    """
    sigma = sigma.clamp_min(0)
    smax = sigma.amax(dim=-1, keepdim=True)
    lam = damping * smax.pow(alpha)
    denom = sigma.pow(alpha) + lam
    valid = (sigma > floor * smax) & (denom > 0)
    return torch.where(
        valid, 1.0 / torch.where(valid, denom, torch.ones_like(denom)), torch.zeros_like(denom)
    )


def spectral_transform(sigma: torch.Tensor, alpha: float, damping: float = 1e-4) -> torch.Tensor:
    """T(sigma; alpha) = sigma / (sigma^alpha + damping * sigma_1^alpha) for sigma of shape (..., r).

    An all-zero sigma gives zeros (never NaN). Numerically-zero singular values map to 0.
    """
    alpha = check_alpha(alpha)
    damping = check_damping(damping)
    r = sigma.shape[-1]
    return sigma.clamp_min(0) * inverse_transform(sigma, alpha, damping, rank_floor(r, r, sigma.dtype))
