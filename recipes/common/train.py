"""The training loop every recipe shares: accelerate, gradient accumulation, evaluation, logging,
diagnostics, checkpoints and exact resume.

A recipe builds a :class:`Task` (model, data, loss, eval) and calls :func:`train`. Exact resume: the
checkpoint (``accelerator.save_state``) holds model, optimizer, scheduler, every process's RNG states and a
:class:`TrainState` with the step; the data position is ``step * grad_accum`` global micro-batches of the
:class:`~common.data.ResumableSampler`, so the resumed run continues with the batch it would have seen.

Resuming reads no code from the checkpoint unless ``--trust_checkpoint true``: see
:func:`check_checkpoint_files`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from spectral_dist.integrations.launch import check_process_count
from spectral_dist.logging import RunLogger

from .accel import make_accelerator
from .config import config_to_dict
from .data import ResumableSampler, eval_index_batches
from .deepspeed import prepare_deepspeed
from .diagnostics import RecipeDiagnostics, matrix_names
from .optim import build_optimizer, warmup_cosine

__all__ = ["Task", "TrainState", "train", "latest_checkpoint", "check_checkpoint_files"]


@dataclass
class Task:
    """What a recipe supplies to :func:`train`.

    Attributes:
        name: recipe name (W&B group default, checkpoint metadata).
        build_model: ``cfg -> nn.Module``, called after seeding, identically on every process.
        train_data, val_data: map-style datasets (train items are looked up by ``(index, epoch)``).
        collate: list of items -> batch.
        loss_fn: ``(model, batch) -> scalar loss``.
        eval_fn: ``(model, batch, mask) -> {name: summed tensor}``; sums are reduced over processes.
        eval_metrics: ``sums -> {"val/...": float}``.
        main_metric: the key of ``eval_metrics`` reports rank runs by (e.g. ``val/acc``).
        fsdp_block: the model's block class, each an FSDP unit under an FSDP config with
            ``TRANSFORMER_BASED_WRAP`` that names no ``fsdp_transformer_layer_cls_to_wrap``.
    """

    name: str
    build_model: Callable
    train_data: object
    val_data: object
    collate: Callable
    loss_fn: Callable
    eval_fn: Callable
    eval_metrics: Callable
    main_metric: str
    to_device: Callable | None = None
    fsdp_block: str | None = None


class TrainState:
    """Loop counters saved with every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    def __init__(self):
        self.step = 0
        self.wandb_id = None
        self.best = None
        self.wandb_segments: list[str] = []
        # micro-batches (all processes) whose loss was NaN/Inf, left out of the logged loss
        self.nonfinite_batches = 0

    def state_dict(self):
        return {
            "step": self.step,
            "wandb_id": self.wandb_id,
            "best": self.best,
            "wandb_segments": list(self.wandb_segments),
            "nonfinite_batches": self.nonfinite_batches,
        }

    def load_state_dict(self, sd):
        self.step, self.wandb_id, self.best = int(sd["step"]), sd.get("wandb_id"), sd.get("best")
        self.wandb_segments = list(sd.get("wandb_segments") or [])
        self.nonfinite_batches = int(sd.get("nonfinite_batches", 0))


RUN_INFO = "run_info.json"  # beside each checkpoint: how it was written, read before anything is loaded


def _run_info(cfg, accelerator) -> dict:
    return {
        "world_size": accelerator.num_processes,
        "global_batch": cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "distributed_type": str(accelerator.distributed_type),
    }


def _family(distributed_type: str) -> str:
    """Distributed types whose accelerate checkpoints share a format (one process and DDP: whole tensors)."""
    for fam in ("FSDP", "DEEPSPEED", "MEGATRON"):
        if fam in distributed_type:
            return fam
    return "REPLICATED"


