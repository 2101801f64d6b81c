"""Sharded SpectralNewton: where each parameter's elements live (:mod:`.describe`), the owner plan
(:mod:`.layout`), the coalesced exchange (:mod:`.exchange`), the one engine every setting uses (:mod:`.engine`)
and DCP checkpoint helpers (:mod:`.checkpoint`).
"""

from .describe import describe, is_dtensor, local_tensor
from .engine import (
    DistributedEngine,
    LocalEngine,
    OwnerEngine,
    PlanMismatchError,
    ShardLocalEngine,
    make_engine,
    state_bytes,
)
from .exchange import ExchangeError, exchange_bytes, gather_to_owners, scatter_from_owners
from .layout import MatrixLayout, Piece, Plan, build_plan, replicated_layout, row_block_layout

__all__ = [
    "DistributedEngine",
    "ExchangeError",
    "LocalEngine",
    "MatrixLayout",
    "OwnerEngine",
    "Piece",
    "Plan",
    "PlanMismatchError",
    "ShardLocalEngine",
    "build_plan",
    "describe",
    "exchange_bytes",
    "gather_to_owners",
    "is_dtensor",
    "local_tensor",
    "make_engine",
    "replicated_layout",
    "row_block_layout",
    "scatter_from_owners",
    "state_bytes",
]
