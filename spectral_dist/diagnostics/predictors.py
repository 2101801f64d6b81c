"""Forecasts of the next sketch from past sketches (pure tensor math, no state, no torch.distributed).

All functions take a history ``(..., T, d)`` ordered oldest first and batch over leading dimensions, so
one call serves the global sketch and every layer. The prediction-based path length of a trajectory is
``sum_t ||z_t - zhat_t||^2`` over the steps where the predictor has enough history.
"""

from __future__ import annotations

import torch

__all__ = ["PREDICTORS", "min_history", "predict_next", "check_predictors"]

PREDICTORS = ("last", "ema", "linear", "lstsq")


def check_predictors(predictors) -> tuple[str, ...]:
    """Validate a predictor list; raises ValueError naming ``predictors``."""
    if isinstance(predictors, str):
        predictors = (predictors,)
    predictors = tuple(predictors)
    bad = [p for p in predictors if p not in PREDICTORS]
    if bad or not predictors:
        raise ValueError(f"predictors must be a non-empty subset of {PREDICTORS}, got {predictors!r}")
    return predictors


def min_history(predictor: str, ar_order: int = 2) -> int:
    """Number of past sketches a predictor needs before it forecasts."""
    return {"last": 1, "ema": 1, "linear": 2, "lstsq": ar_order + 1}[check_predictors(predictor)[0]]


def _ema(history: torch.Tensor, beta: float) -> torch.Tensor:
    """EMA over the history started at its oldest entry (beta^T of the start survives; small for T ~ 32)."""
    m = history[..., 0, :]
    for t in range(1, history.shape[-2]):
        m = beta * m + (1.0 - beta) * history[..., t, :]
    return m


def _ar_lstsq(history: torch.Tensor, order: int) -> torch.Tensor:
    """AR(order) forecast with scalar coefficients fitted by least squares on the history.

    Fits ``z_s ~ sum_k a_k z_{s-k}`` over all ``s`` in the history (shared across the ``d`` coordinates,
    so the fit is a tiny ``order x order`` system per batch entry) and applies it to the newest sketches.
    The pseudo-inverse picks the minimum-norm fit when the regressors are collinear (a constant
    trajectory), which still forecasts exactly. AR(2) reproduces linear drift exactly.
    """
    T = history.shape[-2]
    h = history.to(torch.float64)
    target = h[..., order:, :]  # (..., T-order, d)
    regs = torch.stack([h[..., order - k : T - k, :] for k in range(1, order + 1)], dim=-3)  # (..., p, n, d)
    gram = torch.einsum("...and,...bnd->...ab", regs, regs)
    rhs = torch.einsum("...and,...nd->...a", regs, target)
    scale = gram.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(1e-300)[..., None]
    coef = (torch.linalg.pinv(gram / scale, rtol=1e-10) @ (rhs[..., None] / scale))[..., 0]  # (..., p)
    recent = torch.stack([h[..., T - k, :] for k in range(1, order + 1)], dim=-2)  # (..., p, d)
    return (coef[..., None] * recent).sum(-2).to(history.dtype)


def predict_next(
    history: torch.Tensor, predictor: str, *, ema_beta: float = 0.9, ar_order: int = 2
) -> torch.Tensor:
    """Forecast ``z_T`` from ``history = z_0..z_{T-1}`` (shape ``(..., T, d)``); returns ``(..., d)``.

    Args:
        history: Past sketches, oldest first.
        predictor: ``"last"`` (z_{T-1}), ``"ema"`` (exponential moving average), ``"linear"``
            (``2 z_{T-1} - z_{T-2}``) or ``"lstsq"`` (least-squares AR fit over the history).
        ema_beta: EMA decay in [0, 1).
        ar_order: AR order of ``"lstsq"``.

    Raises:
        ValueError: Unknown predictor, or fewer than :func:`min_history` sketches.
    """
    need = min_history(predictor, ar_order)
    if history.dim() < 2 or history.shape[-2] < need:
        raise ValueError(
            f"history must hold at least {need} sketches for {predictor!r}, got {tuple(history.shape)}"
        )
    if predictor == "last":
        return history[..., -1, :]
    if predictor == "ema":
        return _ema(history, ema_beta)
    if predictor == "linear":
        return 2.0 * history[..., -1, :] - history[..., -2, :]
    return _ar_lstsq(history, ar_order)
