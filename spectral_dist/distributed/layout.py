"""Where each matrix lives across ranks, and which rank owns (preconditions) it.

Every engine is described the same way: each rank holds contiguous slices of the row-major flattened
matrix. DDP replicates (every rank holds ``(0, numel)``), FSDP2 ``Shard(0)`` gives rank r its row block,
ZeRO gives rank r a range of a flat buffer. Only building the layout is engine-specific; the owner plan and
the exchange (:mod:`spectral_dist.distributed.exchange`) are shared.

The owner plan is longest-processing-time (LPT) on the cost m * n * min(m, n) of a decomposition: matrices
in decreasing cost (ties broken by key) each go to the least loaded rank (ties: lowest rank). It depends
only on the layouts, so every rank computes the same plan; :attr:`Plan.hash` lets ranks verify that.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property

__all__ = [
    "MatrixLayout",
    "Plan",
    "Route",
    "build_plan",
    "replicated_layout",
    "row_block_layout",
    "matrix_cost",
]


def matrix_cost(shape: tuple[int, ...]) -> int:
    """m * n * min(m, n) of the (shape[0], rest) matrix view: the flop count of an SVD or Gram eigh."""
    if len(shape) == 0:
        return 0
    m = int(shape[0])
    n = math.prod(int(s) for s in shape[1:])
    return m * n * min(m, n)


@dataclass(frozen=True)
class MatrixLayout:
    """One matrix across ranks.

    Args:
        key: a name identical on every rank (the parameter's FQN).
        shape: shape of the full tensor that :func:`gather_to_owners` returns (the engines use the 2-D
            (out, in * k...) view; ``numel`` is what matters for the exchange).
        slices: ``slices[r]`` is the list of ``(offset, length)`` ranges of the flattened full matrix held
            by rank r, in the order its local pieces are passed to the exchange. Ranges may overlap across
            ranks (replication) and may be empty.
    """

    key: str
    shape: tuple
    slices: list

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(
            self, "slices", [[(int(o), int(n)) for o, n in rank_slices] for rank_slices in self.slices]
        )
        numel = self.numel
        for r, rank_slices in enumerate(self.slices):
            for o, n in rank_slices:
                if o < 0 or n < 0 or o + n > numel:
                    raise ValueError(
                        f"matrix {self.key!r}: rank {r} range (offset={o}, length={n}) is outside [0, {numel})"
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
        return sum(n for _, n in self.slices[rank])

    def holds_all(self, rank: int) -> bool:
        """Whether rank holds the whole matrix as a single piece (so it can use its own copy)."""
        s = [(o, n) for o, n in self.slices[rank] if n > 0]
        return len(s) == 1 and s[0] == (0, self.numel) or self.numel == 0

    @property
    def replicated(self) -> bool:
        return all(self.holds_all(r) for r in range(self.world_size))

    def describe(self) -> tuple:
        return (self.key, self.shape, tuple(tuple(s) for s in self.slices))


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
    """One contiguous piece of a matrix moving between ranks.

    ``src`` sends ``length`` elements starting at ``src_offset`` inside its local piece ``src_piece``; they
    are elements ``[offset, offset + length)`` of the flattened full matrix.
    """

    key: str
    src: int
    src_piece: int
    src_offset: int
    offset: int
    length: int


def _cover(layout: MatrixLayout, owner: int) -> list[Route]:
    """Routes that assemble the full matrix on ``owner``: its own pieces first, then the lowest rank holding
    each missing range. Deterministic, so every rank derives the same routes from the same layout."""
    numel = layout.numel
    routes: list[Route] = []
    missing = [(0, numel)] if numel else []
    order = [owner] + [r for r in range(layout.world_size) if r != owner]
    for r in order:
        if not missing:
            break
        for pi, (po, pn) in enumerate(layout.slices[r]):
            if pn == 0:
                continue
            still = []
            for mo, mn in missing:
                lo, hi = max(mo, po), min(mo + mn, po + pn)
                if lo >= hi:
                    still.append((mo, mn))
                    continue
                routes.append(Route(layout.key, r, pi, lo - po, lo, hi - lo))
                if mo < lo:
                    still.append((mo, lo - mo))
                if hi < mo + mn:
                    still.append((hi, mo + mn - hi))
            missing = sorted(still)
    if missing:
        raise ValueError(
            f"matrix {layout.key!r} of shape {layout.shape}: no rank holds elements {missing[:3]} "
            "(its layout does not cover the matrix)"
        )
    return sorted(routes, key=lambda t: t.offset)


@dataclass(frozen=True)
class Plan:
    """Owner assignment over a list of layouts (same order and content on every rank)."""

    layouts: tuple
    owners: dict
    world_size: int
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
            out[self.owners[lay.key]] += lay.cost
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


def build_plan(layouts: list[MatrixLayout], world_size: int | None = None) -> Plan:
    """Deterministic LPT owner plan: decreasing cost (ties: key), each to the least loaded rank (ties: lowest).

    LPT is within 4/3 of the optimal makespan; the cost is that of the decomposition, which dominates the
    matrix step.
    """
    layouts = tuple(layouts)
    if world_size is None:
        if not layouts:
            raise ValueError("build_plan needs world_size when there are no layouts")
        world_size = layouts[0].world_size
    load = [0] * world_size
    count = [0] * world_size
    owners = {}
    for lay in sorted(layouts, key=lambda t: (-t.cost, -t.numel, t.key)):
        r = min(range(world_size), key=lambda i: (load[i], count[i], i))
        owners[lay.key] = r
        load[r] += lay.cost
        count[r] += 1
    return Plan(layouts, owners, world_size)
