"""Seeded random-projection sketches of (sharded) tensors.

A sketch is ``S x`` for a ``(dim, N)`` projection ``S`` scaled so that ``E ||S x||^2 = ||x||^2``
(Johnson-Lindenstrauss). ``S`` is never materialized: the column for element ``i`` of tensor ``name``
depends only on ``(seed, name, i)``. Columns are generated on demand, so a rank holding any contiguous
slice of a tensor (a DTensor shard, a ZeRO flat partition) computes the sketch of its slice alone, and a
sum over ranks gives the sketch of the whole tensor. Sketching is linear, so per-tensor sketches sum to
the sketch of the concatenation and ``Partial`` DTensors need no special case.

Kinds:

* ``gaussian``: entries N(0, 1/dim); columns for a block of ``block_size`` consecutive indices come from
  one ``torch.Generator`` seeded from ``(seed, name, block)``.
* ``rademacher``: entries +-1/sqrt(dim), generated like ``gaussian``.
* ``countsketch``: one +-1 entry per column in a hashed row; bucket and sign come from a counter-based
  hash (splitmix64) of the element's global index, so the cost is O(N) and independent of ``dim``.

The generated values depend on the device type (CPU and CUDA generators differ), so all ranks of a run
must sketch on the same device type; this is the case for every supported engine.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch

__all__ = ["GradientSketch", "SketchSlice", "KINDS", "local_runs"]

KINDS = ("gaussian", "rademacher", "countsketch")

_MASK64 = (1 << 64) - 1
_COUNT_CHUNK = 1 << 20
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


class SketchSlice(NamedTuple):
    """A contiguous slice of a tensor's flattened values held by this rank (e.g. a ZeRO partition).

    Attributes:
        values: The slice (any shape; flattened in row-major order).
        offset: Global flat index of the slice's first element in the full tensor.
    """

    values: torch.Tensor
    offset: int


def _signed(v: int) -> int:
    """Two's-complement view of a 64-bit unsigned constant, for int64 tensor arithmetic."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _splitmix64(x: int) -> int:
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's ``>>`` is arithmetic on signed types)."""
    return (x >> k).bitwise_and_((1 << (64 - k)) - 1)


def _splitmix64_tensor(state: torch.Tensor) -> torch.Tensor:
    """Vectorized splitmix64 output for int64 states, in place (multiplication wraps modulo 2^64)."""
    z = state.add_(_signed(_GOLDEN))
    z.bitwise_xor_(_lsr(z, 30)).mul_(_signed(_MIX1))
    z.bitwise_xor_(_lsr(z, 27)).mul_(_signed(_MIX2))
    return z.bitwise_xor_(_lsr(z, 31))


_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """``(256, 8)`` table of the +-1 signs encoded by each byte's bits."""
    t = _SIGN_TABLES.get(device)
    if t is None:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        t = _SIGN_TABLES[device] = (bits.to(torch.float32) * 2.0 - 1.0).to(device)
    return t


