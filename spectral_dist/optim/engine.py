"""Where the matrix step runs: see :mod:`spectral_dist.distributed.engine` (one engine for one process, DDP,
FSDP2 and ZeRO). Re-exported here for code that imports the engines from the optimizer package."""

from __future__ import annotations

import torch

from ..distributed.engine import LocalEngine, make_engine

__all__ = ["LocalEngine", "make_engine", "matrix_view"]


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """(out, in * k...) view of a parameter or gradient."""
    return t.reshape(t.shape[0], -1)
