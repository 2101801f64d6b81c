"""``describe``: which elements of a parameter each rank holds, for plain tensors and DTensors of any placement.

This is the one place that works out "where this rank's data sits" for the optimizer, the probes and the
sketches. The result is a :class:`~spectral_dist.distributed.layout.MatrixLayout` over the ranks of a process
group: for every rank, the pieces of the row-major flattened full tensor it holds, in the order of its local
data (``local_tensor(p).reshape(-1)``). No communication: every rank computes every rank's pieces from the
device mesh and the placements, so all ranks derive the same layout.

* plain tensor: replicated, every rank holds all of it (DDP, or no wrapper);
* DTensor: ``Shard(d)`` / ``_StridedShard`` / ``Replicate`` on each mesh dimension, applied left to right as
  DTensor does (FSDP2 ``Shard(0)``, TP ``Shard(0)`` colwise and ``Shard(1)`` rowwise, FSDP over TP
  ``_StridedShard``, HSDP replicate x shard). Uneven and empty shards are what DTensor makes them.
  ``Partial`` placements are refused (a parameter is never a pending reduction).

ZeRO flat partitions are described by the DeepSpeed integration (its partitions are not DTensors).
"""

from __future__ import annotations

import itertools
import math

import torch

from .layout import MatrixLayout, compress_runs

__all__ = ["describe", "dtensor_index_sets", "is_dtensor", "local_tensor", "box_pieces"]


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: the local shard of a DTensor (a view: in-place ops update it)."""
    return t.to_local() if is_dtensor(t) else t


def _shard_offsets(size: int, num_chunks: int, coord: int, placement, previous):
    """Global indices (in local order) along one tensor dim after sharding it over one more mesh dim."""
    from torch.distributed.tensor._utils import _get_shard_size_and_offsets

    with torch.device("cpu"):  # host index math (torch builds it on the default device otherwise)
        shard_size, index = _get_shard_size_and_offsets(
            size, num_chunks, coord, placement, previous, size, False
        )
    if shard_size == 0:
        return torch.zeros(0, dtype=torch.long, device="cpu")
    return index.reshape(-1).to("cpu", torch.long)


def dtensor_index_sets(shape, mesh_shape, coord, placements, name: str = "parameter") -> list:
    """Per tensor dim, the global indices (local order) held at mesh coordinate ``coord``; None = all."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    idx: list = [None] * len(shape)
    sizes = list(shape)
    for mesh_dim, pl in enumerate(placements):
        if isinstance(pl, Replicate):
            continue
        if not isinstance(pl, (Shard, _StridedShard)):  # anything else is Partial or unknown
            raise ValueError(
                f"parameter {name!r} has placement {pl} on mesh dim {mesh_dim}: parameters must be Shard or "
                "Replicate (a Partial parameter is a pending reduction; redistribute it first)"
            )
        d = pl.dim if pl.dim >= 0 else pl.dim + len(shape)
        prev = idx[d]
        off = _shard_offsets(sizes[d], int(mesh_shape[mesh_dim]), int(coord[mesh_dim]), pl, prev)
        idx[d] = off
        sizes[d] = int(off.numel())
    return idx


def box_pieces(shape, idx) -> list:
    """Pieces (local order) of the row-major flattened ``shape`` for the index box ``idx`` (per dim a 1-D
    index tensor or None for the whole dim)."""
    shape = [int(s) for s in shape]
    nd = len(shape)
    if nd == 0:
        return compress_runs([(0, 1)])
    lists = [
        list(range(shape[d])) if idx[d] is None else [int(i) for i in idx[d].tolist()] for d in range(nd)
    ]
    if any(len(x) == 0 for x in lists):
        return []
    full = [idx[d] is None or lists[d] == list(range(shape[d])) for d in range(nd)]
    k = max((d for d in range(nd) if not full[d]), default=-1)
    if k == -1:
        return compress_runs([(0, math.prod(shape))])
    strides = [math.prod(shape[d + 1 :]) for d in range(nd)]
    segs: list[list[int]] = []
    for i in lists[k]:
        if segs and segs[-1][0] + segs[-1][1] == i:
            segs[-1][1] += 1
        else:
            segs.append([i, 1])
    runs = []
    for outer in itertools.product(*lists[:k]):
        base = sum(o * strides[d] for d, o in enumerate(outer))
        for s, n in segs:
            runs.append((base + s * strides[k], n * strides[k]))
    return compress_runs(runs)


def _root_mesh(mesh):
    get = getattr(mesh, "_get_root_mesh", None)  # torch's DeviceMesh keeps the mesh a submesh was sliced from
    return get() if get is not None else mesh


