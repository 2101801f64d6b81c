"""The recipes as users launch them, exact: ViT and GPT under 1 process, DDP, FSDP2 and ZeRO-1/2/3 (2 CPU
processes each, ``accelerate launch``), with warmup + cosine, gradient accumulation 2 and clipping.

For every launch configuration:
* the metrics at every step equal one process on the same global batch (``REL`` relative: the 2-process
  gradient is a mean of two half-batch means, reduced in another order);
* a run whose processes all SIGKILL themselves after step 3 (one step past the checkpoint at step 2), resumed
  with ``--resume latest`` in fresh processes, logs exactly what the uninterrupted run logs: the same values
  bit for bit, every step once (JSONL and W&B).
Plus: a 2-process DDP checkpoint resumes exactly with 1 process when the global batch is kept, and is refused
with a message naming the fix when it is not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wandb_tap
from dist_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ENV = dict(
    os.environ,
    WANDB_MODE="offline",
    WANDB_SILENT="true",
    OMP_NUM_THREADS="1",
    DS_ACCELERATOR="cpu",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    PYTHONPATH=str(ROOT),
)
ENV.pop("WANDB_API_KEY", None)
STEPS, KILL_AT = 6, 3
REL = 2e-5
COMMON = [
    "--max_steps",
    str(STEPS),
    "--eval_every",
    "2",
    "--log_every",
    "1",
    "--eval_batches",
    "2",
    "--diag_every",
    "0",
    "--traj_every",
    "1",
    "--traj_sketch_dim",
    "16",
    "--traj_log_every",
    "2",
    "--checkpoint_every",
    "2",
    "--keep_checkpoints",
    "5",
    "--progress",
    "false",
    "--grad_accum",
    "2",
    "--warmup_steps",
    "2",
    "--min_lr_ratio",
    "0.1",
    "--grad_clip",
    "0.5",
    "--lr",
    "3e-3",
]
RECIPES = {
    "vit_imagenet": ["--hidden", "32", "--layers", "2", "--heads", "2", "--patch_size", "8"],
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
MICRO = 4  # per process; one process gets 2 x MICRO so every configuration sees the same global batch


def _zero(stage):
    if stage in (2, 3):  # the shipped accelerate configs, as they are (sized for 2 CPU processes)
        return ["--config_file", f"configs/accelerate/deepspeed_zero{stage}.yaml", "--num_processes", "2"]
    return [
        "--use_deepspeed",
        "--deepspeed_config_file",
        f"configs/deepspeed/zero{stage}_spectral_newton.json",
        "--zero3_init_flag",
        "false",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


LAUNCH = {
    "one": [
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
    "ddp": [
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
    "fsdp2": [
        "--config_file",
        "configs/accelerate/fsdp2.yaml",
        "--num_processes",
        "2",
    ],
    "zero1": _zero(1),
    "zero2": _zero(2),
    "zero3": _zero(3),
}
KEYS = ("train/loss", "train/lr", "train/grad_norm", "val/loss")
# An H100's paths on these CPUs: the float64 eigenbasis CholeskyQR (attention's alpha 1.65), bf16 Polar Express
# and eigenbasis products, under accelerate's bf16 autocast (which the optimizer's math must not see); the
# library's default basis (the recipes' default is the exact svd)
GPU_PATHS_ENV = dict(SPECTRAL_DIST_EIGENBASIS_QR="cholesky_fp64", SPECTRAL_DIST_CPU_BF16="1")
GPU_PATHS_ARGS = ["--basis", "auto"]
GPU_PATHS_LAUNCH = [*LAUNCH["ddp"][:-4], "--mixed_precision", "bf16", "--dynamo_backend", "no"]
MAX_PARALLEL = 3
# 36 launches of 40-55 s each, 3 at a time on 2 cores: 9-11 minutes measured, above pytest-timeout's default
# 600 s (which would fail the fixture before its own limit could name the stuck runs)
TIMEOUT = 1200
pytestmark = pytest.mark.timeout(TIMEOUT + 120)


def _cmd(recipe, mode, out: Path, extra=(), launch=None):
    launch = list(
        LAUNCH[mode] if launch is None else launch
    )  # fsdp2.yaml as shipped: the recipe names its block
    batch = 2 * MICRO if mode == "one" else MICRO
    return [
        ACCELERATE,
        "launch",
        *launch,
        "--main_process_port",
        str(free_port()),
        "-m",
        f"recipes.{recipe}",
        *COMMON,
        *RECIPES[recipe],
        "--batch_size",
        str(batch),
        "--output_dir",
        str(out),
        *extra,
    ]


class Jobs:
    """Run commands at most MAX_PARALLEL at a time; a job may wait for another."""

    def __init__(self, base: Path):
        self.base, self.specs, self.done = base, {}, {}

    def add(self, name, cmd, after=None, tap=None, env=None):
        """``tap``: record what the job hands to W&B in that folder (tests/wandb_tap.py); ``env``: variables
        added to the launch's environment."""
        self.specs[name] = (cmd, after, tap, env)

    def run(self):
        pending, running, t0 = dict(self.specs), {}, time.time()
        while pending or running:
            for name, (cmd, after, tap, extra_env) in list(pending.items()):
                if len(running) >= MAX_PARALLEL:
                    break
                if after is not None and after not in self.done:
                    continue
                log = open(self.base / f"{name}.log", "w")
                env = {**ENV, **(extra_env or {})}
                running[name] = (
                    subprocess.Popen(
                        cmd,
                        cwd=ROOT,
                        env=wandb_tap.env(tap, env) if tap else env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    ),
                    log,
                )
                del pending[name]
            for name, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    self.done[name] = proc.returncode
                    del running[name]
            if time.time() - t0 > TIMEOUT:
                for proc, _ in running.values():
                    proc.kill()
                pytest.fail(f"recipe runs timed out: {sorted(running)} {sorted(pending)}")
            time.sleep(0.3)
        return self.done

    def log(self, name) -> str:
        return (self.base / f"{name}.log").read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("exact")
    jobs = Jobs(base)
    for recipe in RECIPES:
        for mode in LAUNCH:
            full, killed = f"{recipe}-{mode}", f"{recipe}-{mode}-killed"
            jobs.add(full, _cmd(recipe, mode, base / full))
            tap = base / f"{killed}.tap"  # both launches of the killed run hand their rows to W&B
            jobs.add(killed, _cmd(recipe, mode, base / killed, ["--kill_at_step", str(KILL_AT)]), tap=tap)
            jobs.add(
                f"{killed}-resumed",
                _cmd(recipe, mode, base / killed, ["--resume", "latest"]),
                after=killed,
                tap=tap,
            )
    # the GPT (its attention takes the eigenbasis) on 2 DDP processes through an H100's paths, killed and resumed
    full, killed = "gpt_lm-gpu_paths", "gpt_lm-gpu_paths-killed"
    gpu = dict(launch=GPU_PATHS_LAUNCH)
    jobs.add(full, _cmd("gpt_lm", "ddp", base / full, GPU_PATHS_ARGS, **gpu), env=GPU_PATHS_ENV)
    tap = base / f"{killed}.tap"
    kill = [*GPU_PATHS_ARGS, "--kill_at_step", str(KILL_AT)]
    jobs.add(killed, _cmd("gpt_lm", "ddp", base / killed, kill, **gpu), tap=tap, env=GPU_PATHS_ENV)
    resume = _cmd("gpt_lm", "ddp", base / killed, [*GPU_PATHS_ARGS, "--resume", "latest"], **gpu)
    jobs.add(f"{killed}-resumed", resume, after=killed, tap=tap, env=GPU_PATHS_ENV)
    # 2 -> 1 process: the DDP checkpoint at step 2, with the same global batch (accepted) and another (refused)
    ckpt4 = base / "gpt_lm-ddp" / "checkpoints" / "step_4"
    jobs.add(
        "gpt_lm-ddp-to-one",
        _cmd("gpt_lm", "one", base / "to-one", ["--resume", str(ckpt4)]),
        after="gpt_lm-ddp",
    )
    jobs.add(
        "gpt_lm-ddp-to-one-bad",
        _cmd(
            "gpt_lm",
            "one",
            base / "bad",
            ["--resume", str(base / "gpt_lm-ddp" / "checkpoints" / "step_2"), "--batch_size", str(MICRO)],
        ),
        after="gpt_lm-ddp",
    )
    return jobs, jobs.run(), base


