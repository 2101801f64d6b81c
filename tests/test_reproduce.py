"""``spectral-dist reproduce`` and :mod:`spectral_dist.reproduce`: data, summary statistics, the command."""

import csv
import math

import pytest
import torch

from spectral_dist.cli import main
from spectral_dist.reproduce import (
    Setting,
    breast_cancer_data,
    build_task,
    digits_data,
    format_table,
    reference_checks,
    stdlib_bytes,
    summarize,
    train_and_probe,
)


def test_offline_datasets():
    (xt, yt), (xv, yv) = digits_data()
    assert xt.shape[1:] == (1, 8, 8) and len(xt) + len(xv) == 1797 and set(yt.tolist()) == set(range(10))
    assert -1.0 <= float(xt.min()) and float(xt.max()) <= 1.0
    (ct, _), (cv, _) = breast_cancer_data()
    assert ct.shape[1] == 30 and len(ct) + len(cv) == 569
    assert torch.allclose(ct.mean(0), torch.zeros(30), atol=1e-5)  # standardised with training statistics
    train, val = stdlib_bytes(max_bytes=20_000)
    assert train.dtype == torch.uint8 and train.numel() == 20_000 and 0 < val.numel() <= 1_000
    assert b"def " in bytes(train.tolist())


def _row(t, alpha, s, s_pred, pr, bound, kfac, arch="a"):
    return dict(
        arch=arch,
        dataset="d",
        step=1,
        layer=f"{t}.{alpha}",
        layer_type=t,
        out=4,
        alpha=alpha,
        gamma=s_pred / alpha,
        s=s,
        s_pred=s_pred,
        rel_err=abs(s - s_pred) / abs(s),
        participation_ratio=pr,
        pr_bound=bound,
        negative_fraction=0.0,
        alpha_kfac=kfac,
        n_fit=8,
        **{"in": 4},
    )


def test_summary_statistics_and_table():
    rows = [
        _row("conv", 2.0, 2.0, 2.02, 1.2, 1.5, 2.1),
        _row("conv", 2.2, 1.0, 1.10, 2.0, 1.5, 2.2),
        _row("attention", 1.0, 1.5, 1.47, 1.1, 1.3, 0.6),
        _row("mlp_up", 1.4, 3.0, 3.00, 1.0, math.inf, math.nan),
    ]
    s = summarize(rows)
    assert s["n_layers"] == 4 and s["n_fitted"] == 4
    assert s["rel_err_median"] == pytest.approx((0.01 + 0.02) / 2)  # errors 0.01, 0.10, 0.02, 0.0
    assert s["types"]["conv"]["alpha_mean"] == pytest.approx(2.1)
    assert s["types"]["conv"]["alpha_sd"] == pytest.approx(math.sqrt(0.02))
    assert s["types"]["conv"]["kfac_abs_diff_median"] == pytest.approx(0.05)
    assert s["pr_below_bound_frac"] == pytest.approx(3 / 4) and s["s_le_1"] == 1
    assert s["rel_err_frac_below_5pct"] == pytest.approx(3 / 4)
    table = format_table(s)
    assert "| conv | 2 | 2.10 ± 0.14 |" in table and "~2" in table and "1.5%" in table
    notes = reference_checks(s)
    assert any(n.startswith("conv") and "agrees" in n for n in notes)
    assert any(n.startswith("mlp_up") and "DISAGREES" in n for n in notes)  # 1.4 is not < 1


def test_train_and_probe_rows():
    setting = Setting.quick(steps=3, top_k=4, probe_batch=32, checkpoints=(0.5, 1.0))
    rows = train_and_probe(build_task("mlp_cancer", setting), setting)
    # tiny_mlp(depth 3): three hidden matrices ("matrix") and the head, probed at steps 2 and 3
    assert sorted({r["step"] for r in rows}) == [2, 3] and len(rows) == 8
    assert {r["layer_type"] for r in rows} == {"matrix", "head"}
    hidden = [r for r in rows if r["layer_type"] == "matrix"]
    assert all(math.isfinite(r["alpha"]) and math.isfinite(r["rel_err"]) for r in hidden)
    # the 2-class head has rank <= 2: too few singular directions for a fit, reported as NaN
    assert all(math.isnan(r["alpha"]) and r["n_fit"] <= 2 for r in rows if r["layer_type"] == "head")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_task("lstm", setting)


def test_reproduce_command(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["reproduce", "--quick", "--archs", "cnn", "gpt", "--steps", "3", "--top_k", "4", "--threads", "1"]
    assert main(argv + ["--output_dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| conv |" in text and "| attention |" in text and "paper: ~2% over 93 layers" in text
    for f in (
        "layers.csv",
        "summary.csv",
        "table.md",
        "alpha_by_type.png",
        "transfer.png",
        "participation.png",
    ):
        assert (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(out / "layers.csv")))
    assert {r["arch"] for r in rows} == {"cnn", "gpt"}
    assert {r["dataset"] for r in rows} == {"digits", "stdlib_bytes"}
    # cnn: conv1, conv2, fc head; gpt (2 layers): c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    assert sum(r["arch"] == "cnn" for r in rows) == 3 and sum(r["arch"] == "gpt" for r in rows) == 8
    with pytest.raises(ValueError, match="--checkpoints"):
        main(["reproduce", "--quick", "--checkpoints", "1.5", "--output_dir", str(out)])
