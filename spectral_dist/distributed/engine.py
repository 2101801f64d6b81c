"""DistributedEngine: each matrix is preconditioned on one owner rank, which keeps its momentum and basis.

``SpectralNewton`` picks this engine by itself when a process group with more than one rank is initialised
(see :func:`spectral_dist.optim.engine.make_engine`). A step is:

1. one small ``all_gather`` of which matrices have a gradient on which rank (a gradient present on some
   ranks but not others is an error naming the parameter; absent everywhere means no step for it);
2. ``gather_to_owners``: one ``all_to_all_single`` assembling each matrix's full gradient on its owner
   (none at all for DDP-replicated parameters, whose gradient is already all-reduced on every rank);
3. ``opt.matrix_direction`` on the owned matrices (momentum, basis, direction);
4. ``scatter_from_owners``: one ``all_to_all_single`` returning each rank its slices of the direction, or a
   skip flag; 5. ``opt.apply_matrix_update`` on the local slices.

Layouts: a plain tensor is replicated (DDP, or no wrapper); a DTensor whose placements are ``Shard(0)`` or
``Replicate`` (FSDP2's ``fully_shard``, HSDP) holds a contiguous row block, computed by DTensor's own
``compute_local_shape_and_global_offset``, so uneven and empty shards are handled exactly as FSDP2 made them.
The result equals the single-process step on the same global batch up to float round-off, for any world
size, and the optimizer state of the matrices is split across ranks by the cost-balanced owner plan.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .exchange import ExchangeError, _names, comm_device, gather_to_owners, scatter_from_owners
from .layout import MatrixLayout, Plan, build_plan

__all__ = ["DistributedEngine", "PlanMismatchError", "ShardLocalEngine", "local_tensor", "state_bytes"]


class PlanMismatchError(RuntimeError):
    """Ranks disagree about the matrices to optimise (a parameter missing on one rank, another shape)."""


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: the local shard of a DTensor (a view: in-place ops update it)."""
    return t.to_local() if _is_dtensor(t) else t


def _local_rows(name: str, p: torch.Tensor) -> tuple[int, int] | None:
    """(first row, number of rows) this rank holds of a DTensor parameter, None for a plain tensor."""
    if not _is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for pl in p.placements:
        strided = type(pl).__name__ == "_StridedShard"  # FSDP2 over TP: rows interleaved, not a block
        if strided or not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)):
            raise ValueError(
                f"parameter {name!r} has placements {p.placements}; the exact distributed engine supports "
                "Shard(0) and Replicate (fully_shard, HSDP)"
            )
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape[1:]) != tuple(p.shape[1:]):
        raise ValueError(
            f"parameter {name!r}: local shard {tuple(shape)} is not a row block of {tuple(p.shape)}"
        )
    return int(offset[0]) if shape[0] else 0, int(shape[0])


def state_bytes(opt) -> int:
    """Bytes of tensors in ``opt.state`` held by this rank (local shards of DTensors; tracked bases included)."""
    seen: set[int] = set()

    def walk(x) -> int:
        if isinstance(x, torch.Tensor):
            t = local_tensor(x)
            if id(t) in seen:
                return 0
            seen.add(id(t))
            return t.numel() * t.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    return sum(walk(st) for st in opt.state.values())


