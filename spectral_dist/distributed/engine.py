"""The one engine behind every SpectralNewton step: one process, DDP, FSDP2 (any DTensor placement) and ZeRO.

An engine only needs *slots*: for each parameter the optimizer steps, its key (FQN), its layout over the
ranks (:mod:`.describe` for tensors and DTensors, the DeepSpeed integration for ZeRO's flat partitions) and
accessors for this rank's local data, gradient and state buffers. A step reads the device once:

1. **Agreement** (one ``all_reduce``, not read yet): per parameter, how many holders have a gradient and how
   many hold a non-finite one, as a table on the device, and from it a per-parameter "steps" flag.
2. **Momentum**, elementwise on each rank's own elements (momentum lives sharded like the parameter, so every
   rank's state dict has the parameter's own layout: DCP, accelerate and DeepSpeed checkpoints just work).
   A gradient whose flag says it does not step enters as the buffer itself (``torch.where``), which leaves
   the buffer bit for bit as it was.
3. ``gather_to_owners``: the momentum-blended matrix M goes to its owner (LPT plan), each piece once. Every
   matrix takes part except those that had no gradient on any rank at their last step (a set every rank
   derives from the same read table, so the list is the same everywhere).
4. The owner computes the directions, batched by shape
   (:func:`~spectral_dist.optim.matrix_step.owner_directions_deferred`); each batch's finite flags stay on
   the device and become the status column of the owner's headers (``OK``, or ``REDO`` where not finite).
5. ``scatter_from_owners``: every rank receives a header for every matrix, its pieces of the direction and,
   for stateful bases, the new basis (kept on every rank so any rank's state is complete).
6. **The step's one host sync**: the agreement table and all headers, read together. Every rank then takes
   the same decisions: skip a parameter whose gradient is non-finite anywhere (also a shard of a vector),
   raise when a gradient is missing on some holders (nothing has changed yet), raise
   ``NonFiniteGradientError`` after too many skips in a row; apply the directions (weight decay, lr from the
   *live* param group) with foreach ops, update counters from the headers (identical everywhere), and run
   AdamW with foreach ops on the vectors' local elements.

Two rare cases read more, on every rank together since the read told all of them: a ``REDO`` (a batch's
finite flag was False) is recomputed alone by its owner with the float64 retry and scattered again; a matrix
that has a gradient again after a step without one is exchanged on its own.

In one process (:class:`LocalEngine`) there is no table to reduce: the gradients' non-finite flags are read
with the owner's finite flags, after the directions.

Host syncs per step: 1, in one process and over a process group, whatever the number of matrices, with the
matmul-only bases (``basis="auto"`` at alpha 0, 1, 2 and the eigenbasis after its first step); eigh/SVD-based
bases add one per shape group (the LAPACK/cuSOLVER info check), the tracked basis a few per matrix
(tests/test_step_syncs.py and tests/test_step_syncs_dist.py count them).

Engine choice (:func:`make_engine`), taken at the first step, never at construction (building an optimizer
is never collective, so one built on a single rank cannot hang): ``distributed=False`` or no initialised
process group: one process. ``distributed="auto"`` (default) with a process group of more than one rank:
owner-sharded over it; every rank must then call ``step()``. An optimizer stepped on one rank only (an EMA
copy, an eval helper) must say ``distributed=False``. A ``ProcessGroup`` selects that group.

:class:`ShardLocalEngine` is an opt-in approximation that preconditions each rank's own block.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..optim import matrix_step as ms
from ..spectral import STATEFUL
from .describe import describe, is_dtensor, local_tensor
from .exchange import ExchangeError, _names, comm_device, gather_to_owners, scatter_from_owners
from .layout import MatrixLayout, Plan, build_plan

__all__ = [
    "DistributedEngine",
    "LocalEngine",
    "OwnerEngine",
    "ParamSlot",
    "PlanMismatchError",
    "ShardLocalEngine",
    "local_tensor",
    "make_engine",
    "state_bytes",
]

HEADER = 3  # status, retries, refreshes


class PlanMismatchError(RuntimeError):
    """Ranks disagree about the parameters to optimise (a parameter missing on one rank, another shape)."""


# ---------------------------------------------------------------------------------------------- slots
class ParamSlot:
    """A parameter as the engine sees it: key, group index (the group dict is looked up live every step),
    kind ("matrix" or "vector"), its matrix view shape, its layout, and accessors to this rank's elements."""

    __slots__ = ("opt", "key", "gi", "param", "kind", "mshape", "layout", "shape")

    def __init__(self, opt, key: str, gi: int, param: torch.Tensor, kind: str, layout: MatrixLayout):
        self.opt, self.key, self.gi, self.param, self.kind, self.layout = opt, key, gi, param, kind, layout
        shape = tuple(layout.shape)
        self.shape = shape  # the parameter's (global) shape
        self.mshape = (shape[0], layout.numel // max(1, shape[0])) if len(shape) >= 2 else (layout.numel,)

    @property
    def group(self) -> dict:
        return self.opt.param_groups[self.gi]

    def meta(self) -> dict:
        """Per-parameter state that is not elementwise (counters, tracked basis, alpha estimate, steps)."""
        return self.opt.state[self.param]

    def local(self) -> torch.Tensor:
        """This rank's part of the parameter (a tensor whose in-place updates reach the parameter)."""
        return local_tensor(self.param)

    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return None if g is None else local_tensor(g).reshape(-1)

    def buffer(self, name: str, dtype: torch.dtype, init: Callable | None = None) -> torch.Tensor:
        """This rank's elements of an elementwise state buffer shaped (and sharded) like the parameter."""
        st = self.opt.state[self.param]
        b = st.get(name)
        if b is None:
            b = torch.zeros_like(self.param, dtype=dtype, memory_format=torch.contiguous_format)
            if init is not None:
                local_tensor(b).copy_(init(self.local()))
            st[name] = b
        return local_tensor(b).view(-1)

    def apply(self, fn) -> None:
        """Run ``fn(local flat view)`` and make sure the result lands in the parameter."""
        lt = self.local()
        if lt.is_contiguous():
            fn(lt.view(-1))
        else:  # e.g. channels_last: update a contiguous copy, write it back
            flat = lt.contiguous().view(-1)
            fn(flat)
            lt.copy_(flat.view(lt.shape))


def _kind(opt, p, group) -> str:
    return "matrix" if opt.is_matrix(p, group) else "vector"


def nonfinite_flags(grads: list[torch.Tensor]) -> torch.Tensor:
    """(len(grads),) bool on the gradients' device: whether each has a NaN or Inf entry. No host sync.

    A NaN or Inf entry makes the sum non-finite (as in spectral.direction.finite_matrices); a sum measured 19x
    faster than the inf-norm on CPU (13 ViT-B/16 matrices: 0.9 against 17.8 ms). fp16 is summed in float32 so
    that large finite gradients do not overflow its range."""
    sums = [(g.float() if g.dtype == torch.float16 else g).sum() for g in grads]
    return ~torch.isfinite(torch.stack([x.float() for x in sums]))


# ---------------------------------------------------------------------------------------------- engine
class OwnerEngine:
    """Owner-sharded matrix step over a process group (``group=False``: one process, no collectives).

    See the module docstring for the step. Layouts are computed without communication; the plan is checked
    across ranks (one small ``all_reduce`` of its hash) at the first step after it changes.
    """

    def __init__(self, group=None):
        self.group = group
        self.local = group is False
        self.rank = 0 if self.local else dist.get_rank(group)
        self.world_size = 1 if self.local else dist.get_world_size(group)
        self._group_ranks = None if self.local or group is None else dist.get_process_group_ranks(group)
        self.plan: Plan | None = None
        self._slots: list | None = None
        self._signature = None
        self._verified = self.local
        self._absent: set[str] = set()  # matrices without gradient on every rank at their last step

    # ------------------------------------------------------------------ slots and plan
    def slots(self, opt) -> list:
        """The slots of the optimizer's parameters (rebuilt when its parameters change)."""
        sig = tuple(
            (gi, id(p), bool(opt.is_matrix(p, g)), p.requires_grad)
            for gi, g in enumerate(opt.param_groups)
            for p in g["params"]
        )
        if sig != self._signature:
            self._slots = self.build_slots(opt)
            self._signature = sig
            self.plan = build_plan(*self.plan_args(opt, self._slots))
            self._verified = self.local
        return self._slots

    def plan_args(self, opt, slots) -> tuple:
        """(layouts, world size, costs) of the owner plan: each matrix weighted by its method's flops
        (:func:`~spectral_dist.optim.matrix_step.slot_cost`), the same on every rank."""
        mats = [s for s in slots if s.kind == "matrix"]
        costs = {s.key: ms.slot_cost(opt, s) for s in mats}
        return [s.layout for s in mats], self.world_size, costs

    def build_slots(self, opt) -> list:
        out, seen = [], set()
        for gi, g in enumerate(opt.param_groups):
            names = g.get("param_names")
            for i, p in enumerate(g["params"]):
                key = names[i] if names is not None else f"group{gi}.param{i}"
                if key in seen:
                    raise ValueError(f"parameter names must be unique, {key!r} appears twice")
                seen.add(key)
                lay = describe(key, p, self.world_size, self._group_ranks)
                out.append(ParamSlot(opt, key, gi, p, _kind(opt, p, g), lay))
        return out

    def owner_of(self, key: str) -> int:
        return self.plan.owner(key)

    def _verify(self, slots) -> None:
        """All ranks must step the same parameters with the same layouts: compare a hash (collective)."""
        h = zlib.crc32(
            repr([(s.key, s.kind, s.param.requires_grad, s.layout.describe()) for s in slots]).encode()
        )
        h = zlib.crc32(self.plan.hash.encode(), h)
        mine = torch.tensor(
            [float(h), float(len(slots))], dtype=torch.float64, device=comm_device(self.group)
        )
        both = torch.stack([mine, -mine])
        self._all_reduce(
            both, dist.ReduceOp.MIN, f"the check that every rank steps the same {len(slots)} parameters"
        )
        lo, hi = both[0].tolist(), (-both[1]).tolist()
        if lo != hi:
            everyone: list = [None] * self.world_size
            dist.all_gather_object(
                everyone, [(s.key, tuple(s.layout.shape)) for s in slots], group=self.group
            )
            mine_set = set(everyone[self.rank])
            detail = []
            for r, theirs in enumerate(everyone):
                if r == self.rank:
                    continue
                only_here = sorted(k for k, _ in mine_set - set(theirs))[:5]
                only_there = sorted(k for k, _ in set(theirs) - mine_set)[:5]
                if only_here or only_there:
                    detail.append(
                        f"rank {r} lacks {only_here} and has {only_there} that rank {self.rank} lacks"
                    )
            raise PlanMismatchError(
                "ranks step different parameters or layouts: "
                + ("; ".join(detail) or "same names, different shapes, kinds, requires_grad or orders")
                + ". Every rank must build the optimizer over the same parameters, in the same order"
            )
        self._verified = True

    def _all_reduce(self, t, op, what: str) -> None:
        try:
            dist.all_reduce(t, op=op, group=self.group)
        except Exception as e:  # a timeout here means some rank did not call step()
            raise ExchangeError(
                f"rank {self.rank}: {what} failed (did every rank call optimizer.step()? An optimizer used on "
                f"one rank only needs SpectralNewton(..., distributed=False)): {e}"
            ) from e

    # ------------------------------------------------------------------ step
    def _begin(self, opt) -> tuple[list, list]:
        """(slots, local gradients) of a step, with the plan checked and every state initialised."""
        slots = self.slots(opt)
        if not self._verified:
            self._verify(slots)
        for s in slots:  # the same state keys on every rank and in every run, used parameters or not
            if s.param.requires_grad:
                opt.init_state(s)
        return slots, [s.grad() for s in slots]

    def step(self, opt) -> None:
        """One step with one host sync (module docstring): nothing is read before the exchange."""
        slots, grads = self._begin(opt)
        if not slots:
            return
        n = len(slots)
        table, stepping = self._agreement(slots, grads)
        # every trainable matrix not known to be without gradient enters the exchange (the same list on every
        # rank: the absent set comes from an all-reduced table, requires_grad is in the plan's checked hash);
        # the read below decides what is applied
        mats = [
            s for s in slots if s.kind == "matrix" and s.param.requires_grad and s.key not in self._absent
        ]
        grad_of = {s.key: g for s, g in zip(slots, grads)}
        index = {s.key: i for i, s in enumerate(slots)}
        keys = [s.key for s in mats]
        dtype = _dtype(slots)
        group = False if self.local else self.group
        results: dict = {}
        got: dict = {}
        jobs: dict = {}
        if mats:
            gdev = next((g.device for g in grads if g is not None), stepping.device)
            held_back = (~stepping).to(gdev).unbind(0)  # a gradient that does not step leaves its momentum
            local = self._momentum(opt, mats, grad_of, {s.key: held_back[index[s.key]] for s in mats})
            for s in mats:  # a holder without gradient sends zeros: the table already says "none" or raises
                if s.key not in local and s.layout.local_numel(self.rank):
                    local[s.key] = torch.zeros(s.layout.local_numel(self.rank), dtype=dtype, device=gdev)
            full = gather_to_owners(self.plan, local, group, keys=keys, dtype=dtype)
            results, jobs = self._owner_compute(opt, mats, full, deferred=True)
            got = self._scatter(opt, mats, results, dtype)
        # the one host sync: the agreement table and every matrix's header, from every owner
        parts = [table.reshape(-1)] + [got[k][0].reshape(-1).to(table.device, table.dtype) for k in keys]
        vals = torch.cat(parts).tolist()
        decisions = self._decide(slots, vals[: 2 * n])
        headers = {k: vals[2 * n + HEADER * i : 2 * n + HEADER * (i + 1)] for i, k in enumerate(keys)}
        self._absent = (self._absent - {s.key for s in slots}) | {
            s.key for s, d in zip(slots, decisions) if s.kind == "matrix" and d == "none"
        }
        errors = _skip_errors(opt, [s for s, d in zip(slots, decisions) if d == "skip"])
        stepped = {s.key for s, d in zip(slots, decisions) if d == "step" and s.kind == "matrix"}
        redo = [k for k in keys if k in stepped and headers[k][0] == ms.REDO]
        if redo:  # a batch's finite flag was False: its owner redoes those matrices alone (rare: more syncs)
            got.update(self._redo(opt, [s for s in mats if s.key in redo], jobs, results, dtype, headers))
        updates: list = []
        for s in mats:
            if s.key not in stepped:
                continue
            status, retries, refreshes = headers[s.key]
            _, D, extra = got[s.key]
            err = opt.finish_matrix(
                s,
                int(status),
                D,
                extra,
                int(retries),
                int(refreshes),
                results.get(s.key),
                self.plan.owner(s.key),
                updates=updates,
            )
            if err is not None:
                errors.append(err)
        opt.apply_matrix_updates(updates)
        exchanged = set(keys)
        late = [s for s in slots if s.key in stepped and s.key not in exchanged]
        if late:  # a matrix without gradient at the last step has one now: exchanged on its own (more syncs)
            errors.extend(self._matrix_step(opt, late, grad_of))
        vecs = [(s, g) for s, g, d in zip(slots, grads, decisions) if d == "step" and s.kind == "vector"]
        if vecs:
            opt.adamw_slots(vecs)  # foreach over all vectors, grouped by param group and dtype
        if errors:
            raise errors[0]

    def _agreement(self, slots, grads) -> tuple[torch.Tensor, torch.Tensor]:
        """(table, stepping) on the device, not read: the all-reduced table [holders with a gradient (n),
        holders whose gradient is non-finite (n)], and per slot whether it steps (every holder has a finite
        gradient)."""
        n = len(slots)
        device = comm_device(self.group) if not self.local else None
        have = [g is not None for g in grads]
        held = [s.layout.local_numel(self.rank) > 0 for s in slots]
        present = [g for g in grads if g is not None and g.numel()]
        dev = device if device is not None else (present[0].device if present else torch.device("cpu"))
        bad = torch.zeros(n, dtype=torch.float32, device=dev)
        if present:
            flags = nonfinite_flags(present).float().to(dev)
            idx = torch.tensor([i for i, g in enumerate(grads) if g is not None and g.numel()], device=dev)
            bad = bad.index_copy(0, idx, flags)
        # one host-built table of the counts and the holders (one copy to the device)
        consts = torch.tensor(
            [float(h and k) for h, k in zip(have, held)]
            + [float(len(s.layout.holders()) if not self.local else 1) for s in slots],
            dtype=torch.float32,
            device="cpu",  # built on the host whatever the default device, copied once
        ).to(dev)
        table = torch.cat([consts[:n], bad])
        if not self.local:
            self._all_reduce(table, dist.ReduceOp.SUM, f"the gradient agreement of {n} parameters")
        stepping = (table[:n] == consts[n:]) & (table[n:] == 0)
        return table, stepping

    def _decide(self, slots, vals) -> list[str]:
        """Per slot "none" (no gradient anywhere), "skip" (non-finite somewhere) or "step" from the read
        table; identical on all ranks. Raises (everywhere) when some holders have a gradient and others not."""
        n = len(slots)
        out, problems = [], []
        for i, s in enumerate(slots):
            got, nonfinite = int(round(vals[i])), vals[n + i] > 0
            holders = len(s.layout.holders()) if not self.local else 1
            if got == 0:
                out.append("none")
            elif got != holders:
                problems.append(s.key)
                out.append("none")
            else:
                out.append("skip" if nonfinite else "step")
        if problems:
            raise RuntimeError(
                f"parameter(s) {_names(problems)} have a gradient on some of the ranks that hold them but not "
                "on others; every rank must run the same backward (or set unused gradients to zeros)"
            )
        return out

    def _scatter(self, opt, mats, results, dtype) -> dict:
        """Every rank gets, for each matrix of ``mats``, its owner's header, its pieces of the direction and,
        for stateful bases, the new basis. A deferred result's header says ``REDO`` where its finite flag is
        False (built on the device: nothing is read here)."""
        group = False if self.local else self.group
        extra_sizes = {}
        for s in mats:
            method = ms.slot_method(opt, s)
            if method in STATEFUL:  # the new basis travels to every rank
                extra_sizes[s.key] = math.prod(ms.basis_shape(s.mshape, s.group, method))
        owned = list(results)
        payload = {}
        if owned:
            table = torch.tensor(
                [[float(r.status), float(r.retries), float(r.refreshes)] for r in results.values()],
                dtype=dtype,
                device="cpu",
            ).reshape(len(owned), HEADER)
            deferred = [r.ok for r in results.values() if r.ok is not None]
            if deferred:
                dev = deferred[0].device
                table = table.to(dev)
                okv = torch.stack(
                    [
                        r.ok.to(dev) if r.ok is not None else torch.ones((), dtype=torch.bool, device=dev)
                        for r in results.values()
                    ]
                )
                table[:, 0] = torch.where(okv, table[:, 0], float(ms.REDO))
            for i, (k, r) in enumerate(results.items()):
                basis = r.basis if (r.status == ms.OK and k in extra_sizes) else None
                if basis is not None and basis.numel() != extra_sizes[k]:
                    raise RuntimeError(
                        f"tracked basis of {k!r} has {basis.numel()} numbers, expected {extra_sizes[k]}"
                    )
                payload[k] = (table[i], _sendable(r), basis)
        keys = [s.key for s in mats]
        return scatter_from_owners(
            self.plan, payload, group, keys=keys, header_size=HEADER, extra_sizes=extra_sizes, dtype=dtype
        )

    def _redo(self, opt, mats, jobs, results, dtype, headers) -> dict:
        """The matrices whose batched result was not finite: each owner redoes its own alone (float64 retry,
        fallback rules), every rank receives the new header and direction; ``results`` and ``headers`` are
        updated in place. Collective: every rank calls it with the same ``mats`` (read from the headers)."""
        mine = {s.key: ms.redo(jobs[s.key]) for s in mats if s.key in jobs}
        results.update(mine)
        got = self._scatter(opt, mats, mine, dtype)
        keys = [s.key for s in mats]
        headers.update(zip(keys, _read_headers(got, keys, dtype)))
        return got

    def _step_read_first(self, opt) -> None:
        """The step of :class:`ShardLocalEngine`: the agreement is read before the matrix step (which then
        needs no exchange of its own and may read more)."""
        slots, grads = self._begin(opt)
        decisions = self._agree(slots, grads)
        errors = _skip_errors(opt, [s for s, d in zip(slots, decisions) if d == "skip"])
        mats = [s for s, d in zip(slots, decisions) if d == "step" and s.kind == "matrix"]
        vecs = [(s, g) for s, g, d in zip(slots, grads, decisions) if d == "step" and s.kind == "vector"]
        grad_of = {s.key: g for s, g in zip(slots, grads)}
        if mats:
            errors.extend(self._matrix_step(opt, mats, grad_of))
        if vecs:
            opt.adamw_slots(vecs)  # foreach over all vectors, grouped by param group and dtype
        if errors:
            raise errors[0]

    def _agree(self, slots, grads) -> list[str]:
        """:meth:`_decide` on the all-reduced agreement table, read at once (one host sync)."""
        if not slots:
            return []
        table, _ = self._agreement(slots, grads)
        return self._decide(slots, table.tolist())

    # ------------------------------------------------------------------ matrices
    def _momentum(self, opt, slots, grad_of, nonfinite=None) -> dict[str, torch.Tensor]:
        """Update each matrix's momentum on this rank's elements (foreach); return the local M to precondition.
        ``nonfinite``: ``{key: 0-d bool}``, gradients to leave out (see ``SpectralNewton.momentum_slots``)."""
        items = [(s, grad_of[s.key]) for s in slots if grad_of[s.key] is not None]  # None: holds nothing
        bad = None if nonfinite is None else [nonfinite[s.key] for s, _ in items]
        return {s.key: M for (s, _), M in zip(items, opt.momentum_slots(items, bad))}

    def _owner_compute(self, opt, slots, full, extra=None, deferred=False):
        """(the owner's directions, ``extra``'s values) by
        :func:`~spectral_dist.optim.matrix_step.owner_directions_and_read`; ``deferred=True``: (directions
        with their finite flags unread, :func:`~spectral_dist.optim.matrix_step.owner_directions_deferred`,
        and the jobs by key, for a redo)."""
        jobs = []
        for s in slots:
            if self.plan.owner(s.key) != self.rank:
                continue
            meta = s.meta()
            jobs.append(
                ms.DirectionJob(
                    s.key,
                    full[s.key].view(ms.job_shape(s)),
                    s.group,
                    opt.resolve_alpha_meta(meta, s.group),
                    meta.get("tracked"),
                    opt.counters(meta)["consecutive_failures"],
                )
            )
        cap = opt.max_batch_bytes
        if deferred:
            return ms.owner_directions_deferred(jobs, cap), {j.key: j for j in jobs}
        return ms.owner_directions_and_read(jobs, extra, cap)

    def _matrix_step(self, opt, slots, grad_of) -> list[BaseException]:
        keys = [s.key for s in slots]
        dtype = _dtype(slots)
        local = self._momentum(opt, slots, grad_of)
        group = False if self.local else self.group
        full = gather_to_owners(self.plan, local, group, keys=keys, dtype=dtype)
        results, _ = self._owner_compute(opt, slots, full)
        by_key = {s.key: s for s in slots}
        got = self._scatter(opt, slots, results, dtype)
        if self.local:  # one process: the headers are this process's own results, no copy needed
            headers = [[r.status, r.retries, r.refreshes] for r in (results[k] for k in keys)]
        elif keys:
            headers = _read_headers(got, keys, dtype)
        else:
            headers = []
        errors, updates = [], []
        for k, (status, retries, refreshes) in zip(keys, headers):
            s = by_key[k]
            _, D, extra = got[k]
            status = int(status)
            err = opt.finish_matrix(
                s,
                status,
                D,
                extra,
                int(retries),
                int(refreshes),
                results[k] if k in results else None,
                self.plan.owner(k),
                updates=updates,
            )
            if err is not None:
                errors.append(err)
        opt.apply_matrix_updates(updates)  # foreach, grouped by param group
        return errors


def _skip_errors(opt, slots) -> list[BaseException]:
    """Count a skipped step for each slot; the errors to raise on every rank (too many skips in a row)."""
    errors = [opt.note_skip(s.meta(), s.key) for s in slots]
    return [e for e in errors if e is not None]


def _read_headers(got: dict, keys: list[str], dtype: torch.dtype) -> list[list[float]]:
    """The headers of ``keys`` from a scatter's result, in one host sync: headers from other ranks are on the
    communication device, and stacking them there first keeps it to one device-to-host copy, not one per
    matrix."""
    hs = [got[k][0].reshape(-1) for k in keys]
    dev = next((h.device for h in hs if h.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([h.to(dev, dtype) for h in hs]).tolist()


def _sendable(r: ms.DirectionResult) -> torch.Tensor | None:
    """The flat direction a result carries to the apply step: only an OK or FALLBACK status has one."""
    return r.D.reshape(-1) if r.D is not None and r.status in (ms.OK, ms.FALLBACK) else None


def _dtype(slots) -> torch.dtype:
    """The exchange's dtype: float64 when any matrix is float64."""
    return torch.float64 if any(s.param.dtype == torch.float64 for s in slots) else torch.float32


class LocalEngine(OwnerEngine):
    """The engine of one process: every matrix is owned here; no collectives; one host sync per step.

    Over a process group the gradients' non-finite flags are read first, because every rank's exchange depends
    on them. Here nothing does: the flags are read with the owner's finite flags, after the directions are
    computed. A matrix whose gradient is non-finite enters the momentum as its own buffer (left bit for bit as it
    was) and its direction is discarded; vectors are stepped after the read. The decisions, counters and
    errors are those of :meth:`OwnerEngine.step`."""

    def __init__(self):
        super().__init__(group=False)

    def step(self, opt) -> None:
        slots, grads = self._begin(opt)
        live = [i for i, g in enumerate(grads) if g is not None and g.numel()]
        bad = nonfinite_flags([grads[i] for i in live]) if live else None
        bad_of = {slots[i].key: b for i, b in zip(live, bad.unbind(0))} if live else {}
        mats = [slots[i] for i in live if slots[i].kind == "matrix"]
        grad_of = {s.key: g for s, g in zip(slots, grads)}
        results: dict = {}
        if mats:
            M = self._momentum(opt, mats, grad_of, bad_of)
            full = gather_to_owners(self.plan, M, False, keys=[s.key for s in mats], dtype=_dtype(mats))
            results, values = self._owner_compute(opt, mats, full, extra=bad)
        else:
            values = bad.tolist() if live else []
        skip = {slots[i].key for i, v in zip(live, values) if v}
        errors = _skip_errors(opt, [slots[i] for i in live if slots[i].key in skip])
        updates: list = []
        for s in mats:
            if s.key in skip:
                continue
            r = results[s.key]
            D = _sendable(r)
            err = opt.finish_matrix(s, r.status, D, None, r.retries, r.refreshes, r, 0, updates=updates)
            if err is not None:
                errors.append(err)
        opt.apply_matrix_updates(updates)
        vecs = [(slots[i], grads[i]) for i in live if slots[i].kind == "vector" and slots[i].key not in skip]
        if vecs:
            opt.adamw_slots(vecs)
        if errors:
            raise errors[0]


DistributedEngine = OwnerEngine


class ShardLocalEngine(OwnerEngine):
    """Approximate, opt-in: each rank preconditions its own block of each sharded matrix.

    No exchange of matrices, so it is faster than the exact engine, but the direction of a block is not the
    block of the full matrix's direction: results depend on the world size. Decisions (skips, errors) are
    still taken by all ranks together. Supports row blocks (FSDP2 ``Shard(0)``) and replicated matrices;
    the tracked basis is refused (it would describe a block, not the matrix).
    Select it with ``SpectralNewton(..., engine=ShardLocalEngine())``.
    """

    def __init__(self, group=None):
        super().__init__(group=group if dist.is_available() and dist.is_initialized() else False)

    def step(self, opt) -> None:
        self._step_read_first(opt)

    def _matrix_step(self, opt, slots, grad_of) -> list[BaseException]:
        local = self._momentum(opt, slots, grad_of)
        errors = []
        for s in slots:
            if s.group["basis"] in STATEFUL:
                raise ValueError(f"ShardLocalEngine does not support basis={s.group['basis']!r}")
            M = local.get(s.key)
            if M is None or M.numel() == 0:
                res = ms.DirectionResult(ms.OK, None)
            else:
                js = ms.job_shape(s)  # (m, n), or (count, m, n) for a stack of matrices: blocks of whole ones
                rows = M.numel() // math.prod(js[1:])
                meta = s.meta()
                stateless = ms.slot_method(opt, s, stateless=True)  # "auto": no per-block basis
                grp = s.group if stateless == ms.slot_method(opt, s) else dict(s.group, basis=stateless)
                res = ms.owner_directions(
                    [
                        ms.DirectionJob(
                            s.key,
                            M.view(rows, *js[1:]),
                            grp,
                            opt.resolve_alpha_meta(meta, s.group),
                            None,
                            opt.counters(meta)["consecutive_failures"],
                        )
                    ]
                )[s.key]
            D = None if res.D is None else res.D.reshape(-1)
            if M is not None and M.numel() and D is None and res.status in (ms.OK, ms.FALLBACK):
                res.status = ms.SKIP
            err = opt.finish_matrix(s, res.status, D, None, res.retries, res.refreshes, res, self.rank)
            if err is not None:
                errors.append(err)
        return errors


def make_engine(opt, distributed="auto"):
    """The engine for ``opt`` (see the module docstring): called at the first step."""
    if distributed is False or not (dist.is_available() and dist.is_initialized()):
        if distributed not in (False, "auto", None):
            raise RuntimeError(
                f"distributed={distributed!r} needs an initialised torch.distributed process group"
            )
        return LocalEngine()
    if distributed in ("auto", None, True):
        group = None
        dt = [p for g in opt.param_groups for p in g["params"] if is_dtensor(p)]
        if dt:
            mesh_ranks = sorted({int(r) for p in dt for r in p.device_mesh.mesh.flatten().tolist()})
            if mesh_ranks != list(range(dist.get_world_size())):
                raise ValueError(
                    f"DTensor parameters live on ranks {mesh_ranks[:8]}..., not on the whole default process "
                    "group: pass process_group= (distributed=<group>) covering exactly those ranks"
                )
        if dist.get_world_size() == 1:
            return LocalEngine()
        return OwnerEngine(group)
    return OwnerEngine(distributed)  # a ProcessGroup


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
