"""The issue-8 benchmark scripts on tiny settings: sample efficiency, step overhead, run_all."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


se = _load("sample_efficiency")
so = _load("step_overhead")
run_all = _load("run_all")


def test_steps_to_target_and_mean_curve():
    curve = [(10, 0.5), (20, 0.8), (30, 0.79), (40, 0.9)]
    assert se.steps_to_target(curve, 0.8, "acc") == 20
    assert se.steps_to_target(curve, 0.95, "acc") == math.inf
    assert se.steps_to_target([(10, 3.0), (20, 2.0)], 2.5, "loss") == 20
    assert se.steps_to_target([(10, math.nan)], 0.0, "acc") == math.inf  # a diverged run never reaches
    mc = se.mean_curve([[(10, 0.2), (20, 0.6)], [(10, 0.4), (20, 1.0)]])
    assert mc == [(10, pytest.approx(0.3)), (20, pytest.approx(0.8))]


def _fake(opt, lr, seed, vals, task="cnn_digits"):
    return dict(
        task=task,
        opt=opt,
        lr=lr,
        seed=seed,
        curve=[(10 * (i + 1), v) for i, v in enumerate(vals)],
        seconds=1.0,
        steps=10 * len(vals),
    )


def test_analyze_picks_target_best_lr_and_ratio():
    runs = []
    for seed in range(2):
        runs += [
            _fake("adamw", 1e-3, seed, [0.5, 0.7, 0.8, 0.9]),  # best AdamW final: 0.9 -> target
            _fake("adamw", 1e-2, seed, [0.6, 0.8, 0.85, 0.85]),
            _fake("sn", 1e-3, seed, [0.7, 0.9, 0.92, 0.93]),  # reaches 0.9 at step 20
            _fake("sn", 1e-2, seed, [0.9, 0.95, 0.95, 0.96]),  # reaches 0.9 at step 10: the best lr
        ]
    res = se.analyze(runs)["cnn_digits"]
    assert res["target"] == pytest.approx(0.9) and res["metric"] == "acc"
    a, s = res["optimizers"]["adamw"], res["optimizers"]["sn"]
    assert a["best_lr"] == 1e-3 and a["steps_mean_curve"] == 40 and a["seeds_reached"] == 2
    assert s["best_lr"] == 1e-2 and s["steps_mean_curve"] == 10
    assert s["ratio_to_adamw"] == pytest.approx(0.25) and s["final_mean"] == pytest.approx(0.96)
    text = se.format_results({"cnn_digits": res}, [1e-3, 1e-2], 2)
    assert "| sn | 0.01 | 10 | 0.25x |" in text


def _val_loss(task, model) -> float:
    """The validation loss (a continuous metric: a few steps rarely move the digit accuracy)."""
    model.eval()
    with torch.no_grad():
        if task == "gpt_bytes":
            v = se.models.lm_loss(model, se.task_data(task)[1]).item()
        else:
            (_, _), (xv, yv) = se.task_data(task)
            out = model(xv)
            v = torch.nn.functional.cross_entropy(out.logits if hasattr(out, "logits") else out, yv).item()
    model.train()
    return v


@pytest.mark.parametrize("task", ["cnn_digits", "vit_digits", "gpt_bytes"])
def test_every_optimizer_trains_each_task(task, monkeypatch):
    """Each optimizer of the task trains the model from the same init: the validation loss moves away from
    the untrained model's; on gpt_bytes 4 steps lower it, on cnn_digits 30 steps lift the accuracy well above
    the untrained model's (the ViT needs more steps than a unit test affords to learn the digits)."""
    torch.manual_seed(0)  # train_run builds its model after the same seed: this is its initial model
    untrained = se.build_model(task)
    loss0, metric0 = _val_loss(task, untrained), se.evaluate(task, untrained)
    seen = []  # the validation loss at each of train_run's evaluations
    evaluate = se.evaluate
    monkeypatch.setattr(se, "evaluate", lambda t, m: seen.append(_val_loss(t, m)) or evaluate(t, m))
    steps, lr = (30, 1e-2) if task == "cnn_digits" else (4, 3e-3)
    for opt in se.TASKS[task].optimizers:
        seen.clear()
        r = se.train_run(task, opt, lr, seed=0, steps=steps, eval_every=steps // 2, batch_size=8)
        assert [s for s, _ in r["curve"]] == [steps // 2, steps], opt
        v = r["curve"][-1][1]
        assert len(seen) == 2 and abs(seen[-1] - loss0) > 1e-3, (opt, seen, loss0)  # the model was trained
        if task == "gpt_bytes":  # the metric is the validation loss
            assert v == pytest.approx(seen[-1]) and v < loss0 - 0.3, (opt, v, loss0)
        else:
            assert 0.0 <= v <= 1.0, (opt, v)
        if task == "cnn_digits":
            assert v > metric0 + 0.15, (opt, v, metric0)


def test_optimizer_kinds():
    model = se.build_model("cnn_digits")
    sn = se.build_optimizer("sn_d1e-2", model, 1e-3)
    conv = [g for g in sn.param_groups if g["layer_type"] == "conv"][0]
    assert conv["alpha"] == 2.0 and conv["damping"] == 1e-2
    a1 = se.build_optimizer("sn_a1", model, 1e-3)
    assert all(g["alpha"] == 1.0 for g in a1.param_groups if g["spectral"])
    j2, exact = se.build_optimizer("sn_j2", model, 1e-3), se.build_optimizer("sn_exact", model, 1e-3)
    assert all(g["jacobi_steps"] == 2 and g["basis"] == "auto" for g in j2.param_groups)
    assert all(g["jacobi_steps"] == 0 and g["basis"] == "gram" for g in exact.param_groups)
    assert "gpt_bytes_d256" in se.TASKS and "gpt_bytes_d256" not in se.DEFAULT_TASKS  # on request only
    # torch.optim.Muon takes 2-D matrices only: the CNN has none (4-D kernels, AdamW head), so "muon" is AdamW
    assert isinstance(se.build_optimizer("muon", model, 1e-3), torch.optim.AdamW)
    vit_muon = se.build_optimizer("muon", se.build_model("vit_digits"), 1e-3)
    assert vit_muon.muon.param_groups[0]["params"] and all(
        p.ndim == 2 for p in vit_muon.muon.param_groups[0]["params"]
    )  # the patch-embedding conv kernel goes to AdamW
    with pytest.raises(ValueError, match="unknown optimizer"):
        se.build_optimizer("sgd", model, 1e-3)


def test_sample_efficiency_main_end_to_end(tmp_path):
    out = tmp_path / "se.json"
    argv = ["--quick", "--tasks", "cnn_digits", "--steps", "4", "--jobs", "1", "--json", str(out)]
    res = se.main(argv + ["--optimizers", "sn"])
    assert set(res["cnn_digits"]["optimizers"]) == {"adamw", "sn"}
    assert out.stat().st_size > 0


def test_step_overhead_tiny():
    size = so.SIZES["quick"]["gpt"]
    res = so.bench_model("gpt", size, ["adamw", "muon", "sn_svd", "sn_tracked"], repeats=1, refresh=1, rank=2)
    base = res["adamw"]["seconds"]
    for o, d in res.items():  # every ratio is to AdamW's step time, each optimizer timed on its own
        assert d["seconds"] > 0 and d["ratio"] == pytest.approx(d["seconds"] / base), o
    assert len({d["seconds"] for d in res.values()}) == len(res)
    # AdamW keeps two fp32 moments per element (plus one step counter per tensor)
    assert 2.0 <= res["adamw"]["state_per_param_byte"] < 2.1
    # SpectralNewton keeps one momentum per matrix element; AdamW moments for the rest (embeddings, norms)
    assert 1.0 < res["sn_svd"]["state_per_param_byte"] < 2.0
    text = so.format_results({"gpt": res}, {"gpt": size}, 1, 1, 2)
    assert "| sn_tracked |" in text and "ratio to AdamW" in text
    model, loss_fn, batch = so.make_model_and_batch("vit", so.SIZES["quick"]["vit"])
    opt = so.build_optimizer("sn_newton_schulz", model)
    loss_fn(model, batch).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_run_all_commands_and_one_script(tmp_path, capfd):
    cmds = dict(run_all.commands(quick=True, write=False, out_dir=tmp_path, reproduce=True))
    assert set(cmds) == {"step_overhead", "sample_efficiency", "distributed_scaling", "reproduce"}
    assert "--quick" in cmds["step_overhead"] and "--write" not in cmds["sample_efficiency"]
    assert cmds["distributed_scaling"][-3:] == ["--worlds", "1", "2"]
    full = dict(run_all.commands(quick=False, write=True, out_dir=tmp_path, reproduce=False))
    assert "--write" in full["sample_efficiency"] and "reproduce" not in full
    assert run_all.main(["--quick", "--only", "step_overhead", "--out_dir", str(tmp_path)]) == 0
    out = capfd.readouterr().out
    assert "=== step_overhead: exit 0" in out and "| sn_gram |" in out


@pytest.mark.slow
def test_distributed_probe_quick():
    """The distributed-probe benchmark (a script: its workers are spawned from it) runs 1 rank, DDP and FSDP2,
    and all three measure the same curvature."""
    import subprocess

    r = subprocess.run(
        [sys.executable, str(BENCH / "distributed_probe.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [
        line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    rows = [[c.strip() for c in row] for row in rows[1:]]  # skip the header
    assert [(row[0], row[1]) for row in rows] == [("local", "1"), ("ddp", "2"), ("fsdp2", "2")]
    h0 = [float(row[-1]) for row in rows]
    assert all(abs(h - h0[0]) <= 1e-3 * abs(h0[0]) + 1e-6 for h in h0), h0


def test_moe_step_cost_quick(capsys):
    msc = _load("moe_step_cost")
    med = msc.main(["--quick", "--threads", "1"])
    assert set(med) == set(msc.OPTIMIZERS) and all(v > 0 for v in med.values())
    out = capsys.readouterr().out
    assert "| sn_fused |" in out and "| sn_fused_one_matrix |" in out and "/ sn_split" in out
    # what each row times: a stack per expert, the split Linears, and the old one-matrix view
    assert msc.build("sn_fused", 2, 8, 12).param_groups[0]["batch_dims"] == 1
    assert msc.build("sn_fused_one_matrix", 2, 8, 12).param_groups[0]["batch_dims"] == 0
    assert all(g["batch_dims"] == 0 for g in msc.build("sn_split", 2, 8, 12).param_groups)
