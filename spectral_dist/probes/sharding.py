"""How the probes see a model whose parameters and batch are spread over ranks.

The probes' math (:mod:`.hvp`, :mod:`.lanczos`, :mod:`.curvature`, :mod:`.spectrum`) only needs three things
from the engine, collected here in :class:`ProbeLayout`:

* which tensor of each parameter this rank holds (``local``) and where it sits in the global flat vector
  (``ranges``, for :class:`~spectral_dist.probes.lanczos.VectorSpace`);
* the gradient of the *global-batch* loss, restricted to this rank's part (``grads``);
* how partial results combine (``sum`` of partial inner products, ``mean`` of replicated products).

Kinds:

* ``"local"``: one process (nothing is reduced).
* ``"replicated"``: DDP, DeepSpeed ZeRO-1/2, or any module with a ``process_group``. Every rank holds every
  parameter; each differentiates its local-batch loss on the unwrapped module (any HVP backend) and one
  all-reduce averages each product: the product of the global-batch loss when local batches have equal size
  and the loss is a mean. Vectors are replicated, so inner products need no collective.
* ``"sharded"``: PyTorch FSDP2 (``fully_shard``; DTensor ``Shard(0)`` parameters). Rank r holds a row block
  of every parameter. Gradients come from FSDP2's own backward (its reduce-scatter averages over ranks), so
  only the finite-difference HVP backend applies: both gradient passes perturb the local shards. Vectors
  are row blocks like the parameters; an inner product is a local dot plus one all-reduce. Random vectors
  are drawn whole from the seeded generator and sliced, so results equal one process's on the global batch.

Every collective here runs on every rank in the same order; a rank that skips a probe call hangs the others
until the process group's timeout, which then raises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.describe import is_dtensor as _is_dtensor
from ..distributed.describe import row_block as _local_rows
from .hvp import local_grads
from .lanczos import VectorSpace

__all__ = ["ProbeLayout", "KINDS", "in_place_layout", "split_batch", "reshard"]

KINDS = ("local", "replicated", "sharded")


def _is_deepspeed_engine(model) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


class ProbeLayout:
    """Where a model's parameters live across ranks, for the probes (see the module docstring).

    Build it with :meth:`detect`. Attributes: ``module`` (what ``loss_fn(module, batch)`` is called with),
    ``kind``, ``group``, ``rank``, ``world_size``.
    """

    def __init__(self, module: nn.Module, kind: str, group=None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.module, self.kind, self.group = module, kind, group
        # FSDP2 registers unsharded tensors between a forward and the next reshard: keep the DTensors
        self._all_params = list(module.parameters())
        if kind == "local":
            self.rank, self.world_size = 0, 1
        else:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(f"a {kind} probe layout needs torch.distributed to be initialized")
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    @classmethod
    def detect(cls, model: nn.Module, process_group=None) -> ProbeLayout:
        """The layout of ``model``: DDP and DeepSpeed ZeRO-1/2 engines are unwrapped ("replicated"), a model
        with DTensor parameters is "sharded" (FSDP2), a plain module is "local" unless ``process_group`` is
        given (then "replicated": each rank passes its local batch)."""
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            return cls(model.module, "replicated", process_group or model.process_group)
        if _is_deepspeed_engine(model):
            stage = int(model.zero_optimization_stage())
            if stage >= 3:
                raise ValueError(
                    "DeepSpeed ZeRO-3 partitions the parameters into flat buffers that the probes cannot "
                    "perturb: probe the model under ZeRO-1/2 or FSDP2 (fully_shard), or probe a full copy "
                    "gathered with deepspeed.zero.GatheredParameters"
                )
            group = process_group or getattr(model, "data_parallel_group", None)
            return cls(model.module, "replicated", group)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        reshard(model)
        if any(_is_dtensor(p) for p in model.parameters()):
            for n, p in model.named_parameters():
                if _is_dtensor(p):
                    _local_rows(n, p)  # raises for placements other than Shard(0) / Replicate
            group = process_group
            if group is None:
                p = next(p for p in model.parameters() if _is_dtensor(p))
                if p.device_mesh.ndim != 1:
                    raise ValueError(
                        "parameters are sharded over a multi-dimensional device mesh (HSDP/TP): pass "
                        "process_group= the group the probe's batch is split over"
                    )
                group = p.device_mesh.get_group()
            return cls(model, "sharded", group)
        if process_group is not None:
            return cls(model, "replicated", process_group)
        return cls(model, "local")

    def reshard(self) -> None:
        """Put FSDP2 modules back in their sharded state (see :func:`reshard`)."""
        if self.kind == "sharded":
            reshard(self.module)

    @property
    def distributed(self) -> bool:
        return self.kind != "local"

    # ------------------------------------------------------------------ tensors
    def local(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor this rank holds of ``p`` (a view of the local shard for DTensors)."""
        return p.to_local() if _is_dtensor(p) else p

    def rows(self, p: torch.Tensor) -> tuple[int, int]:
        """(first row, number of rows) of ``p`` held here."""
        r = _local_rows("parameter", p) if _is_dtensor(p) else None
        return (0, int(p.shape[0]) if p.ndim else 1) if r is None else r

    def local_part(self, p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a tensor shaped like the whole of ``p``."""
        if not _is_dtensor(p):
            return full
        r0, n = self.rows(p)
        return full.narrow(0, r0, n)

    def ranges(self, params: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
        """``(offset, length)`` of this rank's part of each parameter in the global flat vector that
        concatenates the flattened parameters in order."""
        out, offset = [], 0
        for p in params:
            numel = p.numel()
            if _is_dtensor(p):
                row = numel // int(p.shape[0]) if p.shape[0] else 0
                r0, n = self.rows(p)
                out.append((offset + r0 * row, n * row))
            else:
                out.append((offset, numel))
            offset += numel
        return out

    def space(self, params: Sequence[torch.Tensor]) -> VectorSpace:
        """The :class:`VectorSpace` of flat vectors over ``params`` (global dimension, local ranges)."""
        dim = sum(p.numel() for p in params)
        if self.kind != "sharded":
            return VectorSpace(dim)
        return VectorSpace(dim, self.ranges(params), allreduce=self._allreduce_sum)

    # ------------------------------------------------------------------ reductions
    def _allreduce_sum(self, t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of partial results computed on shards (identity unless sharded)."""
        if self.kind != "sharded":
            return t
        dev = t.device
        t = t.to(_comm_device(self.group)).contiguous()  # NCCL reduces CUDA tensors only
        self._allreduce_sum(t)
        return t.to(dev)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of per-rank results (identity in one process)."""
        if self.kind == "local":
            return t
        dev = t.device
        t = t.to(_comm_device(self.group)).contiguous()
        self._allreduce_sum(t)
        return t.div_(self.world_size).to(dev)

    def sqnorm(self, tensors: Sequence[torch.Tensor]) -> float:
        """Squared norm of the global vector whose local parts are ``tensors``."""
        if not tensors:
            return 0.0
        local = sum(float(t.detach().double().pow(2).sum()) for t in tensors)
        if self.kind != "sharded":
            return local
        return float(self.sum(torch.tensor([local], dtype=torch.float64, device=_comm_device(self.group)))[0])

    def mean_flat(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average a list of tensors over ranks with one all-reduce (replicated products and gradients)."""
        if self.kind == "local" or not tensors:
            return tensors
        return _reduce_flat(tensors, self.mean)

    def sum_flat(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum a list of partial results computed on shards over ranks with one all-reduce (identity unless
        sharded)."""
        if self.kind != "sharded" or not tensors:
            return tensors
        return _reduce_flat(tensors, self.sum)

    # ------------------------------------------------------------------ gradients
    def grads(self, model: nn.Module, loss_fn, batch, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's part of the gradient of ``loss_fn`` with respect to ``params``.

        local and replicated: ``torch.autograd.grad`` of this rank's loss (the caller averages products with
        :meth:`mean_flat`). sharded: FSDP2's backward of the global-batch loss, its reduce-scatter averaged
        over ranks; ``.grad`` of every parameter is left None (the probes restore it afterwards).
        """
        if self.kind != "sharded":
            return local_grads(model, loss_fn, batch, params)
        return self.backward_grads(model, loss_fn(model, batch), params)

    def backward_grads(self, model: nn.Module, loss: torch.Tensor, params) -> list[torch.Tensor]:
        """Sharded: ``loss.backward()`` through FSDP2 and this rank's rows of each averaged gradient."""
        everything = self._all_params
        for p in everything:  # FSDP2 accumulates into a sharded .grad that is not None
            p.grad = None
        loss.backward()
        out = []
        for p in params:
            g = p.grad
            out.append(torch.zeros_like(self.local(p)) if g is None else self.local(g).detach().clone())
        for p in everything:
            p.grad = None
        return out


def _reduce_flat(tensors: list[torch.Tensor], reduce) -> list[torch.Tensor]:
    """``reduce`` (an all-reduce of one flat tensor) applied to a list of tensors in one collective."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    flat = reduce(torch.cat([t.reshape(-1).to(dtype) for t in tensors]))
    return [
        piece.view(t.shape).to(t.dtype)
        for t, piece in zip(tensors, torch.split(flat, [t.numel() for t in tensors]))
    ]


def in_place_layout(model: nn.Module) -> ProbeLayout | None:
    """The layout for probing ``model`` where it is, distributed over the ranks, or None: in one process, and
    where the probe cannot perturb the parameters (ZeRO-3's flat partitions; FSDP v1's flat parameters,
    which read as a plain module), so the caller probes a gathered copy instead."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    try:
        layout = ProbeLayout.detect(model)
    except ValueError:  # ZeRO-3
        return None
    return layout if layout.distributed else None


def _comm_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reshard(model: nn.Module) -> None:
    """Reshard every FSDP2 module of ``model``.

    After a forward without backward (an eval pass; FSDP2's root keeps its parameters unsharded after
    forward) a module's registered parameters are the unsharded tensors, whose storage FSDP2 frees at the
    next reshard: a probe must snapshot, perturb and restore the sharded DTensors instead.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def split_batch(batch, rank: int, world_size: int):
    """Rank ``rank``'s equal share of a batch along dim 0 (the remainder beyond a multiple of world_size is
    dropped), for a tensor, a tuple/list of tensors or a mapping (a collated Hugging Face batch); other values
    pass through. Distributed probes on these shares equal one process on the whole (kept) batch."""
    from collections.abc import Mapping

    def cut(v):
        if not torch.is_tensor(v) or v.ndim == 0:
            return v
        per = v.shape[0] // world_size
        if per == 0:
            raise ValueError(
                f"a batch of {v.shape[0]} cannot give each of {world_size} processes a sample: use a larger "
                "probe batch"
            )
        return v[rank * per : (rank + 1) * per]

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)
