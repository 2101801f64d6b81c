"""The launch paths as shipped (issue 15): every ``configs/deepspeed/*.json`` through our ``initialize`` and the
HF Trainer, the Slurm template under stand-in ``sbatch``/``srun``/``scontrol`` with 2 "nodes" on this machine
for DDP, FSDP2 and DeepSpeed, launches that ask for more processes than they get, ``spectral-dist ablate
--run`` from another folder; plus the error texts, pinned. (Each accelerate yaml with the recipes it is meant
for: tests/test_recipes.py.)

On CPU every multi-process run has 2 processes; the shipped accelerate yamls say 8 (a GPU count) and are
sized with ``--num_processes``, as their comments say, and the Slurm template with ``GPUS_PER_NODE``. All
launches start together in one fixture, at most MAX_PARALLEL at a time.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = dict(
    os.environ,
    WANDB_MODE="disabled",
    OMP_NUM_THREADS="1",
    DS_ACCELERATOR="cpu",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
)
ENV.pop("WANDB_API_KEY", None)
DS_CONFIGS = sorted(p.name for p in (ROOT / "configs" / "deepspeed").glob("*.json"))
HF_CONFIGS = [
    c for c in DS_CONFIGS if c != "zero2_spectral_newton.json"
]  # that one: tests/test_hf_trainer.py
VIT = ["--hidden", "32", "--layers", "1", "--heads", "2", "--patch_size", "8"]
STEPS, MICRO, REL = 3, 4, 2e-5
RECIPE = [
    *VIT,
    "--max_steps",
    str(STEPS),
    "--log_every",
    "1",
    "--eval_every",
    "0",
    "--eval_batches",
    "1",
    "--diag_every",
    "0",
    "--traj_every",
    "0",
    "--progress",
    "false",
    "--mixed_precision",
    "no",
    "--wandb_mode",
    "disabled",
    "--warmup_steps",
    "1",
]
SLURM = {  # engine -> the accelerate config the template is given
    "ddp": "configs/accelerate/multi_node.yaml",
    "fsdp2": "configs/accelerate/fsdp2.yaml",
    "zero2": "configs/accelerate/deepspeed_zero2.yaml",
}
MAX_PARALLEL = 3
TIMEOUT = 900


def _jobs(base: Path) -> dict:
    """name -> (command, env, cwd)."""
    jobs = {}
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2"]
    script = str(ROOT / "tests" / "ds_configs_script.py")
    jobs["ds-initialize"] = (
        [*torchrun, "--master_port", str(free_port()), script, str(base / "ds"), "initialize"],
        ENV,
        ROOT,
    )
    for name in HF_CONFIGS:
        cfg = str(ROOT / "configs" / "deepspeed" / name)
        jobs[f"hf-{name}"] = (
            [*torchrun, "--master_port", str(free_port()), script, str(base / "ds"), "trainer", cfg],
            ENV,
            ROOT,
        )
    # the Slurm template: 2 "nodes" x 1 process, against one process with the same global batch
    slurm_env = dict(
        ENV,
        PATH=os.pathsep.join([str(ROOT / "tests" / "slurm_standins"), ENV["PATH"]]),
        VENV=str(BIN.parent),
        GPUS_PER_NODE="1",
    )
    for engine, cfg in SLURM.items():
        env = dict(slurm_env, ACCEL_CONFIG=cfg, MASTER_PORT=str(free_port()))
        cmd = [
            "sbatch",
            "--nodes",
            "2",
            "launch/slurm/accelerate_multinode.sbatch",
            "-m",
            "recipes.vit_imagenet",
        ]
        cmd += [*RECIPE, "--batch_size", str(MICRO), "--output_dir", str(base / f"slurm-{engine}")]
        jobs[f"slurm-{engine}"] = (cmd, env, ROOT)
    one = [str(BIN / "accelerate"), "launch", "--config_file", "configs/accelerate/cpu.yaml"]
    jobs["one"] = (
        [*one, "--main_process_port", str(free_port()), "-m", "recipes.vit_imagenet", *RECIPE]
        + ["--batch_size", str(2 * MICRO), "--output_dir", str(base / "one")],
        ENV,
        ROOT,
    )
    # asked for 2 processes, got 1 (no --multi_gpu on a machine without GPUs): the recipe and the Trainer stop
    fewer = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1"]
    fewer += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    jobs["fewer-recipe"] = (
        [*fewer, "-m", "recipes.vit_imagenet", *RECIPE, "--output_dir", str(base / "fewer")],
        ENV,
        ROOT,
    )
    jobs["fewer-trainer"] = (
        [*fewer, str(ROOT / "tests" / "hf_trainer_script.py"), str(base / "fewer-hf")],
        ENV,
        ROOT,
    )
    # spectral-dist ablate --run from a folder outside the checkout, with spectral_dist importable but not the
    # recipes (as an editable install makes it): the launcher puts the checkout on the runs' PYTHONPATH
    away, site = base / "elsewhere", base / "site"
    away.mkdir()
    site.mkdir()
    (site / "spectral_dist").symlink_to(ROOT / "spectral_dist")
    extra = shlex.join(
        [*VIT, "--eval_every", "0", "--eval_batches", "1", "--diag_every", "0", "--traj_every", "0"]
    )
    jobs["ablate-run"] = (
        [str(BIN / "spectral-dist"), "ablate", "--recipes", "vit_imagenet", "--optimizers", "adamw"]
        + ["--lrs", "0.001", "--seeds", "0", "--max_steps", "1", "--output_root", "runs", "--extra", extra]
        + [
            "--launcher",
            f"accelerate launch --config_file configs/accelerate/cpu.yaml --main_process_port {free_port()}",
        ]
        + ["--run"],
        dict(ENV, PYTHONPATH=str(site)),
        away,
    )
    return jobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("launch")
    pending, running, done, t0 = _jobs(base), {}, {}, time.time()
    while pending or running:
        for name in list(pending):
            if len(running) >= MAX_PARALLEL:
                break
            cmd, env, cwd = pending.pop(name)
            log = open(base / f"{name}.log", "w")
            running[name] = (
                subprocess.Popen(
                    cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                ),
                log,
            )
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                done[name] = proc.returncode
                del running[name]
        if time.time() - t0 > TIMEOUT:
            for proc, _ in running.values():
                proc.kill()
            pytest.fail(f"launches timed out: {sorted(running)} {sorted(pending)}")
        time.sleep(0.3)
    return base, done


def _log(base, name) -> str:
    return (base / f"{name}.log").read_text()


def _ok(runs, name) -> Path:
    base, done = runs
    assert done[name] == 0, f"{name} failed:\n{_log(base, name)[-6000:]}"
    return base


def _losses(out: Path) -> list[tuple[int, float]]:
    from spectral_dist.logging import read_jsonl

    rows = read_jsonl(out / "metrics.jsonl")
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r and r["step"] is not None]


@pytest.mark.slow
@pytest.mark.parametrize("name", DS_CONFIGS)
def test_deepspeed_json_through_our_initialize(runs, name):
    """Each shipped JSON, unedited, with the README's one line (the micro-batch): 2 processes, 2 steps."""
    base = _ok(runs, "ds-initialize")
    for rank in (0, 1):
        res = json.loads((base / "ds" / f"initialize-rank{rank}.json").read_text())
        r = res[name]
        assert res["world"] == 2
        assert r["refused"] and 'train_micro_batch_size_per_gpu="auto"' in r["refused"]  # the path alone
        assert 'config["train_micro_batch_size_per_gpu"] = 8' in r["refused"]
        assert r["moved"] > 0 and all(x == x for x in r["losses"]), r
        assert r["basic_optimizer"] == ("ZeroSpectralNewton" if "spectral" in name else "AdamW"), r
        assert r["zero_stage"] == int(name[4]) and r["gas"] == 1 and r["clip"] == 1.0  # "auto" as accelerate
        assert not r["bf16"] and not r["fp16"] and r["train_batch_size"] == 2 * 2  # micro x processes


