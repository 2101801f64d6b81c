"""A tiny GPT-2 trained by the Hugging Face Trainer with SpectralNewton and SpectralDiagnosticsCallback.

Shared by tests/test_hf_trainer.py (in process) and run by ``accelerate launch`` as a script:

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/hf_trainer_script.py OUT_DIR

(``--cpu --num_processes 2`` starts a single process in accelerate 1.x unless an MPI hostfile is given;
``--multi_gpu`` starts the processes with torchrun and ``ACCELERATE_USE_CPU`` / ``use_cpu`` keep them on CPU,
with the gloo backend.)

A second argument picks the engine: a DeepSpeed config path (its optimizer ``spectral_newton``), or ``fsdp2``
(GPUs: accelerate enables FSDP only there). Each process writes ``OUT_DIR/rank<r>.pt`` (initial and final
parameters, ``opt.stats()``, the log history, the last diagnostics).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

STEPS, SEQ, BATCH = 5, 32, 4
TRAJ_EVERY, DIAG_EVERY = 1, 2
STDLIB_FILES = ("textwrap.py", "string.py", "bisect.py", "colorsys.py", "fnmatch.py")


class ByteCorpus(torch.utils.data.Dataset):
    """Non-overlapping ``SEQ``-byte windows of Python standard-library source files, as LM examples."""

    def __init__(self, n_bytes: int = 8192, seq: int = SEQ):
        root = Path(os.__file__).resolve().parent
        data = b"".join((root / f).read_bytes() for f in STDLIB_FILES)[:n_bytes]
        ids = torch.tensor(list(data), dtype=torch.long)
        self.windows = ids[: len(ids) // seq * seq].view(-1, seq)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i):
        x = self.windows[i]
        return {"input_ids": x, "labels": x}


def make_args(out_dir, per_device_batch: int = BATCH, **kw):
    from transformers import TrainingArguments

    opts = dict(
        output_dir=str(out_dir),
        use_cpu=True,
        report_to=["wandb"],
        run_name="hf-trainer-test",
        max_steps=STEPS,
        per_device_train_batch_size=per_device_batch,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    opts.update(kw)
    return TrainingArguments(**opts)


def make_model():
    from spectral_dist.models import tiny_gpt

    torch.manual_seed(0)
    return tiny_gpt(vocab_size=256, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)


def diagnostics_callback(**kw):
    from spectral_dist.integrations.hf import SpectralDiagnosticsCallback

    opts = dict(
        every=DIAG_EVERY, top_k=4, max_layers=2, traj_every=TRAJ_EVERY, traj_sketch_dim=32, traj_window=4
    )
    opts.update(kw)
    return SpectralDiagnosticsCallback(**opts)


def main(
    out_dir: str,
    report_to=("wandb",),
    diagnostics: bool = True,
    engine: str | None = None,
    spectral_options: dict | None = None,
) -> None:
    """``SpectralNewtonTrainer`` (+ diagnostics) under ``accelerate launch`` (each process holds 1/world of the
    batch of ``BATCH`` examples, so every world size trains on the same global batches); also run in process
    as the 1-process reference."""
    import torch.distributed as dist
    import wandb

    from spectral_dist.integrations.hf import SpectralNewtonTrainer

    out = Path(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = {}
    if engine == "fsdp2":  # accelerate enables FSDP on GPUs only
        extra = dict(fsdp=True, fsdp_config={"fsdp_version": 2}, use_cpu=False)
    elif (
        engine
    ):  # a DeepSpeed config; use_cpu=True would make the Trainer drop DeepSpeed (DS_ACCELERATOR=cpu)
        extra = dict(deepspeed=engine, use_cpu=False)
    args = make_args(out / "trainer", per_device_batch=BATCH // world, report_to=list(report_to), **extra)
    model = make_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = diagnostics_callback() if diagnostics else None
    trainer = SpectralNewtonTrainer(
        model=model,
        args=args,
        train_dataset=ByteCorpus(),
        callbacks=[cb] if cb is not None else None,
        spectral_options=spectral_options,
    )
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    opt = trainer.spectral_optimizer()
    torch.save(
        {
            "world": dist.get_world_size() if dist.is_initialized() else 1,
            "engine": type(opt._engine).__name__,
            "optimizer": type(opt).__name__,
            "groups": [
                {k: v for k, v in g.items() if k not in ("params", "param_names")} for g in opt.param_groups
            ],
            "init": init,
            "final": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "stats": opt.stats(),
            "log_history": trainer.state.log_history,
            "diag": cb.last_metrics if cb is not None else {},
        },
        out / f"rank{rank}.pt",
    )
    if wandb.run is not None:
        wandb.finish()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1], engine=sys.argv[2] if len(sys.argv) > 2 else None)
