"""Sharded SpectralNewton: layouts of matrices across ranks, the owner plan, the coalesced exchange, the
distributed engine (picked automatically when a process group is initialised) and DCP checkpoints.

See :mod:`spectral_dist.distributed.layout` (slices and LPT plan), :mod:`.exchange` (gather to owners,
scatter back), :mod:`.engine` (DDP / FSDP2 layouts; the opt-in approximate ``ShardLocalEngine``) and
:mod:`.checkpoint` (FQN-keyed, world-size independent checkpoints).
"""

from .engine import DistributedEngine, PlanMismatchError, ShardLocalEngine, state_bytes
from .exchange import ExchangeError, gather_to_owners, scatter_from_owners
from .layout import MatrixLayout, Plan, build_plan, replicated_layout, row_block_layout

__all__ = [
    "DistributedEngine",
    "ExchangeError",
    "MatrixLayout",
    "Plan",
    "PlanMismatchError",
    "ShardLocalEngine",
    "build_plan",
    "gather_to_owners",
    "replicated_layout",
    "row_block_layout",
    "scatter_from_owners",
    "state_bytes",
]
