"""Matrix-free symmetric eigensolvers, trace estimators and spectral densities.

Everything here sees the operator only through ``matvec(v) -> A v`` on flat 1-D tensors, so the same
code runs on an explicit matrix (the tests), on Hessian-vector products of one weight block, or on the
Hessian of a whole model (:mod:`spectral_dist.probes.spectrum` does the flattening). Randomness comes
from a seeded CPU generator, so a call is reproducible whatever device the vectors live on.

* :func:`lanczos`: top eigenpairs by Lanczos with full reorthogonalization (Hessian blocks are small
  enough to keep every Krylov vector, and full reorthogonalization is what makes the Ritz residual
  estimates trustworthy: without it converged eigenvalues reappear as spurious copies).
* :func:`power_iteration`: deflated power iteration, the slow but assumption-free fallback.
* :func:`hutchinson`, :func:`hutchpp`: stochastic trace estimates with a standard error.
* :func:`slq_density`: stochastic Lanczos quadrature, a Gaussian-broadened spectral density.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "VectorSpace",
    "EigenResult",
    "TraceEstimate",
    "SpectralDensity",
    "lanczos",
    "power_iteration",
    "hutchinson",
    "hutchpp",
    "slq_density",
    "exact_residuals",
]

MatVec = Callable[[torch.Tensor], torch.Tensor]
_WHICH = ("LA", "SA", "LM")


class VectorSpace:
    """Where the solvers' vectors live: this rank's part of a flat space of global dimension ``dim``.

    The default (``ranges=None``, ``allreduce=None``) is the whole space in one process. For vectors sharded
    like the parameters (FSDP2, ZeRO-3), ``ranges`` lists the ``(offset, length)`` pieces of the global flat
    vector this rank holds and ``allreduce`` sums a small tensor over ranks in place: inner products are a
    local dot plus one all-reduce, and random vectors are drawn whole from the seeded generator and sliced,
    so every rank (and one process) sees the same global vectors: results equal one process's.
    """

    def __init__(self, dim: int, ranges: list[tuple[int, int]] | None = None, allreduce=None):
        self.dim = int(dim)
        if self.dim < 1:
            raise ValueError(f"dimension must be >= 1, got {dim}")
        self.ranges = None if ranges is None else [(int(o), int(n)) for o, n in ranges]
        if self.ranges is not None:
            for o, n in self.ranges:
                if o < 0 or n < 0 or o + n > self.dim:
                    raise ValueError(f"range (offset={o}, length={n}) is outside [0, {self.dim})")
        self._allreduce = allreduce

    @property
    def local_dim(self) -> int:
        return self.dim if self.ranges is None else sum(n for _, n in self.ranges)

    @property
    def sharded(self) -> bool:
        return self._allreduce is not None

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (identity in one process)."""
        if self._allreduce is None:
            return t
        t = t.contiguous()
        self._allreduce(t)
        return t

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole vector (or of each row of a ``(rows, dim)`` batch)."""
        if self.ranges is None:
            return full
        parts = [full[..., o : o + n] for o, n in self.ranges]
        return torch.cat(parts, dim=-1) if parts else full[..., :0]

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        if not self.sharded:
            return float(torch.dot(a, b))
        return float(self.reduce(torch.dot(a, b).to(torch.float64).reshape(1))[0])

    def norm(self, a: torch.Tensor) -> float:
        if not self.sharded:
            return float(torch.linalg.vector_norm(a))
        return math.sqrt(max(self.dot(a, a), 0.0))

    def coeffs(self, Q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``Q @ w`` for rows of ``Q`` in this space."""
        return self.reduce(Q @ w)

    def randn(self, gen: torch.Generator, dtype, device, rows: int | None = None) -> torch.Tensor:
        """This rank's part of a standard normal vector (``rows`` of them) of the global space."""
        shape = self.dim if rows is None else (rows, self.dim)
        return self.local(_randn(gen, shape, torch.float64, "cpu")).to(dtype=dtype, device=device)

    def rademacher(self, gen: torch.Generator, dtype, device, rows: int | None = None) -> torch.Tensor:
        """This rank's part of a Rademacher (+-1) vector (``rows`` of them) of the global space."""
        shape = self.dim if rows is None else (rows, self.dim)
        return self.local(_rademacher(gen, shape, torch.float64, "cpu")).to(dtype=dtype, device=device)

    def orthonormal_rows(self, A: torch.Tensor) -> torch.Tensor:
        """Orthonormal rows spanning the rows of ``A`` (Householder QR in one process; sharded: Gram-Schmidt
        twice with all-reduced coefficients, dropping rows that are numerically dependent)."""
        if not self.sharded:
            return torch.linalg.qr(A.T.to(torch.float64))[0].T.to(A.dtype)
        out: list[torch.Tensor] = []
        for a in A:
            ref = self.norm(a)
            w = a
            for _ in range(2):
                if out:
                    B = torch.stack(out)
                    w = w - B.T @ self.coeffs(B, w)
            nrm = self.norm(w)
            if ref > 0 and nrm > 1e-10 * ref:
                out.append(w / nrm)
        return torch.stack(out) if out else A[:0]


