"""The only torch.distributed code of the diagnostics: who sketches what, and one all-reduce.

Every engine reduces to one rule: each rank sketches what it holds, and a sum over ranks gives the
sketch of the whole gradient. Sharded inputs (DTensor, SketchSlice) are summed as they are; a replicated
tensor (DDP, or a plain tensor under FSDP) is sketched by a single owner rank, chosen by a balanced
plan, so replicated work is split across ranks instead of repeated and nothing is counted twice.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

__all__ = ["world", "owner_plan", "all_reduce_sum"]


def world(distributed: bool | str, group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of the group that sketches are reduced over; ``(0, 1)`` when not reducing."""
    import torch.distributed as dist

    if distributed is False or not (dist.is_available() and dist.is_initialized()):
        if distributed is True:
            raise ValueError("distributed=True but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def owner_plan(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each replicated tensor: longest-processing-time greedy on sizes (deterministic)."""
    heap = [(0, r) for r in range(world_size)]
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + sizes[i], r))
    return owners


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` over ranks in place with one collective (call on every rank, same shape)."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
