"""Dataclass configs for the recipes: defaults in code, a YAML file on top, command-line flags on top of that.

Parsed with transformers' ``HfArgumentParser``: every field of a recipe's config dataclass is a ``--field``
flag with its type, its choices (``Literal`` fields), its default and a sentence of help (``--help`` shows
them). ``--config file.yaml`` holds ``field: value`` pairs, parsed like flags given before the command
line's own, so precedence is dataclass default < YAML < flags, and unknown YAML keys and wrongly typed
values are errors naming the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser

__all__ = ["TrainConfig", "opt", "parse_config", "config_to_dict"]


def opt(default, help: str):
    """A config field with its default and the sentence ``--help`` shows for it."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Options shared by every recipe (the recipe's own dataclass adds model and data fields)."""

    # optimisation
    optimizer: Literal["adamw", "spectral_newton", "muon"] = opt(
        "spectral_newton", "The optimizer to train with."
    )
    lr: float = opt(1e-3, "Peak learning rate of the matrix step (of all parameters under adamw).")
    adamw_lr: float | None = opt(
        None, "Learning rate of the non-matrix parameters under spectral_newton and muon (None: --lr)."
    )
    weight_decay: float = opt(0.05, "Decoupled weight decay (none on norms, biases and embeddings).")
    betas: list[float] = opt([0.9, 0.95], "AdamW's two betas, for the parameters AdamW steps.")
    alpha: str = opt(
        "by_layer",
        "SpectralNewton's exponent: by_layer (conv 2, attention 1.65, MLP up 2, MLP down 1), auto or a number.",
    )
    momentum: float = opt(0.95, "Momentum of SpectralNewton and Muon.")
    damping: float = opt(1e-4, "SpectralNewton's damping, relative to sigma_1^alpha.")
    basis: Literal[
        "svd", "gram", "auto", "polar_express", "cholesky", "eigenbasis", "newton_schulz", "tracked"
    ] = opt(
        "svd",
        "How SpectralNewton decomposes each matrix (svd: exact, the recipes' reference; auto: the library's "
        "default, faster; see docs/benchmarks.md section 4).",
    )
    jacobi_steps: int = opt(
        0,
        "SpectralNewton's Jacobi steps per eigenbasis refresh (with --basis auto or eigenbasis: more accurate "
        "directions for alpha outside 0, 1, 2 at about one more power step each; docs/benchmarks.md).",
    )
    warmup_steps: int = opt(20, "Steps of linear learning-rate warmup.")
    min_lr_ratio: float = opt(0.1, "Cosine decay ends at this fraction of the peak learning rate.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0: no clipping).")
    # schedule and batch
    max_steps: int = opt(300, "Optimizer steps to train for.")
    batch_size: int = opt(64, "Samples per process in each micro-batch.")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    mixed_precision: str | None = opt(None, "no, fp16 or bf16 (None: what accelerate launch was told).")
    seed: int = opt(0, "Seed of model initialisation, data order and augmentation.")
    num_workers: int = opt(0, "Data loader worker processes.")
    # evaluation, logging, checkpoints
    eval_every: int = opt(100, "Evaluate every this many steps, and at the last step (0: only at the last).")
    eval_batches: int = opt(0, "Batches per evaluation (0: the whole validation split).")
    log_every: int = opt(10, "Log the training loss every this many steps.")
    checkpoint_every: int = opt(0, "Save a checkpoint every this many steps (0: only at the end).")
    keep_checkpoints: int = opt(2, "Keep this many of the newest checkpoints (0: all).")
    output_dir: str = opt("outputs/run", "Folder for metrics, W&B run, plots and checkpoints.")
    resume: str | None = opt(
        None, "Checkpoint folder to resume from; latest: the newest in output_dir; auto: that, if any."
    )
    trust_checkpoint: bool = opt(
        False, "Let --resume unpickle a checkpoint fully (DeepSpeed, FSDP sharded state): it can run code."
    )
    # diagnostics
    diag_every: int = opt(100, "Run the curvature probe every this many steps and at the last (0: never).")
    probe_top_k: int = opt(8, "Singular directions per layer the curvature probe measures.")
    probe_hvp: Literal["auto", "autograd", "func", "fd"] = opt(
        "auto", "Hessian-vector products of the probe (auto: fd under FSDP and DeepSpeed, else autograd)."
    )
    probe_layers: int = opt(8, "Probe at most this many matrix layers (0: all).")
    probe_batch_size: int = opt(64, "Samples in the curvature probe's batch.")
    traj_every: int = opt(
        1, "Sketch the gradient for the trajectory monitor every this many steps (0: never)."
    )
    traj_sketch_dim: int = opt(128, "Dimension of the trajectory monitor's random-projection sketches.")
    traj_window: int = opt(32, "Sketches in the trajectory monitor's window.")
    traj_log_every: int = opt(50, "Log the trajectory summary every this many steps and at the last.")
    # W&B
    wandb_project: str = opt("spectral-dist", "W&B project.")
    wandb_mode: str | None = opt(
        None, "online, offline or disabled (None: offline unless WANDB_API_KEY is set)."
    )
    run_name: str | None = opt(None, "W&B run name (None: the output folder's name).")
    wandb_group: str | None = opt(None, "W&B group (None: the recipe's name).")
    progress: bool = opt(True, "Show a progress bar.")
    kill_at_step: int = opt(
        0, "For kill/resume tests: every process SIGKILLs itself after this step (0: never)."
    )
    fault_at_step: int = opt(
        0,
        "For fault tests: the last process's first micro-batch of this step gets a NaN loss (0: never).",
    )

    def validate(self) -> None:
        validate_train_config(self)


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors name where the offending value came from (``context``)."""

    context = ""

    def error(self, message):
        super().error(self.context + message)


def _optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _yaml_words(path: Path, loaded: dict, fields: dict, parser: _Parser) -> list[str]:
    """The YAML mapping as command-line words (``--field value ...``)."""
    words = []
    for name, value in loaded.items():
        if name not in fields:
            parser.error(f"--config {path}: unknown field {name!r}; valid: {sorted(fields)}")
        if value is None:
            if fields[name].default is not None:
                parser.error(f"--config {path}: {name} may not be null")
            continue  # None is already the default
        if isinstance(value, dict):
            parser.error(f"--config {path}: {name} expects a value, got a mapping")
        values = value if isinstance(value, list) else [value]
        words += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return words


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """Build ``cls`` (a dataclass) from defaults, ``--config`` YAML and ``--field value`` flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(cls, description=description)
    parser.add_argument(
        "--config", default=None, help="YAML file of field: value (flags given here override it)"
    )
    for (
        action
    ) in parser._actions:  # HfArgumentParser's --no_<flag> twin of a True flag: no misleading default
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            flag = action.option_strings[0].replace("--no_", "--", 1)
            action.help, action.default = f"Same as {flag} false.", argparse.SUPPRESS
    fields = {f.name: f for f in dataclasses.fields(cls)}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    cfg_path = pre.parse_known_args(argv)[0].config
    words: list[str] = []
    if cfg_path:
        path = Path(cfg_path)
        if not path.is_file():
            parser.error(f"--config {cfg_path}: no such file")
        import yaml

        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            parser.error(f"--config {cfg_path}: expected a mapping of field: value")
        words = _yaml_words(path, loaded, fields, parser)
        parser.context = f"--config {cfg_path}: "
        parser.parse_args(words)  # its own errors name the file
        parser.context = ""
    values = vars(parser.parse_args(words + argv))
    values.pop("config")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():  # "none" / "null" for an optional text field
        if _optional(hints[name]) and isinstance(value, str) and value.lower() in ("none", "null"):
            values[name] = None
    cfg = cls(**values)
    try:
        cfg.validate()
    except ValueError as e:
        parser.error(str(e))
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def validate_train_config(cfg: TrainConfig) -> None:
    """Raise ValueError for inconsistent shared options (types and choices are checked by the parser)."""
    if cfg.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.wandb_mode not in (None, "online", "offline", "disabled"):
        raise ValueError(f"--wandb_mode must be online, offline or disabled, got {cfg.wandb_mode!r}")
    if len(cfg.betas) != 2:
        raise ValueError(f"--betas takes two values, got {cfg.betas}")
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
        "kill_at_step",
        "fault_at_step",
    ):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.alpha not in ("by_layer", "auto"):
        try:
            float(cfg.alpha)
        except ValueError:
            raise ValueError(f"--alpha must be by_layer, auto or a number, got {cfg.alpha!r}") from None
