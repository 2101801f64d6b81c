"""``accelerate launch`` with a DeepSpeed config file whose optimizer is ``spectral_newton``.

Accelerate hands DeepSpeed the config's optimizer by name, and DeepSpeed would look ``spectral_newton`` up in
``torch.optim``. :func:`prepare_spectral_newton` replaces ``accelerator.prepare(model, DummyOptim(...), ...)``:
it builds :class:`~spectral_dist.integrations.deepspeed.ZeroSpectralNewton` from the config's
``optimizer.params``, removes the optimizer section from the plugin's config, prepares, and attaches the
optimizer to the ZeRO engine (see :mod:`spectral_dist.integrations.deepspeed` for how the matrix step sees
full, fully reduced gradients). With any other optimizer in the config it prepares with a ``DummyOptim``, so
one training script serves spectral_newton runs and their AdamW ablations.

On CPU-only machines accelerate finds no DeepSpeed backend by itself: create the accelerator with
``Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])`` and set ``DS_ACCELERATOR=cpu``.
"""

from __future__ import annotations

import os

from .._extras import require

require("accelerate", extra="hf", feature="spectral_dist.integrations.accelerate")

from .deepspeed import attach, build_optimizer, check_config, is_spectral_config  # noqa: E402

__all__ = ["prepare_spectral_newton"]


def prepare_spectral_newton(accelerator, model, *objects, **options):
    """Prepare ``model``, an optimizer named by the DeepSpeed config, and ``objects`` (data loaders, ...).

    Args:
        accelerator: an ``accelerate.Accelerator`` whose state has a DeepSpeed plugin.
        model: the ``nn.Module`` to train (not yet prepared).
        *objects: further objects for ``accelerator.prepare`` (data loaders; a ``DummyScheduler`` when the
            config has a ``scheduler`` section).
        **options: optimizer options that override ``optimizer.params`` (and fill its ``"auto"`` values).

    Returns:
        ``(model, optimizer, *objects)`` as ``accelerator.prepare`` returns them; the spectral optimizer
        itself is ``model.basic_optimizer`` (the DeepSpeed engine's client optimizer).
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        raise ValueError(
            "prepare_spectral_newton needs a DeepSpeed accelerator: launch with an accelerate config whose "
            "distributed_type is DEEPSPEED (deepspeed_config_file pointing to a configs/deepspeed/*.json)"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"accelerate started {world} processes but the Accelerator sees {accelerator.num_processes}: on a "
            "machine without GPUs pass the backend, Accelerator(kwargs_handlers=[InitProcessGroupKwargs("
            'backend="gloo")]), or every process trains alone on the full data'
        )
    cfg = plugin.deepspeed_config
    if "optimizer" not in cfg:
        raise ValueError(
            "the DeepSpeed config has no optimizer section: add "
            '"optimizer": {"type": "spectral_newton", "params": {...}} (or "AdamW") to deepspeed_config_file'
        )
    if not is_spectral_config(cfg):
        from accelerate.utils import DummyOptim

        params = dict(cfg["optimizer"].get("params") or {})
        lr = options.get("lr", params.get("lr", 1e-3))
        wd = options.get("weight_decay", params.get("weight_decay", 0.0))
        lr, wd = (
            (1e-3 if lr == "auto" else lr),
            (0.0 if wd == "auto" else wd),
        )  # accelerate fills "auto" from these
        dummy = DummyOptim(model.parameters(), lr=lr, weight_decay=wd)
        return accelerator.prepare(model, dummy, *objects)
    params = dict(cfg["optimizer"].get("params") or {})
    params.update(options)
    check_config({**cfg, "optimizer": {"type": cfg["optimizer"]["type"], "params": params}})
    opt = build_optimizer(model, params)
    del cfg["optimizer"]  # accelerate refuses an optimizer both in the config and in the code
    cfg["zero_allow_untested_optimizer"] = True
    prepared = accelerator.prepare(model, opt, *objects)
    attach(opt, prepared[0])
    return prepared
