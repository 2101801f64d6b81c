"""The math of one SpectralNewton step, free of torch.distributed.

* :func:`owner_directions`: the owner's work. Same-shape matrices with the same options are stacked and
  computed as one batch (one SVD / eigh / Polar Express / Cholesky call per shape group, not per matrix). No
  batch waits for the device: each returns a per-matrix "finite" flag, and the flags of all batches are read
  with one host sync per step; only a matrix whose flag is False (or whose batch raised) is redone alone with
  the float64 retry of :func:`~spectral_dist.spectral.spectral_direction`, so only it is affected.
  A batch holds at most ``max_batch_bytes`` of inputs (:func:`batch_chunks`): its workspace is ~7 stacks of
  its inputs, so an unbounded batch made the step's transient memory ~8x the matrices' size.
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

from ..spectral import (
    STATEFUL,
    DecompositionError,
    auto_method,
    direction_unchecked,
    eigenbasis_batched,
    spectral_direction,
)
from ..spectral.direction import auto_eigenbasis_qr, auto_matmul_dtype
from ..spectral.precision import with_exact_matmuls
from ..spectral.transform import inverse_transform, rank_floor

__all__ = [
    "ERROR",
    "FALLBACK",
    "MAX_DECOMPOSITION_FAILURES",
    "OK",
    "RAISE",
    "REDO",
    "SKIP",
    "DirectionJob",
    "DirectionResult",
    "BATCH_MB",
    "basis_shape",
    "batch_chunks",
    "job_method",
    "job_shape",
    "method_cost",
    "method_flops",
    "method_of",
    "owner_directions",
    "owner_directions_and_read",
    "owner_directions_deferred",
    "redo",
    "slot_cost",
    "slot_method",
    "scale_directions",
    "tracked_rank",
]

OK, SKIP, FALLBACK, RAISE, ERROR = 0, 1, 2, 3, 4
REDO = 5  # in an exchange header only: a deferred batch's finite flag was False, the owner redoes the matrix
MAX_DECOMPOSITION_FAILURES = 3
# SpectralNewton's default ``max_batch_mb``: the most MiB of inputs stacked into one batched decomposition. Big
# enough that the batches of GPT-2-small / ViT-B/16 shapes stay whole (48 x 768^2 fp32 is 108 MiB) and that a
# batch of large matrices still fills a GPU (4 x 4096^2 fp32 is a 0.55 TFLOP bmm); small enough that the
# batch's workspace (~7 stacks) stays under 2 GiB.
BATCH_MB = 256


def batch_chunks(jobs: list, max_bytes: int | None) -> list[list]:
    """Split same-shape jobs into consecutive chunks of at most ``max_bytes`` of inputs each (at least one job
    per chunk; None: one chunk), as equal in length as possible so no chunk is a small remainder."""
    if max_bytes is None or len(jobs) <= 1:
        return [jobs]
    M = jobs[0].M
    per = max(1, M.numel() * M.element_size())
    n = len(jobs)
    k = -(-n // max(1, int(max_bytes) // per))  # number of chunks
    size, extra = divmod(n, k)
    out, i = [], 0
    for c in range(k):
        j = i + size + (c < extra)
        out.append(jobs[i:j])
        i = j
    return out


def tracked_rank(shape, group: Mapping) -> int:
    m, n = int(shape[0]), int(shape[1])
    r = group["rank"]
    return min(m, n) if r is None else min(int(r), m, n)


def basis_shape(shape, group: Mapping, method: str) -> tuple[int, int]:
    """The shape of a stateful basis for an (m, n) matrix: ``"tracked"`` keeps right singular vectors (n, r);
    ``"eigenbasis"`` keeps the smaller side's (min(m, n), r) (left singular vectors of a wide matrix)."""
    m, n = int(shape[0]), int(shape[1])
    r = tracked_rank((m, n), group)
    return (min(m, n), r) if method == "eigenbasis" else (n, r)


