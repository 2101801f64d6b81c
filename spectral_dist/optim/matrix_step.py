"""The math of one SpectralNewton step, free of torch.distributed.

* :func:`owner_directions`: the owner's work. Same-shape matrices with the same options are stacked and
  decomposed as one batch (one SVD / eigh / Newton-Schulz call per shape group, not per matrix); a batch that
  fails is retried matrix by matrix so only the failing matrix is affected.
* :func:`scale_directions`: the ``scale`` option (RMS target, Muon's spectral factor, none), without host syncs.

Statuses an owner reports for each matrix (they travel to every rank in the exchange's header):
``OK`` the direction was computed; ``SKIP`` the decomposition failed and there is no previous basis (no step);
``FALLBACK`` it failed and the previous tracked basis gave the direction; ``RAISE`` it failed for the
``MAX_DECOMPOSITION_FAILURES``-th time in a row; ``ERROR`` anything else went wrong on the owner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..spectral import DecompositionError, spectral_direction
from ..spectral.transform import inverse_transform, rank_floor

__all__ = [
    "ERROR",
    "FALLBACK",
    "MAX_DECOMPOSITION_FAILURES",
    "OK",
    "RAISE",
    "SKIP",
    "DirectionJob",
    "DirectionResult",
    "owner_directions",
    "scale_directions",
    "tracked_rank",
]

OK, SKIP, FALLBACK, RAISE, ERROR = 0, 1, 2, 3, 4
MAX_DECOMPOSITION_FAILURES = 3


def tracked_rank(shape, group: Mapping) -> int:
    m, n = int(shape[0]), int(shape[1])
    r = group["rank"]
    return min(m, n) if r is None else min(int(r), m, n)


@dataclass
class DirectionJob:
    """One matrix for the owner: its preconditioned input M (m x n), live group, resolved alpha, and the
    per-matrix state it reads (tracked basis, consecutive failure count)."""

    key: str
    M: torch.Tensor
    group: Mapping
    alpha: float
    tracked: dict | None = None
    consecutive_failures: int = 0


@dataclass
class DirectionResult:
    status: int
    D: torch.Tensor | None = None
    retries: int = 0
    refreshes: int = 0
    basis: torch.Tensor | None = None  # new tracked basis (n x r) when status is OK
    error: str = ""
    exc: BaseException | None = field(default=None, repr=False)


def scale_directions(D: torch.Tensor, group: Mapping) -> torch.Tensor:
    """Apply ``group["scale"]`` to a direction or a batch of directions (..., m, n); no host sync."""
    m, n = D.shape[-2:]
    s = group["scale"]
    if s == "spectral":
        return D * math.sqrt(max(1.0, m / n))
    if s == "rms":
        norm = torch.linalg.matrix_norm(D, keepdim=True)
        target = group["rms_target"] * math.sqrt(m * n)
        return D * torch.where(norm > 0, target / norm.clamp_min(torch.finfo(D.dtype).tiny), 1.0)
    return D


def _batch_key(job: DirectionJob):
    g = job.group
    return (
        tuple(job.M.shape),
        job.M.dtype,
        job.M.device,
        float(job.alpha),
        float(g["damping"]),
        g["basis"],
        int(g["ns_steps"]),
        g["scale"],
        float(g["rms_target"]),
    )


def _one(job: DirectionJob) -> DirectionResult:
    """One matrix, with the fallback rules (tracked basis: previous basis; others: skip; then raise)."""
    g = job.group
    counter: dict = {}
    tracked = None
    if g["basis"] == "tracked":
        tracked = dict(job.tracked or {})  # a copy: every rank applies the new basis from the result
    try:
        D = spectral_direction(
            job.M,
            job.alpha,
            g["damping"],
            g["basis"],
            state=tracked,
            rank=g["rank"],
            refresh_every=g["refresh_every"],
            ns_steps=g["ns_steps"],
            counter=counter,
            check_finite=False,  # the engine skipped non-finite gradients before the momentum
        )
    except DecompositionError as e:
        retries = counter.get("retries", 0)
        if job.consecutive_failures + 1 >= MAX_DECOMPOSITION_FAILURES:
            return DirectionResult(RAISE, retries=retries, error=str(e), exc=e)
        prev = (job.tracked or {}).get("basis") if g["basis"] == "tracked" else None
        if prev is None:
            return DirectionResult(SKIP, retries=retries, error=str(e))
        V = prev.to(job.M.dtype)
        B = job.M @ V  # columns M v_k; their norms estimate sigma_k in the previous basis
        M = job.M
        w = inverse_transform(B.norm(dim=0), job.alpha, g["damping"], rank_floor(*M.shape, M.dtype))
        D = (B * w) @ V.mT
        return DirectionResult(FALLBACK, scale_directions(D, g), retries=retries, error=str(e))
    basis = tracked["basis"] if tracked is not None else None
    return DirectionResult(
        OK, scale_directions(D, g), counter.get("retries", 0), counter.get("refreshes", 0), basis
    )


def owner_directions(jobs: list[DirectionJob]) -> dict[str, DirectionResult]:
    """Directions for the owner's matrices: batched per (shape, dtype, options) for svd / gram /
    newton_schulz, one by one for tracked bases (their state is per matrix). Never raises for a single
    matrix's failure: the status says what happened, and the caller raises on every rank together."""
    out: dict[str, DirectionResult] = {}
    batches: dict[tuple, list[DirectionJob]] = {}
    for job in jobs:
        if job.group["basis"] == "tracked":
            batches.setdefault(("tracked", job.key), []).append(job)
        else:
            batches.setdefault(_batch_key(job), []).append(job)
    for bkey, bjobs in batches.items():
        try:
            if len(bjobs) == 1 or bkey[0] == "tracked":
                for job in bjobs:
                    out[job.key] = _one(job)
                continue
            g = bjobs[0].group
            counter: dict = {}
            try:
                Ds = spectral_direction(
                    torch.stack([j.M for j in bjobs]),
                    bjobs[0].alpha,
                    g["damping"],
                    g["basis"],
                    ns_steps=g["ns_steps"],
                    counter=counter,
                    check_finite=False,
                )
            except DecompositionError:  # find the failing matrix: retry one by one
                for job in bjobs:
                    out[job.key] = _one(job)
                continue
            Ds = scale_directions(Ds, g)
            retries = counter.get("retries", 0)
            for job, D in zip(bjobs, Ds.unbind(0)):
                out[job.key] = DirectionResult(OK, D, retries)
        except Exception as e:  # noqa: BLE001 - reported to every rank, raised everywhere
            for job in bjobs:
                if job.key not in out:
                    out[job.key] = DirectionResult(ERROR, error=f"{type(e).__name__}: {e}", exc=e)
    return out
