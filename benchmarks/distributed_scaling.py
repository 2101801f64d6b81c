"""Optimizer step time and optimizer-state bytes per rank of sharded SpectralNewton at 1, 2, 4 ranks.

Each matrix is preconditioned on one owner rank, so the step's decompositions are split over the ranks
(LPT on m * n * min(m, n)) and each rank keeps only its matrices' momentum and basis. This script measures
both on a matrix-heavy MLP with gloo on CPU (one thread per rank):

* step time: wall time of ``optimizer.step()`` only (forward/backward excluded), max over ranks, median over
  the measured steps, ratio t_N / t_1 (ideal 1/N); and the same for the CPU time of each rank's process
  (``time.process_time``), which is what the step costs the slowest rank when it has a core to itself: on an
  oversubscribed machine the wall time measures the scheduler more than the optimizer. Efficiency is
  t_1 / (N t_N) of the CPU time;
* state bytes: max over ranks of the tensors in ``optimizer.state``, against AdamW's two fp32 moments per
  element (replicated under DDP, sharded under FSDP2).

Usage: ``python benchmarks/distributed_scaling.py [--width 256 --depth 8 --steps 6 --worlds 1 2 4]``.
Prints a markdown table (``--out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dist_helpers import run_workers  # noqa: E402

from spectral_dist.distributed.engine import state_bytes  # noqa: E402
from spectral_dist.optim import SpectralNewton  # noqa: E402

BATCH = 32


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        n_in = width if i % 2 == 0 else 2 * width
        n_out = 2 * width if i % 2 == 0 else width
        layers += [nn.Linear(n_in, n_out), nn.Tanh()]
    return nn.Sequential(*layers)


def bench(rank, world, width, depth, steps, warmup, mode, basis):
    model = make_model(width, depth)
    if world > 1 and mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
    elif world > 1 and mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        wrapped = model
    else:
        wrapped = model
    opt = SpectralNewton(model.named_parameters(), lr=0.01, basis=basis)
    g = torch.Generator().manual_seed(rank)
    times, cpu = [], []
    for t in range(warmup + steps):
        x = torch.randn(BATCH // world, width, generator=g)
        loss = wrapped(x).square().mean()
        opt.zero_grad()
        loss.backward()
        if world > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if world > 1:
            d = torch.tensor([dt, dc])
            dist.all_reduce(d, op=dist.ReduceOp.MAX)
            dt, dc = float(d[0]), float(d[1])
        if t >= warmup:
            times.append(dt)
            cpu.append(dc)
    numel = sum(p.numel() for p in model.parameters())
    local = numel
    if world > 1 and mode == "fsdp2":
        local = sum(p.to_local().numel() for p in model.parameters())
    sb = state_bytes(opt)
    if world > 1:
        b = torch.tensor([sb, local], dtype=torch.float64)
        dist.all_reduce(b, op=dist.ReduceOp.MAX)
        sb, local = int(b[0]), int(b[1])
    return dict(
        step_s=statistics.median(times),
        cpu_s=statistics.median(cpu),
        state_bytes=sb,
        adamw_bytes=2 * 4 * local,
        numel=numel,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", default=["ddp", "fsdp2"])
    ap.add_argument("--basis", default="svd")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    base = bench(0, 1, args.width, args.depth, args.steps, args.warmup, "none", args.basis)
    rows = [
        "| engine | ranks | step wall (ms) | wall t_N / t_1 | step CPU (ms) | CPU t_N / t_1 | CPU efficiency "
        "| state bytes / rank | vs 1 rank | AdamW bytes / rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows.append(
        f"| local | 1 | {base['step_s'] * 1e3:.1f} | 1.00 | {base['cpu_s'] * 1e3:.1f} | 1.00 | 1.00 | "
        f"{base['state_bytes']:,} | 1.00 | {base['adamw_bytes']:,} |"
    )
    for mode in args.modes:
        for w in args.worlds:
            if w == 1:
                continue
            r = run_workers(
                bench, w, args.width, args.depth, args.steps, args.warmup, mode, args.basis, timeout=900
            )[0]
            ratio = r["step_s"] / base["step_s"]
            cratio = r["cpu_s"] / base["cpu_s"]
            rows.append(
                f"| {mode} | {w} | {r['step_s'] * 1e3:.1f} | {ratio:.2f} | {r['cpu_s'] * 1e3:.1f} | {cratio:.2f} | "
                f"{1 / (w * cratio):.2f} | {r['state_bytes']:,} | {r['state_bytes'] / base['state_bytes']:.2f} | "
                f"{r['adamw_bytes']:,} |"
            )
            print(rows[-1], flush=True)
    head = (
        f"model: {args.depth} Linear layers alternating {args.width}x{2 * args.width} / {2 * args.width}x{args.width} "
        f"(+ biases), {base['numel']:,} parameters, basis={args.basis}, fp32; "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), gloo, 1 thread per rank, "
        f"torch {torch.__version__}"
    )
    text = head + "\n\n" + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