def method_flops(shape, method: str, steps: int = 5, jacobi_steps: int = 0) -> int:
    """Approximate flops of one matrix's direction by ``method`` (k = min(m, n), l = max(m, n); a matmul of
    a x b by b x c is 2 a b c). LAPACK counts from Golub & Van Loan (thin R-SVD 6 l k^2 + 20 k^3, symmetric eigh
    with vectors ~9 k^3); ``steps``: Newton-Schulz / Polar Express iterations; ``jacobi_steps``: the
    eigenbasis's Jacobi steps (each B^T B and X Q', 2 l k^2 each, Q (I + K) and the QR, ~5 k^3)."""
    m, n = int(shape[0]), int(math.prod(int(s) for s in shape[1:]))
    k, ln = min(m, n), max(m, n)
    if method in ("polar_express", "newton_schulz"):
        if method == "polar_express" and ln >= 2 * k:  # Gram form: (4 steps - 3) k x k matmuls, X X^T, R X
            return 4 * ln * k * k + (8 * steps - 6) * k**3
        return steps * (4 * k * k * ln + 2 * k**3)
    if method == "cholesky":  # Gram and G P (2 l k^2 each), Cholesky, L^-1, L^-T L^-1 (~3 k^3)
        return 4 * ln * k * k + 3 * k**3
    if method == "eigenbasis":  # Gram, X Q, (B w) Q^T (2 l k^2 each), A Q and the k x k QR (~5 k^3)
        return 6 * ln * k * k + 5 * k**3 + int(jacobi_steps) * (4 * ln * k * k + 5 * k**3)
    if method == "gram":  # Gram and G P (2 l k^2 each), eigh ~9 k^3, Q w Q^T 2 k^3
        return 4 * ln * k * k + 11 * k**3
    if method in ("svd", "tracked"):  # tracked: its refresh
        return 6 * ln * k * k + 20 * k**3
    raise ValueError(f"unknown method {method!r}")


def method_cost(shape, method: str, jacobi_steps: int = 0) -> int:
    """What the owner plan balances: :func:`method_flops`, with SVD and eigh weighted by how far below matmul
    speed they run (float64 eigh for ``"gram"``: measured 3.1x a batched Muon step at GPT-2 shapes on CPU).
    Polar Express's Gram form costs 2.7x a Cholesky step at 768 x 3072 (measured 2.3x on CPU), so balancing
    on m n min(m, n) alone put both of a GPT-2 layer pair's MLP-down matrices on one rank."""
    slowdown = {"gram": 3, "svd": 4, "tracked": 4}.get(method, 1)
    return slowdown * method_flops(shape, method, jacobi_steps=jacobi_steps)


def method_of(group: Mapping, alpha: float, device) -> str:
    """The decomposition method a matrix of ``group`` uses: the group's ``basis``, or for ``"auto"`` the
    choice of :func:`~spectral_dist.spectral.auto_method` for the matrix's device and resolved alpha."""
    b = group["basis"]
    return auto_method(float(alpha), float(group["damping"]), device) if b == "auto" else b


def job_shape(slot) -> tuple[int, ...]:
    """The shape the owner preconditions a slot's matrix as: its matrix view (m, n), or (count, m, n) for a
    group with ``batch_dims`` = k > 0 (a stack of matrices: the leading k dims of the parameter's shape)."""
    k = int(slot.group.get("batch_dims", 0))
    if k == 0 or slot.kind != "matrix":
        return slot.mshape
    shape = tuple(int(d) for d in slot.shape)
    return (math.prod(shape[:k]), shape[k], math.prod(shape[k + 1 :]))


def job_method(group: Mapping, alpha: float, M: torch.Tensor) -> str:
    """:func:`method_of` for an owner's input M: a stack of matrices (M.ndim > 2, ``batch_dims``) keeps no
    per-matrix basis, so where ``"auto"`` picks a stateful one it runs ``"gram"`` (validation refuses a named
    stateful basis there)."""
    m = method_of(group, alpha, M.device)
    return "gram" if M.ndim > 2 and m in STATEFUL else m


def slot_method(opt, slot, stateless: bool = False, meta: Mapping | None = None) -> str:
    """:func:`method_of` for an engine slot (alpha resolved from its state; the same on every rank).
    ``stateless=True``: where ``"auto"`` would pick a stateful basis, ``"gram"`` (for engines that keep no
    per-matrix basis, such as the shard-local approximation). ``meta``: the slot's state when the caller has
    read it without creating it (``slot.meta()`` creates it)."""
    g = slot.group
    meta = slot.meta() if meta is None else meta
    m = method_of(g, opt.resolve_alpha_meta(meta, g), slot.local().device)
    stateless = stateless or (slot.kind == "matrix" and int(g.get("batch_dims", 0)) > 0)
    return "gram" if stateless and m in STATEFUL and g["basis"] == "auto" else m


