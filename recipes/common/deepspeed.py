"""DeepSpeed under ``accelerate launch``: fill the config from the recipe config and prepare the optimizer.

The recipes do not hand their data loaders to accelerate, so the batch-size fields are set here. The
config's ``optimizer`` section is rewritten from ``--optimizer`` (so one DeepSpeed file serves every
ablation arm): ``spectral_newton`` is built by
:func:`spectral_dist.integrations.accelerate.prepare_spectral_newton` (ZeRO-aware: the matrix step sees
full, fully reduced gradients), ``adamw`` by DeepSpeed itself. Muon is not offered under DeepSpeed.
"""

from __future__ import annotations

__all__ = ["prepare_deepspeed_config", "prepare_deepspeed"]


def prepare_deepspeed_config(accelerator, cfg) -> dict:
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.grad_clip
    if cfg.optimizer == "spectral_newton":
        alpha = cfg.alpha if cfg.alpha in ("by_layer", "auto") else float(cfg.alpha)
        params = dict((ds.get("optimizer") or {}).get("params") or {}) if _is_spectral(ds) else {}
        params.update(
            lr=cfg.lr,
            alpha=alpha,
            momentum=cfg.momentum,
            damping=cfg.damping,
            weight_decay=cfg.weight_decay,
            basis=cfg.basis,
            adamw_lr=cfg.adamw_lr if cfg.adamw_lr is not None else cfg.lr,
            adamw_betas=list(cfg.betas),
            adamw_weight_decay=0.0,  # as in common.optim: no decay on norms, biases, embeddings
        )
        ds["optimizer"] = {"type": "spectral_newton", "params": params}
    elif cfg.optimizer == "adamw":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay},
        }
    else:
        raise ValueError(
            f"--optimizer {cfg.optimizer} is not available under DeepSpeed; use spectral_newton or adamw "
            "(or a DDP/FSDP accelerate config for muon)"
        )
    return ds


def _is_spectral(ds) -> bool:
    opt = ds.get("optimizer") or {}
    return str(opt.get("type", "")).lower() == "spectral_newton"


def prepare_deepspeed(accelerator, cfg, model):
    """``(model, optimizer)`` prepared by DeepSpeed with the optimizer ``cfg.optimizer`` names."""
    from spectral_dist.integrations.accelerate import prepare_spectral_newton

    prepare_deepspeed_config(accelerator, cfg)
    return prepare_spectral_newton(accelerator, model)
