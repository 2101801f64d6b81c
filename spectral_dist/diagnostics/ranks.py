"""Predictable rank and effective rank of a window of sketch increments (pure tensor math).

The increments ``dz_t = z_t - z_{t-1}`` of a window form a ``(T-1, d)`` matrix; its squared singular
values are the energy the increments spend along each temporal direction. A low predictable rank means
the gradient moves in a low-dimensional subspace over the window.
"""

from __future__ import annotations

import torch

__all__ = ["increment_spectrum", "predictable_rank", "effective_rank"]


def increment_spectrum(window: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of the increments of ``window`` (``(..., T, d)``, T >= 2)."""
    if window.dim() < 2 or window.shape[-2] < 2:
        raise ValueError(f"window must hold at least 2 sketches, got shape {tuple(window.shape)}")
    inc = window[..., 1:, :] - window[..., :-1, :]
    return torch.linalg.svdvals(inc.to(torch.float64))


def predictable_rank(singular_values: torch.Tensor, energy: float = 0.9) -> torch.Tensor:
    """Smallest r whose top-r squared singular values hold ``energy`` of the total (0 for no motion).

    Args:
        singular_values: ``(..., k)`` descending, e.g. from :func:`increment_spectrum`.
        energy: Fraction in (0, 1].

    Returns:
        An int64 tensor of shape ``(...)``.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    e = singular_values.to(torch.float64) ** 2
    total = e.sum(-1, keepdim=True)
    frac = e.cumsum(-1) / total.clamp_min(1e-300)
    # Count prefixes still short of the target; a tiny slack absorbs rounding at exact fractions.
    r = (frac < energy - 1e-12).sum(-1) + 1
    return torch.where(total[..., 0] > 0, r.clamp_max(e.shape[-1]), torch.zeros_like(r))


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank exp(H(p)), p_k = s_k / sum s (Roy and Vetterli, 2007); 0 for no motion."""
    s = singular_values.to(torch.float64).clamp_min(0)
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(1e-300)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.where(total[..., 0] > 0, torch.exp(h), torch.zeros_like(h))