def slot_cost(opt, slot, meta: Mapping | None = None) -> int:
    """What an owner plan weighs a slot's matrix by: :func:`method_cost` of its method (:func:`slot_method`)
    and its group's ``jacobi_steps``."""
    shape = job_shape(slot)
    count = shape[0] if len(shape) == 3 else 1  # a stack of matrices (batch_dims): each one costs
    return count * method_cost(shape[-2:], slot_method(opt, slot, meta=meta), slot.group["jacobi_steps"])


def _matmul_dtype(group: Mapping, method: str, X: torch.Tensor):
    """The bf16 matmuls of a batch X: :func:`~spectral_dist.spectral.direction.auto_matmul_dtype` under
    ``basis="auto"`` (Polar Express, and the eigenbasis's last product, in bf16 on CUDA and, when
    SPECTRAL_DIST_CPU_BF16 asks, on CPUs; never for float64 X), None (the working dtype) when the group names its basis."""
    return auto_matmul_dtype(method, X.device, X.dtype) if group["basis"] == "auto" else None


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
    # the deferred finite flag (owner_directions_deferred): status OK holds only where it is True
    ok: torch.Tensor | None = field(default=None, repr=False)


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


def _batch_key(job: DirectionJob, method: str):
    g = job.group
    return (
        tuple(job.M.shape),
        job.M.dtype,
        job.M.device,
        float(job.alpha),
        float(g["damping"]),
        method,
        g["basis"] == "auto",  # decides the matmul dtype (_matmul_dtype)
        int(g["ns_steps"]),
        g["scale"],
        float(g["rms_target"]),
    )


def _one(job: DirectionJob, method: str | None = None) -> DirectionResult:
    """One matrix, with the fallback rules (tracked basis: previous basis; others: skip; then raise).
    Checked and retried in float64 (host syncs): the path of stateful bases and of failed batches."""
    g = job.group
    method = job_method(g, job.alpha, job.M) if method is None else method
    counter: dict = {}
    tracked = None
    if method in STATEFUL:
        tracked = dict(job.tracked or {})  # a copy: every rank applies the new basis from the result
    try:
        # a stack of matrices (batch_dims, stateless methods only) one by one: any failure is the parameter's
        Ms = job.M.reshape(-1, *job.M.shape[-2:]).unbind(0) if job.M.ndim > 2 else [job.M]
        Ds = [
            spectral_direction(
                M,
                job.alpha,
                g["damping"],
                method,
                state=tracked,
                rank=g["rank"],
                refresh_every=g["refresh_every"],
                ns_steps=g["ns_steps"],
                jacobi_steps=g["jacobi_steps"],
                counter=counter,
                check_finite=False,  # the engine skipped non-finite gradients before the momentum
            )
            for M in Ms
        ]
        D = torch.stack(Ds).view_as(job.M) if job.M.ndim > 2 else Ds[0]
    except DecompositionError as e:
        retries = counter.get("retries", 0)
        if job.consecutive_failures + 1 >= MAX_DECOMPOSITION_FAILURES:
            return DirectionResult(RAISE, retries=retries, error=str(e), exc=e)
        prev = (job.tracked or {}).get("basis") if method in STATEFUL else None
        if prev is None:
            return DirectionResult(SKIP, retries=retries, error=str(e))
        V = prev.to(job.M.dtype)
        wide = method == "eigenbasis" and job.M.shape[0] < job.M.shape[1]  # its basis is on the smaller side
        M = job.M.mT if wide else job.M
        B = M @ V  # columns M v_k; their norms estimate sigma_k in the previous basis
        w = inverse_transform(B.norm(dim=0), job.alpha, g["damping"], rank_floor(*M.shape, M.dtype))
        D = (B * w) @ V.mT
        D = D.mT if wide else D
        return DirectionResult(FALLBACK, scale_directions(D, g), retries=retries, error=str(e))
    basis = tracked["basis"] if tracked is not None else None
    return DirectionResult(
        OK, scale_directions(D, g), counter.get("retries", 0), counter.get("refreshes", 0), basis
    )


