"""Spectral directions D = U diag(T(sigma; alpha)) V^T, computed four ways.

* ``"svd"``: the reference, a thin SVD.
* ``"gram"``: eigh of the smaller Gram matrix. D = G f(G^T G) with f(l) = 1 / (l^(alpha/2) + lambda), so no
  division by sigma and no U is needed. Squaring G squares its condition number: singular values below
  sqrt(max(m,n) * eps) * sigma_1 are treated as zero. Agreement with ``"svd"``: ~1e-10 relative in float64,
  ~1e-3 in float32 (tests pin both).
* ``"newton_schulz"``: alpha = 1 only; polynomial iteration towards the polar factor U V^T (see
  :func:`newton_schulz`). It ignores damping.
* ``"tracked"``: a rank-r right singular basis kept across steps, refined by warm-started subspace iteration
  and replaced by an exact SVD every ``refresh_every`` steps (see :func:`tracked_direction`).
"""

from __future__ import annotations

import torch

from .decompose import DecompositionError, compute_dtype, robust_eigh, robust_svd
from .transform import check_alpha, check_damping, inverse_transform, rank_floor

__all__ = [
    "METHODS",
    "NS_COEFFICIENTS",
    "spectral_direction",
    "newton_schulz",
    "tracked_direction",
    "DecompositionError",
]

METHODS = ("svd", "gram", "newton_schulz", "tracked")

# Quintic coefficients tuned for speed by Muon (Keller Jordan): 5 steps map singular values in
# [~1e-3 sigma_1, sigma_1] into roughly [0.68, 1.13] rather than exactly 1. The cubic iteration
# X <- 1.5 X - 0.5 X X^T X converges to the exact polar factor but slowly for small sigma.
NS_COEFFICIENTS = {
    "quintic": (3.4445, -4.7750, 2.0315),
    "cubic": (1.5, -0.5, 0.0),
}


def _as_matrix(G: torch.Tensor) -> torch.Tensor:
    if G.ndim < 2:
        raise ValueError(
            f"spectral_direction needs a tensor of shape (..., m, n), got shape {tuple(G.shape)}"
        )
    return G


def _svd_direction(G, alpha, damping, counter):
    U, S, Vh = robust_svd(G, counter)
    m, n = G.shape[-2:]
    T = S * inverse_transform(S, alpha, damping, rank_floor(m, n, S.dtype))
    return (U * T.unsqueeze(-2)) @ Vh


def _gram_direction(G, alpha, damping, counter):
    m, n = G.shape[-2:]
    tall = m >= n
    A = G.mT @ G if tall else G @ G.mT
    A = 0.5 * (A + A.mT)  # exact symmetry for eigh
    evals, Q = robust_eigh(A, counter)
    sigma = evals.clamp_min(0).sqrt()
    w = inverse_transform(sigma, alpha, damping, rank_floor(m, n, sigma.dtype, squared=True))
    P = (Q * w.unsqueeze(-2)) @ Q.mT
    return G @ P if tall else P @ G


def newton_schulz(
    G: torch.Tensor, steps: int = 5, coefficients: str = "quintic", eps: float = 1e-7
) -> torch.Tensor:
    """Approximate polar factor U V^T of G (..., m, n) by an odd matrix polynomial iteration.

    Approximation error (measured in tests/test_spectral.py on Gaussian 64x32 matrices):
    ``"quintic"`` with 5 steps (Muon's default) gives output singular values in about [0.68, 1.13] for
    sigma_k > 1e-3 sigma_1, so individual directions are off by up to ~30% while the subspace is exact;
    ``"cubic"`` converges to U V^T exactly: with 30 steps, directions with sigma_k > 1e-2 sigma_1 match to 1e-4.
    Directions with sigma_k much smaller than sigma_1 / sqrt(min(m, n)) converge last in both.
    """
    if coefficients not in NS_COEFFICIENTS:
        raise ValueError(f"coefficients must be one of {sorted(NS_COEFFICIENTS)}, got {coefficients!r}")
    a, b, c = NS_COEFFICIENTS[coefficients]
    X = G.to(compute_dtype(G.dtype))
    transpose = X.shape[-2] > X.shape[-1]
    if transpose:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A) if c else b * A
        X = a * X + B @ X
    return X.mT if transpose else X