def _name_seed(seed: int, name: str) -> int:
    """64-bit per-tensor seed; hashlib (not ``hash()``) so every process derives the same value."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def local_runs(
    global_shape: tuple[int, ...], local_shape: tuple[int, ...], offset: tuple[int, ...]
) -> Iterator[tuple[int, int, int]]:
    """Split a box ``offset + [0, local_shape)`` of a row-major tensor into contiguous flat runs.

    Args:
        global_shape: Shape of the full tensor.
        local_shape: Shape of the locally held box.
        offset: Global index of the box's first element along each dimension.

    Yields:
        ``(local_start, global_start, length)`` for each run, in local flat order. A row shard
        (``Shard(0)``) is a single run; a column shard gives one run per row.
    """
    nd = len(global_shape)
    if math.prod(local_shape) == 0:
        return
    if nd == 0:
        yield 0, 0, 1
        return
    k = nd - 1
    while k > 0 and local_shape[k] == global_shape[k]:
        k -= 1
    g_strides = [math.prod(global_shape[d + 1 :]) for d in range(nd)]
    l_strides = [math.prod(local_shape[d + 1 :]) for d in range(nd)]
    run = local_shape[k] * g_strides[k]
    outer = local_shape[:k]
    for flat in range(math.prod(outer)):
        idx, rem = [], flat
        for size in reversed(outer):
            idx.append(rem % size)
            rem //= size
        idx.reverse()
        g_start = sum((offset[d] + j) * g_strides[d] for d, j in enumerate(idx)) + offset[k] * g_strides[k]
        l_start = sum(j * l_strides[d] for d, j in enumerate(idx))
        yield l_start, g_start, run


def _dtensor_parts(t: Any) -> tuple[torch.Tensor, list[tuple[int, int, int]]] | None:
    """Local values and the flat runs this rank contributes (:func:`spectral_dist.distributed.describe.
    dtensor_runs`: any placement, strided shards included; replicated pieces count once, on their lowest
    rank, so the sum over ranks is exact for HSDP-style meshes), or None when it contributes nothing."""
    from ..distributed.describe import dtensor_runs

    if t.device_mesh.get_coordinate() is None:
        return None
    runs = dtensor_runs(t)
    return (t.to_local(), runs) if runs else None


def is_sharded(value: Any) -> bool:
    """True for inputs that hold only part of a tensor (DTensor or SketchSlice)."""
    from torch.distributed.tensor import DTensor

    return isinstance(value, (DTensor, SketchSlice))


class GradientSketch:
    """Seeded JL sketch of named tensors, computed slice by slice without materializing the projection.

    Args:
        dim: Sketch dimension (rows of the projection).
        seed: Seed shared by all ranks; the projection depends only on (seed, name, index).
        kind: One of ``"gaussian"``, ``"rademacher"``, ``"countsketch"``.
        block_size: Elements per seeded block for the dense kinds. Small blocks waste little on tiny
            tensors and partial slices; on GPUs use large blocks (e.g. 65536) to cut generator calls.
            Must be equal on all ranks.
    """

    def __init__(self, dim: int = 256, seed: int = 0, kind: str = "gaussian", block_size: int = 256):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.dim, self.seed, self.kind, self.block_size = dim, seed, kind, block_size
        self._name_seeds: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"GradientSketch(dim={self.dim}, seed={self.seed}, kind={self.kind!r})"

    def _seed_of(self, name: str) -> int:
        s = self._name_seeds.get(name)
        if s is None:
            s = self._name_seeds[name] = _name_seed(self.seed, name)
        return s

    def _block(self, name_seed: int, block: int, device: torch.device) -> torch.Tensor:
        """Unscaled columns ``(block_size, dim)`` of one block of a dense kind."""
        g = torch.Generator(device=device)
        g.manual_seed(_splitmix64(name_seed ^ (block * _GOLDEN & _MASK64)) >> 1)
        shape = (self.block_size, self.dim)
        if self.kind == "gaussian":
            return torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        # 64 signs per random word: one int64 draw per 64 entries, unpacked bytewise through a table.
        n = self.block_size * self.dim
        words = torch.randint(
            -(2**63), 2**63 - 1, (-(-n // 64),), generator=g, device=device, dtype=torch.int64
        )
        return _sign_table(device)[words.view(torch.uint8).long()].reshape(-1)[:n].reshape(shape)

    def columns(self, name: str, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Projection columns for global indices ``[start, stop)`` of ``name``, as a ``(n, dim)`` matrix.

        Meant for tests and small slices: sketching never builds more than one block at a time.
        """
        one = torch.ones(1, dtype=torch.float32, device=device)
        cols = [self.sketch_slice(name, one, i).to(torch.float32) for i in range(start, stop)]
        return torch.stack(cols) if cols else torch.zeros(0, self.dim, device=device)

    def sketch_slice(self, name: str, flat_values: torch.Tensor, offset: int) -> torch.Tensor:
        """Sketch of a contiguous slice of ``name``'s flattened values.

        Args:
            name: Tensor name (the key of the projection).
            flat_values: The slice; flattened row-major.
            offset: Global flat index of the slice's first element.

        Returns:
            A float64 tensor of shape ``(dim,)``; summing the sketches of disjoint slices that cover a
            tensor gives the sketch of the tensor.
        """
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an int >= 0, got {offset!r}")
        v = flat_values.detach().reshape(-1)
        out = torch.zeros(self.dim, dtype=torch.float64, device=v.device)
        if v.numel() == 0:
            return out
        v = v.to(torch.float32)
        name_seed = self._seed_of(name)
        if self.kind == "countsketch":
            # Chunks bound the int64 temporaries to a few times _COUNT_CHUNK elements.
            for pos in range(0, v.numel(), _COUNT_CHUNK):
                part = v[pos : pos + _COUNT_CHUNK]
                start = offset + pos
                idx = torch.arange(start, start + part.numel(), device=v.device, dtype=torch.int64)
                h = _splitmix64_tensor(idx.mul_(_signed(_GOLDEN)).add_(_signed(name_seed)))
                bucket = _lsr(h, 32) % self.dim
                sign = (h & 1).to(torch.float32).mul_(2.0).sub_(1.0)
                out.index_add_(0, bucket, (part * sign).to(torch.float64))
            return out
        acc = torch.zeros(self.dim, dtype=torch.float32, device=v.device)
        B, pos, n = self.block_size, 0, v.numel()
        while pos < n:
            g = offset + pos
            block, within = divmod(g, B)
            take = min(B - within, n - pos)
            cols = self._block(name_seed, block, v.device)
            acc += v[pos : pos + take] @ cols[within : within + take]
            pos += take
        return out.add_(acc.to(torch.float64)).mul_(1.0 / math.sqrt(self.dim))

    def sketch_tensor(self, name: str, value: Any) -> torch.Tensor:
        """This rank's contribution to the sketch of ``name``.

        ``value`` may be a whole tensor, a DTensor (its local shard at the shard's global offset) or a
        :class:`SketchSlice`; ``None`` gives zeros. For DTensor and SketchSlice inputs, the sum over
        ranks is the sketch of the full tensor.
        """
        from torch.distributed.tensor import DTensor

        if value is None:
            return torch.zeros(self.dim, dtype=torch.float64)
        if isinstance(value, SketchSlice):
            return self.sketch_slice(name, value.values, value.offset)
        if isinstance(value, DTensor):
            parts = _dtensor_parts(value)
            if parts is None:
                return torch.zeros(self.dim, dtype=torch.float64, device=value.to_local().device)
            local, runs = parts
            flat = local.detach().reshape(-1)
            out = torch.zeros(self.dim, dtype=torch.float64, device=flat.device)
            for l_start, g_start, n in runs:
                out += self.sketch_slice(name, flat[l_start : l_start + n], g_start)
            return out
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"value for {name!r} must be a Tensor, DTensor or SketchSlice, got {type(value)}"
            )
        return self.sketch_slice(name, value, 0)

    def sketch_layers(
        self, named_tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]
    ) -> dict[str, torch.Tensor]:
        """One sketch per name; the sketches sum to :meth:`sketch` of the same tensors."""
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        return {name: self.sketch_tensor(name, value) for name, value in items}

    def sketch(self, named_tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> torch.Tensor:
        """Sketch of the concatenation of the named tensors, shape ``(dim,)``, float64 on CPU.

        With DTensor or SketchSlice inputs this is this rank's part: all-reduce (sum) it over the ranks,
        as :class:`~spectral_dist.diagnostics.TrajectoryMonitor` does, to get the sketch of the whole.
        """
        layers = self.sketch_layers(named_tensors)
        if not layers:
            return torch.zeros(self.dim, dtype=torch.float64)
        return torch.stack([s.cpu() for s in layers.values()]).sum(0)