def owner_directions(
    jobs: list[DirectionJob], max_batch_bytes: int | None = None
) -> dict[str, DirectionResult]:
    """Directions for the owner's matrices: batched per (shape, dtype, method and options) for the stateless
    methods, one by one for stateful bases (``tracked``, ``eigenbasis``: their state is per matrix). The
    batches' finite flags are read together, with one host sync for all of them; a failed matrix is redone
    alone (float64 retry). Never raises for a single matrix's failure: the status says what happened, and the
    caller raises on every rank together. ``max_batch_bytes``: the most bytes of inputs in one batch
    (:func:`batch_chunks`; None: unbounded)."""
    return owner_directions_and_read(jobs, max_batch_bytes=max_batch_bytes)[0]


def owner_directions_and_read(
    jobs: list[DirectionJob], extra: torch.Tensor | None = None, max_batch_bytes: int | None = None
) -> tuple[dict[str, DirectionResult], list]:
    """:func:`owner_directions`, and the values of ``extra`` (a 1-D tensor, e.g. the gradients' non-finite
    flags) read in the same host sync as the finite flags: one sync for both (one process: the whole step's)."""
    out, pending = _launch(jobs, max_batch_bytes)
    n_extra = 0 if extra is None else extra.numel()

    def read_extra() -> list:  # alone: when there are no flags to read it with, or their read failed
        return [] if extra is None else extra.reshape(-1).tolist()

    if not pending:
        return out, read_extra()
    try:
        dev = pending[0][2].device
        parts = [p[2].to(dev, torch.float32) for p in pending]
        if extra is not None:
            parts.append(extra.reshape(-1).to(dev, torch.float32))
        read = torch.cat(parts).tolist()  # the owner's one host sync
        flags, extra_values = read[: len(read) - n_extra], read[len(read) - n_extra :]
    except Exception as e:  # noqa: BLE001
        for p in pending:
            for job in p[0]:
                out[job.key] = DirectionResult(ERROR, error=f"{type(e).__name__}: {e}", exc=e)
        return out, read_extra()
    i = 0
    for bjobs, Ds, _, bases, refreshes in pending:
        for j, (job, D) in enumerate(zip(bjobs, Ds.unbind(0))):
            out[job.key] = (
                DirectionResult(OK, D, refreshes=refreshes, basis=None if bases is None else bases[j])
                if flags[i]
                else redo(job)
            )
            i += 1
    return out, extra_values


def owner_directions_deferred(
    jobs: list[DirectionJob], max_batch_bytes: int | None = None
) -> dict[str, DirectionResult]:
    """:func:`owner_directions` without its host sync, for an engine that reads the flags later with others
    (over a process group: with the gradient agreement and every owner's headers, one read per step).

    A batched matrix's result has status ``OK`` and its finite flag in ``ok`` (a 0-d bool on the device, not
    read); where the flag turns out False the caller discards the direction and calls :func:`redo`. Results
    without ``ok`` (stateful ``tracked`` bases, batches that raised) are final, as in :func:`owner_directions`."""
    out, pending = _launch(jobs, max_batch_bytes)
    for bjobs, Ds, ok, bases, refreshes in pending:
        for j, (job, D, f) in enumerate(zip(bjobs, Ds.unbind(0), ok.reshape(-1).unbind(0))):
            basis = None if bases is None else bases[j]
            out[job.key] = DirectionResult(OK, D, refreshes=refreshes, basis=basis, ok=f)
    return out


@with_exact_matmuls
def redo(job: DirectionJob) -> DirectionResult:
    """A matrix whose batched result was not finite, alone, with the float64 retry and the fallback rules."""
    try:
        return _one(job)
    except Exception as e:  # noqa: BLE001 - reported to every rank, raised everywhere
        return DirectionResult(ERROR, error=f"{type(e).__name__}: {e}", exc=e)


