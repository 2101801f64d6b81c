"""Probe cost: HVP time per gradient time for each backend, and AutoAlpha's overhead on training time.

For spectral_dist.models.tiny_vit and tiny_gpt (float32, eval mode, eager attention) and the weight matrices
the probe covers by default:

* t_grad: one gradient (forward + ``torch.autograd.grad``) of the batch loss w.r.t. those matrices;
* t_hvp / t_grad for the ``autograd`` (double backward; graph build counted separately), ``func``
  (``torch.func.jvp`` of ``torch.func.grad``) and ``fd`` (two gradients) backends;
* a SpectralNewton(alpha="auto") training step, and an AutoAlpha probe at its defaults (all layers, fd,
  top_k=8, samples=2): the added fraction of training time at ``every`` steps is t_probe / (every * t_step).

Usage: ``python benchmarks/probe_cost.py [--reps 7] [--threads 2] [--append benchmarks/RESULTS.md]``.
Timings are medians; the machine (and whether it is shared) is printed with them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from spectral_dist import models
from spectral_dist.optim import AutoAlpha, SpectralNewton
from spectral_dist.probes import CurvatureProbe, make_hvp


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _case(name: str):
    torch.manual_seed(0)
    if name == "tiny_vit":
        return (
            models.tiny_vit(),
            models.classification_loss,
            models.image_batch(16, 3, 16, 10),
            models.image_batch,
        )
    return models.tiny_gpt(), models.lm_loss, models.token_batch(8, 32, 256), models.token_batch


def hvp_ratios(name: str, reps: int, func_reps: int) -> dict:
    model, loss_fn, batch, _ = _case(name)
    model.eval()
    params = [s["param"] for s in CurvatureProbe(model, loss_fn).specs]

    def grad():
        torch.autograd.grad(loss_fn(model, batch), params)

    t_grad = _median_time(grad, reps)
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g) for p in params]
    out = {"t_grad": t_grad, "params": len(params), "numel": sum(p.numel() for p in params)}
    for backend in ("autograd", "func", "fd"):
        hvp = make_hvp(model, loss_fn, batch, params, backend=backend)
        t0 = time.perf_counter()
        hvp(v)  # warm-up; autograd: builds the double-backward graph
        if backend == "autograd":
            out["autograd_setup"] = (time.perf_counter() - t0) / t_grad
        ratios, pair = [], []  # each HVP timed right after a gradient: robust to a shared machine's load
        for _ in range(func_reps if backend == "func" else reps):
            t0 = time.perf_counter()
            grad()
            t1 = time.perf_counter()
            hvp(v)
            t2 = time.perf_counter()
            if backend == "fd":  # two gradients back to back: what fd costs without its bookkeeping
                grad()
                grad()
                pair.append((t2 - t1) / (time.perf_counter() - t2))
            ratios.append((t2 - t1) / (t1 - t0))
        out[backend] = statistics.median(ratios)
        if pair:
            out["fd_vs_two"] = statistics.median(pair)
    return out


def training_overhead(name: str, reps: int, probes: int, every: int) -> dict:
    model, loss_fn, batch, _ = _case(name)
    opt = SpectralNewton.from_model(model, alpha="auto", lr=1e-3)
    auto = AutoAlpha(opt, model, loss_fn, every=every)

    def step():
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()

    t_step = _median_time(step, reps)
    t_probe = _median_time(lambda: auto.update(batch), probes)
    ge = auto.last_report.cost["gradient_equivalents"]
    return {"t_step": t_step, "t_probe": t_probe, "probe_grad_equiv": ge, "every": every}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--func_reps", type=int, default=3, help="func is slow on CPU; fewer repetitions")
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--every", type=int, nargs="*", default=[250, 500, 1000, 2000])
    ap.add_argument("--append", default=None, help="append the markdown section to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    default_every = AutoAlpha.__init__.__defaults__[0]
    lines = [
        "## Probe cost (issue 3)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other "
        f"jobs), no GPU; torch {torch.__version__}, {args.threads} threads, float32. "
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Command: `python benchmarks/probe_cost.py --threads {args.threads}`.",
        "",
        "HVP time / gradient time (median over repetitions of the ratio of an HVP timed right after a gradient; "
        "gradient = forward + autograd.grad w.r.t. the probed matrices):",
        "",
        "| model | matrices (numel) | t_grad ms | autograd | func | fd | fd / (2 gradients) | autograd graph build |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("tiny_vit", "tiny_gpt"):
        r = hvp_ratios(name, args.reps, args.func_reps)
        lines.append(
            f"| {name} | {r['params']} ({r['numel']}) | {1e3 * r['t_grad']:.1f} | {r['autograd']:.2f} | "
            f"{r['func']:.2f} | {r['fd']:.2f} | {r['fd_vs_two']:.2f} | {r['autograd_setup']:.2f} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "AutoAlpha at its defaults (all layers, fd, top_k=8, samples=2: 33 gradient-equivalents per probe) "
        "against a SpectralNewton(alpha='auto') training step on the same batch; added training time = "
        "t_probe / (every * t_step):",
        "",
        "| model | t_step ms | t_probe ms | probe / step | "
        + " | ".join(f"every={e}" for e in args.every)
        + " |",
        "|---|---|---|---|" + "---|" * len(args.every),
    ]
    for name in ("tiny_vit", "tiny_gpt"):
        r = training_overhead(name, args.reps, args.probes, default_every)
        ratio = r["t_probe"] / r["t_step"]
        cells = " | ".join(f"{100 * ratio / e:.2f}%" for e in args.every)
        lines.append(
            f"| {name} | {1e3 * r['t_step']:.1f} | {1e3 * r['t_probe']:.0f} | {ratio:.1f} | {cells} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        f"Default schedule: `AutoAlpha(every={default_every})`. Targets: fd HVP <= 2.5 gradients; all-layers "
        "probe at the default schedule <= 5% of training time.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    return text


if __name__ == "__main__":
    main()
