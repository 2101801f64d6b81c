"""benchmarks/gpu/run.sh's CPU dry run: the script the GPU session will run, on tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run_on_cpu(tmp_path):
    """The dry run takes an H100's choices where they are not CUDA-only: bf16 Polar Express and eigenbasis last
    product, and the float64 eigenbasis CholeskyQR (the CPU defaults are every other test's)."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.update(SPECTRAL_DIST_CPU_BF16="1", SPECTRAL_DIST_EIGENBASIS_QR="cholesky_fp64")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu" / "run.sh"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (js,) = tmp_path.glob("*.json")
    (md,) = tmp_path.glob("*.md")
    res = json.loads(js.read_text())
    assert res["device"] == "cpu" and res["quick"]
    assert all(v.startswith("ok") for v in res["stage_status"].values()), res["stage_status"]
    syncs = {r["basis"]: r["syncs"] for r in res["syncs"]["rows"]}
    assert len(syncs) == 4 and all(s == {"5": 1, "17": 1} for s in syncs.values()), syncs  # one read per step
    mem = {(r["optimizer"], r["cap"]): r["peak_mib"] for r in res["memory"]["rows"]}
    assert set(mem) == {("adamw", None), ("sn_alpha1.65", None), ("sn_alpha1.65", 1.0)}, mem
    assert mem[("sn_alpha1.65", 1.0)] < 0.7 * mem[("sn_alpha1.65", None)], mem  # capped batches: less memory
    assert {"gpt2", "vit"} <= set(res["step_cost"])
    assert {"adamw", "muon", "sn_alpha1"} <= set(res["step_cost"]["gpt2"]["optimizer_step"])
    methods = {row["method"] for row in res["accuracy"]["rows"]}
    assert {"polar_express 5", "cholesky", "gram", "newton_schulz (Muon, 5)"} <= methods
    assert all(row["ok"] for row in res["accuracy"]["rows"])
    assert set(res["training"]) == {"adamw", "muon", "sn"}
    real = res["real_accuracy"]
    assert {r["layer_type"] for r in real["rows"]} == {"attention", "mlp_up", "mlp_down"}
    exact = [r for r in real["rows"] if r["method"].startswith(("gram", "cholesky"))]
    assert exact and all(r["median"] < 1e-3 for r in exact), exact  # the exact methods on real inputs
    assert {(r["qr"], r["jacobi_steps"]) for r in res["jacobi_cost"]["rows"]} == {
        (q, j) for q in ("householder", "cholesky", "cholesky_fp64") for j in (0, 1, 2)
    }
    assert res["eigenbasis_qr"] == "cholesky_fp64"  # the H100's, as set above; the header names it
    text = md.read_text()
    assert "eigenbasis QR cholesky_fp64" in text
    assert "GPU checks (issue 16)" in text and "recorded inputs of a real run" in text
    assert "Cost of the Jacobi steps" in text and "Host syncs in one optimizer step" in text
    assert "Transient memory of one optimizer step" in text
