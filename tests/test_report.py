"""spectral-dist report and ablate on synthetic run folders (fast; the real-run report is in test_recipes)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from spectral_dist.cli import main
from spectral_dist.commands.ablate import expand_grid
from spectral_dist.logging import JsonlLogger
from spectral_dist.reporting import build_report, load_runs, metric_mode, per_run


def _fake_run(root, optimizer, seed, accs, lr=0.001):
    d = root / f"{optimizer}_lr{lr:g}_s{seed}"
    d.mkdir(parents=True)
    cfg = {"recipe": "vit_imagenet", "optimizer": optimizer, "lr": lr, "seed": seed, "main_metric": "val/acc"}
    (d / "config.json").write_text(json.dumps(cfg))
    log = JsonlLogger(d / "metrics.jsonl")
    for i, a in enumerate(accs):
        log.log({"train/loss": 2.0 - a}, step=10 * (i + 1))
        log.log({"val/acc": a}, step=10 * (i + 1))
    log.log({"summary": True, "best/val/acc": max(accs)}, step=None)
    log.close()
    return d


def test_report_table_and_plots(tmp_path):
    _fake_run(tmp_path, "adamw", 0, [0.2, 0.5, 0.6])
    _fake_run(tmp_path, "adamw", 1, [0.3, 0.4, 0.7])
    _fake_run(tmp_path, "spectral_newton", 0, [0.5, 0.8, 0.9])
    _fake_run(tmp_path, "spectral_newton", 1, [0.6, 0.9, 0.85])
    _fake_run(tmp_path, "spectral_newton", 0, [0.1, 0.1, 0.1], lr=0.1)
    rep = build_report([tmp_path], "val/acc", tmp_path / "out", target=0.8)
    best = rep["best"].set_index("optimizer")
    assert best.loc["spectral_newton", "best_mean"] == pytest.approx(0.9)
    assert best.loc["spectral_newton", "lr"] == "0.001"
    assert best.loc["adamw", "best_mean"] == pytest.approx(0.65)
    assert best.loc["adamw", "best_std"] == pytest.approx(0.0707, abs=1e-3)
    assert best.loc["spectral_newton", "steps_to_target"] == 20 and best.loc["adamw", "reached"] == 0
    assert len(rep["summary"]) == 3 and len(rep["runs"]) == 5
    md = (tmp_path / "out" / "report.md").read_text()
    assert "higher is better" in md and "| vit_imagenet | spectral_newton | 0.001 | 2 |" in md
    assert (tmp_path / "out" / "vit_imagenet_val_acc_curves.png").stat().st_size > 1000
    assert pd.read_csv(tmp_path / "out" / "runs.csv").shape[0] == 5


def test_report_without_target_has_no_reached_columns(tmp_path, capsys):
    _fake_run(tmp_path, "adamw", 0, [0.2, 0.5])
    _fake_run(tmp_path, "adamw", 1, [0.3, 0.6])
    rep = build_report([tmp_path], "val/acc", tmp_path / "out")
    assert "reached" not in rep["summary"] and "steps_to_target" not in rep["runs"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "reached" not in md and "steps_to_target" not in md and "±1 std" in md
    from PIL import Image

    for png in ("vit_imagenet_val_acc_curves.png", "best_val_acc.png"):
        w, h = Image.open(tmp_path / "out" / png).size
        assert w >= 700 and h >= 550, (png, w, h)  # readable


def test_report_cli_and_errors(tmp_path, capsys):
    _fake_run(tmp_path, "adamw", 0, [0.2, 0.5])
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 0  # metric from main_metric
    assert "val/acc" in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--metric", "val/nope", "--out", str(tmp_path / "r2")]) == 2
    assert main(["report", str(tmp_path / "missing"), "--metric", "val/acc"]) == 2
    with pytest.raises(FileNotFoundError):
        load_runs([tmp_path / "missing"])
    assert metric_mode("val/loss") == "min" and metric_mode("val/acc") == "max"
    runs = load_runs([tmp_path])
    t = per_run(runs, "train/loss", target=1.6)
    assert t.loc[0, "best"] == pytest.approx(1.5) and t.loc[0, "steps_to_target"] == 20


def test_ablate_grid_and_cli(tmp_path, capsys):
    jobs = expand_grid(
        ["vit_imagenet", "gpt_lm"], ["adamw", "muon"], [1e-3, 3e-3], [0, 1], tmp_path, max_steps=5
    )
    assert len(jobs) == 16 and len({j.output_dir for j in jobs}) == 16
    j = jobs[0]
    assert j.args[:4] == ["-m", "recipes.vit_imagenet", "--config", "configs/recipes/vit_imagenet.yaml"]
    assert ["--max_steps", "5"] == j.args[-2:] and "--seed" in j.args
    with pytest.raises(ValueError, match="unknown optimizer"):
        expand_grid(["vit_imagenet"], ["sgd"], [1e-3], [0], tmp_path)
    grid = tmp_path / "g.yaml"
    grid.write_text(
        "recipes: [resnet_cifar]\noptimizers: [adamw, spectral_newton]\nlrs: [0.001]\nseeds: [0, 1, 2]\n"
    )
    assert main(["ablate", "--grid", str(grid), "--launcher", "accelerate launch --cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and all(
        x.startswith("accelerate launch --cpu -m recipes.resnet_cifar") for x in lines
    )
    grid.write_text("recipes: [resnet_cifar]\nlearning_rates: [1]\n")
    assert main(["ablate", "--grid", str(grid)]) == 2