@dataclass
class EigenResult:
    """Eigenpairs from a matrix-free solver.

    Attributes:
        eigenvalues: ``(k,)`` float64, in the solver's order (descending for ``which="LA"``).
        eigenvectors: ``(k, dim)`` unit rows, or None when not requested.
        residuals: ``(k,)`` float64, ``||A q - lambda q||`` per pair (Lanczos: the exact Ritz residual
            identity ``|beta_m s_mi|``, valid because every Krylov vector is reorthogonalized).
        num_matvecs: operator applications spent.
        converged: whether every requested pair met ``tol`` before the iteration budget ran out.
        method: ``"lanczos"`` or ``"power"``.
        norm_estimate: estimate of ``||A||_2`` (largest Ritz magnitude; power: the dominant eigenvalue's
            magnitude), the scale ``tol`` is relative to.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    num_matvecs: int
    converged: bool
    method: str
    norm_estimate: float


@dataclass
class TraceEstimate:
    """A stochastic trace estimate: ``value`` with its standard error over ``num_matvecs`` products."""

    value: float
    stderr: float
    num_matvecs: int
    method: str


@dataclass
class SpectralDensity:
    """A Gaussian-broadened spectral density normalized to integrate to 1 (eigenvalue mass 1/dim each).

    Attributes:
        grid: ``(num_points,)`` float64 evaluation points.
        values: ``(num_points,)`` float64 density at ``grid``.
        nodes: ``(num_probes, m)`` Gauss quadrature nodes (Ritz values), NaN-padded when a probe's
            Krylov space closed early.
        weights: ``(num_probes, m)`` quadrature weights (each row sums to 1), zero where padded.
        sigma: Gaussian width used for broadening.
        num_matvecs: operator applications spent.
    """

    grid: torch.Tensor
    values: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    num_matvecs: int

    def integral(self) -> float:
        """Trapezoid integral of the density over the grid (1 up to the tails cut by the grid)."""
        return float(torch.trapezoid(self.values, self.grid))


def _space(dim_or_template, dtype, device, space=None) -> tuple[int, torch.dtype, torch.device]:
    if space is not None:
        if isinstance(dim_or_template, torch.Tensor) or int(dim_or_template) != space.dim:
            raise ValueError(
                f"with a VectorSpace pass its global dimension {space.dim}, got {dim_or_template!r}"
            )
        return (
            space.dim,
            dtype or torch.float64,
            torch.device(device) if device is not None else torch.device("cpu"),
        )
    if isinstance(dim_or_template, torch.Tensor):
        t = dim_or_template
        return t.numel(), dtype or t.dtype, torch.device(device) if device is not None else t.device
    dim = int(dim_or_template)
    if dim < 1:
        raise ValueError(f"dimension must be >= 1, got {dim}")
    return dim, dtype or torch.float64, torch.device(device) if device is not None else torch.device("cpu")


def _randn(gen: torch.Generator, shape, dtype, device) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def _rademacher(gen: torch.Generator, shape, dtype, device) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    r = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
    return r.to(dtype=dtype, device=device)


def _apply(matvec: MatVec, v: torch.Tensor) -> torch.Tensor:
    w = matvec(v)
    if not isinstance(w, torch.Tensor) or w.shape != v.shape:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"matvec must return a tensor of shape {tuple(v.shape)}, got {got}")
    return w


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the ``k`` wanted Ritz values, in output order."""
    if which == "LA":
        order = torch.argsort(theta, descending=True)
    elif which == "SA":
        order = torch.argsort(theta)
    else:
        order = torch.argsort(theta.abs(), descending=True)
    return order[:k]


