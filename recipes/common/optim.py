"""Optimizers for the recipes' ablations, and the warmup + cosine schedule.

* ``adamw``: torch.optim.AdamW on everything (no weight decay on norms, biases and embeddings).
* ``spectral_newton``: :meth:`SpectralNewton.from_model` (Spectral Newton on matrices, AdamW on the rest).
* ``muon``: torch.optim.Muon on 2-D hidden matrices, AdamW on the rest, in one :class:`MuonWithAdamW`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spectral_dist.optim import SpectralNewton
from spectral_dist.optim.classify import SPECTRAL_TYPES, classify_parameters

__all__ = ["MuonWithAdamW", "build_optimizer", "warmup_cosine"]

NO_DECAY_TYPES = ("norm", "bias", "vector", "embedding")


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon for 2-D hidden matrices and AdamW for everything else, behind one optimizer.

    ``param_groups`` is the list of both inner optimizers' groups (the same dicts), so LR schedulers and
    gradient clipping see every parameter; the state dict holds both inner state dicts.
    """

    def __init__(
        self, muon_groups: list[dict], adamw_groups: list[dict], muon_kwargs: dict, adamw_kwargs: dict
    ):
        if not any(g["params"] for g in muon_groups):
            raise ValueError(
                "muon: the model has no 2-D hidden matrices (torch.optim.Muon takes 2-D matrices only; conv "
                "kernels are 4-D); use --optimizer adamw or spectral_newton"
            )
        self.muon = torch.optim.Muon(muon_groups, **muon_kwargs)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw_kwargs) if adamw_groups else None
        self.optimizers = [o for o in (self.muon, self.adamw) if o is not None]
        # Optimizer.__init__ is skipped on purpose: the inner optimizers own the groups and state.
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        out = {}
        for o in self.optimizers:
            out.update(o.state)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict):
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError(f"not a MuonWithAdamW state dict (keys {sorted(state_dict)})")
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])

    def __repr__(self):
        return f"MuonWithAdamW(muon={len(self.muon.param_groups[0]['params'])} matrices)"


def _adamw_groups(infos, lr, weight_decay):
    decay = [i.param for i in infos if i.layer_type not in NO_DECAY_TYPES]
    no_decay = [i.param for i in infos if i.layer_type in NO_DECAY_TYPES]
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` for ``model`` (see the module docstring)."""
    infos = [i for i in classify_parameters(model) if i.param.requires_grad]
    adamw_lr = cfg.adamw_lr if cfg.adamw_lr is not None else cfg.lr
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(_adamw_groups(infos, cfg.lr, cfg.weight_decay), betas=tuple(cfg.betas))
    if cfg.optimizer == "spectral_newton":
        alpha = cfg.alpha if cfg.alpha in ("by_layer", "auto") else float(cfg.alpha)
        opt = SpectralNewton.from_model(
            model,
            alpha=alpha,
            lr=cfg.lr,
            momentum=cfg.momentum,
            damping=cfg.damping,
            basis=cfg.basis,
            jacobi_steps=cfg.jacobi_steps,
            weight_decay=cfg.weight_decay,
            adamw_betas=tuple(cfg.betas),
            adamw_weight_decay=0.0,
        )
        for g in opt.param_groups:  # AdamW groups get their own lr in "lr", so the schedule scales both
            if g["spectral"] is False:
                g["lr"] = adamw_lr
        return opt
    if cfg.optimizer == "muon":
        hidden = [i for i in infos if i.layer_type in SPECTRAL_TYPES and i.param.ndim == 2]
        ids = {id(i.param) for i in hidden}
        rest = [i for i in infos if id(i.param) not in ids]
        return MuonWithAdamW(
            [{"params": [i.param for i in hidden], "lr": cfg.lr}],
            _adamw_groups(rest, adamw_lr, cfg.weight_decay),
            muon_kwargs=dict(
                lr=cfg.lr,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
                adjust_lr_fn="match_rms_adamw",
            ),
            adamw_kwargs=dict(lr=adamw_lr, betas=tuple(cfg.betas)),
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw, spectral_newton, muon)")


def warmup_cosine(optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """LambdaLR: linear warmup to each group's lr, then cosine decay to ``min_lr_ratio`` of it."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