def check_resume(ckpt: Path, cfg, accelerator) -> None:
    """Refuse a checkpoint this run cannot continue exactly, saying what to change.

    The data order depends on the global batch only, and SpectralNewton's state has each parameter's own
    layout, so DDP and FSDP checkpoints resume exactly at another process count when the global batch is the
    same; DeepSpeed ZeRO partitions its optimizer state by process count."""
    path = Path(ckpt, RUN_INFO)
    if not path.exists():
        return  # written before run_info existed
    saved, now = json.loads(path.read_text()), _run_info(cfg, accelerator)
    if saved["global_batch"] != now["global_batch"]:
        want = saved["global_batch"] // (cfg.grad_accum * accelerator.num_processes)
        hint = (
            f"--batch_size {want}"
            if want * cfg.grad_accum * accelerator.num_processes == saved["global_batch"]
            else f"{saved['world_size']} processes with --batch_size {saved['batch_size']}"
        )
        raise ValueError(
            f"{ckpt} was written with a global batch of {saved['global_batch']} ({saved['batch_size']} x "
            f"{saved['grad_accum']} accumulation x {saved['world_size']} processes); this run's is "
            f"{now['global_batch']}. The data order and the optimizer's trajectory depend on it: resume with "
            f"{hint} (or start a new run without --resume)"
        )
    if _family(saved["distributed_type"]) != _family(now["distributed_type"]):
        raise ValueError(
            f"{ckpt} was written under {saved['distributed_type']}, this run is {now['distributed_type']}: their "
            "checkpoint formats differ; resume with the accelerate config that wrote it"
        )
    if "DEEPSPEED" in now["distributed_type"] and saved["world_size"] != now["world_size"]:
        raise ValueError(
            f"{ckpt} was written by {saved['world_size']} DeepSpeed processes, this run has {now['world_size']}: "
            f"ZeRO partitions the optimizer state by process count; resume with --num_processes "
            f"{saved['world_size']}"
        )


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = sorted(Path(output_dir, "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return ckpts[-1] if ckpts else None


def check_checkpoint_files(
    folder: str | Path, trust: bool = False, deepspeed: bool = False, own: bool = False
) -> None:
    """Refuse (ValueError naming ``--trust_checkpoint``) a checkpoint whose loading would run code from it.

    ``accelerator.load_state`` reads the model from safetensors and the optimizer, RNG states and sampler
    with ``torch.load(weights_only=True)``, but the registered objects' state (``custom_checkpoint_*.pkl``:
    scheduler, :class:`TrainState`, trajectory monitor) with ``weights_only=False``. This recipe writes only
    tensors, numbers, strings and containers there, so each of those files is first read with
    ``weights_only=True`` and refused if that fails. Loaders outside this project unpickle fully and cannot
    be restricted from here: DeepSpeed's ``engine.load_checkpoint`` (``deepspeed``) and
    ``torch.distributed.checkpoint`` (``.metadata``/``.distcp`` files of FSDP sharded state); those need
    ``trust``, unless ``own``: the run resumes its own output folder (``--resume latest``/``auto``), whose
    DeepSpeed and DCP files it wrote itself. With ``trust`` nothing is checked.
    """
    if trust:
        return
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    how = (
        "Only resume from a checkpoint you trust (one you wrote, or whose author you trust), and say so with "
    )
    if not own and (deepspeed or any(p.name.endswith("_states.pt") for p in files)):
        raise ValueError(
            f"--resume {folder}: refused. A DeepSpeed checkpoint is read by DeepSpeed's engine.load_checkpoint, "
            "which unpickles its files fully (torch.load(weights_only=False)), so a checkpoint from elsewhere "
            f"could run code as you; this recipe cannot restrict that loader. {how}--trust_checkpoint true."
        )
    dcp = [] if own else [p for p in files if p.name == ".metadata" or p.suffix == ".distcp"]
    if dcp:
        raise ValueError(
            f"--resume {folder}: refused. It holds torch.distributed.checkpoint files (FSDP sharded state: "
            f"{', '.join(str(p.relative_to(folder)) for p in dcp[:3])}), whose metadata torch reads with a plain "
            "pickle.load, so a checkpoint from elsewhere could run code as you; this recipe cannot restrict "
            f"that loader. {how}--trust_checkpoint true."
        )
    for p in files:
        if not (p.name.startswith("custom_checkpoint_") and p.suffix == ".pkl"):
            continue
        try:
            torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"it names the Python global {found.group(1)}" if found else "it is not weights only"
            raise ValueError(
                f"--resume {folder}: refused {p.name}: {what}. accelerate unpickles this file fully "
                "(weights_only=False), which runs whatever code it names; the recipes write only tensors, "
                f"numbers, strings and containers there. {how}--trust_checkpoint true."
            ) from None


def _move(batch, device):
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(b, device) for b in batch)
    return batch.to(device, non_blocking=True) if torch.is_tensor(batch) else batch


def _loader(dataset, sampler_or_batches, collate, num_workers):
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler_or_batches,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=False,
    )


@torch.no_grad()
def evaluate(cfg, task: Task, accelerator: Accelerator, model) -> dict:
    """Task metrics over the validation split (or ``eval_batches`` batches of it), on every process."""
    model.eval()
    batches = eval_index_batches(
        len(task.val_data),
        cfg.batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        cfg.eval_batches,
    )
    sums: dict[str, torch.Tensor] = {}
    masks = [torch.tensor(m) for _, m in batches]
    loader = _loader(task.val_data, [idx for idx, _ in batches], task.collate, cfg.num_workers)
    for batch, mask in zip(loader, masks):
        batch = _move(batch, accelerator.device)
        with accelerator.autocast():
            out = task.eval_fn(model, batch, mask.to(accelerator.device))
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v.detach().double()
    keys = sorted(sums)
    vec = torch.stack([sums[k] for k in keys]).to(accelerator.device)
    vec = accelerator.reduce(vec, reduction="sum")
    model.train()
    return task.eval_metrics(dict(zip(keys, vec.tolist())))