def _orthogonalize(w: torch.Tensor, Q: torch.Tensor, space: VectorSpace | None = None) -> torch.Tensor:
    """Classical Gram-Schmidt against the rows of ``Q``, twice ("twice is enough", Kahan/Parlett)."""
    if Q.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - Q.T @ (Q @ w if space is None else space.coeffs(Q, w))
    return w


def _tridiag(alphas: list[float], betas: list[float]) -> torch.Tensor:
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def _lanczos_core(
    matvec: MatVec,
    v0: torch.Tensor,
    max_steps: int,
    gen: torch.Generator,
    restart: bool,
    stop: Callable[[list[float], list[float], float, int], bool] | None = None,
    space: VectorSpace | None = None,
):
    """Lanczos with full reorthogonalization from unit ``v0``.

    On breakdown (an invariant subspace, ``beta ~ 0``) it either restarts with a fresh random vector
    orthogonal to the basis (``restart``: needed to find repeated eigenvalues and the rest of the
    spectrum) or stops (quadrature: the Krylov space of ``v0`` is exhausted and the rule is exact).
    ``stop(alphas, betas, scale, block_start)`` is asked after each step whether to end early
    (``block_start``: the step at which the current restarted block began).

    Returns:
        ``(Q, alphas, betas, num_matvecs)``; ``betas[-1]`` is the residual norm after the last step
        (0 after a breakdown without restart).
    """
    space = space or VectorSpace(v0.numel())
    dim = space.dim
    Q = torch.empty(max_steps, v0.numel(), dtype=v0.dtype, device=v0.device)
    alphas: list[float] = []
    betas: list[float] = []
    v = v0
    n = 0
    scale = 0.0
    block_start = 0
    for j in range(max_steps):
        Q[j] = v
        w = _apply(matvec, v)
        n += 1
        if not torch.isfinite(w).all():
            raise FloatingPointError("matvec returned non-finite values")
        alpha = space.dot(w, v)
        w = _orthogonalize(w, Q[: j + 1], space)
        beta = space.norm(w)
        alphas.append(alpha)
        betas.append(beta)
        scale = max(scale, abs(alpha), beta)
        breakdown = beta <= 1e-12 * max(scale, 1e-300) * math.sqrt(dim) or beta == 0.0
        if breakdown:
            betas[-1] = 0.0
        if stop is not None and stop(alphas, betas, scale, block_start):
            return Q[: j + 1], alphas, betas, n
        if j + 1 >= max_steps:
            break
        if breakdown:
            if not restart or j + 1 >= dim:
                return Q[: j + 1], alphas, betas, n
            # Fresh direction orthogonal to everything so far; T becomes block diagonal (beta = 0).
            w = _orthogonalize(space.randn(gen, v0.dtype, v0.device), Q[: j + 1], space)
            nrm = space.norm(w)
            if nrm == 0.0:
                return Q[: j + 1], alphas, betas, n
            v = w / nrm
            block_start = j + 1
        else:
            v = w / beta
    return Q[: len(alphas)], alphas, betas, n


