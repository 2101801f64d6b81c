"""Every shipped ``configs/deepspeed/*.json``, unedited, through the paths the README names (test helper, run
by tests/test_launch_paths.py under ``torchrun --nproc_per_node 2``; writes ``OUT/<mode>-rank<r>.json``).

    torchrun --nproc_per_node 2 tests/ds_configs_script.py OUT initialize   # our initialize, every JSON;
                                                                           # DeepSpeed's own initialize
                                                                           # before and after register()
    torchrun --nproc_per_node 2 tests/ds_configs_script.py OUT trainer CONFIG   # the HF Trainer

The shipped files say ``"auto"`` for the batch, accumulation, clipping and precision fields: accelerate and
the Trainer fill them in; with :func:`spectral_dist.deepspeed.initialize` the one a user sets is
``train_micro_batch_size_per_gpu`` (the README's snippet), and the path alone is refused naming it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a test helper beside this file

from hf_trainer_script import ByteCorpus, make_args, make_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))
MICRO = 2


def _rank_world():
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _steps(engine, n=2) -> list[float]:
    rank, world = _rank_world()
    data = ByteCorpus().windows
    losses = []
    for step in range(n):
        x = data[(step * world + rank) * MICRO : (step * world + rank + 1) * MICRO]
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def _engine_info(engine) -> dict:
    return {
        "basic_optimizer": type(engine.basic_optimizer).__name__,
        "zero_stage": engine.zero_optimization_stage(),
        "gas": engine.gradient_accumulation_steps(),
        "clip": engine.gradient_clipping(),
        "bf16": engine.bfloat16_enabled(),
        "fp16": engine.fp16_enabled(),
        "train_batch_size": engine.train_batch_size(),
    }


def initialize_all(out: Path) -> dict:
    import deepspeed

    import spectral_dist.deepspeed as sd

    res = {}
    for path in CONFIGS:
        try:
            sd.initialize(model=make_model(), config=str(path))
            refused = None
        except sd.SpectralConfigError as e:
            refused = str(e)
        cfg = sd.load_config(path)
        cfg["train_micro_batch_size_per_gpu"] = MICRO  # as in the README
        model = make_model()
        before = [p.detach().clone() for p in model.parameters()]
        engine, _, _, _ = sd.initialize(model=model, config=cfg)
        losses = _steps(engine)
        moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
        res[path.name] = {"refused": refused, "losses": losses, "moved": moved, **_engine_info(engine)}
        engine.destroy()
    spectral = sd.resolve_auto(
        {
            **sd.load_config(ROOT / "configs/deepspeed/zero2_spectral_newton.json"),
            "train_micro_batch_size_per_gpu": 2,
        }
    )
    try:  # DeepSpeed's own initialize does not know the type
        deepspeed.initialize(model=make_model(), config=spectral)
        res["unregistered"] = None
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises an AssertionError
        res["unregistered"] = f"{type(e).__name__}: {e}"
    sd.register()
    try:
        engine, _, _, _ = deepspeed.initialize(model=make_model(), config=spectral)
        res["registered"] = {"losses": _steps(engine), **_engine_info(engine)}
        engine.destroy()
    finally:
        sd.unregister()
    return res


def trainer(out: Path, config: str) -> dict:
    from transformers import Trainer

    from spectral_dist.integrations.hf import SpectralNewtonTrainer, repair_deepspeed_cpu_state

    _, world = _rank_world()
    spectral = "spectral_newton" in Path(config).name
    # the Trainer checks that an AdamW config's numbers equal TrainingArguments': say the config's values
    opt = json.loads(Path(config).read_text())["optimizer"]["params"]
    same = dict(learning_rate=opt["lr"], weight_decay=opt.get("weight_decay", 0.0))
    if not spectral:
        same.update(adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1], adam_epsilon=opt["eps"])
    args = make_args(
        out / "trainer",
        per_device_batch=4 // world,
        report_to=[],
        deepspeed=config,
        use_cpu=False,
        max_steps=2,
        **same,
    )
    cls = SpectralNewtonTrainer if spectral else Trainer
    if (
        not spectral
    ):  # CPU only: accelerate counts one DeepSpeed process otherwise (SpectralNewtonTrainer does this)
        repair_deepspeed_cpu_state(args)
    t = cls(model=make_model(), args=args, train_dataset=ByteCorpus())
    t.train()
    return {
        "trainer": cls.__name__,
        "num_processes": t.accelerator.num_processes,
        "distributed_type": str(t.accelerator.distributed_type),
        "losses": [h["loss"] for h in t.state.log_history if "loss" in h],
        **_engine_info(t.model_wrapped),
    }


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    result = initialize_all(out) if mode == "initialize" else trainer(out, sys.argv[3])
    rank, world = _rank_world()
    result["world"] = world
    tag = mode if mode == "initialize" else f"trainer-{Path(sys.argv[3]).stem}"
    (out / f"{tag}-rank{rank}.json").write_text(json.dumps(result, indent=1))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads can still abort there after an orderly
    # destroy_process_group ("terminate called without an active exception", a torch teardown race seen on
    # CI after every result was written). Any failure above has already exited non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
