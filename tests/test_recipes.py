"""The recipes end to end through the real ``accelerate launch`` on CPU: 1 and 2 processes (DDP), FSDP2 and
DeepSpeed ZeRO-2 for the ViT, exact resume, the diagnostics rows W&B received, and a report built from two
finished runs. All runs are tiny (a few steps of small models) and start together in a fixture. Recipes run as
a package (``accelerate launch -m recipes.<name>``); ``vit_1`` runs the file path
(``accelerate launch recipes/vit_imagenet.py``), which works too."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import wandb_tap
from dist_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ENV = dict(
    os.environ,
    WANDB_MODE="offline",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    OMP_NUM_THREADS="1",
    DS_ACCELERATOR="cpu",
    PYTHONPATH=str(ROOT),
    WANDB_SILENT="true",
)
ENV.pop("WANDB_API_KEY", None)
COMMON = [
    "--max_steps",
    "4",
    "--eval_every",
    "2",
    "--log_every",
    "1",
    "--eval_batches",
    "2",
    "--diag_every",
    "4",
    "--probe_layers",
    "2",
    "--probe_top_k",
    "3",
    "--probe_batch_size",
    "16",
    "--traj_log_every",
    "2",
    "--traj_sketch_dim",
    "16",
    "--checkpoint_every",
    "2",
    "--progress",
    "false",
    "--batch_size",
    "8",
    "--warmup_steps",
    "1",
]
TINY = {
    "vit_imagenet": ["--hidden", "32", "--layers", "2", "--heads", "2", "--patch_size", "8"],
    "resnet_cifar": ["--width", "4", "--stages", "2"],
    "gpt_lm": [
        "--n_embd",
        "32",
        "--n_layer",
        "1",
        "--n_head",
        "2",
        "--seq_len",
        "32",
        "--max_corpus_bytes",
        "60000",
    ],
}
# the shipped accelerate configs as they are, sized with --num_processes as their comments say (they name 8
# GPUs); multi_gpu.yaml's bf16 included. deepspeed_zero3.yaml: tests/test_recipes_exact.py; multi_node.yaml:
# tests/test_launch_paths.py (the Slurm template); deepspeed_test_zero*.yaml: tests/test_deepspeed_accelerate.py
ONE = ["--config_file", "configs/accelerate/cpu.yaml"]
TWO = ["--config_file", "configs/accelerate/multi_gpu.yaml", "--num_processes", "2"]
FSDP2 = ["--config_file", "configs/accelerate/fsdp2.yaml", "--num_processes", "2"]
ZERO2 = ["--config_file", "configs/accelerate/deepspeed_zero2.yaml", "--num_processes", "2"]
FAULT = ["--fault_at_step", "3", "--eval_every", "1", "--diag_every", "0", "--max_steps", "5"]
MAX_PARALLEL = 3
TIMEOUT = 600


def _launch(launch_args, recipe, out: Path, extra=(), as_file=False):
    cmd = [
        ACCELERATE,
        "launch",
        *launch_args,
        "--main_process_port",
        str(free_port()),
        *([f"recipes/{recipe}.py"] if as_file else ["-m", f"recipes.{recipe}"]),
        *COMMON,
        *TINY[recipe],
        "--output_dir",
        str(out),
        *extra,
    ]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    env = wandb_tap.env(out.parent / f"{out.name}.tap", ENV)  # what each run hands to W&B
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def make_jpeg_folder(root: Path, classes=3, per_class=(6, 3)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            d = root / split / f"n0000{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = int(rng.integers(36, 60)), int(rng.integers(36, 60))
                arr = (rng.random((h, w, 3)) * 80 + 60 * c).clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"img_{i}.JPEG", quality=85)
    return root


def make_cifar_folder(root: Path, per_batch=20) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch).tolist()
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    return d


def make_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(600)]
    pq.write_table(pa.table({"text": rows}), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every run (at most MAX_PARALLEL at once) and wait; returns {name: (returncode, output_dir)}."""
    base = tmp_path_factory.mktemp("recipes")
    data = make_jpeg_folder(base / "imagenet")
    cifar = make_cifar_folder(base / "cifar")
    parquet = make_parquet(base / "corpus.parquet")
    specs = {
        "vit_1": (ONE, "vit_imagenet", [], True),
        "vit_ddp_folder": (
            TWO,
            "vit_imagenet",
            ["--data_dir", str(data), "--image_size", "32", "--optimizer", "adamw"],
        ),
        "vit_fsdp2": (FSDP2, "vit_imagenet", ["--batch_size", "4", "--mixed_precision", "no"]),
        "resnet_fsdp2": (FSDP2, "resnet_cifar", ["--optimizer", "adamw"]),  # fsdp2.yaml wraps BasicBlock too
        # the library's default basis with Jacobi steps (attention's eigenbasis) through ZeRO-2
        "vit_zero2": (ZERO2, "vit_imagenet", ["--basis", "auto", "--jacobi_steps", "1"]),
        "resnet_1": (ONE, "resnet_cifar", ["--grad_accum", "2", "--batch_size", "4"]),
        "resnet_ddp_cifar": (TWO, "resnet_cifar", ["--data_dir", str(cifar), "--optimizer", "adamw"]),
        "gpt_1": (ONE, "gpt_lm", ["--optimizer", "adamw", "--mixed_precision", "bf16"]),
        "gpt_ddp_parquet": (TWO, "gpt_lm", ["--data_path", str(parquet), "--optimizer", "muon"]),
        # a NaN loss on one micro-batch of step 3 (the last process's): SpectralNewton under DDP (bf16, as
        # multi_gpu.yaml ships) and ZeRO-2 skips it, torch AdamW does not
        "gpt_ddp_fault": (TWO, "gpt_lm", [*FAULT, "--grad_accum", "2", "--batch_size", "4"]),
        "vit_zero2_fault": (ZERO2, "vit_imagenet", FAULT),
        "gpt_1_fault_adamw": (ONE, "gpt_lm", [*FAULT, "--optimizer", "adamw", "--grad_accum", "2"]),
    }
    pending, running, done = list(specs.items()), {}, {}
    t0 = time.time()
    while pending or running:
        while pending and len(running) < MAX_PARALLEL:
            name, (la, recipe, extra, *as_file) = pending.pop(0)
            running[name] = _launch(la, recipe, base / name, extra, *as_file)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                done[name] = (proc.returncode, base / name)
                del running[name]
        if time.time() - t0 > TIMEOUT:
            for proc, _ in running.values():
                proc.kill()
            pytest.fail(f"recipe runs timed out: {sorted(running)}")
        time.sleep(0.5)
    return done


