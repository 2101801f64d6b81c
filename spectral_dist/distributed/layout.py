"""Where each matrix lives across ranks, and which rank owns (preconditions) it.

Every engine is described the same way: rank r holds a list of *pieces* of the row-major flattened matrix,
in the order of its local data. A piece is ``(offset, length, count, stride)``: ``count`` runs of ``length``
consecutive elements starting at ``offset + i * stride``. DDP replicates (every rank holds ``(0, numel)``),
FSDP2 ``Shard(0)`` gives rank r its row block, a tensor-parallel ``Shard(1)`` weight a column block (one
strided piece), ZeRO a range of a flat buffer. Only building the layout is engine-specific
(:mod:`spectral_dist.distributed.describe`, the ZeRO mapping); the owner plan and the exchange
(:mod:`spectral_dist.distributed.exchange`) are shared.

Pieces held by different ranks are either identical (replicas: DDP, HSDP's replicate dimension) or disjoint;
:func:`build_plan` checks that they cover the matrix exactly once. Each distinct piece travels to the owner
at most once (from the owner itself when it holds it, else from the lowest rank that does).

The owner plan is longest-processing-time (LPT) on the cost of each matrix's step (the engines pass the flops
of its method; m * n * min(m, n) by default): matrices in decreasing cost (ties broken by key) each go to the
least loaded rank (ties: lowest rank). It depends only on the layouts and those costs, the same on every rank,
so every rank computes the same plan; :attr:`Plan.hash` lets ranks verify that.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property

__all__ = [
    "MatrixLayout",
    "Piece",
    "Plan",
    "Route",
    "build_plan",
    "compress_runs",
    "matrix_cost",
    "replicated_layout",
    "row_block_layout",
]


def matrix_cost(shape: tuple[int, ...]) -> int:
    """m * n * min(m, n) of the (shape[0], rest) matrix view: the flop count of an SVD or Gram eigh."""
    if len(shape) == 0:
        return 0
    m = int(shape[0])
    n = math.prod(int(s) for s in shape[1:])
    return m * n * min(m, n)


@dataclass(frozen=True)
class Piece:
    """``count`` runs of ``length`` elements, run i starting at flat index ``offset + i * stride``."""

    offset: int
    length: int
    count: int = 1
    stride: int = 0

    @property
    def numel(self) -> int:
        return self.length * self.count

    def runs(self):
        for i in range(self.count):
            yield self.offset + i * self.stride, self.length

    @property
    def end(self) -> int:
        """One past the last flat index touched."""
        if self.numel == 0:
            return self.offset
        return self.offset + (self.count - 1) * self.stride + self.length


def _as_piece(p) -> Piece:
    if isinstance(p, Piece):
        return p
    p = tuple(int(v) for v in p)
    if len(p) == 2:
        return Piece(p[0], p[1], 1, p[1])
    if len(p) == 4:
        return Piece(*p)
    raise ValueError(f"a piece is (offset, length) or (offset, length, count, stride), got {p!r}")


def compress_runs(runs: list[tuple[int, int]]) -> list[Piece]:
    """Pieces for a list of (offset, length) runs in local order: adjacent runs merge, equal-length runs at a
    constant stride become one strided piece."""
    merged: list[list[int]] = []
    for o, n in runs:
        if n <= 0:
            continue
        if merged and merged[-1][0] + merged[-1][1] == o:
            merged[-1][1] += n
        else:
            merged.append([o, n])
    out: list[Piece] = []
    i = 0
    while i < len(merged):
        o, n = merged[i]
        j = i + 1
        stride = merged[j][0] - o if j < len(merged) else 0
        while (
            j < len(merged) and merged[j][1] == n and merged[j][0] - merged[j - 1][0] == stride and stride > n
        ):
            j += 1
        count = j - i
        out.append(Piece(o, n, count, stride if count > 1 else n))
        i = j
    return out


@dataclass(frozen=True)
class MatrixLayout:
    """One matrix (or vector) across ranks.

    Args:
        key: a name identical on every rank (the parameter's FQN).
        shape: shape of the full tensor (the engines use the 2-D (out, in * k...) view).
        slices: ``slices[r]`` is the list of pieces (:class:`Piece`, or ``(offset, length)`` for a contiguous
            range) of the flattened full matrix held by rank r, in the order of its local data. Pieces of
            different ranks are identical (replicas) or disjoint; they may be empty.
    """

    key: str
    shape: tuple
    slices: list

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        slices = [[_as_piece(p) for p in rank_pieces] for rank_pieces in self.slices]
        slices = [[p for p in rank_pieces if p.numel > 0] for rank_pieces in slices]
        object.__setattr__(self, "slices", slices)
        numel = self.numel
        for r, rank_pieces in enumerate(slices):
            for p in rank_pieces:
                if (
                    p.offset < 0
                    or p.length < 0
                    or p.count < 0
                    or p.end > numel
                    or (p.count > 1 and p.stride < p.length)
                ):
                    raise ValueError(
                        f"matrix {self.key!r}: rank {r} piece {p} is outside [0, {numel}) or overlaps itself"
                    )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def world_size(self) -> int:
        return len(self.slices)

    @property
    def cost(self) -> int:
        return matrix_cost(self.shape)

    def local_numel(self, rank: int) -> int:
        return sum(p.numel for p in self.slices[rank])

    def holders(self) -> list[int]:
        """Ranks that hold at least one element."""
        return [r for r in range(self.world_size) if self.slices[r]]

    def holds_all(self, rank: int) -> bool:
        """Whether rank holds the whole matrix as a single contiguous piece."""
        s = self.slices[rank]
        return self.numel == 0 or (
            len(s) == 1
            and s[0].offset == 0
            and s[0].numel == self.numel
            and (s[0].count == 1 or s[0].stride == s[0].length)
        )

    @property
    def replicated(self) -> bool:
        return all(self.holds_all(r) for r in range(self.world_size))

    def describe(self) -> tuple:
        return (
            self.key,
            self.shape,
            tuple(tuple((p.offset, p.length, p.count, p.stride) for p in s) for s in self.slices),
        )


def replicated_layout(key: str, shape: tuple, world_size: int) -> MatrixLayout:
    """DDP: every rank holds the whole matrix."""
    numel = math.prod(shape)
    return MatrixLayout(key, shape, [[(0, numel)] for _ in range(world_size)])


def row_block_layout(key: str, shape: tuple, row_ranges: list[tuple[int, int]]) -> MatrixLayout:
    """FSDP2 ``Shard(0)``: rank r holds rows ``[start, start + count)``, given as ``row_ranges[r]``."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return MatrixLayout(key, shape, [[(start * row, count * row)] for start, count in row_ranges])


@dataclass(frozen=True)
class Route:
    """One piece of a matrix moving to its owner: rank ``src`` sends its local elements
    ``[src_offset, src_offset + piece.numel)``, which are ``piece`` of the flattened full matrix."""

    key: str
    src: int
    src_offset: int
    piece: Piece

    @property
    def length(self) -> int:
        return self.piece.numel


def _check_cover(layout: MatrixLayout) -> None:
    """Distinct pieces must tile the matrix: no element twice, none missing (replicas count once)."""
    distinct = {p for s in layout.slices for p in s}
    total = sum(p.numel for p in distinct)
    if total != layout.numel:
        raise ValueError(
            f"matrix {layout.key!r} of shape {layout.shape}: its ranks' distinct pieces hold {total} elements, "
            f"the matrix has {layout.numel} (pieces must be identical replicas or disjoint, and cover it)"
        )
    if len(distinct) <= 1:
        return
    covered = bytearray(layout.numel)  # plan time only; one byte per element
    for p in distinct:
        for o, n in p.runs():
            if any(covered[o : o + n]):
                raise ValueError(
                    f"matrix {layout.key!r}: pieces of different ranks overlap partially at elements "
                    f"[{o}, {o + n}); pieces must be identical replicas or disjoint"
                )
            covered[o : o + n] = b"\x01" * n


def _cover(layout: MatrixLayout, owner: int) -> list[Route]:
    """Routes that assemble the full matrix on ``owner``: each distinct piece once, from the owner when it
    holds it, else from the lowest rank that does. Deterministic: every rank derives the same routes."""
    chosen: dict[Piece, Route] = {}
    order = [owner] + [r for r in range(layout.world_size) if r != owner]
    for r in order:
        off = 0
        for p in layout.slices[r]:
            if p not in chosen:
                chosen[p] = Route(layout.key, r, off, p)
            off += p.numel
    return sorted(chosen.values(), key=lambda t: (t.src, t.src_offset))


@dataclass(frozen=True)
class Plan:
    """Owner assignment over a list of layouts (same order and content on every rank)."""

    layouts: tuple
    owners: dict
    world_size: int
    costs: dict | None = field(default=None, compare=False)  # key -> cost the plan balanced (None: lay.cost)
    by_key: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        by_key = {}
        for lay in self.layouts:
            if lay.key in by_key:
                raise ValueError(f"duplicate matrix key {lay.key!r} in plan")
            if lay.world_size != self.world_size:
                raise ValueError(
                    f"matrix {lay.key!r} has slices for {lay.world_size} ranks, plan has {self.world_size}"
                )
            by_key[lay.key] = lay
        object.__setattr__(self, "by_key", by_key)

    def layout(self, key: str) -> MatrixLayout:
        return self.by_key[key]

    def owner(self, key: str) -> int:
        return self.owners[key]

    def owned(self, rank: int) -> list[str]:
        """Keys owned by ``rank`` in plan order."""
        return [lay.key for lay in self.layouts if self.owners[lay.key] == rank]

    @cached_property
    def routes(self) -> dict[str, list[Route]]:
        """Per key, the pieces that assemble it on its owner (see :func:`_cover`)."""
        return {lay.key: _cover(lay, self.owners[lay.key]) for lay in self.layouts}

    def loads(self) -> list[int]:
        """Total cost per rank."""
        out = [0] * self.world_size
        for lay in self.layouts:
            out[self.owners[lay.key]] += _cost(lay, self.costs)
        return out

    def owned_numel(self, rank: int) -> int:
        return sum(self.by_key[k].numel for k in self.owned(rank))

    @cached_property
    def hash(self) -> str:
        """sha256 of (world size, every layout, every owner): equal on all ranks iff the plans agree."""
        h = hashlib.sha256()
        h.update(repr(self.world_size).encode())
        for lay in self.layouts:
            h.update(repr((lay.describe(), self.owners[lay.key])).encode())
        return h.hexdigest()


def _cost(lay: MatrixLayout, costs) -> int:
    return lay.cost if costs is None or lay.key not in costs else int(costs[lay.key])


def build_plan(
    layouts: list[MatrixLayout], world_size: int | None = None, costs: dict[str, int] | None = None
) -> Plan:
    """Deterministic LPT owner plan: decreasing cost (ties: key), each to the least loaded rank (ties: lowest).

    LPT is within 4/3 of the optimal makespan; the cost is that of the decomposition, which dominates the
    matrix step: ``costs`` (key -> cost, the same on every rank) when given, e.g. the flops of each matrix's
    method (:func:`spectral_dist.optim.matrix_step.method_cost`), else m * n * min(m, n). Every layout is
    checked to tile its matrix (:func:`_check_cover`).
    """
    layouts = tuple(layouts)
    if world_size is None:
        if not layouts:
            raise ValueError("build_plan needs world_size when there are no layouts")
        world_size = layouts[0].world_size
    for lay in layouts:
        _check_cover(lay)
    load = [0] * world_size
    count = [0] * world_size
    owners = {}
    for lay in sorted(layouts, key=lambda t: (-_cost(t, costs), -t.numel, t.key)):
        r = min(range(world_size), key=lambda i: (load[i], count[i], i))
        owners[lay.key] = r
        load[r] += _cost(lay, costs)
        count[r] += 1
    return Plan(layouts, owners, world_size, dict(costs) if costs is not None else None)