@with_exact_matmuls  # the caller's TF32 / autocast settings do not reach the owner's math
def _launch(
    jobs: list[DirectionJob], max_batch_bytes: int | None = None
) -> tuple[dict[str, DirectionResult], list[tuple]]:
    """(final results, pending batches): every batch computed, nothing read. A pending batch is (jobs,
    scaled directions, finite flags, new bases or None, refreshes); batches are split by
    :func:`batch_chunks`."""
    out: dict[str, DirectionResult] = {}
    batches: dict[tuple, list[DirectionJob]] = {}
    methods: dict[tuple, str] = {}
    for job in jobs:
        method = job_method(job.group, job.alpha, job.M)
        if method == "eigenbasis":  # batched too: same shape, options and phase (init / step count)
            key = ("eigenbasis", *_batch_key(job, method), *_phase(job))
        elif method in STATEFUL:
            key = ("stateful", job.key)
        else:
            key = _batch_key(job, method)
        batches.setdefault(key, []).append(job)
        methods[key] = method
    chunks = [
        (bkey, c)
        for bkey, bjobs in batches.items()
        for c in ([bjobs] if bkey[0] == "stateful" else batch_chunks(bjobs, max_batch_bytes))
    ]
    pending: list[tuple] = []
    for bkey, bjobs in chunks:
        method = methods[bkey]
        try:
            if bkey[0] == "stateful":
                for job in bjobs:
                    out[job.key] = _one(job, method)
                continue
            if bkey[0] == "eigenbasis":
                try:
                    pending.append(_eigenbasis_batch(bjobs, bkey))
                except (torch.linalg.LinAlgError, RuntimeError):  # one by one, with the float64 retry
                    for job in bjobs:
                        out[job.key] = _one(job, method)
                continue
            g, first = bjobs[0].group, bjobs[0]
            X = torch.stack([j.M for j in bjobs]) if len(bjobs) > 1 else first.M.unsqueeze(0)
            try:
                Ds, ok = direction_unchecked(
                    X,
                    first.alpha,
                    g["damping"],
                    method,
                    ns_steps=g["ns_steps"],
                    matmul_dtype=_matmul_dtype(g, method, X),
                )
            except (torch.linalg.LinAlgError, RuntimeError):  # find the failing matrix: one by one
                for job in bjobs:
                    out[job.key] = _one(job, method)
                continue
            # one flag per job: a stack of matrices (batch_dims) is finite when all of its matrices are
            pending.append((bjobs, scale_directions(Ds, g), ok.reshape(len(bjobs), -1).all(-1), None, 0))
        except Exception as e:  # noqa: BLE001 - reported to every rank, raised everywhere
            for job in bjobs:
                if job.key not in out:
                    out[job.key] = DirectionResult(ERROR, error=f"{type(e).__name__}: {e}", exc=e)
    return out, pending


def _phase(job: DirectionJob) -> tuple:
    """(step, init) of an eigenbasis job: matrices batch together only at the same point of their schedule."""
    g = job.group
    tr = job.tracked or {}
    Q = tr.get("basis")
    step = int(tr.get("step", 0))
    init = Q is None or tuple(Q.shape) != basis_shape(job.M.shape, g, "eigenbasis") or step == 0
    return step, init, g["rank"], int(g["refresh_every"]), int(g["jacobi_steps"])


def _eigenbasis_batch(bjobs: list[DirectionJob], bkey: tuple):
    """One batched eigenbasis step for same-shape, same-phase matrices: (jobs, D, ok, new bases, refreshes)."""
    g, first = bjobs[0].group, bjobs[0]
    step, init = bkey[-5], bkey[-4]
    X = torch.stack([j.M for j in bjobs])
    Q = None if init else torch.stack([j.tracked["basis"].to(X.device) for j in bjobs])
    qr = auto_eigenbasis_qr(X.device)  # reasons: eigenbasis_batched
    D, Qn, ok = eigenbasis_batched(
        X,
        first.alpha,
        g["damping"],
        Q,
        step,
        g["rank"],
        g["refresh_every"],
        qr=qr,
        jacobi_steps=g["jacobi_steps"],
        apply_dtype=_matmul_dtype(g, "eigenbasis", X),
    )
    return bjobs, scale_directions(D, g), ok, Qn.unbind(0), int(init)
