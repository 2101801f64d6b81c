"""spectral_dist.logging: JSONL, W&B offline runs (written by wandb, parsed back), plots."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spectral_dist.logging import (
    JsonlLogger,
    RunLogger,
    find_offline_runs,
    read_jsonl,
    read_offline_run,
    wandb_mode,
)
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


def test_offline_run_is_parsed_back(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = RunLogger(tmp_path, name="t", config={"optimizer": "spectral_newton", "lr": 0.001})
    assert logger.mode == "offline"
    for step in range(1, 4):
        logger.log({"train/loss": 1.0 / step, "curv/layers.0.w/alpha": 1.0 + step}, step=step)
    fig = loglog_curvature(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([9.0, 4.0, 1.0]), 2.0, "w")
    logger.log_images({"curv/loglog": fig}, step=3)
    logger.summary({"best/val/acc": 0.5})
    logger.finish()
    runs = find_offline_runs(tmp_path)
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    rows = {r["_step"]: r for r in run["history"] if "train/loss" in r}
    assert rows[2]["train/loss"] == 0.5 and rows[3]["curv/layers.0.w/alpha"] == 4.0
    assert any("curv/loglog" in k for r in run["history"] for k in r)
    assert run["config"]["optimizer"] == "spectral_newton" and "git_sha" in run["config"]
    assert run["summary"]["best/val/acc"] == 0.5
    jl = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in jl if "train/loss" in r] == [1, 2, 3]
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.001
    assert (tmp_path / "plots" / "curv_loglog_step3.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="not a W&B run file"):
        (tmp_path / "x.wandb").write_bytes(b"nope")
        read_offline_run(tmp_path / "x.wandb")


def test_plots_handle_negative_and_nan():
    fig = curvature_grid(
        {
            "a": type("L", (), {"sigma": [3.0, 2.0, 1.0], "h": [2.0, -1.0, 0.5], "alpha": 1.2})(),
            "b": type("L", (), {"sigma": [1.0, 0.5], "h": [1.0, 0.2], "alpha": math.nan})(),
        }
    )
    assert len(fig.axes) == 2
    with pytest.raises(ValueError):
        curvature_grid({})
