"""Spectral directions D = U diag(T(sigma; alpha)) V^T, computed seven ways (and ``"auto"``, which picks one).

* ``"svd"``: the reference, a thin SVD.
* ``"gram"``: eigh of the smaller Gram matrix, formed and decomposed in float64. D = G f(G^T G) with
  f(l) = 1 / (l^(alpha/2) + lambda), so no division by sigma and no U is needed. Squaring G squares its
  condition number: singular values below sqrt(max(m,n) * eps64) * sigma_1 (~4e-7 sigma_1) are treated as
  zero. Agreement with ``"svd"``: ~1e-10 relative in float64, ~1e-6 for float32 inputs (tests pin both).
* ``"newton_schulz"``: alpha = 1 only; Muon's fixed quintic iteration towards the polar factor U V^T (see
  :func:`newton_schulz`). It ignores damping.
* ``"polar_express"``: alpha = 1 only; the polar factor by odd quintic polynomials with per-iteration minimax
  coefficients (Polar Express, Amsel et al. 2025; :data:`POLAR_EXPRESS_COEFFICIENTS`). Matmuls only. It
  ignores damping, like Newton-Schulz (T(sigma; 1) and the polar factor differ by lambda / (sigma + lambda),
  1e-4 on the top direction at the default damping).
* ``"cholesky"``: alpha = 2 (and alpha = 0) exactly: D = G (G^T G + lambda I)^(-1), since
  sigma / (sigma^2 + lambda) = sigma * f(sigma^2) with f(s) = 1 / (s + lambda); alpha = 0 is G / (1 + damping).
  One Gram product, a few power iterations for sigma_1^2 (lambda = damping * sigma_1^2), one Cholesky
  factorisation, its inverse (k x k) and one product with G (``cholesky_ex``: no host sync).
* ``"tracked"``: a rank-r right singular basis kept across steps, refined by warm-started subspace iteration
  and replaced by an exact SVD every ``refresh_every`` steps (see :func:`tracked_direction`).
* ``"eigenbasis"``: any alpha; an eigenbasis Q of the smaller Gram matrix kept across steps (SOAP-style): one
  power iteration plus a k x k QR every ``refresh_every`` steps, an SVD only when there is no basis yet; every
  step is D = (X Q) diag(f(||X q_i||)) Q^T with X = G or G^T, two matmuls (see :func:`eigenbasis_direction`).

``"auto"`` (:func:`auto_method`) picks per alpha (and the matmul dtype per device); the measured reasons are in
docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .decompose import DecompositionError, compute_dtype, robust_eigh, robust_svd
from .transform import check_alpha, check_damping, inverse_transform, rank_floor

__all__ = [
    "BASES",
    "METHODS",
    "NS_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "STATEFUL",
    "DecompositionError",
    "auto_eigenbasis_qr",
    "auto_matmul_dtype",
    "auto_method",
    "cholesky_direction",
    "cpu_has_native_bf16",
    "direction_unchecked",
    "eigenbasis_batched",
    "eigenbasis_direction",
    "jacobi_rotate",
    "newton_schulz",
    "polar_express",
    "spectral_direction",
    "tracked_direction",
]

METHODS = ("svd", "gram", "newton_schulz", "tracked", "polar_express", "cholesky", "eigenbasis")
BASES = ("auto",) + METHODS  # what a param group's ``basis`` may say
STATEFUL = ("tracked", "eigenbasis")  # methods that keep a per-matrix basis across steps
ALPHA_ONE = ("newton_schulz", "polar_express")  # polar-factor methods: alpha must be 1

# Quintic coefficients tuned for speed by Muon (Keller Jordan): 5 steps map singular values in
# [~1e-3 sigma_1, sigma_1] into roughly [0.68, 1.13] rather than exactly 1. The cubic iteration
# X <- 1.5 X - 0.5 X X^T X converges to the exact polar factor but slowly for small sigma.
NS_COEFFICIENTS = {
    "quintic": (3.4445, -4.7750, 2.0315),
    "cubic": (1.5, -0.5, 0.0),
}


# Polar Express (Amsel, Persson, Musco, Gower 2025): step k applies the odd quintic p_k(x) = a x + b x^3 + c x^5
# that is minimax-optimal for max |1 - p_k(x)| over the interval [l_k, u_k] the previous steps left the singular
# values in, starting from [1e-3, 1] (G normalised by 1.01 ||G||_F, so sigma_1 <= 1/1.01). Computed here with a
# linear program on 8,000 points per interval (benchmarks/basis_accuracy.py --coefficients recomputes them);
# the interval after each step: [0.00847, 1.99], [0.0354, 1.96], [0.140, 1.86], [0.454, 1.55],
# [0.887, 1.11], [0.9991, 1.0009], [1 - 6e-10, 1 + 6e-10]. Steps past the list repeat the last polynomial,
# the fixed point iteration (15/8, -5/4, 3/8). Muon's fixed quintic leaves [0.68, 1.13] after 5 steps.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.4703294819, -25.1080786235, 18.6292788121),
    (4.1828371388, -3.1087038820, 0.5806071962),
    (3.9618663078, -2.9540701252, 0.5629768504),
    (3.2866087143, -2.4647369800, 0.5073595999),
    (2.2737686210, -1.6446773010, 0.4161927912),
    (1.8887178929, -1.2651590914, 0.3765191150),
    (1.8749020652, -1.2498032079, 0.3749011427),
)


def auto_method(alpha: float, damping: float, device) -> str:
    """The method ``basis="auto"`` uses for one matrix (measurements in docs/benchmarks.md).

    * alpha = 0, or alpha = 2 with damping > 0: ``"cholesky"``, the exact closed forms (alpha = 2: one Gram
      product, one Cholesky solve; measured 0.3-0.8x the cost of 5 Newton-Schulz steps on CPU).
    * alpha = 1: ``"polar_express"``, matmuls only: 0.6-0.8x the cost of Muon's 5 Newton-Schulz steps on CPU
      (its Gram form for rectangular shapes), 8% error on the direction against 19% for Muon's polynomial.
      The optimizer runs it in bf16 on CUDA (as Muon does) and, when asked, on CPUs
      (:func:`auto_matmul_dtype`): 11.9% against float32's 11.8% on a real run's inputs, at 0.45x the time on CPU.
    * any other alpha: ``"eigenbasis"``: matmuls plus one k x k QR per matrix and step (Householder on CPU,
      CholeskyQR2 on CUDA: :func:`auto_eigenbasis_qr`, :func:`eigenbasis_batched`), 0.7-10% error along a
      synthetic drifting sequence but ~23% (Householder, float64 CholeskyQR) and ~53% (float32 CholeskyQR)
      along a real run's attention inputs; the optimizer's
      ``jacobi_steps`` (:func:`jacobi_rotate`) trade cost for accuracy there. The exact alternative,
      ``"gram"`` (float64 eigh), measured 3.1x the cost of Muon's step at GPT-2 shapes on CPU, and eigh runs
      far below matmul speed on GPUs; in float32 an eigh of the Gram matrix loses the directions that carry
      the update.
    * alpha = 2 without damping: ``"gram"`` (the exact pseudo-inverse with its rank floor).

    ``device`` is accepted so that per-device choices stay in one place; today the method does not depend on
    it, only the matmul dtype (:func:`auto_matmul_dtype`) and the eigenbasis QR
    (:mod:`spectral_dist.optim.matrix_step`) do.
    """
    del device
    if alpha == 0.0 or (alpha == 2.0 and damping > 0):
        return "cholesky"
    if alpha == 1.0:
        return "polar_express"
    if alpha == 2.0:
        return "gram"
    return "eigenbasis"


# ``SPECTRAL_DIST_CPU_BF16``: unset or "0" keeps float32 on CPUs (the default), "1" uses bf16
# (:func:`auto_matmul_dtype`) on any CPU, "auto" where the CPU has native bf16 dot products
# (:func:`cpu_has_native_bf16`).
CPU_BF16_ENV = "SPECTRAL_DIST_CPU_BF16"
BF16_METHODS = ("polar_express", "eigenbasis")  # where basis="auto" uses bf16 matmuls (auto_matmul_dtype)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX tiles), where oneDNN runs bf16
    matmuls several times faster than float32 (measured 4.8x on an AMD EPYC with AVX512-BF16: 976 against 204
    GFLOP/s for 8 x 768^3, 2 threads). Without them bf16 is emulated and slower than float32. Read from torch's
    CPU feature probes; False where this torch has none."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        f = getattr(cpu, probe, None)
        try:
            if f is not None and f():
                return True
        except Exception:  # noqa: BLE001 - a probe that cannot run means no known support
            continue
    return False


def auto_matmul_dtype(method: str, device, dtype: torch.dtype = torch.float32) -> torch.dtype | None:
    """The bf16 matmuls ``basis="auto"`` gives ``method`` on ``device`` for inputs of ``dtype``: bf16 or None
    (the working dtype). float64 inputs keep float64: whoever trains in float64 asked for its precision.

    bf16 on CUDA (tensor cores), and on CPUs only when asked: ``SPECTRAL_DIST_CPU_BF16=auto`` (where
    :func:`cpu_has_native_bf16`) or ``=1``. The CPU default stays float32 because bf16 turns the round-off of
    a different reduction order into visible differences: a 2- or 4-rank FSDP2 run ended 1.2e-2 (relative) from
    the one-process run after 10 steps, against < 5e-5 in float32 (tests/test_distributed.py). bf16 is used for

    * ``"polar_express"``, every step, as Muon does: 5 steps in bf16 measured 11.9% top-direction error against
      float32's 11.8% on a real run's inputs (both dominated by the 5-step polynomial), at 0.45x float32's time
      on CPU at 2 x 768 x 3072 (its float32 Gram form included);
    * ``"eigenbasis"``, only its last product D = (B w) Q^T (:func:`eigenbasis_batched`'s ``apply_dtype``):
      0.28x float32's time at 8 x 768 x 768 on CPU, no change in the error.

    Everything that squares the spectrum (the Gram products of Cholesky and the eigenbasis, the power step)
    stays in the working dtype: the small eigenvalues carry the alpha > 1 update and are below bf16's
    resolution."""
    if method not in BF16_METHODS or dtype == torch.float64:
        return None
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16
    if kind == "cpu":
        forced = os.environ.get(CPU_BF16_ENV, "").strip()
        if forced not in ("", "0", "1", "auto"):
            raise ValueError(
                f"{CPU_BF16_ENV} must be 0 or unset (float32), 1 (bf16) or auto (bf16 where the CPU has native "
                f"bf16 matmuls), got {forced!r}"
            )
        if forced == "auto":
            return torch.bfloat16 if cpu_has_native_bf16() else None
        return torch.bfloat16 if forced == "1" else None
    return None


def finite_matrices(X: torch.Tensor) -> torch.Tensor:
    """One bool per matrix of X (..., m, n): all its entries are finite. Read from the matrix's sum: a NaN or
    Inf entry makes the sum non-finite, so none is missed; one reduction instead of isfinite's four passes
    over X (measured 27x faster on 2 x 768 x 3072 on CPU). A finite matrix whose sum overflows (entries near
    3e38 in float32) reads as non-finite: the optimizer then redoes it in float64, never passes it on."""
    return torch.isfinite(X.sum(dim=(-2, -1)))


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


def _gram_direction(G, alpha, damping, counter, decompose=None):
    """D = G f(G^T G) (smaller side). Below float64 the Gram matrix, its eigh and the k x k matrix f(.) are
    formed in float64 and only the final product G P runs in G's dtype: in float32 the Gram floor
    sqrt(k eps) sigma_1 (~1e-2 sigma_1 at k = 768) would zero directions that carry most of the update at
    alpha >= 1 (measured: 50-90% error on a 1/k spectrum, benchmarks/RESULTS.md)."""
    m, n = G.shape[-2:]
    tall = m >= n
    X = G.double()
    A = X.mT @ X if tall else X @ X.mT
    A = 0.5 * (A + A.mT)  # exact symmetry for eigh
    evals, Q = robust_eigh(A, counter) if decompose is None else decompose(A)
    sigma = evals.clamp_min(0).sqrt()
    w = inverse_transform(sigma, alpha, damping, rank_floor(m, n, sigma.dtype, squared=True))
    P = ((Q * w.unsqueeze(-2)) @ Q.mT).to(G.dtype)
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


def _mm3(X: torch.Tensor):
    """(..., m, n) as a 3-D batch for baddbmm, and the function that restores the leading dims."""
    lead = X.shape[:-2]
    return X.reshape(-1, *X.shape[-2:]), (lambda Y: Y.reshape(*lead, *Y.shape[-2:]))


def polar_express(
    G: torch.Tensor, steps: int = 5, eps: float = 1e-7, matmul_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Polar factor U V^T of G (..., m, n) by Polar Express: ``steps`` odd quintic steps with the per-step
    minimax coefficients of :data:`POLAR_EXPRESS_COEFFICIENTS`.

    Singular values above 1e-3 ||G||_F come out in [0.887, 1.113] after 5 steps, [0.9991, 1.0009] after 6
    (Muon's 5 quintic steps: [0.68, 1.13]); smaller ones converge later (measured errors against the SVD in
    benchmarks/RESULTS.md). ``matmul_dtype=torch.bfloat16`` runs the iteration in bf16 (GPUs, CPUs with
    native bf16); the result has
    the working dtype of G.

    Cost: 3 matmuls per step on X (k x l, k = min(m, n) <= l = max(m, n)): 4 k^2 l + 2 k^3 flops. When
    l >= 2 k (and not in bf16) the steps run on the k x k Gram matrix instead (X_j = X R_j with R_j a
    polynomial in Y = X^T X, all k x k: 4 matmuls of 2 k^3 per step, plus the Gram product and X R at the
    end, 4 k^2 l): 1.5x fewer flops at l = 3k, 1.8x at l = 4k, the same result to float32 round-off.
    """
    out_dtype = compute_dtype(G.dtype)
    mdt = matmul_dtype or out_dtype
    X = G.to(mdt)
    transpose = X.shape[-2] > X.shape[-1]
    if transpose:
        X = X.mT
    X, restore = _mm3(X)  # (batch, k, l), k <= l
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + eps)
    k, ln = X.shape[-2:]
    coeffs = [POLAR_EXPRESS_COEFFICIENTS[min(j, len(POLAR_EXPRESS_COEFFICIENTS) - 1)] for j in range(steps)]
    if steps and ln >= 2 * k and mdt not in (torch.float16, torch.bfloat16):
        Y = torch.bmm(X, X.mT)  # X X^T (k x k); X_j = R_j X with R_j, Y_j polynomials in it
        eye = torch.eye(k, dtype=X.dtype, device=X.device).expand_as(Y)
        R = None
        for j, (a, b, c) in enumerate(coeffs):
            q = torch.baddbmm(torch.add(eye, Y, alpha=b / a), Y, Y, beta=a, alpha=c)  # a I + b Y + c Y^2
            R = q if R is None else torch.bmm(q, R)
            if j < steps - 1:
                Y = torch.bmm(torch.bmm(q, Y), q)
        X = torch.bmm(R, X)
    else:
        for a, b, c in coeffs:
            A = torch.bmm(X, X.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    X = restore(X).to(out_dtype)
    return X.mT if transpose else X


def _sigma1_squared(A: torch.Tensor, iters: int = 32) -> torch.Tensor:
    """Largest eigenvalue of the PSD batch A (..., n, n) by power iteration from a fixed start (no host
    sync; 32 matrix-vector products, nothing next to the n^3 of the factorisation). It only sets lambda, and
    it is a Rayleigh quotient, so from below: measured 2e-4 low on a 96 x 96 Gaussian, 1.8% low on a
    768 x 768 Gaussian (a flat top, the worst case), exact to round-off when sigma_2 <= 0.9 sigma_1.

    The iterate is a row vector, v <- v A (A is symmetric): a batched (1 x n)(n x n) product measured 11x
    faster than (n x n)(n x 1) on CPU (2 x 768 x 768: 0.037 against 0.41 ms; the column form goes through a
    general bmm that is slow for one column), 32 of them per Cholesky batch."""
    n = A.shape[-1]
    g = torch.Generator(device="cpu").manual_seed(n)
    # the start is drawn on the CPU (explicitly: a caller's torch.set_default_device("cuda") must not move it
    # off its generator's device) and copied once
    v = (torch.rand(1, n, generator=g, dtype=torch.float64, device="cpu") + 0.5).to(A.device, A.dtype)
    v = v.expand(*A.shape[:-2], 1, n)
    for _ in range(iters):
        v = v @ A
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
    return ((v @ A) * v).sum(-1).clamp_min(0)  # (..., 1)


def cholesky_direction(G: torch.Tensor, alpha: float, damping: float):
    """(D, ok) for alpha = 2: D = G (G^T G + lambda I)^(-1) on the smaller side, lambda = damping * sigma_1^2;
    alpha = 0: D = G / (1 + damping). ``ok`` (one bool per matrix) is False where the factorisation failed or
    a value is non-finite; nothing here waits for the device.

    Exact for T(sigma; 2) = sigma / (sigma^2 + lambda) up to the floor below which the SVD reference zeroes
    sigma: there the Cholesky form keeps sigma / (sigma^2 + lambda), which is <= sigma / lambda.
    Directions far below sqrt(eps) sigma_1 are lost when G^T G is formed (as in ``"gram"``); they carry
    T(sigma) ~ sigma / lambda, nothing next to the top ones."""
    if alpha == 0.0:
        D = G / (1.0 + damping)
        return D, finite_matrices(D)
    if alpha != 2.0:
        raise ValueError(f"method='cholesky' is exact for alpha = 0 or 2 only, got alpha={alpha}")
    m, n = G.shape[-2:]
    tall = m >= n
    A = G.mT @ G if tall else G @ G.mT
    s1 = _sigma1_squared(A).unsqueeze(-1)  # (..., 1, 1)
    k = A.shape[-1]
    # lambda, at least a floor that keeps the factorisation defined for damping = 0 or a rank-deficient G (the
    # rounding error of a formed Gram matrix is about sqrt(k) * eps * sigma_1^2; 7.6e-6 for k = 256 in float32)
    lam = max(damping, 4.0 * math.sqrt(k) * torch.finfo(A.dtype).eps) * s1
    lam = torch.where(s1 > 0, lam, torch.ones_like(lam))  # a zero matrix: any shift, D = 0
    eye = torch.eye(k, dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(A + lam * eye)
    # (A + lambda I)^-1 = L^-T L^-1 (k x k: one triangular solve on I, one matmul), then one matmul with G:
    # measured ~1.4x faster than two triangular solves on G (k^2 l each, at a fraction of matmul speed) for
    # 768 x 3072 on CPU, with the same error against the float64 reference (cond(A + lambda I) <= 1 / damping).
    # cholesky_solve and cholesky_inverse would check their info with a host sync; solve_triangular does not
    Li = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    P = Li.mT @ Li
    D = G @ P if tall else P @ G
    ok = (info == 0) & finite_matrices(D)
    return D, ok


def eigenbasis_shift(A: torch.Tensor, factor: float = 64.0) -> torch.Tensor:
    """The shift mu (..., 1, 1) of the CholeskyQR power step Q <- qr((A + mu I) Q) on a Gram batch A (..., k, k).

    A shift moves no eigenvector. It keeps the columns of the directions whose eigenvalues are below A's own
    rounding error (~sqrt(k) eps tr(A) when A is formed in the working dtype) at mu q_i, the previous basis
    vector, instead of rounding noise: without it those columns are nearly parallel (the noise E q_i lines up
    with E's top directions) and CholeskyQR fails on most real gradients (measured: 2 to 3 of 4 GPT-2 attention
    matrices per step fell back to Householder QR). mu = 64 sqrt(k) eps tr(A): directions with
    sigma_i^2 < mu barely move between refreshes, and below that level the formed Gram matrix does not resolve
    them anyway. ``factor`` replaces the 64: the float64 CholeskyQR (``qr="cholesky_fp64"``) resolves the
    noise columns itself and only needs columns that are exactly zero (a gradient's structurally zero rows or
    columns) filled, so it shifts by 0.01 sqrt(k) eps tr(A), below A's own rounding error."""
    k = A.shape[-1]
    tr = A.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    return factor * math.sqrt(k) * torch.finfo(A.dtype).eps * tr


def householder_q(Y: torch.Tensor) -> torch.Tensor:
    """The Q factor of Y (..., n, r) by Householder QR (LAPACK geqrf + orgqr), without forming R: what
    torch.linalg.qr returns, bit for bit, minus its R (measured 5% of the QR's time at 8 x 768 x 768 on CPU)."""
    a, tau = torch.geqrf(Y)
    return torch.linalg.householder_product(a, tau)


def _small_side(G: torch.Tensor):
    """(X, wide): G as a tall matrix (m >= n), transposed when G is wide: the eigenbasis lives on the smaller
    side, so its Gram matrix, power iteration and QR are min(m, n) squared."""
    wide = G.shape[-2] < G.shape[-1]
    return (G.mT if wide else G), wide


def jacobi_rotate(X: torch.Tensor, Q: torch.Tensor, B: torch.Tensor, qr: str = "householder"):
    """One parallel Jacobi step on an eigenbasis: (Q', B' = X Q', ok), for X (..., m, k), Q (..., k, r) with
    orthonormal columns and B = X Q.

    C = B^T B = Q^T A Q (A = X^T X) is diagonal exactly when Q spans eigenvectors. Every pair (i, j) is rotated
    at once by the Jacobi angle theta_ij = atan(2 C_ij / (C_jj - C_ii)) / 2 (|theta| <= pi/4): Q' = qr(Q (I + K))
    with K_ij = theta_ij = -K_ji (i < j), the first-order eigenvector correction C_ij / (C_jj - C_ii) where the
    gaps are large, bounded where they are not. Subspace iteration (A Q, then QR) moves direction i by the ratio of neighbouring eigenvalues,
    near 1 in the bulk of a gradient's spectrum, which is where the directions that carry an alpha > 1 update
    lie; a Jacobi step moves them by C_ij / gap. Measured on the recorded inputs of a real training run
    (``benchmarks/basis_accuracy.py --real``): one step after the power step cut the top-direction error of the
    eigenbasis at alpha 1.65 from 23% to 15%, two to 9% (float32 CholeskyQR: 53%, 31%, 21%). It does not replace the
    power step, which moves the top of the spectrum (Jacobi steps alone measured far worse in exploratory runs).

    C is formed from B, not from A: its entries then scale with sigma_i sigma_j, so the small directions'
    off-diagonal terms are resolved (a formed A's rounding error, ~sqrt(k) eps sigma_1^2, would swamp them).
    Cost: C (2 l r^2), Q (I + K) (2 k r^2), the QR, and B' (2 l k r); ``ok`` (Cholesky QR only) as in
    :func:`eigenbasis_batched`."""
    C = B.mT @ B
    lam = C.diagonal(dim1=-2, dim2=-1)
    gap = lam.unsqueeze(-2) - lam.unsqueeze(-1)  # gap[..., i, j] = C_jj - C_ii
    theta = 0.5 * torch.atan2(2 * C * torch.where(gap < 0, -1.0, 1.0), gap.abs()).triu(1)
    Y = Q + Q @ (theta - theta.mT)  # Q (I + K)
    if qr == "householder":
        Y, ok = householder_q(Y), None
    else:  # Q (I + K) is well conditioned: no shift needed
        Y, ok = _cholesky_qr(Y.double() if qr == "cholesky_fp64" else Y, overwrite=True)
        Y = Y.to(Q.dtype)
    return Y, X @ Y, ok


def eigenbasis_direction(
    G: torch.Tensor,
    alpha: float,
    damping: float,
    state: dict,
    rank: int | None = None,
    refresh_every: int = 10,
    counter: dict | None = None,
    jacobi_steps: int = 0,
) -> torch.Tensor:
    """Spectral direction in an eigenbasis of the smaller Gram matrix kept across calls (SOAP-style; any alpha,
    matmuls plus a QR every ``refresh_every`` calls).

    ``state`` (owned by the caller, like :func:`tracked_direction`'s) holds ``basis`` Q (k x r, k = min(m, n),
    orthonormal columns: right singular vectors of a tall G, left ones of a wide G) and ``step``. Write X for G
    (tall) or G^T (wide), so that X^T X is k x k. Without a basis (first call, another shape) Q is the top-r
    singular vectors of an SVD (counted in ``counter['refreshes']``); every ``refresh_every`` calls it is
    refined by one step of subspace iteration Q <- qr(A Q), A = X^T X (Householder QR, k x k), then by
    ``jacobi_steps`` parallel Jacobi steps (:func:`jacobi_rotate`). Every call: B = X Q, d_i = ||B e_i||
    (sigma_i, measured without squaring), D = B diag(f(d)) Q^T with f(s) = 1 / (s^alpha + lambda), transposed back for a wide G; the part of X outside span(Q)
    (r < k) gets the factor of the weakest tracked direction, as ``tracked``'s ``"scaled"`` residual. Exact
    when Q is an eigenbasis; between refreshes the error grows with the drift of G's singular vectors
    (measured in benchmarks/RESULTS.md).
    """
    if G.ndim != 2:
        raise ValueError(f"eigenbasis_direction works on one matrix (m, n), got shape {tuple(G.shape)}")
    X, wide = _small_side(G)
    m, n = X.shape
    r = n if rank is None else min(int(rank), n)
    step = int(state.get("step", 0))
    Q = state.get("basis")
    counter = {} if counter is None else counter
    refine = False
    if Q is None or tuple(Q.shape) != (n, r) or step == 0:
        _, _, Vh = robust_svd(X, counter)
        Q = Vh[:r].mT
        counter["refreshes"] = counter.get("refreshes", 0) + 1
    else:
        Q = Q.to(X.dtype)
        refine = step % max(1, refresh_every) == 0
        if refine:
            Q = householder_q((X.mT @ X) @ Q)
    B = X @ Q
    for _ in range(int(jacobi_steps) if refine else 0):
        Q, B, _ = jacobi_rotate(X, Q, B)
    sigma = B.norm(dim=0)
    w = inverse_transform(sigma, alpha, damping, rank_floor(m, n, sigma.dtype))
    D = (B * w) @ Q.mT
    if r < n:  # the residual X - B Q^T with the factor of the weakest tracked direction
        w_r = w.gather(0, sigma.argmin().reshape(1))
        D = D + w_r * (X - B @ Q.mT)
    state["basis"] = Q.detach().clone()
    state["step"] = step + 1
    return D.mT if wide else D


EIGENBASIS_QR = ("householder", "cholesky", "cholesky_fp64")
# ``SPECTRAL_DIST_EIGENBASIS_QR``: unset or "auto" (the QR by device, :func:`auto_eigenbasis_qr`), or one of
# EIGENBASIS_QR on any device.
EIGENBASIS_QR_ENV = "SPECTRAL_DIST_EIGENBASIS_QR"
# CUDA compute capabilities whose float64 matmuls run at the float32 (non-TF32) rate or at half of it: P100,
# V100, A100, H100/H200, B200. Elsewhere (consumer and workstation parts, B300) float64 runs at 1/32-1/64.
FAST_FP64_CAPABILITIES = ((6, 0), (7, 0), (8, 0), (9, 0), (10, 0))


@functools.cache
def _fast_fp64(index: int) -> bool:
    if getattr(torch.version, "hip", None):  # ROCm: not measured, keep the float32 path
        return False
    return tuple(torch.cuda.get_device_capability(index)) in FAST_FP64_CAPABILITIES


def auto_eigenbasis_qr(device) -> str:
    """The QR of the optimizer's batched eigenbasis power step on ``device`` (:func:`eigenbasis_batched`'s
    ``qr``; reasons there): ``"householder"`` off CUDA; on CUDA ``"cholesky_fp64"`` where float64 matmuls are
    fast (:data:`FAST_FP64_CAPABILITIES`), else ``"cholesky"``.

    ``SPECTRAL_DIST_EIGENBASIS_QR`` = ``householder``, ``cholesky`` or ``cholesky_fp64`` picks one on any device:
    Householder on a GPU, or a GPU's path on a CPU, where the tests run the optimizer through it (its CholeskyQR,
    its failure flags and the owner's Householder redo, over a process group too)."""
    forced = os.environ.get(EIGENBASIS_QR_ENV, "").strip()
    if forced in EIGENBASIS_QR:
        return forced
    if forced not in ("", "auto"):
        raise ValueError(
            f"{EIGENBASIS_QR_ENV} must be unset or auto (by device), or one of {', '.join(EIGENBASIS_QR)}, "
            f"got {forced!r}"
        )
    device = torch.device(device)
    if device.type != "cuda":
        return "householder"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "cholesky_fp64" if _fast_fp64(index) else "cholesky"


def eigenbasis_batched(
    X: torch.Tensor,
    alpha: float,
    damping: float,
    Q: torch.Tensor | None,
    step: int,
    rank: int | None = None,
    refresh_every: int = 1,
    qr: str = "householder",
    jacobi_steps: int = 0,
    apply_dtype: torch.dtype | None = None,
):
    """:func:`eigenbasis_direction` for a batch X (b, m, n) whose matrices share ``step``: (D, Q_new, ok),
    without host syncs (beyond the SVD's info check when ``Q`` is None or ``step`` is 0, the initialisation).
    ``Q`` (b, k, r), k = min(m, n), is the batch of previous bases; ``ok`` (b,) says D and Q_new are finite and
    (``qr="cholesky"``, ``"cholesky_fp64"``) the CholeskyQR succeeded.

    ``qr`` orthonormalises the power step A Q (k x r, A = X^T X):

    * ``"householder"`` (CPU): torch.linalg.qr, stable at any conditioning, the same iteration as
      :func:`eigenbasis_direction`. On CPU a refresh step measured 29.7 ms against CholeskyQR2's 37.6 ms per
      768 x 768 matrix (benchmarks/basis_accuracy.py).
    * ``"cholesky"`` (GPUs, where Householder QR is a chain of latency-bound panel steps and CholeskyQR is
      matmuls plus a small Cholesky): shifted CholeskyQR2 of (A + mu I) Q, mu = :func:`eigenbasis_shift`, which
      real gradients need (without it 2-3 of 4 GPT-2 attention matrices per step failed the factorisation).
      The shift slows the tracking of directions with sigma_i^2 < mu: measured 1.6-2.3x the drift error of
      ``"householder"`` (basis_accuracy.py, 1/k spectra at GPT-2 shapes, alpha 1.65), and 0.53 against 0.23
      top-direction error on a real run's attention inputs.
    * ``"cholesky_fp64"`` (GPUs with fast float64: A100, H100, H200, B200): the power step A Q in X's dtype,
      its CholeskyQR2 in float64, where the noise columns of the directions below A's rounding error stay
      independent, so the shift is 0.01 sqrt(k) eps tr(A) (it only fills the exactly zero columns of a
      structurally rank-deficient gradient) instead of 64 sqrt(k) eps tr(A): Householder's accuracy (0.23 on
      the same real inputs, the same to two digits per matrix), matmuls and a small Cholesky only. Its
      float64 work is the k x k CholeskyQR (about 2 x (2 k^3 Gram + k^3 solve + k^3 / 3)), at the float32
      (non-TF32) rate on those GPUs.

    Cost per matrix (l = max(m, n), r = k): the Gram product l k^2, B = X Q and D = (B w) Q^T 2 l k^2 (matmuls,
    2 flops each), A Q k^3, and the QR (Householder 4/3 k^3; CholeskyQR2 2 x (k^3 Gram + k^3/3 Cholesky +
    k^3 triangular solve)); each of the ``jacobi_steps`` (:func:`jacobi_rotate`, after the power step) adds
    2 l r^2 + 2 k r^2 + 2 l k r and a QR.

    ``apply_dtype`` (e.g. bf16): the dtype of the last product only, D = (B w) Q^T. Its error is the rounding
    of its two factors, ~2^-8 of D whatever the spectrum (the Gram product, the power step and B = X Q, where
    the small directions that carry an alpha > 1 update must be resolved, stay in X's dtype); measured on a
    real run's attention inputs, the top-direction error did not change in its fourth digit."""
    if qr not in EIGENBASIS_QR:
        raise ValueError(f"qr must be one of {EIGENBASIS_QR}, got {qr!r}")
    X, wide = _small_side(X)
    m, n = X.shape[-2:]
    r = n if rank is None else min(int(rank), n)
    chol_ok = None
    refine = False
    if Q is None or step == 0:
        _, _, Vh = torch.linalg.svd(X, full_matrices=False)
        Q = Vh[:, :r].mT
    else:
        Q = Q.to(X.dtype)
        refine = step % max(1, refresh_every) == 0
        if refine:
            A = X.mT @ X
            # the QR's input is a temporary it may overwrite (nothing else holds it: one stack less)
            if qr == "cholesky":
                Q, chol_ok = _cholesky_qr(A @ Q + eigenbasis_shift(A) * Q, overwrite=True)
            elif qr == "cholesky_fp64":
                mu = eigenbasis_shift(A, 0.01).double()
                Q, chol_ok = _cholesky_qr((A @ Q).double().addcmul_(mu, Q), overwrite=True)
                Q = Q.to(X.dtype)
            else:
                Q = householder_q(A @ Q)
            del A  # k x k per matrix, not needed past the power step
    B = X @ Q
    for _ in range(int(jacobi_steps) if refine else 0):
        Q, B, j_ok = jacobi_rotate(X, Q, B, qr)
        chol_ok = chol_ok if j_ok is None else chol_ok & j_ok
    sigma = B.norm(dim=-2)  # (b, r)
    w = inverse_transform(sigma, alpha, damping, rank_floor(m, n, sigma.dtype))
    Bw = B * w.unsqueeze(-2)
    if apply_dtype is not None and apply_dtype != Bw.dtype:
        D = (Bw.to(apply_dtype) @ Q.mT.to(apply_dtype)).to(Bw.dtype)
    else:
        D = Bw @ Q.mT
    if r < n:
        w_r = w.gather(-1, sigma.argmin(-1, keepdim=True)).unsqueeze(-1)  # (b, 1, 1)
        D = D + w_r * (X - B @ Q.mT)
    ok = finite_matrices(D) & finite_matrices(Q)
    D = D.mT if wide else D
    return D, Q, ok if chol_ok is None else ok & chol_ok


# The smallest ratio min/max of the diagonal of the last pass's Cholesky factor that ``_cholesky_qr`` accepts:
# its output's orthogonality error measured ~eps / ratio^2 (ratio 0.1: 4e-6, 0.0017: 2e-2), so 0.02 bounds it
# near 1e-4 in float32; below, the optimizer redoes the matrix with Householder QR. In float64 the same bound
# is sqrt(eps64 / 3e-4) ~ 8.6e-7.
CHOLQR_MIN_DIAG_RATIO = 0.02
CHOLQR_MIN_DIAG_RATIO_FP64 = 8.6e-7


def _cholesky_qr(Y: torch.Tensor, overwrite: bool = False):
    """(Q, ok): the Q factor of Y (b, n, r) by shifted CholeskyQR2 on column-normalised Y, without host syncs.

    Scaling columns by positive numbers does not change Q (Y S = Q (R S)), nor does any upper-triangular
    change of basis change the nested spans of the leading columns (what subspace iteration needs). Pass 1
    factors the Gram matrix shifted by 1e-4 (column-normalised: diagonal 1), which keeps the Cholesky defined
    for any condition number and leaves a basis with a moderate one; pass 2 makes it orthonormal to round-off.
    Measured on GPT-2 attention gradients (condition 3e3-2e4 after the eigenbasis shift): 0.8-0.97 from
    orthogonal after pass 1, 6e-7 after pass 2, and a third pass (CholeskyQR3) only reached 4e-7, so it is not
    run. Cholesky and triangular solves run at matmul-like speed (Householder QR measured ~10x a matmul of the
    same size on CPU). ``ok`` is False where a factorisation failed or pass 2's factor is too ill-conditioned
    for round-off orthogonality (:data:`CHOLQR_MIN_DIAG_RATIO`; e.g. a condition number of 1e6 or two equal
    columns): the optimizer then redoes that matrix with Householder QR."""
    fp64 = Y.dtype == torch.float64
    norms = Y.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(Y.dtype).tiny)
    Y = Y.div_(norms) if overwrite else Y / norms  # overwrite: the caller's temporary, one stack less
    ok = torch.ones(Y.shape[0], dtype=torch.bool, device=Y.device)
    # pass 1's shift sits above C's rounding error, ~k eps (1e-4 covers k = 768 in float32)
    for shift in (1e-10 if fp64 else 1e-4, 0.0):
        C = Y.mT @ Y
        if shift:
            C.diagonal(dim1=-2, dim2=-1).add_(shift)
        L, info = torch.linalg.cholesky_ex(C)
        del C
        Y = torch.linalg.solve_triangular(L.mT, Y, upper=True, left=False)  # Y L^-T
        ok = ok & (info == 0)
    diag = L.diagonal(dim1=-2, dim2=-1)
    ratio = diag.amin(-1) / diag.amax(-1).clamp_min(torch.finfo(Y.dtype).tiny)
    return Y, ok & (ratio >= (CHOLQR_MIN_DIAG_RATIO_FP64 if fp64 else CHOLQR_MIN_DIAG_RATIO))


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
        D = torch.addmm(G * w[-1], Ub * (S * (w - w[-1])).unsqueeze(0), V.mT)  # no host sync for w_r
    else:
        D = (Ub * (S * w).unsqueeze(0)) @ V.mT
    state["basis"] = V.detach().clone()
    state["step"] = step + 1
    return D


# The optimizer's default number of parallel Jacobi steps per eigenbasis refresh (reasons: SpectralNewton's
# ``jacobi_steps`` and docs/benchmarks.md).
JACOBI_STEPS = 0


def check_jacobi_steps(n) -> int:
    """``jacobi_steps`` as an int >= 0, or a ValueError that says what to pass."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"jacobi_steps must be an integer >= 0 (0: power step only), got {n!r}")
    return n


def _check_method(method: str, alpha: float) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {BASES}, got {method!r}")
    if method in ALPHA_ONE and alpha != 1.0:
        raise ValueError(f"method={method!r} computes the polar factor and needs alpha=1, got alpha={alpha}")
    if method == "cholesky" and alpha not in (0.0, 2.0):
        raise ValueError(f"method='cholesky' is exact for alpha = 0 or 2 only, got alpha={alpha}")


def direction_unchecked(
    X: torch.Tensor,
    alpha: float,
    damping: float,
    method: str,
    *,
    ns_steps: int = 5,
    ns_coefficients: str = "quintic",
    matmul_dtype: torch.dtype | None = None,
):
    """(D, ok) for a stateless method on a batch X (..., m, n) in its working dtype, without host syncs and
    without retries: ``ok`` is a bool tensor (one per matrix) saying D is finite (and, for ``"cholesky"``, the
    factorisation succeeded). An exception of a LAPACK/cuSOLVER call propagates. The optimizer reads the
    ``ok`` flags of all its batches with one host sync per step and redoes only the failed matrices with
    :func:`spectral_direction` (float64 retry)."""
    if method == "svd":
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        m, n = X.shape[-2:]
        T = S * inverse_transform(S, alpha, damping, rank_floor(m, n, S.dtype))
        D = (U * T.unsqueeze(-2)) @ Vh
    elif method == "gram":
        D = _gram_direction(X, alpha, damping, None, decompose=torch.linalg.eigh)
    elif method == "newton_schulz":
        D = newton_schulz(X, steps=ns_steps, coefficients=ns_coefficients)
    elif method == "polar_express":
        D = polar_express(X, steps=ns_steps, matmul_dtype=matmul_dtype)
    elif method == "cholesky":
        return cholesky_direction(X, alpha, damping)
    else:
        raise ValueError(f"direction_unchecked takes a stateless method, got {method!r}")
    return D, finite_matrices(D)


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
    jacobi_steps: int = 0,
) -> torch.Tensor:
    """U diag(T(sigma; alpha)) V^T for G = U diag(sigma) V^T of shape (..., m, n).

    T(sigma; alpha) = sigma / (sigma^alpha + lambda) with lambda = damping * sigma_1^alpha. Half-precision
    inputs are computed in float32 and returned in the input dtype. A zero matrix gives zeros.

    Args:
        G: gradient or momentum, shape (..., m, n).
        alpha: curvature exponent >= 0.
        damping: relative damping >= 0.
        method: ``"svd"``, ``"gram"``, ``"newton_schulz"`` / ``"polar_express"`` (alpha must be 1),
            ``"cholesky"`` (alpha 0 or 2), ``"tracked"`` / ``"eigenbasis"`` (pass a persistent ``state`` dict
            to keep the basis across calls, otherwise every call starts afresh) or ``"auto"``
            (:func:`auto_method` for G's device).
        state, rank, refresh_every: tracked-basis options (see :func:`tracked_direction`).
        ns_steps, ns_coefficients: Newton-Schulz / Polar Express steps (see :func:`newton_schulz`,
            :func:`polar_express`).
        counter: optional dict; ``retries`` and ``refreshes`` are incremented in it.
        check_finite: raise ValueError on a non-finite G (callers that already checked pass False).
        jacobi_steps: ``"eigenbasis"``: parallel Jacobi steps after each power step (:func:`jacobi_rotate`).
    """
    G = _as_matrix(G)
    alpha = check_alpha(alpha)
    damping = check_damping(damping)
    if method == "auto":
        method = auto_method(alpha, damping, G.device)
    _check_method(method, alpha)
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
        D = newton_schulz(X, steps=ns_steps, coefficients=ns_coefficients)
    elif method == "polar_express":
        D = polar_express(X, steps=ns_steps)
    elif method == "cholesky":
        D, ok = cholesky_direction(X, alpha, damping)
        if not bool(ok.all()):  # a failed factorisation: once more in float64, as the decompositions do
            if counter is not None:
                counter["retries"] = counter.get("retries", 0) + 1
            D, ok = cholesky_direction(X.double(), alpha, damping)
            if not bool(ok.all()):
                raise DecompositionError(
                    f"Cholesky failed in {X.dtype} and float64 for shape {tuple(X.shape)}"
                )
            D = D.to(X.dtype)
    else:
        if rank is not None and int(rank) <= 0:
            raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
        if method == "tracked":
            fn = tracked_direction
        else:
            fn = functools.partial(eigenbasis_direction, jacobi_steps=check_jacobi_steps(jacobi_steps))
        st = {} if state is None else state
        if X.ndim == 2:
            D = fn(X, alpha, damping, st, rank, refresh_every, counter=counter)
        else:  # batch: one state per matrix, kept in a list under the caller's dict
            flat = X.reshape(-1, *X.shape[-2:])
            subs = st.setdefault("batch", [{} for _ in range(flat.shape[0])])
            if len(subs) != flat.shape[0]:
                raise ValueError(f"{method} state was built for a different batch size")
            D = torch.stack(
                [fn(x, alpha, damping, s, rank, refresh_every, counter=counter) for x, s in zip(flat, subs)]
            ).reshape(X.shape)
    if not torch.isfinite(D).all():  # finite input must give a finite direction: never pass NaN on silently
        raise DecompositionError(
            f"method={method!r} produced non-finite values for finite G of shape {tuple(G.shape)}"
        )
    return D.to(out_dtype)