def tracked_direction(
    G: torch.Tensor,
    alpha: float,
    damping: float,
    state: dict,
    rank: int | None = None,
    refresh_every: int = 10,
    power_iters: int = 1,
    residual: str = "scaled",
    counter: dict | None = None,
) -> torch.Tensor:
    """Spectral direction in a rank-r right singular basis tracked across calls.

    ``state`` is a dict owned by the caller (the optimizer keeps one per matrix); it holds ``basis`` (n x r)
    and ``step``. Every ``refresh_every`` calls, or when there is no basis yet, the basis is replaced by the
    top-r right singular vectors of an exact SVD; otherwise it is refined by ``power_iters`` steps of
    warm-started subspace iteration Q <- qr(G^T G Q). Gradients along a run move slowly (the second paper's
    predictable gradient manifolds), so one step per call keeps Q close to the current top-r subspace.

    Within the subspace the step is exact: with G Q = U_r S W^T (an m x r SVD), D_r = U_r diag(T(S)) (Q W)^T.
    The part of G outside the tracked subspace, R = G - G Q Q^T, is handled by ``residual``:

    * ``"scaled"`` (default): R is kept and multiplied by 1 / (s_r^alpha + lambda), the factor the weakest
      tracked direction gets. When Q holds the true top-r subspace the true factors of R's directions are at
      least this large, so the tail is under-stepped, never amplified.
    * ``"drop"``: R is discarded (pure low-rank update, as in PowerSGD/Dion without error feedback).

    With r = min(m, n), R is zero and the result equals ``method="svd"`` up to round-off.
    """
    if G.ndim != 2:
        raise ValueError(f"tracked_direction works on one matrix (m, n), got shape {tuple(G.shape)}")
    if residual not in ("scaled", "drop"):
        raise ValueError(f"residual must be 'scaled' or 'drop', got {residual!r}")
    m, n = G.shape
    r = min(m, n) if rank is None else min(int(rank), m, n)
    step = int(state.get("step", 0))
    Q = state.get("basis")
    counter = {} if counter is None else counter
    if Q is None or tuple(Q.shape) != (n, r) or step % max(1, refresh_every) == 0:
        _, _, Vh = robust_svd(G, counter)
        Q = Vh[:r].mT
        counter["refreshes"] = counter.get("refreshes", 0) + 1
    else:
        Q = Q.to(G.dtype)
        for _ in range(power_iters):
            Q, _ = torch.linalg.qr(G.mT @ (G @ Q))
    B = G @ Q
    Ub, S, Wh = robust_svd(B, counter)
    V = Q @ Wh.mT
    w = inverse_transform(S, alpha, damping, rank_floor(m, n, S.dtype))
    if residual == "scaled" and r < min(m, n):
        # U_r diag(S w) V^T + w_r (G - G Q Q^T) with G Q Q^T = U_r diag(S) V^T: one rank-r product, not two
        D = torch.addmm(G, Ub * (S * (w - w[-1])).unsqueeze(0), V.mT, beta=w[-1].item(), alpha=1.0)
    else:
        D = (Ub * (S * w).unsqueeze(0)) @ V.mT
    state["basis"] = V.detach().clone()
    state["step"] = step + 1
    return D


def spectral_direction(
    G: torch.Tensor,
    alpha: float,
    damping: float = 1e-4,
    method: str = "svd",
    *,
    state: dict | None = None,
    rank: int | None = None,
    refresh_every: int = 10,
    ns_steps: int = 5,
    ns_coefficients: str = "quintic",
    counter: dict | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """U diag(T(sigma; alpha)) V^T for G = U diag(sigma) V^T of shape (..., m, n).

    T(sigma; alpha) = sigma / (sigma^alpha + lambda) with lambda = damping * sigma_1^alpha. Half-precision
    inputs are computed in float32 and returned in the input dtype. A zero matrix gives zeros.

    Args:
        G: gradient or momentum, shape (..., m, n).
        alpha: curvature exponent >= 0.
        damping: relative damping >= 0.
        method: ``"svd"``, ``"gram"``, ``"newton_schulz"`` (alpha must be 1) or ``"tracked"`` (2-D G; pass a
            persistent ``state`` dict to keep the basis across calls, otherwise every call is a refresh).
        state, rank, refresh_every: tracked-basis options (see :func:`tracked_direction`).
        ns_steps, ns_coefficients: Newton-Schulz options (see :func:`newton_schulz`).
        counter: optional dict; ``retries`` and ``refreshes`` are incremented in it.
        check_finite: raise ValueError on a non-finite G (callers that already checked pass False).
    """
    G = _as_matrix(G)
    alpha = check_alpha(alpha)
    damping = check_damping(damping)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if check_finite and not torch.isfinite(G).all():
        raise ValueError(
            "spectral_direction got a non-finite G; the optimizer skips such steps before calling it"
        )
    out_dtype = G.dtype
    X = G.to(compute_dtype(G.dtype))
    if method == "svd":
        D = _svd_direction(X, alpha, damping, counter)
    elif method == "gram":
        D = _gram_direction(X, alpha, damping, counter)
    elif method == "newton_schulz":
        if alpha != 1.0:
            raise ValueError(
                f"method='newton_schulz' computes the polar factor and needs alpha=1, got alpha={alpha}"
            )
        D = newton_schulz(X, steps=ns_steps, coefficients=ns_coefficients)
    else:
        if rank is not None and int(rank) <= 0:
            raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
        st = {} if state is None else state
        if X.ndim == 2:
            D = tracked_direction(X, alpha, damping, st, rank, refresh_every, counter=counter)
        else:  # batch: one tracked state per matrix, kept in a list under the caller's dict
            flat = X.reshape(-1, *X.shape[-2:])
            subs = st.setdefault("batch", [{} for _ in range(flat.shape[0])])
            if len(subs) != flat.shape[0]:
                raise ValueError("tracked state was built for a different batch size")
            D = torch.stack(
                [
                    tracked_direction(x, alpha, damping, s, rank, refresh_every, counter=counter)
                    for x, s in zip(flat, subs)
                ]
            ).reshape(X.shape)
    if not torch.isfinite(D).all():  # finite input must give a finite direction: never pass NaN on silently
        raise DecompositionError(
            f"method={method!r} produced non-finite values for finite G of shape {tuple(G.shape)}"
        )
    return D.to(out_dtype)
