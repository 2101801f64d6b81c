"""A tiny GPT-2 trained by the Hugging Face Trainer with SpectralNewton and SpectralDiagnosticsCallback.

Shared by tests/test_hf_trainer.py (in process) and run as a script by a launcher, ``OUT_DIR [ENGINE]``:

    # DDP, 2 CPU processes (gloo)
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/hf_trainer_script.py OUT_DIR
    # DeepSpeed, 2 CPU processes: TrainingArguments(deepspeed=CONFIG)
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/hf_trainer_script.py OUT_DIR CONFIG
    # DeepSpeed, 2 CPU processes: the config comes from accelerate launch (TrainingArguments without deepspeed=)
    DS_ACCELERATOR=cpu accelerate launch --use_deepspeed --deepspeed_config_file CONFIG --num_processes 2 \
        tests/hf_trainer_script.py OUT_DIR deepspeed-env
    # FSDP2 on GPUs
    accelerate launch --multi_gpu --num_processes 2 tests/hf_trainer_script.py OUT_DIR fsdp2
    # FSDP2 on CPU (test harness, see CpuFsdp2Trainer)
    torchrun --nproc_per_node 2 tests/hf_trainer_script.py OUT_DIR fsdp2-cpu

(``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.x unless an MPI hostfile
is given; ``--multi_gpu`` starts the processes with torchrun and ``ACCELERATE_USE_CPU`` / ``use_cpu`` keep them
on CPU, with the gloo backend.)

Each process writes ``OUT_DIR/rank<r>.pt``: initial and full final parameters (gathered under ZeRO-3 and FSDP2),
``opt.stats()``, accelerate's process count, the log history, the last diagnostics.
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


def train_resumable(model_fn, out_dir, steps, resume=None, save_steps=None):
    """One process: ``model_fn()``'s model trained ``steps`` steps by the Trainer with SpectralNewton (warmup +
    cosine), saving every ``save_steps``, resuming from the checkpoint ``resume``. Returns (model, optimizer)."""
    from transformers import Trainer

    from spectral_dist.integrations.hf import spectral_newton_optimizers

    torch.manual_seed(0)
    model = model_fn()
    kw = dict(save_strategy="steps", save_steps=save_steps) if save_steps else {}
    args = make_args(out_dir, report_to=[], max_steps=steps, lr_scheduler_type="cosine", warmup_steps=2, **kw)
    opt, sched = spectral_newton_optimizers(model, args)
    trainer = Trainer(model=model, args=args, train_dataset=ByteCorpus(), optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume)
    return model, opt


def diagnostics_callback(**kw):
    from spectral_dist.integrations.hf import SpectralDiagnosticsCallback

    opts = dict(
        every=DIAG_EVERY, top_k=4, max_layers=2, traj_every=TRAJ_EVERY, traj_sketch_dim=32, traj_window=4
    )
    opts.update(kw)
    return SpectralDiagnosticsCallback(**opts)


class CpuFsdp2Trainer:
    """Test harness: ``SpectralNewtonTrainer`` with accelerate's FSDP2 turned on in a CPU (gloo) run.

    accelerate never enables FSDP on CPU: ``AcceleratorState.__init__`` (accelerate/state.py, the
    ``elif self.distributed_type in [DistributedType.MULTI_GPU, ...]`` branch, about line 986) installs the
    FSDP plugin only for GPU-like distributed types, so under ``MULTI_CPU`` the plugin is dropped silently and the
    Trainer wraps the model in DDP. This subclass does, after the Trainer has created its ``Accelerator``, what
    that branch does on GPUs (``distributed_type = FSDP``, ``fsdp_plugin`` from ``TrainingArguments``, mirrored
    into ``PartialState`` as accelerate does at the end of ``AcceleratorState.__init__``). Everything after that
    is unchanged: the Trainer's FSDP2 path, accelerate's ``fully_shard`` preparation and SpectralNewton's
    distributed engine on DTensor parameters.
    """

    def __new__(cls, *args, **kwargs):
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        from spectral_dist.integrations.hf import SpectralNewtonTrainer

        class _Trainer(SpectralNewtonTrainer):
            def create_accelerator_and_postprocess(self):
                super().create_accelerator_and_postprocess()
                state = self.accelerator.state
                if getattr(state, "fsdp_plugin", None) is None and self.args.fsdp_plugin_args:
                    state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                    state.distributed_type = DistributedType.FSDP
                    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                    self.is_fsdp_enabled = True

        return _Trainer(*args, **kwargs)


def _full_parameters(trainer) -> dict[str, torch.Tensor]:
    """Full copies of the trained parameters on every process (collective under ZeRO-3 and FSDP2)."""
    model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    params = dict(model.named_parameters())
    if trainer.is_deepspeed_enabled:
        import deepspeed

        params = dict(trainer.model_wrapped.module.named_parameters())
        plist = list(params.values())
        with deepspeed.zero.GatheredParameters(plist, enabled=hasattr(plist[0], "ds_id")):
            return {n: p.detach().clone() for n, p in params.items()}
    out = {}
    for n, p in params.items():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # DTensor under FSDP2
        out[n] = full.detach().clone()
    return out


def _zero_info(trainer, opt) -> dict | None:
    """Under DeepSpeed: the ZeRO optimizer that wraps the ZeroSpectralNewton, the attached layout's world
    size and owner plan (matrix -> rank); None otherwise."""
    layout = getattr(opt, "_zero", None)
    if layout is None:
        return None
    o, wrapper = trainer.optimizer, None
    for _ in range(4):  # accelerate wrapper -> ZeRO optimizer -> ours
        if getattr(o, "optimizer", None) is opt:
            wrapper = type(o).__name__
            break
        o = getattr(o, "optimizer", None)
    return {"wrapper": wrapper, "world": layout.world, "owners": dict(opt._engine.plan.owners)}


class _KillAt:
    """A TrainerCallback that SIGKILLs the process at the end of a step (before that step's checkpoint)."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        self.step = step
        self.__class__ = type("KillAt", (_KillAt, TrainerCallback), {})

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def main(
    out_dir: str,
    report_to=("wandb",),
    diagnostics: bool = True,
    engine: str | None = None,
    spectral_options: dict | None = None,
) -> None:
    """``SpectralNewtonTrainer`` (+ diagnostics) under a launcher (each process holds 1/world of the batch of
    ``BATCH`` examples, so every world size trains on the same global batches); also run in process as the
    1-process reference."""
    import torch.distributed as dist
    import wandb

    from spectral_dist.integrations.hf import SpectralNewtonTrainer

    out = Path(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if spectral_options is None and os.environ.get("HF_TEST_BASIS"):  # engine-equality tests: an exact basis
        spectral_options = {"basis": os.environ["HF_TEST_BASIS"]}
    extra = {}
    trainer_cls = SpectralNewtonTrainer
    fsdp = dict(fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]})
    if engine == "fsdp2":  # accelerate enables FSDP on GPUs only
        extra = dict(fsdp, use_cpu=False)
    elif engine == "fsdp2-cpu":
        extra, trainer_cls = dict(fsdp, use_cpu=True), CpuFsdp2Trainer
    elif engine == "deepspeed-env":  # accelerate launch --use_deepspeed --deepspeed_config_file ...
        extra = dict(use_cpu=False)
    elif (
        engine
    ):  # a DeepSpeed config; use_cpu=True would make the Trainer drop DeepSpeed (DS_ACCELERATOR=cpu)
        extra = dict(deepspeed=engine, use_cpu=False)
    save_steps = int(os.environ.get("HF_TEST_SAVE_STEPS", "0"))  # kill/resume tests
    if save_steps:
        extra.update(save_strategy="steps", save_steps=save_steps)
    args = make_args(out / "trainer", per_device_batch=BATCH // world, report_to=list(report_to), **extra)
    model = make_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = diagnostics_callback() if diagnostics else None
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=ByteCorpus(),
        callbacks=[cb] if cb is not None else None,
        spectral_options=spectral_options,
    )
    kill_at = int(os.environ.get("HF_TEST_KILL_AT", "0"))
    if kill_at:
        trainer.add_callback(_KillAt(kill_at))
    trainer.train(resume_from_checkpoint=True if os.environ.get("HF_TEST_RESUME") == "1" else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    opt = trainer.spectral_optimizer()
    final = _full_parameters(trainer)
    torch.save(
        {
            "world": dist.get_world_size() if dist.is_initialized() else 1,
            "num_processes": trainer.accelerator.num_processes,
            "process_index": trainer.accelerator.process_index,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "model_class": type(trainer.model).__name__,
            "engine": type(opt._engine).__name__,
            "owners": dict(opt._engine.plan.owners) if getattr(opt._engine, "plan", None) else {},
            "optimizer": type(opt).__name__,
            "zero": _zero_info(trainer, opt),
            "groups": [
                {k: v for k, v in g.items() if k not in ("params", "param_names")} for g in opt.param_groups
            ],
            "init": init,
            "final": final,
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
    import torch.distributed as dist

    if dist.is_initialized():  # an orderly gloo shutdown (FSDP2's mesh groups abort at exit otherwise)
        dist.barrier()
        dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads can still abort there after an orderly
    # destroy_process_group ("terminate called without an active exception", a torch teardown race seen on
    # CI after every result was written). Any failure above has already exited non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
