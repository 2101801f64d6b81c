"""Snapshot and exact restore of everything a probe could disturb in a training run.

A probe runs extra forward and backward passes (and, for finite differences, moves the parameters). None of
that may leak into training: :func:`preserve_training_state` restores parameters, buffers (BatchNorm running
statistics), ``.grad``, optimizer state, RNG state and train/eval flags bitwise, also when the probe raises.
Tensors are restored in place (``copy_``), so their identity (and views such as DDP gradient buckets) is kept.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

__all__ = ["preserve_training_state", "rng_state", "set_rng_state"]


def rng_state() -> dict:
    """The torch CPU RNG state and, if CUDA is initialised, the state of every CUDA device."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _snapshot_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    out = {}
    for p, st in optimizer.state.items():
        out[p] = {
            k: (v, v.detach().clone()) if torch.is_tensor(v) else (None, copy.deepcopy(v))
            for k, v in st.items()
        }
    return out


def _restore_optimizer(optimizer: torch.optim.Optimizer, snap: dict) -> None:
    for p in list(optimizer.state.keys()):
        if p not in snap:
            del optimizer.state[p]
    for p, entries in snap.items():
        st = optimizer.state[p]
        st.clear()
        for k, (orig, saved) in entries.items():
            if orig is None:
                st[k] = saved
            else:
                with torch.no_grad():
                    orig.copy_(saved)
                st[k] = orig


@contextlib.contextmanager
def preserve_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Snapshot ``model`` (and ``optimizer``) on entry and restore them exactly on exit, even on exceptions.

    Restored: parameter values, buffers, ``.grad`` (including ``None``), the ``training`` flag of every
    submodule, torch's CPU and CUDA RNG states, and the optimizer's per-parameter state. Costs one copy of
    parameters, gradients and buffers in memory.

    Args:
        model: the module whose state must survive.
        optimizer: optional optimizer whose ``state`` must survive.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    saved_params = [p.detach().clone() for p in params]
    saved_grads = [(p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params]
    buffers = list(model.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    modes = [(m, m.training) for m in model.modules()]
    rng = rng_state()
    opt_snap = _snapshot_optimizer(optimizer) if optimizer is not None else None
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved_params):
                p.copy_(s)
            for p, (g, s) in zip(params, saved_grads):
                if g is None:
                    p.grad = None
                else:
                    g.copy_(s)
                    p.grad = g
            for b, s in zip(buffers, saved_buffers):
                b.copy_(s)
        for m, t in modes:
            m.training = t
        set_rng_state(rng)
        if opt_snap is not None:
            _restore_optimizer(optimizer, opt_snap)
