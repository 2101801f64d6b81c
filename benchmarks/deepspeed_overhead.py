"""Step time of DeepSpeed ZeRO 1/2/3 with spectral_newton against DeepSpeed's AdamW at the same stage.

Two gloo processes on CPU (DS_ACCELERATOR=cpu, one thread each) train a matrix-heavy MLP in fp32 with the
configs of ``configs/deepspeed/`` (batch sizes and clipping filled in). Per step, the wall time of
``engine.step()`` (the optimizer step: for spectral_newton the gather to owners, the decompositions, the
scatter and the partition update) and of the whole iteration (forward, backward, step) are taken as the max
over ranks; the table reports medians over the measured steps and the ratio to AdamW. "Matrix math" is the
time in ``SpectralNewton.matrix_direction`` on the busiest owner (momentum, decomposition, scale): the rest
of the spectral step is the exchange and the partition update that the ZeRO integration adds.

Usage: ``python benchmarks/deepspeed_overhead.py [--width 256 --depth 4 --steps 10 --out table.md]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32  # global batch, split over 2 ranks


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers, d = [], width
    for i in range(depth):
        out = 2 * width if i % 2 == 0 else width
        layers += [nn.Linear(d, out), nn.Tanh()]
        d = out
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers)


def config(stage: int, optimizer: str) -> dict:
    cfg = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}_{optimizer}.json").read_text())
    cfg.update(
        train_micro_batch_size_per_gpu=BATCH // 2, gradient_accumulation_steps=1, gradient_clipping=1.0
    )
    cfg.pop("bf16", None)
    cfg.pop("fp16", None)
    cfg["steps_per_print"] = 10**9
    return cfg


def worker(args) -> None:
    import torch.distributed as dist

    from spectral_dist.deepspeed import initialize

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows = []
    for stage in (1, 2, 3):
        for opt in ("adamw", "spectral_newton"):
            engine, *_ = initialize(model=make_model(args.width, args.depth), config=config(stage, opt))
            math_t = [0.0]
            if opt == "spectral_newton":  # time the owner's matrix math apart from the exchange
                inner = engine.basic_optimizer.matrix_direction

                def timed(*a, inner=inner, math_t=math_t):
                    t = time.perf_counter()
                    try:
                        return inner(*a)
                    finally:
                        math_t[0] += time.perf_counter() - t

                engine.basic_optimizer.matrix_direction = timed
            g = torch.Generator().manual_seed(rank)
            step_t, iter_t, mt = [], [], []
            for i in range(args.warmup + args.steps):
                x = torch.randn(BATCH // 2, args.width, generator=g)
                y = torch.randint(0, 10, (BATCH // 2,), generator=g)
                dist.barrier()
                math_t[0] = 0.0
                t0 = time.perf_counter()
                loss = nn.functional.cross_entropy(engine(x), y)
                engine.backward(loss)
                t1 = time.perf_counter()
                engine.step()
                t2 = time.perf_counter()
                t = torch.tensor([t2 - t1, t2 - t0, math_t[0]], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if i >= args.warmup:
                    step_t.append(t[0].item())
                    iter_t.append(t[1].item())
                    mt.append(t[2].item())
            rows.append(
                (stage, opt, statistics.median(step_t), statistics.median(iter_t), statistics.median(mt))
            )
            engine.destroy()
    if rank == 0:
        Path(args.result).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def table(rows, args) -> str:
    base = {(s, o): (st, it) for s, o, st, it, _ in rows}
    n_params = sum(p.numel() for p in make_model(args.width, args.depth).parameters())
    lines = [
        f"MLP width {args.width}, depth {args.depth} ({n_params / 1e6:.2f} M parameters), global batch {BATCH}, "
        f"fp32, 2 gloo processes x 1 thread, median of {args.steps} steps after {args.warmup} warm-up.",
        "",
        "| ZeRO stage | optimizer | optimizer step (ms) | of which matrix math (ms) | step / AdamW "
        "| iteration (ms) | iteration / AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, o, st, it, mt in rows:
        a_st, a_it = base[(s, "adamw")]
        m = f"{mt * 1e3:.1f}" if o == "spectral_newton" else "-"
        lines.append(
            f"| {s} | {o} | {st * 1e3:.1f} | {m} | {st / a_st:.2f} | {it * 1e3:.1f} | {it / a_it:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rows.json")
        procs = []
        for r in range(2):
            env = dict(
                os.environ,
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT),
            )
            cmd = [sys.executable, __file__, "--worker", "--result", result]
            cmd += ["--width", str(args.width), "--depth", str(args.depth)]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if r else None))
        for p in procs:
            p.wait(timeout=1800)
        if any(p.returncode for p in procs):
            sys.exit("a benchmark worker failed")
        rows = json.loads(Path(result).read_text())
    text = table(rows, args)
    text += f"\n\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
    text += f"torch {torch.__version__}, deepspeed {__import__('deepspeed').__version__}; "
    text += time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