def lanczos(
    matvec: MatVec,
    dim_or_template: int | torch.Tensor,
    k: int,
    *,
    which: str = "LA",
    tol: float = 1e-3,
    max_iter: int | None = None,
    seed: int = 0,
    return_eigenvectors: bool = True,
    v0: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    space: VectorSpace | None = None,
) -> EigenResult:
    """Top-``k`` eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Stops as soon as every wanted Ritz pair has residual ``||A y - theta y|| <= tol * ||T||`` (``||T||``:
    the largest Ritz magnitude, an estimate of the spectral norm, so ``tol`` is scale-free), or when
    the Krylov space reaches ``max_iter`` (default ``min(dim, max(10 k, 100))``) or the whole space.

    Args:
        matvec: ``v -> A v`` on flat tensors of length ``dim``; must be (numerically) symmetric.
        dim_or_template: the dimension, or a tensor whose numel/dtype/device define the space.
        k: number of eigenpairs wanted.
        which: ``"LA"`` largest algebraic (descending, the Hessian default: curvature directions),
            ``"SA"`` smallest algebraic (ascending), ``"LM"`` largest magnitude.
        tol: relative residual target.
        max_iter: Krylov dimension cap (memory: ``max_iter * dim`` numbers are kept).
        seed: seed of the random start vector (and of restarts after a breakdown).
        return_eigenvectors: also return the Ritz vectors.
        v0: explicit start vector (normalized here) instead of a random one.
        dtype, device: of the work vectors (default: the template's, else float64 on CPU).
        space: a sharded :class:`VectorSpace` (``dim_or_template`` is then its global dimension): ``matvec``
            and ``v0`` take and return this rank's part, and the eigenvectors are this rank's part.

    Returns:
        :class:`EigenResult` with ``method="lanczos"``.

    Raises:
        ValueError: bad ``k``/``which``/``tol`` or a matvec returning the wrong shape.
        FloatingPointError: the operator produced non-finite values.
    """
    dim, dtype, device = _space(dim_or_template, dtype, device, space)
    space = space or VectorSpace(dim)
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, dim={dim}], got {k}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    max_iter = min(dim, max(10 * k, 100)) if max_iter is None else min(int(max_iter), dim)
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} must be >= k={k}")
    gen = torch.Generator().manual_seed(seed)
    if v0 is None:
        v0 = space.randn(gen, dtype, device)
    else:
        v0 = v0.detach().reshape(-1).to(dtype=dtype, device=device).clone()
        if v0.numel() != space.local_dim:
            raise ValueError(f"v0 has {v0.numel()} entries, expected {space.local_dim}")
    nrm = space.norm(v0)
    if not nrm > 0 or not math.isfinite(nrm):
        raise ValueError("start vector must be finite and nonzero")
    v0 = v0 / nrm

    def better(a: float, b: float, margin: float) -> bool:
        if which == "LA":
            return a > b + margin
        if which == "SA":
            return a < b - margin
        return abs(a) > abs(b) + margin

    def converged(alphas, betas, scale, block_start) -> bool:
        m = len(alphas)
        if m < k:
            return False
        theta, S = torch.linalg.eigh(_tridiag(alphas, betas))
        idx = _select(theta, k, which)
        ref = max(float(theta.abs().max()), 1e-300)
        if not bool(((betas[-1] * S[-1, idx]).abs() <= tol * ref).all()):
            return False
        if m >= dim or (block_start == 0 and betas[-1] != 0.0):
            return True
        # A restart happened or is due. A Krylov space that closed holds one copy of each eigenvalue it
        # saw, so the complement can only hold further copies of the closed block's values: stop when
        # none of them would enter the top k. An open block must first converge its own extreme value.
        tb, Sb = torch.linalg.eigh(_tridiag(alphas[block_start:], betas[block_start:]))
        e = int(_select(tb, 1, which)[0])
        if betas[-1] == 0.0:
            return not better(float(tb[e]), float(theta[idx[-1]]), tol * ref)
        return abs(betas[-1] * float(Sb[-1, e])) <= tol * ref

    Q, alphas, betas, n = _lanczos_core(matvec, v0, max_iter, gen, restart=True, stop=converged, space=space)
    theta, S = torch.linalg.eigh(_tridiag(alphas, betas))
    idx = _select(theta, k, which)
    res = (betas[-1] * S[-1, idx]).abs()
    ref = max(float(theta.abs().max()), 1e-300)
    vecs = None
    if return_eigenvectors:
        vecs = (S[:, idx].T.to(dtype=Q.dtype, device=Q.device) @ Q).contiguous()
    return EigenResult(
        eigenvalues=theta[idx].clone(),
        eigenvectors=vecs,
        residuals=res.clone(),
        num_matvecs=n,
        converged=bool((res <= tol * ref).all()),
        method="lanczos",
        norm_estimate=ref,
    )