def _fault_here(cfg, step: int, micro: int, accelerator) -> bool:
    """The ``--fault_at_step`` test hook: a NaN loss on the last process's first micro-batch of that step."""
    last = accelerator.process_index == accelerator.num_processes - 1
    return step == cfg.fault_at_step and micro == 0 and last  # steps count from 1: 0 never matches


def _nonfinite_message(cfg, step: int, n_bad: int, n_total: int) -> str:
    """Why the run stops: the logging window has no finite loss (or its finite losses overflow)."""
    head = (
        f"training loss is non-finite at step {step}: {n_bad} of the {n_total} micro-batches since the last "
        f"log (all processes) had a NaN/Inf loss"
    )
    if cfg.optimizer == "spectral_newton":
        return (
            f"{head}. SpectralNewton skips a step whose gradient is non-finite, so the weights are finite: "
            f"look at the data, lower --lr, or train in fp32 (--mixed_precision no)"
        )
    return (
        f"{head}. --optimizer {cfg.optimizer} does not skip a non-finite gradient, so one bad batch makes "
        f"every weight NaN; lower --lr, set --grad_clip, or use --optimizer spectral_newton (it skips "
        f"non-finite steps and counts them)"
    )


def spectral_newton_of(optimizer):
    """The SpectralNewton inside accelerate's and DeepSpeed's wrappers (each keeps the one it wraps in
    ``.optimizer``), or None for other optimizers."""
    from spectral_dist import SpectralNewton

    o = optimizer
    for _ in range(6):
        if isinstance(o, SpectralNewton):
            return o
        o = getattr(o, "optimizer", None)
        if o is None:
            return None
    return None


def optimizer_counters(opt) -> dict:
    """``optim/*`` metrics from ``SpectralNewton.stats()`` (host counters, identical on every process, kept in
    its state across resumes): steps skipped for a non-finite gradient (the most any parameter skipped: a NaN
    batch skips every parameter at once), float64 retries, decomposition failures and fallbacks to the
    previous basis (summed over the matrices)."""
    stats = list(opt.stats().values())
    if not stats:
        return {}
    return {
        "optim/skipped_steps": max(s["skipped"] for s in stats),
        "optim/retries": sum(s["retries"] for s in stats),
        "optim/decomposition_failures": sum(s["decomposition_failures"] for s in stats),
        "optim/fallbacks": sum(s["fallbacks"] for s in stats),
    }