def _rows(out: Path):
    from spectral_dist.logging import read_jsonl

    return [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step") is not None]


def _series(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


def _ok(jobs, done, name):
    assert done[name] == 0, f"{name} failed:\n{jobs.log(name)[-6000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("mode", [m for m in LAUNCH if m != "one"])
def test_metrics_equal_one_process(runs, recipe, mode):
    jobs, done, base = runs
    _ok(jobs, done, f"{recipe}-one")
    _ok(jobs, done, f"{recipe}-{mode}")
    one, two = _rows(base / f"{recipe}-one"), _rows(base / f"{recipe}-{mode}")
    for key in KEYS:
        a, b = _series(one, key), _series(two, key)
        assert [s for s, _ in a] == [s for s, _ in b] and a, (key, a, b)
        for (s, x), (_, y) in zip(a, b):
            assert abs(x - y) <= REL * max(abs(x), 1e-3), f"{recipe} {mode} {key} step {s}: {x} vs {y}"
    lrs = [v for _, v in _series(one, "train/lr")]
    assert lrs[0] == 3e-3 and lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]  # warmup, then cosine


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("mode", list(LAUNCH))
def test_kill_and_resume_is_exact(runs, recipe, mode):
    traj = "deepspeed" not in " ".join(LAUNCH[mode])  # no trajectory monitor under ZeRO
    _check_kill_and_resume(*runs, f"{recipe}-{mode}", traj)


@pytest.mark.slow
def test_kill_and_resume_is_exact_on_a_gpus_paths(runs):
    """The GPT on 2 DDP processes with the float64 eigenbasis CholeskyQR, bf16 matmuls and accelerate's bf16
    autocast (GPU_PATHS_*): the killed and resumed run logs what the uninterrupted one logs, bit for bit."""
    _check_kill_and_resume(*runs, "gpt_lm-gpu_paths", traj=True)


def _check_kill_and_resume(jobs, done, base, full, traj):
    killed = f"{full}-killed"
    _ok(jobs, done, full)
    assert done[killed] != 0, "the killed run finished: the kill hook did not fire"
    _ok(jobs, done, f"{killed}-resumed")
    assert "resumed from" in jobs.log(f"{killed}-resumed")
    a, b = _rows(base / full), _rows(base / killed)
    for key in (*KEYS, *(("traj/global/path_length/last",) if traj else ())):
        sa, sb = _series(a, key), _series(b, key)
        assert sa and sa == sb, (key, sa, sb)  # bit-identical, every step once: no gap, no duplicate
    # W&B: the rows both launches handed to wandb.Run.log, less the killed segment set aside on resume
    logged = {}
    for row in wandb_tap.rows(base / f"{killed}.tap"):
        if "train/loss" in row["data"]:
            logged.setdefault(row["step"], []).append(row["data"]["train/loss"])
    assert logged == {s: [v] for s, v in _series(a, "train/loss")}, logged


@pytest.mark.slow
def test_resume_with_another_process_count(runs):
    jobs, done, base = runs
    _ok(jobs, done, "gpt_lm-ddp-to-one")
    two, one = _rows(base / "gpt_lm-ddp"), _rows(base / "to-one")
    for key in KEYS:
        sa = dict(_series(two, key))
        got = _series(one, key)
        assert got and min(s for s, _ in got) >= 5, got  # resumed from the step-4 checkpoint
        for s, v in got:
            assert abs(v - sa[s]) <= REL * max(abs(v), 1e-3), (key, s, v, sa[s])
    assert done["gpt_lm-ddp-to-one-bad"] != 0
    text = jobs.log("gpt_lm-ddp-to-one-bad")
    assert "global batch of 16" in text and "--batch_size 8" in text, text[-3000:]