def power_iteration(
    matvec: MatVec,
    dim_or_template: int | torch.Tensor,
    k: int,
    *,
    which: str = "LA",
    tol: float = 1e-3,
    max_iter: int = 1000,
    seed: int = 0,
    return_eigenvectors: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    space: VectorSpace | None = None,
) -> EigenResult:
    """Top-``k`` eigenpairs by power iteration with deflation (projection onto the found vectors'
    complement): slower than :func:`lanczos` but it relies on nothing beyond symmetry.

    For ``"LA"``/``"SA"`` the operator is first shifted by its largest magnitude (one extra power run)
    so the wanted end of the spectrum becomes the dominant one. Each pair stops when its true residual
    ``||A q - lambda q|| <= tol * |lambda_max|`` or after ``max_iter`` products.

    Returns:
        :class:`EigenResult` with ``method="power"``; residuals are measured, not estimated.
    """
    dim, dtype, device = _space(dim_or_template, dtype, device, space)
    space = space or VectorSpace(dim)
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, dim={dim}], got {k}")
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    gen = torch.Generator().manual_seed(seed)
    n = 0

    def run(sign: float, shift: float, found: list[torch.Tensor], ref: float):
        """Power iteration on ``sign * A + shift * I`` restricted to the complement of ``found``."""
        nonlocal n
        B = torch.stack(found) if found else torch.empty(0, space.local_dim, dtype=dtype, device=device)
        v = _orthogonalize(space.randn(gen, dtype, device), B, space)
        v = v / space.norm(v)
        lam, res = 0.0, math.inf
        for _ in range(max_iter):
            w = _apply(matvec, v)
            n += 1
            if not torch.isfinite(w).all():
                raise FloatingPointError("matvec returned non-finite values")
            lam = space.dot(v, w)
            res = space.norm(w - lam * v)
            if res <= tol * max(ref, abs(lam), 1e-300):
                break
            w = _orthogonalize(sign * w + shift * v, B, space)
            nrm = space.norm(w)
            if nrm == 0:
                break
            v = w / nrm
        return lam, v, res

    # Largest magnitude first: it is the answer for "LM" and the shift for "LA"/"SA"
    # (ref*I + A and ref*I - A are positive semidefinite with the wanted end dominant).
    lam0, v0, r0 = run(1.0, 0.0, [], 0.0)
    ref = abs(lam0)
    lams, vecs, ress = [], [], []
    if which == "LM" or (which == "LA" and lam0 >= 0) or (which == "SA" and lam0 <= 0):
        lams, vecs, ress = [lam0], [v0], [r0]
    sign = -1.0 if which == "SA" else 1.0
    shift = 0.0 if which == "LM" else ref
    while len(lams) < k:
        lam, v, r = run(sign, shift, vecs, ref)
        lams.append(lam)
        vecs.append(v)
        ress.append(r)
    lam_t = torch.tensor(lams, dtype=torch.float64)
    res_t = torch.tensor(ress, dtype=torch.float64)
    order = _select(lam_t, k, which)
    V = torch.stack(vecs)[order] if return_eigenvectors else None
    return EigenResult(
        eigenvalues=lam_t[order],
        eigenvectors=V,
        residuals=res_t[order],
        num_matvecs=n,
        converged=bool((res_t <= tol * max(ref, 1e-300)).all()),
        method="power",
        norm_estimate=max(ref, float(lam_t.abs().max())),
    )


def exact_residuals(
    matvec: MatVec, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, space: VectorSpace | None = None
) -> torch.Tensor:
    """``||A q_i - lambda_i q_i||`` measured with one product per pair (checks the Lanczos estimate)."""
    space = space or VectorSpace(max(eigenvectors.shape[-1], 1))
    out = []
    for lam, q in zip(eigenvalues.tolist(), eigenvectors):
        out.append(space.norm(_apply(matvec, q) - lam * q))
    return torch.tensor(out, dtype=torch.float64)