def _ok(runs, name) -> Path:
    rc, out = runs[name]
    log = (out.parent / f"{name}.log").read_text()
    assert rc == 0, f"{name} failed (rc {rc}):\n{log[-5000:]}"
    return out


def _records(out: Path):
    from spectral_dist.logging import read_jsonl

    return read_jsonl(out / "metrics.jsonl")


def _config(out: Path):
    import json

    return json.loads((out / "config.json").read_text())


def _last(records, key):
    vals = [r[key] for r in records if key in r]
    assert vals, f"no {key} logged"
    return vals[-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,world,dist",
    [
        ("vit_1", 1, "NO"),
        ("vit_ddp_folder", 2, "MULTI_CPU"),
        ("vit_fsdp2", 2, "FSDP"),
        ("vit_zero2", 2, "DEEPSPEED"),
        ("resnet_1", 1, "NO"),
        ("resnet_fsdp2", 2, "FSDP"),
        ("resnet_ddp_cifar", 2, "MULTI_CPU"),
        ("gpt_1", 1, "NO"),
        ("gpt_ddp_parquet", 2, "MULTI_CPU"),
    ],
)
def test_recipe_runs(runs, name, world, dist):
    out = _ok(runs, name)
    cfg = _config(out)
    assert cfg["world_size"] == world and cfg["distributed_type"].endswith(dist)
    assert cfg["git_sha"] and cfg["max_steps"] == 4
    recs = _records(out)
    steps = sorted({r["step"] for r in recs if "train/loss" in r and r["step"] is not None})
    assert steps == [1, 2, 3, 4]
    metric = cfg["main_metric"]
    assert np.isfinite(_last(recs, metric)) and np.isfinite(_last(recs, "train/loss"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    # curvature diagnostics at the last step: every key for every probed layer (a fit with too few
    # positive h_k at initialisation is NaN), and a finite participation ratio
    last = {k: v for r in recs if r.get("step") == 4 for k, v in r.items() if k.startswith("curv/")}
    layers = {k.rsplit("/", 1)[0] for k in last if k.endswith("/participation_ratio")}
    assert len(layers) == 2, sorted(last)
    for lay in layers:
        for m in ("alpha", "gamma", "s", "s_pred", "rel_err", "participation_ratio"):
            assert f"{lay}/{m}" in last, (lay, m)
        assert np.isfinite(float(last[f"{lay}/participation_ratio"]))
    # conv layers: positive curvature, finite exponents even at init (resnet_fsdp2 runs for the FSDP2 config's
    # wrapping; its fd probe at step 4 measured mostly negative h_k, so no exponent: not checked here)
    if name.startswith("resnet") and dist != "FSDP":
        assert any(np.isfinite(float(last[f"{lay}/alpha"])) for lay in layers)
    if dist != "DEEPSPEED":
        assert _last(recs, "traj/global/num_sketches") == 4
    else:  # DeepSpeed's deprecated torch.distributed calls are filtered (spectral_dist/_warnings.py)
        assert "FutureWarning" not in (out.parent / f"{name}.log").read_text()


def _by_step(records, key) -> dict:
    return {r["step"]: r[key] for r in records if key in r and r.get("step") is not None}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_ddp_fault", "vit_zero2_fault"])
def test_a_nan_batch_is_skipped_and_training_goes_on(runs, name):
    """One micro-batch with a NaN loss at step 3, on the last process only: the gradient is NaN on every
    process after the reduction, step 3 is skipped everywhere (by SpectralNewton under DDP, by DeepSpeed's
    overflow check under ZeRO; the weights, so the validation loss, stay those of step 2), the loss window
    leaves the batch out and the run counts it, and training goes on to step 5 with finite losses and moving
    weights."""
    out = _ok(runs, name)
    recs = _records(out)
    assert _by_step(recs, "train/nonfinite_batches") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    # the optimizer's own counter, read through accelerate's (and DeepSpeed's) wrappers: under DDP every
    # parameter skipped step 3 once; under ZeRO DeepSpeed's own overflow check skips the step before the
    # optimizer sees the gradient (also in fp32), so the optimizer's counter stays 0
    skipped = 0 if "zero" in name else 1
    assert _by_step(recs, "optim/skipped_steps") == {1: 0, 2: 0, 3: skipped, 4: skipped, 5: skipped}
    assert set(_by_step(recs, "optim/fallbacks").values()) == {0}
    loss = _by_step(recs, "train/loss")
    assert sorted(loss) == [1, 2, 3, 4, 5] and all(np.isfinite(v) for v in loss.values()), loss
    val = _by_step(recs, "val/loss")
    assert val[3] == val[2], val  # step 3 changed no weight
    assert val[1] != val[2] and val[4] != val[3] and val[5] != val[4], val  # every other step did
    if name == "gpt_ddp_fault":  # the trajectory monitor left the NaN gradient out too (not under ZeRO)
        assert _by_step(recs, "traj/global/skipped_nonfinite")[4] == 1
        assert np.isnan(float(_by_step(recs, "train/grad_norm")[3]))  # logged as it was ("nan" in JSONL)


@pytest.mark.slow
def test_a_nan_batch_under_adamw_stops_with_advice(runs):
    """torch AdamW takes the NaN step (every weight NaN); the next window has no finite loss and the run
    stops with a FloatingPointError that names the way out, after logging the step that had one."""
    rc, out = runs["gpt_1_fault_adamw"]
    log = (out.parent / "gpt_1_fault_adamw.log").read_text()
    assert rc != 0, log[-3000:]
    assert "FloatingPointError: training loss is non-finite at step 4" in log, log[-3000:]
    assert "--optimizer adamw does not skip a non-finite gradient" in log and "spectral_newton" in log
    recs = _records(out)
    assert _by_step(recs, "train/nonfinite_batches") == {1: 0, 2: 0, 3: 1}
    assert not _by_step(recs, "optim/skipped_steps")  # torch AdamW keeps no such counter
    assert all(np.isfinite(v) for v in _by_step(recs, "train/loss").values())


@pytest.mark.slow
def test_data_paths_and_optimizers_were_used(runs):
    vit = _config(_ok(runs, "vit_ddp_folder"))
    assert (
        vit["data_dir"] and vit["train_size"] == 18 and vit["val_size"] == 9 and vit["optimizer"] == "adamw"
    )
    res = _config(_ok(runs, "resnet_ddp_cifar"))
    assert res["train_size"] == 100 and res["val_size"] == 20
    gpt = _config(_ok(runs, "gpt_ddp_parquet"))
    assert gpt["optimizer"] == "muon" and gpt["data_path"].endswith(".parquet")
    assert _config(_ok(runs, "vit_1"))["optimizer"] == "spectral_newton"
    z2 = _config(_ok(runs, "vit_zero2"))
    assert z2["basis"] == "auto" and z2["jacobi_steps"] == 1
    assert _config(_ok(runs, "gpt_1"))["mixed_precision_effective"] == "bf16"
    assert _config(_ok(runs, "resnet_1"))["grad_accum"] == 2


@pytest.mark.slow
def test_fsdp2_matches_single_process(runs):
    """FSDP2 on 2 processes x 4 samples sees the same global batches (and eval samples) as 1 process x 8."""
    one = _records(_ok(runs, "vit_1"))
    two = _records(_ok(runs, "vit_fsdp2"))
    for key in ("train/loss", "val/loss"):
        a, b = _last(one, key), _last(two, key)
        assert abs(a - b) <= 1e-4 * abs(a), (key, a, b)
    # the curvature probe ran in place on the sharded model (fd HVPs, each process half the probe batch)
    # and measured what one process measured on the whole probe batch (autograd HVPs)
    curv1 = {k: v for r in one if r.get("step") == 4 for k, v in r.items() if k.startswith("curv/")}
    curv2 = {k: v for r in two if r.get("step") == 4 for k, v in r.items() if k.startswith("curv/")}
    assert curv1 and set(curv1) == set(curv2)
    compared = 0
    for k, a in curv1.items():
        a, b = float(a), float(curv2[k])
        if k.endswith(("/gamma", "/participation_ratio")):  # gradient spectrum only
            if np.isnan(a) and np.isnan(b):  # too few points for a fit in both runs
                continue
            assert abs(a - b) <= 1e-3 * abs(a), (k, a, b)
            compared += 1
        elif k.endswith("/alpha") and np.isfinite(a):  # also the HVPs (fd against autograd)
            assert abs(a - b) <= 0.02, (k, a, b)
    assert compared >= 2, sorted(curv1)  # at least the participation ratio of both probed layers


@pytest.mark.slow
def test_wandb_received_diagnostics(runs):
    """The rows the run handed to W&B (wandb.Run.log, recorded by tests/wandb_tap.py), and the finished
    offline segments W&B wrote: one per checkpoint (steps 2 and 4) and the final one."""
    from spectral_dist.logging import find_offline_runs

    out = _ok(runs, "vit_1")
    assert len(find_offline_runs(out)) == 3
    rows = wandb_tap.rows(out.parent / "vit_1.tap")
    keys = {k for row in rows for k in row["data"]}
    layer_keys = [k for k in keys if k.startswith("curv/") and k.endswith("/alpha")]
    assert layer_keys, sorted(keys)[:50]
    layer = layer_keys[0][: -len("/alpha")]
    for m in ("gamma", "s", "s_pred", "rel_err", "participation_ratio"):
        assert f"{layer}/{m}" in keys, m
    assert "traj/global/path_length/last" in keys and "traj/global/predictable_rank_90" in keys
    assert any(k.startswith("curv/loglog") for k in keys), "log-log plot not logged as an image"
    assert {"train/loss", "val/acc", "val/loss"} <= keys
    # every JSONL row reached W&B at its step with the same values
    jsonl = {
        (r["step"], k): v
        for r in _records(out)
        if r.get("step")
        for k, v in r.items()
        if k.startswith("train/")
    }
    wandb_rows = {(r["step"], k): v for r in rows for k, v in r["data"].items() if k.startswith("train/")}
    assert jsonl == wandb_rows
    # rows went to the finished segments (the last one, after the step-4 checkpoint, holds the summary only)
    assert {Path(r["run_dir"]).name for r in rows} == {d.name for d in find_offline_runs(out)[:2]}
    config = next(r["config"] for r in rows if "config" in r)
    assert config["git_sha"] == _config(out)["git_sha"] and config["optimizer"] == "spectral_newton"
    assert list((out / "plots").glob("curv_loglog_step4.png"))


@pytest.mark.slow
def test_resume_is_exact(runs, tmp_path):
    """Resume the 1-process ViT from its step-2 checkpoint in fresh processes: steps 3-4 match exactly."""
    src = _ok(runs, "vit_1")
    out = tmp_path / "vit_resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step_2", out / "checkpoints" / "step_2")
    proc, log = _launch(ONE, "vit_imagenet", out, ["--resume", "latest"])
    try:
        rc = proc.wait(timeout=TIMEOUT)
    finally:
        log.close()
    text = (out.parent / f"{out.name}.log").read_text()
    assert rc == 0, text[-5000:]
    assert "resumed from" in text
    a, b = _records(src), _records(out)
    for key in ("train/loss", "train/grad_norm", "val/loss", "traj/global/path_length/last"):
        va = [r[key] for r in a if r.get("step") in (3, 4) and key in r]
        vb = [r[key] for r in b if r.get("step") in (3, 4) and key in r]
        assert va and va == vb, (key, va, vb)
    assert not [r for r in b if r.get("step") in (1, 2) and "train/loss" in r]


@pytest.mark.slow
def test_resume_after_a_skipped_step_is_exact_with_its_counters(runs, tmp_path):
    """Resume the 2-process DDP run with the NaN micro-batch (multi_gpu.yaml, bf16, gradient accumulation) from
    its step-4 checkpoint, after the skipped step 3: step 5 matches the uninterrupted run exactly, and the
    counters of the skip (the optimizer's, the recipe's, the trajectory monitor's) come back from the
    checkpoint instead of restarting at 0."""
    src = _ok(runs, "gpt_ddp_fault")
    out = tmp_path / "gpt_ddp_fault_resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step_4", out / "checkpoints" / "step_4")
    extra = [*FAULT, "--grad_accum", "2", "--batch_size", "4", "--resume", "latest"]
    proc, log = _launch(TWO, "gpt_lm", out, extra)
    try:
        rc = proc.wait(timeout=TIMEOUT)
    finally:
        log.close()
    text = (out.parent / f"{out.name}.log").read_text()
    assert rc == 0 and "resumed from" in text, text[-5000:]
    a, b = _records(src), _records(out)
    keys = (
        "train/loss",
        "val/loss",
        "optim/skipped_steps",
        "train/nonfinite_batches",
        "traj/global/skipped_nonfinite",
    )
    for key in keys:
        va = [r[key] for r in a if r.get("step") == 5 and key in r]
        vb = [r[key] for r in b if r.get("step") == 5 and key in r]
        assert va and va == vb, (key, va, vb)
    assert _by_step(b, "optim/skipped_steps") == {5: 1} and _by_step(b, "train/nonfinite_batches") == {5: 1}


@pytest.mark.slow
def test_report_from_two_runs(runs, tmp_path):
    import pandas as pd

    from spectral_dist.cli import main

    a, b = _ok(runs, "resnet_1"), _ok(runs, "resnet_ddp_cifar")
    out = tmp_path / "report"
    rc = main(["report", str(a), str(b), "--metric", "val/loss", "--target", "100", "--out", str(out)])
    assert rc == 0
    md = (out / "report.md").read_text()
    assert "| resnet_cifar | adamw |" in md and "| resnet_cifar | spectral_newton |" in md
    assert (out / "resnet_cifar_val_loss_curves.png").stat().st_size > 1000
    assert (out / "best_val_loss.png").stat().st_size > 1000
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["optimizer"]) == {"adamw", "spectral_newton"}
    assert (summary["reached"] == 1).all() and (summary["steps_to_target"] == 2).all()
