"""Dataclass configs for the recipes: defaults in code, a YAML file on top, command-line flags on top of that.

Every field of a recipe's config dataclass becomes a ``--field`` flag. Precedence: dataclass default <
``--config file.yaml`` < explicit flags. Unknown YAML keys and wrongly typed values are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["TrainConfig", "parse_config", "config_to_dict"]


@dataclass
class TrainConfig:
    """Options shared by every recipe (the recipe's own dataclass adds model and data fields)."""

    # optimisation
    optimizer: str = "spectral_newton"  # adamw | spectral_newton | muon
    lr: float = 1e-3  # peak learning rate of the matrix step (all parameters for adamw)
    adamw_lr: float | None = None  # non-matrix parameters under spectral_newton / muon (None: lr)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    alpha: str = "by_layer"  # SpectralNewton exponent: by_layer | auto | a number
    momentum: float = 0.95  # SpectralNewton / Muon momentum
    damping: float = 1e-4
    basis: str = "svd"  # SpectralNewton decomposition: svd | gram | newton_schulz | tracked
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of the peak
    grad_clip: float = 1.0  # 0 disables
    # schedule and batch
    max_steps: int = 300
    batch_size: int = 64  # per process, per micro-batch
    grad_accum: int = 1
    mixed_precision: str | None = None  # no | fp16 | bf16; None: what `accelerate launch` was told
    seed: int = 0
    num_workers: int = 0
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 0  # 0: the whole validation split
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    output_dir: str = "outputs/run"
    resume: str | None = (
        None  # a checkpoint folder; "latest": newest in output_dir/checkpoints; "auto": that if any
    )
    trust_checkpoint: bool = False  # let --resume unpickle fully (DeepSpeed, FSDP sharded): runs code from it
    # diagnostics
    diag_every: int = 100  # curvature probe every N steps (and at the last step); 0 disables
    probe_top_k: int = 8
    probe_hvp: str = "auto"  # autograd | func | fd | auto (fd under FSDP/DeepSpeed, else autograd)
    probe_layers: int = 8  # probe at most this many matrix layers (0: all)
    probe_batch_size: int = 64
    traj_every: int = 1  # trajectory sketch every N steps; 0 disables
    traj_sketch_dim: int = 128
    traj_window: int = 32
    traj_log_every: int = 50  # trajectory summary logged every N steps (and at the last step)
    # W&B
    wandb_project: str = "spectral-dist"
    wandb_mode: str | None = None  # online | offline | disabled; None: offline unless WANDB_API_KEY is set
    run_name: str | None = None
    wandb_group: str | None = None
    progress: bool = True
    kill_at_step: int = 0  # testing kill/resume: every process SIGKILLs itself after this step (0: never)

    def validate(self) -> None:
        validate_train_config(self)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp, value):
    """Convert ``value`` (from YAML or a command-line string) to the field type ``tp``."""
    base, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional or base is str:
            return None
        raise ValueError(f"config field {name!r} may not be None")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config field {name!r} expects a boolean, got {value!r}")
    if typing.get_origin(base) is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        args = typing.get_args(base)
        if len(value) != len(args):
            raise ValueError(f"config field {name!r} expects {len(args)} values, got {value!r}")
        return tuple(_coerce(name, a, v) for a, v in zip(args, value))
    if base in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"config field {name!r} expects {base.__name__}, got {value!r}")
        try:
            out = base(value) if not (base is int and isinstance(value, float)) else None
        except (TypeError, ValueError):
            out = None
        if out is None or (
            base is int and isinstance(value, str) and not value.strip().lstrip("-").isdigit()
        ):
            raise ValueError(f"config field {name!r} expects {base.__name__}, got {value!r}")
        return out
    if base is str:
        return str(value)
    raise TypeError(f"unsupported config field type for {name!r}: {tp!r}")


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """Build ``cls`` (a dataclass) from defaults, ``--config`` YAML and ``--field value`` flags."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file of field: value (flags given here override it)")
    for name in fields:
        parser.add_argument(
            f"--{name}", default=argparse.SUPPRESS, metavar=name.upper(), help=f"({hints[name]})"
        )
    args = vars(parser.parse_args(argv))
    values: dict = {}
    cfg_path = args.pop("config", None)
    if cfg_path:
        path = Path(cfg_path)
        if not path.is_file():
            parser.error(f"--config {cfg_path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            parser.error(f"--config {cfg_path}: expected a mapping of field: value")
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            parser.error(f"--config {cfg_path}: unknown fields {unknown}; valid: {sorted(fields)}")
        values.update(loaded)
    values.update(args)
    try:
        kwargs = {k: _coerce(k, hints[k], v) for k, v in values.items()}
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    cfg = cls(**kwargs)
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ValueError as e:
            parser.error(str(e))
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def validate_train_config(cfg: TrainConfig) -> None:
    """Raise ValueError for inconsistent shared options."""
    if cfg.optimizer not in ("adamw", "spectral_newton", "muon"):
        raise ValueError(f"--optimizer must be adamw, spectral_newton or muon, got {cfg.optimizer!r}")
    if cfg.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in (
        "eval_every",
        "checkpoint_every",
        "diag_every",
        "traj_every",
        "warmup_steps",
        "eval_batches",
    ):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.probe_hvp not in ("auto", "autograd", "func", "fd"):
        raise ValueError(f"--probe_hvp must be auto, autograd, func or fd, got {cfg.probe_hvp!r}")
    if cfg.alpha not in ("by_layer", "auto"):
        try:
            float(cfg.alpha)
        except ValueError:
            raise ValueError(f"--alpha must be by_layer, auto or a number, got {cfg.alpha!r}") from None
