"""spectral_dist.logging: JSONL, W&B (what reaches wandb.Run.log, and the finished offline segments), plots."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import wandb_tap

from spectral_dist.logging import JsonlLogger, RunLogger, find_offline_runs, read_jsonl, wandb_mode
from spectral_dist.logging.plots import curvature_grid, loglog_curvature


def test_jsonl_round_trip_and_truncated_tail(tmp_path):
    log = JsonlLogger(tmp_path / "m.jsonl")
    log.log({"a": torch.tensor(1.5), "b": float("nan"), "c": [1, 2]}, step=3)
    log.close()
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 4, "a"')  # a run killed mid-write
    recs = read_jsonl(tmp_path / "m.jsonl")
    assert recs == [{"step": 3, "time": recs[0]["time"], "a": 1.5, "b": "nan", "c": [1, 2]}]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_wandb_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    assert wandb_mode("disabled") == "disabled"
    with pytest.raises(ValueError):
        wandb_mode("cloud")


@pytest.fixture
def tap(tmp_path):
    wandb_tap.install(tmp_path / "tap")
    yield tmp_path / "tap"
    wandb_tap.uninstall()


def test_run_logger_reaches_wandb_and_jsonl(tmp_path, monkeypatch, tap):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    logger = RunLogger(out, name="t", config={"optimizer": "spectral_newton", "lr": 0.001})
    assert logger.mode == "offline"
    for step in range(1, 4):
        logger.log({"train/loss": 1.0 / step, "curv/layers.0.w/alpha": 1.0 + step}, step=step)
        if step == 2:
            assert len(logger.checkpoint()) == 1  # the first segment is finished and kept
    fig = loglog_curvature(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([9.0, 4.0, 1.0]), 2.0, "w")
    logger.log_images({"curv/loglog": fig}, step=3)
    logger.summary({"best/val/acc": 0.5})
    logger.finish()
    assert [d.name for d in find_offline_runs(out)] == logger.segments and len(logger.segments) == 2
    for d in find_offline_runs(out):  # W&B wrote each segment (its private format is not read here)
        assert list(d.glob("run-*.wandb")) and list(d.glob("run-*.wandb"))[0].stat().st_size > 0
    rows = wandb_tap.rows(tap)
    by_step = {r["step"]: r["data"] for r in rows if "train/loss" in r["data"]}
    assert by_step[2]["train/loss"] == 0.5 and by_step[3]["curv/layers.0.w/alpha"] == 4.0
    assert {Path(r["run_dir"]).name for r in rows} == set(logger.segments)
    assert any(r["data"].get("curv/loglog") == "<Image>" for r in rows)
    config = next(r["config"] for r in rows if "config" in r)
    assert config["optimizer"] == "spectral_newton" and "git_sha" in config
    jl = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in jl if "train/loss" in r] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["lr"] == 0.001
    assert (out / "plots" / "curv_loglog_step3.png").stat().st_size > 1000


def test_resumed_logger_sets_killed_segment_aside(tmp_path, monkeypatch, tap):
    """A run killed after its checkpoint: on resume its unfinished segment is renamed *.abandoned and its
    rows after the checkpoint leave the JSONL, so each step is logged once."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    a = RunLogger(out, name="t")
    a.log({"x": 1.0}, step=1)
    segments = a.checkpoint()
    a.log({"x": 2.0}, step=2)  # lost to the kill below: logged after the checkpoint at step 1
    a.run.finish()  # (a real kill leaves it unfinished; finished or not, it is set aside)
    time.sleep(1.1)  # W&B names a segment by its start second; a real resume starts seconds later
    b = RunLogger(out, name="t", resume_id=a.run_id, resume_step=1, segments=segments)
    b.log({"x": 20.0}, step=2)
    b.finish()
    assert len(list(out.glob("wandb/*.abandoned"))) == 1
    kept = [(r["step"], r["data"]["x"]) for r in wandb_tap.rows(tap)]
    assert kept == [(1, 1.0), (2, 20.0)]
    assert len(wandb_tap.rows(tap, keep_abandoned=True)) == 3
    assert [(r["step"], r["x"]) for r in read_jsonl(out / "metrics.jsonl")] == [(1, 1.0), (2, 20.0)]


def test_plots_handle_negative_and_nan():
    fig = curvature_grid(
        {
            "a": type("L", (), {"sigma": [3.0, 2.0, 1.0], "h": [2.0, -1.0, 0.5], "alpha": 1.2})(),
            "b": type("L", (), {"sigma": [1.0, 0.5], "h": [1.0, 0.2], "alpha": math.nan})(),
        }
    )
    assert len(fig.axes) == 2
    w, h = fig.get_size_inches() * 100  # RunLogger.log_images saves at dpi 100
    assert w >= 900 and h >= 350, (w, h)  # two panels: readable (it was 512x208)
    with pytest.raises(ValueError):
        curvature_grid({})
