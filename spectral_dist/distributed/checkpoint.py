"""Model + optimizer checkpoints with ``torch.distributed.checkpoint`` (DCP), the way torchtitan does it.

SpectralNewton's state has each parameter's own layout on every rank (momentum and AdamW moments sharded like
the parameter, DTensors under FSDP2; the per-matrix tracked basis and counters identical on all ranks), so
torch's own ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` save and restore it: no pickled
extras, FQN keys, and DCP reshards on load, so a checkpoint written at N ranks resumes exactly at M ranks
(2 -> 1, 2 -> 4) under DDP and FSDP2. These two helpers just put model and optimizer in one ``dcp.save``.
"""

from __future__ import annotations

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(checkpoint_id, model, opt) -> None:
    """``dcp.save({"model": ..., "optim": ...})`` with torch's state-dict helpers (collective)."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=str(checkpoint_id))


def load_checkpoint(checkpoint_id, model, opt) -> None:
    """Inverse of :func:`save_checkpoint`, at any world size (build ``opt`` on the wrapped model first)."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(checkpoint_id))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