@pytest.mark.slow
def test_deepspeed_own_initialize_after_register(runs):
    """Without register() DeepSpeed refuses the type with its own message; after it, deepspeed.initialize
    builds our ZeRO optimizer and steps exactly as spectral_dist.deepspeed.initialize does."""
    base = _ok(runs, "ds-initialize")
    res = json.loads((base / "ds" / "initialize-rank0.json").read_text())
    assert res["unregistered"] == "AssertionError: spectral_newton is not a supported DeepSpeed Optimizer"
    assert res["registered"]["basic_optimizer"] == "ZeroSpectralNewton"
    assert res["registered"]["losses"] == res["zero2_spectral_newton.json"]["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("name", HF_CONFIGS)
def test_deepspeed_json_through_the_trainer(runs, name):
    """Each shipped JSON, unedited, as TrainingArguments(deepspeed=...) with 2 processes (zero2_spectral_newton:
    tests/test_hf_trainer.py)."""
    base = _ok(runs, f"hf-{name}")
    for rank in (0, 1):
        r = json.loads((base / "ds" / f"trainer-{Path(name).stem}-rank{rank}.json").read_text())
        assert r["world"] == 2 and r["num_processes"] == 2 and r["distributed_type"].endswith("DEEPSPEED")
        assert r["trainer"] == ("SpectralNewtonTrainer" if "spectral" in name else "Trainer")
        assert r["basic_optimizer"] == ("ZeroSpectralNewton" if "spectral" in name else "AdamW"), r
        assert r["zero_stage"] == int(name[4]) and len(r["losses"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(SLURM))
def test_slurm_template_forms_one_job(runs, engine):
    """2 stand-in nodes x 1 process form one job of world size 2, whose metrics equal one process on the same
    global batch (REL, as tests/test_recipes_exact.py)."""
    base = _ok(runs, f"slurm-{engine}")
    out = base / f"slurm-{engine}"
    cfg = json.loads((out / "config.json").read_text())
    kind = {"ddp": "MULTI_CPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED"}[engine]
    assert cfg["world_size"] == 2 and cfg["distributed_type"].endswith(kind), cfg
    text = _log(base, f"slurm-{engine}")
    assert "Submitted batch job" in text and "2 nodes x 1 processes" in text
    one, two = _losses(_ok(runs, "one") / "one"), _losses(out)
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, STEPS + 1))
    for (s, a), (_, b) in zip(one, two):
        assert abs(a - b) <= REL * max(abs(a), 1e-3), (engine, s, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fewer-recipe", "fewer-trainer"])
def test_launch_with_fewer_processes_than_asked_stops(runs, name):
    base, done = runs
    text = _log(base, name)
    assert done[name] != 0, text[-3000:]
    assert "accelerate launch asked for 2 processes (--num_processes 2) but started 1" in text, text[-3000:]
    assert (
        "add --multi_gpu" in text
        and "--config_file configs/accelerate/multi_gpu.yaml --num_processes 2" in text
    )


@pytest.mark.slow
def test_ablate_run_from_another_folder(runs):
    base = _ok(runs, "ablate-run")
    out = base / "elsewhere" / "runs" / "vit_imagenet" / "adamw" / "lr0.001_s0"
    assert json.loads((out / "config.json").read_text())["max_steps"] == 1
    assert "1/1 runs succeeded" in _log(base, "ablate-run")


# ------------------------------------------------------------------------------------------ fast: messages
def test_config_errors_name_the_key():
    from spectral_dist.deepspeed import SpectralConfigError, check_config, load_config, resolve_auto

    cfg = load_config(ROOT / "configs" / "deepspeed" / "zero2_spectral_newton.json")
    bad = {**cfg, "optimizer": {"type": "spectral_newton", "params": {"lr": "auto"}}}
    with pytest.raises(SpectralConfigError) as e:
        check_config(bad)
    assert 'optimizer.params.lr="auto"' in str(e.value) and "prepare_spectral_newton(..., lr=...)" in str(
        e.value
    )
    legacy = {**cfg, "zero_optimization": {**cfg["zero_optimization"], "cpu_offload": True}}
    with pytest.raises(SpectralConfigError, match=r"zero_optimization\.cpu_offload=true .*legacy"):
        check_config(legacy)
    with pytest.raises(SpectralConfigError, match=r'train_micro_batch_size_per_gpu="auto"'):
        resolve_auto(cfg)
    sized = resolve_auto({**cfg, "train_micro_batch_size_per_gpu": 4}, world_size=2)
    assert sized["gradient_accumulation_steps"] == 1 and sized["gradient_clipping"] == 1.0
    assert sized["bf16"]["enabled"] is False and sized["fp16"]["enabled"] is False
    assert "train_micro_batch_size_per_gpu" not in resolve_auto({**cfg, "train_batch_size": 16})
    # SpectralNewton's own "auto" option values are options, not placeholders: they pass through untouched
    own = {**cfg, "train_micro_batch_size_per_gpu": 4}
    own["optimizer"] = {"type": "spectral_newton", "params": {"lr": 1e-3, "basis": "auto", "alpha": "auto"}}
    assert resolve_auto(own)["optimizer"]["params"] == {"lr": 1e-3, "basis": "auto", "alpha": "auto"}
    hf_style = {
        **cfg,
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"},
    }
    with pytest.raises(SpectralConfigError, match=r"zero_optimization\.reduce_bucket_size: \"auto\""):
        resolve_auto(hf_style)


def test_model_parameters_with_by_layer_alpha_is_refused():
    from spectral_dist.deepspeed import SpectralConfigError, build_optimizer
    from spectral_dist.models import tiny_mlp

    model = tiny_mlp()
    with pytest.raises(
        SpectralConfigError, match="needs the model's layer types: do not pass model_parameters"
    ):
        build_optimizer(model, {"alpha": "by_layer"}, model_parameters=model.parameters())


def test_requested_processes_from_the_launch_command():
    from spectral_dist.integrations.launch import LaunchError, check_process_count, requested_processes

    acc = ["/v/bin/python", "/v/bin/accelerate", "launch"]
    assert requested_processes([*acc, "--num_processes", "2", "-m", "recipes.vit_imagenet"]) == (
        2,
        "--num_processes 2",
    )
    cfg = str(ROOT / "configs" / "accelerate" / "multi_gpu.yaml")
    assert requested_processes([*acc, "--config_file", cfg, "x.py"]) == (8, f"num_processes: 8 in {cfg}")
    assert requested_processes(["/v/bin/python", "train.py"]) is None
    with pytest.raises(LaunchError, match=r"asked for 2 processes \(--num_processes 2\) but started 1"):
        check_process_count(1, argv=[*acc, "--num_processes", "2", "x.py"])
    check_process_count(2, argv=[*acc, "--num_processes", "2", "x.py"])


def test_ablate_dry_run_prints_files_and_sbatch_lines(tmp_path, monkeypatch, capsys):
    from spectral_dist.cli import main

    monkeypatch.chdir(tmp_path)  # not the checkout: paths come out absolute, the grid's --config once
    rc = main(
        ["ablate", "--grid", str(ROOT / "launch" / "grids" / "vit_imagenet.yaml"), "--submit", "--dry-run"]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    sbatch = [x for x in lines if "sbatch" in x]
    assert len(sbatch) == 27 and len([x for x in lines if x.startswith("# ")]) == 27
    for line in sbatch:
        words = shlex.split(line.split("&& ", 1)[1].rstrip(")"))
        assert words.count("--config") == 1, line
        assert words[words.index("--config") + 1] == str(ROOT / "configs/recipes/vit_s16_imagenet.yaml")
        assert str(ROOT / "launch/slurm/accelerate_multinode.sbatch") in words and "--nodes" in words
        assert words[words.index("--output_dir") + 1].startswith(str(tmp_path / "outputs" / "ablate"))
    assert line.startswith(f"(cd {ROOT} && sbatch")
    assert f"Slurm log {tmp_path}/outputs/ablate/vit_imagenet/" in lines[0]
    assert not (tmp_path / "outputs").exists()  # a dry run writes nothing