def _save(accelerator, cfg, state: TrainState, logger=None):
    path = Path(cfg.output_dir, "checkpoints", f"step_{state.step}")
    if logger is not None:  # make every row logged so far durable, and remember the finished W&B segments
        state.wandb_segments = logger.checkpoint()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        Path(path, RUN_INFO).write_text(json.dumps(_run_info(cfg, accelerator) | {"step": state.step}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and cfg.keep_checkpoints > 0:
        ckpts = sorted(path.parent.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for old in ckpts[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def train(cfg, task: Task) -> dict:
    """Train ``task`` as ``cfg`` says; returns the final metrics (on every process)."""
    if task.fsdp_block and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        # the block each FSDP unit wraps, unless the accelerate config (or its flag) names one
        os.environ.setdefault("FSDP_TRANSFORMER_CLS_TO_WRAP", task.fsdp_block)
    accelerator = make_accelerator(cfg)
    check_process_count(accelerator.num_processes, "the recipe's Accelerator")  # asked for N, got fewer: stop
    dist = accelerator.distributed_type
    set_seed(cfg.seed)  # same seed everywhere: identical initial weights on every process
    model = task.build_model(cfg)
    matrices = matrix_names(model)
    if dist == DistributedType.DEEPSPEED:
        model, optimizer = prepare_deepspeed(accelerator, cfg, model)
    else:
        model, optimizer = accelerator.prepare(model, build_optimizer(cfg, model))
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    spectral = spectral_newton_of(optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    diagnostics = RecipeDiagnostics(cfg, accelerator, model, task, matrices)  # registers checkpointed state

    resumed = False
    if cfg.resume:
        ckpt = latest_checkpoint(cfg.output_dir) if cfg.resume in ("latest", "auto") else Path(cfg.resume)
        if ckpt is not None and ckpt.is_dir():
            # "latest"/"auto" resume this run's own output_dir; a checkpoint given by path may come from
            # anywhere, and loaders outside this project unpickle it fully: that needs --trust_checkpoint
            own = cfg.resume in ("latest", "auto")
            check_checkpoint_files(
                ckpt, cfg.trust_checkpoint, deepspeed=dist == DistributedType.DEEPSPEED, own=own
            )
            check_resume(ckpt, cfg, accelerator)
            accelerator.load_state(str(ckpt))
            resumed = True
            accelerator.print(f"resumed from {ckpt} at step {state.step}")
        elif cfg.resume != "auto":
            raise FileNotFoundError(
                f"--resume {cfg.resume}: no checkpoint found (looked in {cfg.output_dir})"
            )

    logger = None
    if accelerator.is_main_process:
        run_cfg = config_to_dict(cfg) | {
            "recipe": task.name,
            "world_size": accelerator.num_processes,
            "distributed_type": str(dist),
            "mixed_precision_effective": accelerator.mixed_precision,
            "num_parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
            "train_size": len(task.train_data),
            "val_size": len(task.val_data),
            "main_metric": task.main_metric,
        }
        logger = RunLogger(
            cfg.output_dir,
            project=cfg.wandb_project,
            name=cfg.run_name or Path(cfg.output_dir).name,
            group=cfg.wandb_group or task.name,
            config=run_cfg,
            mode=cfg.wandb_mode,
            resume_id=state.wandb_id,
            resume_step=state.step if resumed else None,
            segments=state.wandb_segments,
        )
        state.wandb_id = logger.run_id

    diagnostics.logger = logger
    sampler = ResumableSampler(
        len(task.train_data),
        cfg.batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        seed=cfg.seed,
        start=state.step * cfg.grad_accum,
    )
    batches = iter(_loader(task.train_data, sampler, task.collate, cfg.num_workers))
    global_batch = cfg.batch_size * cfg.grad_accum * accelerator.num_processes

    progress = None
    if accelerator.is_main_process and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=state.step, desc=task.name, dynamic_ncols=True)
    model.train()
    # the loss window, on the device (no host sync until it is logged): the sum of the finite micro-batch
    # losses, how many were finite, how many were not
    window, window_n, t0 = torch.zeros(3, device=accelerator.device), 0, time.perf_counter()
    metrics: dict = {}
    while state.step < cfg.max_steps:
        for micro in range(cfg.grad_accum):
            batch = _move(next(batches), accelerator.device)
            with accelerator.accumulate(model):
                loss = task.loss_fn(model, batch)
                if _fault_here(cfg, state.step + 1, micro, accelerator):
                    loss = loss * float("nan")  # test hook: one bad batch on the last process
                accelerator.backward(loss)
            lv = loss.detach().float()
            ok = torch.isfinite(lv)
            window += torch.stack([torch.where(ok, lv, 0.0), ok.float(), (~ok).float()])
            window_n += 1
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        diagnostics.after_backward(state.step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        last = state.step == cfg.max_steps
        if progress is not None:
            progress.update(1)

        if state.step % cfg.log_every == 0 or last:
            loss_sum, n_ok, n_bad = accelerator.reduce(window, reduction="sum").tolist()
            state.nonfinite_batches += int(n_bad)
            avg = loss_sum / n_ok if n_ok else float("nan")
            if not math.isfinite(avg):
                raise FloatingPointError(_nonfinite_message(cfg, state.step, int(n_bad), int(n_bad + n_ok)))
            dt = time.perf_counter() - t0
            metrics = {
                "train/loss": avg,
                "train/lr": scheduler.get_last_lr()[0],
                "train/samples_per_s": global_batch * window_n / cfg.grad_accum / max(dt, 1e-9),
                "train/epoch": state.step * cfg.grad_accum / sampler.batches_per_epoch,
                "train/nonfinite_batches": state.nonfinite_batches,
            }
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            if spectral is not None:
                metrics.update(optimizer_counters(spectral))
            if logger is not None:
                logger.log(metrics, step=state.step)
            if progress is not None:
                progress.set_postfix(loss=f"{avg:.4f}")
            window.zero_()
            window_n, t0 = 0, time.perf_counter()

        if (cfg.eval_every and state.step % cfg.eval_every == 0) or last:
            ev = evaluate(cfg, task, accelerator, model)
            if logger is not None:
                logger.log(ev, step=state.step)
                accelerator.print(
                    f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()), flush=True
                )
            m = ev.get(task.main_metric)
            if m is not None:
                better = state.best is None or (
                    m < state.best if "loss" in task.main_metric else m > state.best
                )
                state.best = m if better else state.best
            metrics.update(ev)

        diagnostics.maybe_log(state.step, last)

        if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or last:
            _save(accelerator, cfg, state, logger)

        if cfg.kill_at_step and state.step == cfg.kill_at_step:  # test hook: a node failure, no clean-up
            os.kill(os.getpid(), signal.SIGKILL)

    if progress is not None:
        progress.close()
    if logger is not None:
        logger.summary({"final_step": state.step, f"best/{task.main_metric}": state.best, **metrics})
        logger.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics
