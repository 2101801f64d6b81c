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


def _row(t, alpha, s, s_pred, pr, bound, kfac, arch="a", err_indep=0.5):
    row = dict(
        arch=arch,
        dataset="d",
        width=1,
        step=1,
        layer=f"{t}.{alpha}.{s}",
        layer_type=t,
        out=4,
        alpha=alpha,
        alpha_r2=0.9,
        alpha_c=alpha + 0.1,
        overlap_median=0.05,
        participation_ratio=pr,
        pr_bound=bound,
        negative_fraction=0.0,
        alpha_kfac=kfac,
        n_fit=8,
        **{"in": 4},
    )
    for mode, err in (("same", abs(s - s_pred) / abs(s)), ("indep", err_indep), ("indep_rayleigh", 0.1)):
        row.update({f"gamma_{mode}": s_pred / alpha, f"s_{mode}": s, f"s_pred_{mode}": s_pred})
        row[f"rel_err_{mode}"] = err
    return row


def test_summary_statistics_and_table():
    rows = [
        _row("conv", 2.0, 2.0, 2.02, 1.2, 1.5, 2.1, err_indep=0.3),
        _row("conv", 2.2, 1.0, 1.10, 2.0, 1.5, 2.2, err_indep=0.5),
        _row("attention", 1.0, 1.5, 1.47, 1.1, 1.3, 0.6, err_indep=0.7),
        _row("mlp_up", 1.4, 3.0, 3.00, 1.0, math.inf, math.nan, err_indep=math.nan),
    ]
    traj = [
        dict(width=w, step=st, layer_type=t, alpha=a)
        for w, st, t, a in (
            (1, 0, "conv", 2.0),
            (1, 0, "attention", 1.2),
            (1, 0, "mlp_up", 0.8),
            (1, 10, "conv", 1.5),
            (1, 10, "attention", 1.7),
            (1, 10, "mlp_up", 1.9),
            (2, 0, "conv", 1.9),
            (2, 0, "attention", 1.6),
        )
    ]
    s = summarize(rows, traj)
    assert s["n_layers"] == 4 and s["n_fitted"] == 4 and s["n_distinct_layers"] == 4
    m = s["modes"]
    assert m["same"]["median"] == pytest.approx((0.01 + 0.02) / 2)  # errors 0.01, 0.10, 0.02, 0.0
    assert m["indep"]["median"] == pytest.approx(0.5) and m["indep"]["n"] == 3
    assert s["types"]["conv"]["alpha_mean"] == pytest.approx(2.1)
    assert s["types"]["conv"]["alpha_sd"] == pytest.approx(math.sqrt(0.02))
    assert s["types"]["conv"]["kfac_abs_diff_median"] == pytest.approx(0.05)
    assert s["types"]["conv"]["rel_err_indep_median"] == pytest.approx(0.4)
    assert s["pr_below_bound_frac"] == pytest.approx(3 / 4) and s["s_le_1"] == 1
    assert m["same"]["below_5pct"] == pytest.approx(3 / 4)
    tr = {(e["width"], e["step"]): e for e in s["training"]}
    assert tr[1, 0]["ordering"] is True and tr[1, 0]["paper_values"] is True
    assert tr[1, 10]["ordering"] is False and tr[1, 10]["paper_values"] is False
    assert tr[2, 0]["ordering"] is None  # no mlp_up layer: not testable
    table = format_table(s)
    assert (
        "| conv | 2 | 2.10 ± 0.14 |" in table and "~2" in table and "1.5%" in table and "**50.0%**" in table
    )
    assert "| width | step |" in table
    notes = reference_checks(s)
    assert any(n.startswith("conv") and "agrees" in n for n in notes)
    assert any(n.startswith("mlp_up") and "DISAGREES" in n for n in notes)  # 1.4 is not < 1
    assert any("same-point: median rel err 1.5%" in n and "agrees" in n for n in notes)
    assert any("independent: median rel err 50.0%" in n and "DISAGREES" in n for n in notes)
    assert any("width 1: ordering conv > attention > MLP-up at steps [0] of [0, 10]" in n for n in notes)
    assert any("at step 0: +0.80 / +0.40" in n for n in notes)
    assert any("width 2: not testable" in n for n in notes)


def test_train_and_probe_rows():
    setting = Setting.quick(steps=3, top_k=4, probe_batch=32, checkpoints=(0.0, 0.5, 1.0))
    task = build_task("mlp_cancer", setting)
    assert all(len(b[1]) == 32 for b in task.batches.values())  # three disjoint held-out batches
    rows, traj = train_and_probe(task, setting)
    # tiny_mlp(depth 3): three hidden matrices ("matrix") and the head; transfer test once, at step 3
    assert len(rows) == 4 and {r["step"] for r in rows} == {3}
    assert {r["layer_type"] for r in rows} == {"matrix", "head"}
    hidden = [r for r in rows if r["layer_type"] == "matrix"]
    for r in hidden:
        assert r["n_fit"] >= 3 and r["k_fit"].startswith("1")  # k with h_k <= 0 in any batch are left out
        for mode in ("same", "indep", "indep_rayleigh"):
            assert math.isfinite(r[f"rel_err_{mode}"]) and math.isfinite(r[f"s_{mode}"]), mode
        assert r["gamma_same"] != r["gamma_indep"]  # gamma from A and from B: different data
    # the 2-class head has rank <= 2: too few singular directions for a fit, reported as NaN
    assert all(math.isnan(r["alpha"]) and r["n_fit"] <= 2 for r in rows if r["layer_type"] == "head")
    # alpha on batch A at steps 0, 2 (round(1.5)) and 3, the last from the transfer test's probe on A
    assert sorted({r["step"] for r in traj}) == [0, 2, 3] and len(traj) == 12
    final = {r["layer"]: r["alpha"] for r in traj if r["step"] == 3}
    assert all(final[r["layer"]] == pytest.approx(r["alpha"]) for r in hidden)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_task("lstm", setting)


def test_reproduce_command(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["reproduce", "--quick", "--archs", "cnn", "gpt", "--steps", "3", "--top_k", "4", "--threads", "1"]
    assert main(argv + ["--output_dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| conv |" in text and "| attention |" in text and "paper: ~2% over 93 layers" in text
    assert "| same-point |" in text and "| independent |" in text and "Fit range: k = 1..4" in text
    for f in (
        "layers.csv",
        "alpha_training.csv",
        "summary.csv",
        "table.md",
        "alpha_by_type.png",
        "transfer.png",
        "alpha_training.png",
        "participation.png",
    ):
        assert (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(out / "layers.csv")))
    assert {r["arch"] for r in rows} == {"cnn", "gpt"}
    assert {r["dataset"] for r in rows} == {"digits", "stdlib_bytes"}
    # cnn: conv1, conv2, fc head; gpt (2 layers): c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    assert sum(r["arch"] == "cnn" for r in rows) == 3 and sum(r["arch"] == "gpt" for r in rows) == 8
    traj = list(csv.DictReader(open(out / "alpha_training.csv")))
    assert sorted({int(r["step"]) for r in traj}) == [0, 2, 3]  # fractions 0 .1 .5 1 of 3 steps: 0 0 2 3
    with pytest.raises(ValueError, match="--checkpoints"):
        main(["reproduce", "--quick", "--checkpoints", "1.5", "--output_dir", str(out)])
    with pytest.raises(ValueError, match="--fit_k"):
        main(["reproduce", "--quick", "--fit_k", "4", "2", "--output_dir", str(out)])