class DistributedEngine:
    """Owner-sharded matrix step over the default process group (or ``group``).

    Construction is collective: every rank describes its matrices (name, shape, local row range) in one
    ``all_gather_object``; a parameter missing on some rank or a shape mismatch raises
    :class:`PlanMismatchError` naming it; the LPT plan's hash is verified with one more ``all_gather_object``.
    The plan is rebuilt (collectively) when the optimizer's matrices change.
    """

    def __init__(self, opt, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.plan: Plan | None = None
        self._signature = None
        self._params: dict[str, tuple[torch.Tensor, dict]] = {}
        self.build(opt)

    # ------------------------------------------------------------------ plan
    @staticmethod
    def _jobs(opt):
        return [(n, p, g) for n, p, g in opt.named_params() if opt.is_matrix(p, g)]

    @staticmethod
    def _signature_of(jobs):
        return tuple((n, id(p), tuple(p.shape)) for n, p, _ in jobs)

    def build(self, opt, jobs=None) -> Plan:
        """(Re)build and verify the owner plan for the optimizer's matrices (collective)."""
        jobs = self._jobs(opt) if jobs is None else jobs
        names = [n for n, _, _ in jobs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"matrix parameter names must be unique for the distributed engine: {dup}")
        mine = {}
        for n, p, _ in jobs:
            rows = _local_rows(n, p)
            mine[n] = (tuple(p.shape), rows)
        everyone: list[dict] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(everyone, mine, group=self.group)
        all_names = set().union(*(set(d) for d in everyone))
        for n in sorted(all_names):
            missing = [r for r, d in enumerate(everyone) if n not in d]
            if missing:
                raise PlanMismatchError(
                    f"matrix parameter {n!r} is missing on rank(s) {missing} (present on the others); every "
                    "rank must build the optimizer over the same parameters"
                )
            shapes = {d[n][0] for d in everyone}
            if len(shapes) > 1:
                raise PlanMismatchError(f"matrix parameter {n!r} has different shapes across ranks: {shapes}")
        layouts = []
        for n, p, _ in jobs:
            m = int(p.shape[0])
            cols = p.numel() // m if m else 0
            slices = []
            for d in everyone:
                rows = d[n][1]
                slices.append([(0, m * cols)] if rows is None else [(rows[0] * cols, rows[1] * cols)])
            layouts.append(MatrixLayout(n, (m, cols), slices))
        plan = build_plan(layouts, self.world_size)
        hashes: list[str] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(hashes, plan.hash, group=self.group)
        if len(set(hashes)) != 1:
            raise PlanMismatchError(
                f"owner plans differ across ranks (hashes {hashes}); matrices on rank {self.rank}: {names}"
            )
        self.plan = plan
        self._signature = self._signature_of(jobs)
        self._params = {n: (p, g) for n, p, g in jobs}
        return plan

    def owner_of(self, name: str) -> int:
        return self.plan.owner(name)

    # ------------------------------------------------------------------ step
    def _active_keys(self, jobs) -> list[str]:
        """Matrices to step this time: gradient present on every rank that holds part of them.

        One all_gather of a byte per matrix; ranks with an empty shard do not count (FSDP2 may leave them
        without a gradient).
        """
        plan = self.plan
        keys = [lay.key for lay in plan.layouts]
        if not keys:
            return []
        has = torch.tensor(
            [self._params[k][0].grad is not None for k in keys],
            dtype=torch.uint8,
            device=comm_device(self.group),
        )
        table = [torch.empty_like(has) for _ in range(self.world_size)]
        try:
            dist.all_gather(table, has, group=self.group)
        except Exception as e:  # a timeout here means some rank did not call step()
            raise ExchangeError(
                f"rank {self.rank}: gradient check of matrices {_names(keys)} failed (did every rank call "
                f"optimizer.step()?): {e}"
            ) from e
        table = torch.stack(table).cpu()
        active = []
        for i, k in enumerate(keys):
            lay = plan.layout(k)
            holders = [r for r in range(self.world_size) if lay.local_numel(r) > 0]
            with_grad = [r for r in holders if table[r, i]]
            if not with_grad:
                continue
            if len(with_grad) != len(holders):
                without = sorted(set(holders) - set(with_grad))
                raise RuntimeError(
                    f"parameter {k!r} has a gradient on rank(s) {with_grad} but none on rank(s) {without}; "
                    "every rank must run the same backward (or set unused gradients to zeros)"
                )
            active.append(k)
        return active

    def matrix_step(self, opt, jobs) -> None:
        if self.plan is None or self._signature_of(jobs) != self._signature:
            self.build(opt, jobs)
        keys = self._active_keys(jobs)
        if not keys:
            return
        plan, rank = self.plan, self.rank
        local = {}
        for k in keys:
            p, _ = self._params[k]
            g = p.grad
            if g is None:  # an empty shard without a gradient
                local[k] = [torch.empty(0)]
            else:
                local[k] = [local_tensor(g).reshape(-1)]
        full = gather_to_owners(plan, local, self.group, keys=keys)
        dirs = {}
        for k in keys:
            if plan.owner(k) != rank:
                continue
            p, group = self._params[k]
            dirs[k] = opt.matrix_direction(p, full[k], group, k)
        pieces = scatter_from_owners(plan, dirs, self.group, keys=keys)
        for k in keys:
            got = pieces[k]
            if got is None:
                continue
            p, group = self._params[k]
            lp = local_tensor(p)
            if lp.numel() == 0:
                continue
            opt.apply_matrix_update(lp, got[0].to(lp.device).view(lp.shape), group)


class ShardLocalEngine:
    """Approximate, opt-in: each rank preconditions its own row block of each FSDP2-sharded matrix.

    No exchange at all, so it is faster than :class:`DistributedEngine`, but the direction of a row block is
    not the row block of the full matrix's direction: results depend on the world size, and a rank's momentum
    and basis describe its shard only (non-finite-gradient skips are decided per rank too). Replicated (DDP)
    matrices are computed whole on every rank. Off by default; select it with
    ``SpectralNewton(..., engine=ShardLocalEngine())``. Sharded checkpoints are not supported in this mode.
    """

    def matrix_step(self, opt, jobs) -> None:
        for name, p, group in jobs:
            if p.grad is None:
                continue
            g = local_tensor(p.grad)
            lp = local_tensor(p)
            if g.numel() == 0:
                continue
            D = opt.matrix_direction(p, g.reshape(g.shape[0], -1), group, name)
            opt.apply_matrix_update(lp, None if D is None else D.view(lp.shape), group)