def hutchinson(
    matvec: MatVec,
    dim_or_template: int | torch.Tensor,
    num_samples: int = 32,
    *,
    seed: int = 0,
    distribution: str = "rademacher",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    space: VectorSpace | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate ``tr(A) ~ mean_i z_i^T A z_i``: unbiased; its variance is
    ``2 ||A||_F^2 - 2 sum_i A_ii^2`` per sample for Rademacher ``z`` (``2 ||A||_F^2`` for Gaussian).

    Returns:
        :class:`TraceEstimate` whose ``stderr`` is the sample standard deviation / sqrt(num_samples).
    """
    dim, dtype, device = _space(dim_or_template, dtype, device, space)
    space = space or VectorSpace(dim)
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (for a standard error), got {num_samples}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    draw = space.rademacher if distribution == "rademacher" else space.randn
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(num_samples):
        z = draw(gen, dtype, device)
        vals.append(space.dot(z, _apply(matvec, z)))
    t = torch.tensor(vals, dtype=torch.float64)
    return TraceEstimate(float(t.mean()), float(t.std() / math.sqrt(num_samples)), num_samples, "hutchinson")


def hutchpp(
    matvec: MatVec,
    dim_or_template: int | torch.Tensor,
    num_matvecs: int = 48,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    space: VectorSpace | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): trace the top of the spectrum exactly, Hutchinson
    for the rest. A third of the budget sketches ``range(A S)``, a third computes ``tr(Q^T A Q)`` on its
    orthonormal basis ``Q``, a third runs Hutchinson on ``(I - QQ^T) A (I - QQ^T)``. Hessians with fast
    eigenvalue decay (the paper's regime) make the deflated remainder small, so the error falls like
    ``1/num_matvecs`` instead of ``1/sqrt(num_matvecs)``; when the sketch spans the whole space
    (``num_matvecs/3 >= dim``) the estimate is exact.

    Returns:
        :class:`TraceEstimate`; ``stderr`` is that of the Hutchinson remainder (0 when it is empty).
    """
    dim, dtype, device = _space(dim_or_template, dtype, device, space)
    space = space or VectorSpace(dim)
    if num_matvecs < 6:
        raise ValueError(f"num_matvecs must be >= 6 (two Hutchinson samples), got {num_matvecs}")
    gen = torch.Generator().manual_seed(seed)
    s = min(num_matvecs // 3, dim)
    ell = num_matvecs - 2 * s
    S = space.rademacher(gen, dtype, device, rows=s)
    AS = torch.stack([_apply(matvec, x) for x in S])
    Q = space.orthonormal_rows(AS)  # (s, dim) orthonormal rows
    top = sum(space.dot(q, _apply(matvec, q)) for q in Q)
    n = s + Q.shape[0]
    if s >= dim:
        return TraceEstimate(top, 0.0, n, "hutch++")
    vals = []
    for _ in range(ell):
        g = _orthogonalize(space.rademacher(gen, dtype, device), Q, space)
        vals.append(space.dot(g, _orthogonalize(_apply(matvec, g), Q, space)))
        n += 1
    t = torch.tensor(vals, dtype=torch.float64)
    return TraceEstimate(top + float(t.mean()), float(t.std() / math.sqrt(ell)), n, "hutch++")


def slq_density(
    matvec: MatVec,
    dim_or_template: int | torch.Tensor,
    *,
    num_probes: int = 8,
    num_steps: int = 64,
    sigma: float | None = None,
    grid: torch.Tensor | None = None,
    num_points: int = 512,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    space: VectorSpace | None = None,
) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (Golub-Meurant; Ghorbani et al. 2019).

    For a unit Rademacher probe ``v``, ``m`` Lanczos steps give ``T = S diag(theta) S^T`` and
    ``v^T f(A) v ~ sum_i S_0i^2 f(theta_i)``, a Gauss rule exact for polynomials of degree ``2m - 1``.
    With ``f`` a Gaussian of width ``sigma`` centered at each grid point this estimates
    ``(1/dim) sum_j N(x; lambda_j, sigma^2)``; averaging over probes removes the dependence on ``v``.
    The density integrates to 1 (each eigenvalue carries mass ``1/dim``); the default grid extends
    ``5 sigma`` past the extreme nodes so the cut tails are below 1e-6.

    Args:
        num_probes: independent probes (variance of the weights falls like 1/num_probes).
        num_steps: Lanczos steps per probe (resolution; capped at ``dim``).
        sigma: broadening width; default 1% of the spread of the nodes (or of their magnitude).
        grid: explicit evaluation points; default ``num_points`` evenly spaced.

    Returns:
        :class:`SpectralDensity`.
    """
    dim, dtype, device = _space(dim_or_template, dtype, device, space)
    space = space or VectorSpace(dim)
    if num_probes < 1 or num_steps < 1:
        raise ValueError(f"need num_probes >= 1 and num_steps >= 1, got {num_probes}, {num_steps}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    m = min(num_steps, dim)
    gen = torch.Generator().manual_seed(seed)
    nodes = torch.full((num_probes, m), float("nan"), dtype=torch.float64)
    weights = torch.zeros(num_probes, m, dtype=torch.float64)
    n = 0
    for p in range(num_probes):
        v = space.rademacher(gen, dtype, device) / math.sqrt(dim)
        _, alphas, betas, used = _lanczos_core(matvec, v, m, gen, restart=False, space=space)
        n += used
        theta, S = torch.linalg.eigh(_tridiag(alphas, betas))
        nodes[p, : theta.numel()] = theta
        weights[p, : theta.numel()] = S[0] ** 2
    finite = nodes[torch.isfinite(nodes)]
    lo, hi = float(finite.min()), float(finite.max())
    if sigma is None:
        spread = hi - lo
        sigma = 0.01 * spread if spread > 0 else max(1e-3 * max(abs(lo), abs(hi)), 1e-12)
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
    else:
        grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    nd = torch.nan_to_num(nodes, nan=0.0).reshape(-1)
    wt = weights.reshape(-1) / num_probes
    gauss = torch.exp(-0.5 * ((grid[:, None] - nd[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    values = gauss @ wt
    return SpectralDensity(grid, values, nodes, weights, float(sigma), n)
