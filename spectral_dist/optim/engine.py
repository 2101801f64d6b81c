"""Where the matrix step runs. The optimizer hands its engine a list of (name, param, group) jobs.

``LocalEngine`` computes every matrix here. When a process group is initialised, ``make_engine`` returns the
distributed engine from ``spectral_dist.distributed`` (owner ranks, coalesced exchange), so the same
``SpectralNewton(...)`` works under DDP, FSDP2 and ZeRO with nothing else to call.
"""

from __future__ import annotations

import torch

__all__ = ["LocalEngine", "make_engine", "matrix_view"]


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """(out, in * k...) view of a parameter or gradient."""
    return t.reshape(t.shape[0], -1)


class LocalEngine:
    """Every matrix's momentum, basis and direction on this process."""

    def matrix_step(self, opt, jobs) -> None:
        for name, p, group in jobs:
            if p.grad is None:
                continue
            D = opt.matrix_direction(p, matrix_view(p.grad), group, name)
            opt.apply_matrix_update(p, D, group)


def make_engine(opt):
    """LocalEngine unless torch.distributed is initialised with world size > 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from ..distributed.engine import DistributedEngine

        return DistributedEngine(opt)
    return LocalEngine()
