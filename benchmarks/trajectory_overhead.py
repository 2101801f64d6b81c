"""Overhead of TrajectoryMonitor per training step on a small ViT and GPT (CPU).

For each model it times a full training step (forward, backward, AdamW step) and one sketching
``monitor.update()`` per sketch kind, then reports the overhead ratio ``sketch / (every * step)`` for a
range of schedules, the measured cost of a skipped call, and the smallest ``every`` under 2%. Timings are
medians of interleaved repetitions, single-threaded by default so that a shared machine's load perturbs
both sides alike.

    python benchmarks/trajectory_overhead.py [--append-results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time

import torch

from spectral_dist.diagnostics import DEFAULT_EVERY, DEFAULT_KIND, KINDS, TrajectoryMonitor
from spectral_dist.models import classification_loss, image_batch, lm_loss, tiny_gpt, tiny_vit, token_batch

SCHEDULES = tuple(sorted({1, 10, 20, 100, 200, 500, 1000, DEFAULT_EVERY}))


def _models(args):
    vit = tiny_vit(image_size=32, patch_size=4, hidden=128, layers=4, heads=4)
    gpt = tiny_gpt(vocab_size=256, n_positions=128, n_embd=128, n_layer=4, n_head=4)
    return {
        "vit": (vit, image_batch(n=args.batch, size=32), classification_loss),
        "gpt": (gpt, token_batch(n=max(1, args.batch // 4), seq=128), lm_loss),
    }


def _time(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bench_model(name, model, batch, loss_fn, args) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=False)
        loss_fn(model, batch).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    n_params = sum(p.numel() for p in model.parameters())
    monitors = {k: TrajectoryMonitor(model, sketch_dim=args.dim, every=1, kind=k) for k in args.kinds}
    skip = TrajectoryMonitor(model, sketch_dim=args.dim, every=10**9)
    skip.update()
    step_t, sketch_t = [], {k: [] for k in args.kinds}
    for _ in range(args.reps):  # interleave so that load changes hit both sides
        step_t.append(_time(step, 1))
        for k, mon in monitors.items():
            sketch_t[k].append(_time(mon.update, 1))
    skip_t = _time(skip.update, 1000)
    # summary() runs only when logging; time it on a full window of the default kind.
    full = TrajectoryMonitor(model, sketch_dim=args.dim, every=1)
    for _ in range(full.window):
        full.update()
    summary_t = _time(full.summary, 3)
    res = {
        "model": name,
        "params": n_params,
        "step_s": statistics.median(step_t),
        "skip_s": skip_t,
        "summary_s": summary_t,
        "layers": len(full.names),
        "sketch_s": {k: statistics.median(v) for k, v in sketch_t.items()},
    }
    res["ratio"] = {
        k: {e: (s + (e - 1) * skip_t) / (e * res["step_s"]) for e in SCHEDULES}
        for k, s in res["sketch_s"].items()
    }
    res["min_every_2pct"] = {
        k: next((e for e in SCHEDULES if r[e] < 0.02), None) for k, r in res["ratio"].items()
    }
    return res


def markdown(results, args) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Trajectory diagnostics overhead (issue 4)",
        "",
        f"Machine: CPU only ({platform.processor() or platform.machine()}, 2 cores shared with other jobs, no GPU), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s). Date: {now}.",
        f"Command: `python benchmarks/trajectory_overhead.py` (sketch_dim={args.dim}, window=32, all four "
        f"predictors, {args.reps} interleaved repetitions, medians).",
        "",
        "Overhead ratio = (one sketching `update()` + (every-1) skipped calls) / (every x training step); a training",
        "step is forward + backward + AdamW on one batch.",
        "",
        "| model | params | step (ms) | kind | sketch (ms) | "
        + " | ".join(f"every={e}" for e in SCHEDULES)
        + " | min every < 2% |",
        "|---|---|---|---|---|" + "---|" * len(SCHEDULES) + "---|",
    ]
    for r in results:
        for k in r["sketch_s"]:
            ratios = " | ".join(f"{100 * r['ratio'][k][e]:.2f}%" for e in SCHEDULES)
            lines.append(
                f"| {r['model']} | {r['params'] / 1e6:.2f}M | {1e3 * r['step_s']:.0f} | {k} | "
                f"{1e3 * r['sketch_s'][k]:.0f} | {ratios} | {r['min_every_2pct'][k]} |"
            )
    lines += [
        "",
        "Skipped calls cost "
        + ", ".join(f"{1e6 * r['skip_s']:.1f} us ({r['model']})" for r in results)
        + ".",
        "`summary()` on a full window (global + every parameter; run only when logging) costs "
        + ", ".join(
            f"{1e3 * r['summary_s']:.0f} ms ({r['model']}, {r['layers']} parameters)" for r in results
        )
        + ".",
        "",
        f"Default schedule: `TrajectoryMonitor(every={DEFAULT_EVERY}, kind={DEFAULT_KIND!r})` costs "
        + ", ".join(
            f"{100 * r['ratio'][DEFAULT_KIND][DEFAULT_EVERY]:.2f}% ({r['model']})"
            for r in results
            if DEFAULT_KIND in r["ratio"]
        )
        + " of a step (target: under 2%). The dense kinds (O(N x sketch_dim) per sketch) need the `every` in",
        "the last column.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--models", nargs="+", default=["vit", "gpt"], choices=["vit", "gpt"])
    p.add_argument("--append-results", default=None, help="append the markdown section to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = _models(args)
    results = [bench_model(m, *models[m], args) for m in args.models]
    text = markdown(results, args)
    print(text)
    if args.append_results:
        with open(args.append_results, "a") as f:
            f.write("\n" + text)
    return results


if __name__ == "__main__":
    main()
