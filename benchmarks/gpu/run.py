"""The GPU checks of issue 16 (run through benchmarks/gpu/run.sh; see there). Every stage is timed and the whole
run is budgeted: a stage that would start after ``--budget`` seconds is skipped and recorded as skipped.

Results: ``benchmarks/gpu/results/<device>-<UTC time>.json`` and ``.md`` (device name from
``torch.cuda.get_device_name``), or ``--out DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import basis_accuracy  # noqa: E402
import step_cost  # noqa: E402
import step_memory  # noqa: E402

from spectral_dist import models  # noqa: E402
from spectral_dist.host_reads import HostReads  # noqa: E402
from spectral_dist.optim import SpectralNewton  # noqa: E402
from spectral_dist.spectral.direction import auto_eigenbasis_qr  # noqa: E402

TRAIN_OPTIMIZERS = ("adamw", "muon", "sn")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def stage_step_cost(device, quick: bool) -> dict:
    """Optimizer step (12 layers) and full step of GPT-2-small and ViT-B/16 shapes."""
    out = {}
    on_gpu = device.type == "cuda"
    gpt_tokens = [256] if quick else ([4096, 16384, 65536] if on_gpu else [4096])
    vit_tokens = [256] if quick else ([4096, 16384] if on_gpu else [4096])
    for model, tokens in (("gpt2", gpt_tokens), ("vit", vit_tokens)):
        argv = ["--model", model, "--device", str(device), "--tokens", *map(str, tokens)]
        if quick:
            argv += ["--quick", "--only", "sn_alpha1", "sn_by_layer"]
        else:
            argv += [
                "--layers",
                "12",
                "--full_layers",
                "12" if on_gpu else "2",
                "--repeats",
                "5" if on_gpu else "2",
            ]
            argv += [
                "--only",
                "muon_bf16",
                "sn_alpha1",
                "sn_by_layer",
                "sn_alpha0.5",
                "sn_alpha2",
                "sn_alpha0.5@eigenbasis",
            ]
        if on_gpu:
            argv.append("--amp")
        out[model] = step_cost.main(argv)["results"][model]
    return out


SYNC_CASES = (
    ("alpha 1: polar_express", dict(alpha=1.0)),
    ("alpha 2: cholesky", dict(alpha=2.0)),
    ("alpha 0.5: eigenbasis", dict(alpha=0.5)),
    ("alpha 1.65: eigenbasis", dict(alpha=1.65)),
)


def _syncs_in_a_step(device, n_pairs: int, width: int, opts: dict) -> int:
    """Host syncs in the second optimizer step (the first initialises state and the eigenbasis's SVD) of
    2 * n_pairs + 1 matrices (two shapes and a conv kernel) plus biases, basis "auto"."""
    torch.manual_seed(0)
    layers: list = [torch.nn.Conv2d(4, 8, 3)]
    for _ in range(n_pairs):
        layers += [torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)]
    model = torch.nn.ModuleList(layers).to(device)
    opt = SpectralNewton(model.parameters(), lr=0.01, **opts)
    for i in range(2):
        g = torch.Generator(device=device).manual_seed(i)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, device=device)
        if i == 0:
            opt.step()
    if device.type != "cuda":
        with HostReads() as reads:
            opt.step()
        return reads.count
    import warnings

    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")  # every CUDA call that waits for the device warns
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def stage_syncs(device, quick: bool) -> dict:
    """Host syncs in one optimizer step, for 5 and 17 matrices per auto basis: on CUDA every call that waits
    for the device (torch.cuda.set_sync_debug_mode), on CPU the tensor -> Python reads. The engine's bound: 1
    per step, whatever the number of matrices (tests/test_step_syncs.py counts the same on CPU)."""
    width = 32 if quick else 768
    rows = [
        dict(
            basis=name,
            width=width,
            syncs={str(2 * n + 1): _syncs_in_a_step(device, n, width, opts) for n in (2, 8)},
        )
        for name, opts in SYNC_CASES
    ]
    how = "torch.cuda.set_sync_debug_mode warnings" if device.type == "cuda" else "tensor -> Python reads"
    return {"rows": rows, "counted": how}


def stage_memory(device, quick: bool) -> dict:
    """Transient memory of one optimizer step (benchmarks/step_memory.py): SpectralNewton per auto basis with
    batches unbounded and capped (``max_batch_mb``) against AdamW (foreach) and the batched Muon. CUDA: 48
    matrices of 1024^2 fp32 (192 MiB; the eigenbasis's first step is a batched SVD, slow on GPUs at larger sizes), the
    allocator's peak; CPU dry run: the script's --quick."""
    if device.type == "cuda":
        argv = ["--device", str(device), "--matrices", "48", "--width", "1024", "--caps", "none", "32"]
    else:
        argv = ["--quick", "--only", "adamw", "sn_alpha1.65"]
    r = step_memory.main(argv)
    return {"rows": r["rows"], "params_mib": r["params_mib"], "markdown": r["markdown"]}


def stage_accuracy(device, quick: bool) -> dict:
    shapes = [(96, 64)] if quick else [(768, 768), (3072, 768), (768, 2304)]
    return basis_accuracy.run(device, shapes, drift_shape=(96, 48) if quick else (512, 256))


# seconds a stage needs left in the budget to start (the last stage must not push the run past 8 minutes)
STAGE_RESERVE_S = {"real_accuracy": 150.0}


def stage_jacobi_cost(device, quick: bool) -> dict:
    """ms per matrix of an eigenbasis refresh step with 0, 1, 2 Jacobi steps, both QRs (seconds on a GPU): what
    a per-device default for ``jacobi_steps`` needs."""
    shapes = [(64, 64)] if quick else [(768, 768), (768, 2304)]
    return {"rows": basis_accuracy.jacobi_cost(device, shapes)}


def stage_real_accuracy(device, quick: bool) -> dict:
    """The bases along a real run's recorded inputs (CPU-recorded, evaluated on the device; docs/benchmarks.md).
    Last, with a reserve: about 2 minutes, so it runs only when the others left that much of the budget."""
    return basis_accuracy.real_gradients(device, steps=8 if quick else 60, d=64 if quick else 256, cost=False)


def _lr_lambda(steps: int, warmup: int):
    def f(t):
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, steps - warmup)))

    return f


def stage_training(device, quick: bool, steps: int, tokens: int) -> dict:
    """GPT-2-small (byte vocabulary) on the standard library's source bytes: AdamW (lr 1e-3), batched Muon (lr 0.02
    on hidden matrices + AdamW 1e-3) and SpectralNewton (from_model, alpha 1, default basis, lr 3e-3), warmup +
    cosine, weight decay 0.01, bf16 autocast on CUDA. The learning rates are not tuned: a smoke test of the
    training loop at scale and a time per step, not a sample-efficiency claim."""
    from recipes.common.data import stdlib_corpus

    seq = 64 if quick else 1024
    d, layers, heads = (64, 2, 2) if quick else (768, 12, 12)
    train, val = stdlib_corpus(max_bytes=200_000 if quick else 8_000_000)
    train, val = train.long(), val.long()
    bs = max(1, tokens // seq)
    out = {}
    for name in TRAIN_OPTIMIZERS:
        torch.manual_seed(0)
        model = models.tiny_gpt(
            n_positions=seq, n_embd=d, n_layer=layers, n_head=heads, attn_implementation="sdpa"
        )
        model = model.to(device)
        if name == "adamw":
            opts = [torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)]
        elif name == "muon":
            opts = step_cost.build_optimizer("muon", model, lr=1e-3)
            opts[0].param_groups[0]["lr"] = 0.02
        else:
            opts = [
                SpectralNewton.from_model(model, alpha=1.0, lr=3e-3, weight_decay=0.01, distributed=False)
            ]
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(steps, max(1, steps // 20))) for o in opts]
        g = torch.Generator().manual_seed(1)
        losses, t0 = [], None
        for t in range(steps):
            if t == 1:  # the first step builds state and compiles kernels
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            idx = torch.randint(0, len(train) - seq - 1, (bs,), generator=g)
            batch = torch.stack([train[i : i + seq] for i in idx.tolist()]).to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = models.lm_loss(model, batch)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o, s in zip(opts, scheds):
                o.step()
                s.step()
            if t % max(1, steps // 10) == 0 or t == steps - 1:
                losses.append((t, float(loss)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms_step = 1000 * (time.perf_counter() - t0) / max(1, steps - 1)
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            gv = torch.Generator().manual_seed(2)
            vidx = torch.randint(0, len(val) - seq - 1, (max(1, bs // 2),), generator=gv)
            vb = torch.stack([val[i : i + seq] for i in vidx.tolist()]).to(device)
            val_loss = float(models.lm_loss(model, vb))
        out[name] = dict(ms_per_step=ms_step, val_loss=val_loss, train_curve=losses)
        del model, opts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def to_markdown(res: dict) -> str:
    lines = [f"## GPU checks (issue 16) — {res['device']}, {res['date']}", ""]
    lines.append(
        f"torch {res['torch']}; compute capability {res.get('capability')}; eigenbasis QR "
        f"{res.get('eigenbasis_qr')}; total {res['seconds']:.0f} s; stages: "
        + ", ".join(f"{k} {v}" for k, v in res["stage_status"].items())
    )
    lines.append("")
    sy = res.get("syncs")
    if sy:
        sizes = list(sy["rows"][0]["syncs"])
        lines += [
            f"**Host syncs in one optimizer step** ({sy['counted']}; Linear pairs of width {sy['rows'][0]['width']})",
            "",
            "| basis | " + " | ".join(f"{k} matrices" for k in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        lines += [
            f"| {r['basis']} | " + " | ".join(str(r["syncs"][k]) for k in sizes) + " |" for r in sy["rows"]
        ]
        lines.append("")
    mem = res.get("memory")
    if mem:
        lines += ["**Transient memory of one optimizer step**", "", mem["markdown"], ""]
    sc = res.get("step_cost")
    if sc:
        for model, tables in sc.items():
            for what, med in tables.items():
                lines.append(step_cost.table(f"**{model}**, {what.replace('_', ' ')}", med))
    acc = res.get("accuracy")
    if acc:
        lines.append(basis_accuracy.format_md(acc, res["device"]))
    jc = res.get("jacobi_cost")
    if jc:
        lines.append(basis_accuracy.format_jacobi_cost_md(jc["rows"], res["device"]))
    real = res.get("real_accuracy")
    if real:
        lines.append(basis_accuracy.format_real_md(real, res["device"]))
    tr = res.get("training")
    if tr:
        lines += [
            "**GPT-2-small training run** (see run.py's stage_training for the settings)",
            "",
            "| optimizer | ms / step | / adamw | val loss | train loss (first -> last) |",
            "|---|---|---|---|---|",
        ]
        base = tr.get("adamw", {}).get("ms_per_step")
        for k, v in tr.items():
            c = v["train_curve"]
            lines.append(
                f"| {k} | {v['ms_per_step']:.1f} | {v['ms_per_step'] / base:.3f}x | {v['val_loss']:.4f} | "
                f"{c[0][1]:.3f} -> {c[-1][1]:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: the CPU dry run of this script")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; later stages are skipped past it")
    ap.add_argument("--train_steps", type=int, default=300)
    ap.add_argument("--train_tokens", type=int, default=16384)
    ap.add_argument(
        "--stages",
        nargs="*",
        default=["syncs", "memory", "step_cost", "accuracy", "jacobi_cost", "training", "real_accuracy"],
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu" / "results"))
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu/run.py: no CUDA device; use --device cpu --quick for the dry run")
    if a.quick:
        a.train_steps, a.train_tokens = 6, 256
    t_start = time.perf_counter()
    res = dict(
        device=device_name(device),
        date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        torch=torch.__version__,
        # what basis="auto" chooses on this device: the eigenbasis QR and the bf16 matmuls
        eigenbasis_qr=auto_eigenbasis_qr(device),
        capability=".".join(map(str, torch.cuda.get_device_capability(device)))
        if device.type == "cuda"
        else None,
        quick=a.quick,
        stage_status={},
    )
    stages = {
        "syncs": lambda: stage_syncs(device, a.quick),
        "memory": lambda: stage_memory(device, a.quick),
        "step_cost": lambda: stage_step_cost(device, a.quick),
        "accuracy": lambda: stage_accuracy(device, a.quick),
        "training": lambda: stage_training(device, a.quick, a.train_steps, a.train_tokens),
        "jacobi_cost": lambda: stage_jacobi_cost(device, a.quick),
        "real_accuracy": lambda: stage_real_accuracy(device, a.quick),
    }
    for name in a.stages:
        if time.perf_counter() - t_start > a.budget - STAGE_RESERVE_S.get(name, 0.0):
            res["stage_status"][name] = "skipped (budget)"
            continue
        t0 = time.perf_counter()
        try:
            res[name] = stages[name]()
            res["stage_status"][name] = f"ok ({time.perf_counter() - t0:.0f} s)"
        except Exception as e:  # noqa: BLE001 - one failed stage must not lose the others' results
            traceback.print_exc()
            res["stage_status"][name] = f"failed: {type(e).__name__}: {e}"
    res["seconds"] = time.perf_counter() - t_start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", res["device"]).strip("-").lower()
    stem = out / f"{slug}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    stem.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))
    print(f"wrote {stem}.json and {stem}.md")
    return res


if __name__ == "__main__":
    main()