def _mesh_coordinates(mesh, world_size: int, group_ranks: list[int] | None) -> list:
    """Per rank of the process group, its coordinate in ``mesh``, or in *its own copy* of ``mesh`` when
    ``mesh`` is a submesh (``mesh2d["dp"]``: ranks 0, 2 see one, ranks 1, 3 a parallel one, and they hold
    replicas of each other's data); None when the rank is in neither."""
    grid = mesh.mesh
    root = _root_mesh(mesh)
    ranks = group_ranks if group_ranks is not None else list(range(world_size))
    if root is mesh or tuple(root.mesh.shape) == tuple(grid.shape):
        coords: dict[int, tuple] = {}
        for pos in itertools.product(*(range(s) for s in grid.shape)):
            coords[int(grid[pos])] = pos
        return [coords.get(g) for g in ranks]
    R = root.mesh
    where = {int(R[pos]): pos for pos in itertools.product(*(range(s) for s in R.shape))}
    members = [int(r) for r in grid.flatten().tolist()]
    dims = [d for d in range(R.ndim) if len({where[r][d] for r in members}) > 1]

    def coord(pos):
        if grid.ndim == 1:
            flat = 0
            for d in dims:
                flat = flat * R.shape[d] + pos[d]
            return (flat,)
        if grid.ndim == len(dims):
            return tuple(pos[d] for d in dims)
        return None

    for r in members:  # the rule must reproduce this rank's own submesh
        c = coord(where[r])
        if c is None or int(grid[c]) != r:
            raise ValueError(
                f"cannot tell where the other ranks' copies of the {tuple(grid.shape)} submesh sit in the "
                f"{tuple(R.shape)} mesh it was sliced from; pass distributed=<the submesh's process group>"
            )
    return [coord(where[g]) if g in where else None for g in ranks]


def describe(
    name: str, p: torch.Tensor, world_size: int, group_ranks: list[int] | None = None
) -> MatrixLayout:
    """The layout of ``p`` (full shape) over a process group of ``world_size`` ranks.

    Args:
        name: key of the layout (the parameter's FQN), identical on every rank.
        p: a plain tensor (replicated on every rank) or a DTensor.
        world_size: size of the process group the layout is for.
        group_ranks: global ranks of the group's members in group-rank order (None: the default group).
    """
    shape = tuple(int(s) for s in p.shape)
    numel = math.prod(shape)
    if not is_dtensor(p):
        return MatrixLayout(name, shape, [[(0, numel)] for _ in range(world_size)])
    mesh = p.device_mesh
    coords = _mesh_coordinates(mesh, world_size, group_ranks)
    cache: dict[tuple, list] = {}
    slices = []
    for c in coords:
        if c is None:
            slices.append([])
            continue
        key = tuple(c[d] for d, pl in enumerate(p.placements) if not pl.is_replicate())
        if key not in cache:
            cache[key] = box_pieces(shape, dtensor_index_sets(shape, mesh.shape, c, p.placements, name))
        slices.append(cache[key])
    return MatrixLayout(name, shape, slices)


def row_block(name: str, p: torch.Tensor) -> tuple[int, int] | None:
    """(first row, number of rows) this rank holds of a DTensor that is a row block here (FSDP2 ``Shard(0)``,
    ``Replicate``), None for a plain tensor; a clear error for placements that are not row blocks (TP
    ``Shard(1)``, strided shards), for the code that needs row blocks (the probes' sharded vectors)."""
    if not is_dtensor(p):
        return None
    import torch.distributed as dist

    rank = dist.get_rank()
    lay = describe(name, p, dist.get_world_size())
    pieces = lay.slices[rank]
    row = math.prod(p.shape[1:]) if p.ndim > 1 else 1
    if not pieces:
        return 0, 0
    if len(pieces) != 1 or pieces[0].count != 1 or pieces[0].offset % row or pieces[0].length % row:
        raise ValueError(
            f"parameter {name!r} has placements {p.placements} on a {p.device_mesh.ndim}-D mesh: this rank does not "
            "hold a block of whole rows, which the curvature probes and sketches need (FSDP2 Shard(0) or "
            "Replicate); probe a copy of the model gathered with full_tensor(), or without tensor parallelism"
        )
    return pieces[0].offset // row, pieces[0].length // row


_RUNS_CACHE: dict = {}


def dtensor_runs(t) -> list[tuple[int, int, int]]:
    """``(local_start, global_start, length)`` runs of this rank's part of DTensor ``t`` that this rank
    *contributes* to a sum over ranks: a piece held by several ranks (a replicate mesh dimension, HSDP) counts
    once, on the lowest of them, so sums over ranks of per-rank partial results are exact (the sketches)."""
    import torch.distributed as dist

    mesh = t.device_mesh
    key = (tuple(t.shape), tuple(mesh.mesh.flatten().tolist()), tuple(mesh.shape), tuple(t.placements))
    world, rank = dist.get_world_size(), dist.get_rank()
    if key not in _RUNS_CACHE:
        lay = describe("t", t, world)
        first: dict = {}
        for r in range(world):
            for p in lay.slices[r]:
                first.setdefault(p, r)
        per_rank = []
        for r in range(world):
            runs, local = [], 0
            for p in lay.slices[r]:
                if first[p] == r:
                    for i, (o, n) in enumerate(p.runs()):
                        runs.append((local + i * p.length, o, n))
                local += p.numel
            per_rank.append(runs)
        _RUNS_CACHE[key] = per_rank
    return _RUNS_CACHE[key][rank]
