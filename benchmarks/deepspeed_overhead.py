"""Step time of DeepSpeed ZeRO 1/2/3 with spectral_newton against DeepSpeed's AdamW at the same stage.

Two gloo processes on CPU (DS_ACCELERATOR=cpu, one thread each) train in fp32 with the configs of
``configs/deepspeed/`` (batch sizes and clipping filled in) either a matrix-heavy MLP (``--model mlp``) or GPT-2
layers (``--model gpt2``: d=768, 12 heads, ``--depth`` layers, byte vocabulary, ``--tokens`` tokens per step
over both ranks in sequences of ``--seq``). Per step, the wall time of ``engine.step()`` (the optimizer step: for
spectral_newton the gather to owners, the directions, the scatter and the partition update) and of the whole
iteration (forward, backward, step) are taken as the max over ranks; the table reports medians over the
measured steps and the ratio to AdamW. "Matrix math" is the time in
:func:`spectral_dist.optim.matrix_step.owner_directions_deferred` on the busiest owner (batched directions and
scale): the rest of the spectral step is momentum, the exchange and the partition update.

Usage: ``python benchmarks/deepspeed_overhead.py [--model gpt2 --depth 2 --tokens 4096 --stages 2]``.
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


def make_gpt2(depth: int, seq: int) -> nn.Module:
    from spectral_dist import models

    torch.manual_seed(0)
    return models.tiny_gpt(n_positions=seq, n_embd=768, n_layer=depth, n_head=12, attn_implementation="sdpa")


def config(stage: int, optimizer: str, micro: int = BATCH // 2, overrides: dict | None = None) -> dict:
    cfg = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}_{optimizer}.json").read_text())
    if optimizer == "spectral_newton" and overrides:
        cfg["optimizer"]["params"].update(overrides)
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, gradient_clipping=1.0)
    cfg.pop("bf16", None)
    cfg.pop("fp16", None)
    cfg["steps_per_print"] = 10**9
    return cfg


def worker(args) -> None:
    import torch.distributed as dist

    from spectral_dist.deepspeed import initialize

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    import spectral_dist.optim.matrix_step as ms

    rows = []
    gpt = args.model == "gpt2"
    micro = max(1, args.tokens // args.seq // 2) if gpt else BATCH // 2
    for stage in args.stages:
        for opt in ("adamw", "spectral_newton"):
            model = make_gpt2(args.depth, args.seq) if gpt else make_model(args.width, args.depth)
            over = {
                "basis": args.basis,
                "alpha": args.alpha if args.alpha == "by_layer" else float(args.alpha),
            }
            engine, *_ = initialize(model=model, config=config(stage, opt, micro, over))
            math_t = [0.0]
            # what the engines' owners compute through: the deferred form over a process group, the read form
            # in one process (CPU timings: on a GPU the deferred call returns before its kernels finish)
            reals = {n: getattr(ms, n) for n in ("owner_directions_and_read", "owner_directions_deferred")}

            def timed_of(real, math_t=math_t):
                def timed(*a, **k):  # the owner's batched directions
                    t = time.perf_counter()
                    try:
                        return real(*a, **k)
                    finally:
                        math_t[0] += time.perf_counter() - t

                return timed

            for n, real in reals.items():
                setattr(ms, n, timed_of(real))
            g = torch.Generator().manual_seed(rank)
            step_t, iter_t, mt = [], [], []
            for i in range(args.warmup + args.steps):
                if gpt:
                    batch = torch.randint(0, 256, (micro, args.seq), generator=g)
                else:
                    x = torch.randn(BATCH // 2, args.width, generator=g)
                    y = torch.randint(0, 10, (BATCH // 2,), generator=g)
                dist.barrier()
                math_t[0] = 0.0
                t0 = time.perf_counter()
                if gpt:
                    out = engine(input_ids=batch).logits[:, :-1]
                    loss = nn.functional.cross_entropy(
                        out.reshape(-1, out.shape[-1]), batch[:, 1:].reshape(-1)
                    )
                else:
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
            for n, real in reals.items():
                setattr(ms, n, real)
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
    if args.model == "gpt2":
        n_params = sum(p.numel() for p in make_gpt2(args.depth, args.seq).parameters())
        what = (
            f"GPT-2 layers (d=768, 12 heads, byte vocabulary) x {args.depth} ({n_params / 1e6:.2f} M parameters), "
            f"{args.tokens} tokens per step in sequences of {args.seq}"
        )
    else:
        n_params = sum(p.numel() for p in make_model(args.width, args.depth).parameters())
        what = f"MLP width {args.width}, depth {args.depth} ({n_params / 1e6:.2f} M parameters), global batch {BATCH}"
    lines = [
        f"{what}, fp32, 2 gloo processes x 1 thread, median of {args.steps} steps after {args.warmup} warm-up; "
        f"spectral_newton with the config's options but basis={args.basis!r}, alpha={args.alpha!r}.",
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
    ap.add_argument("--model", choices=["mlp", "gpt2"], default="gpt2")
    ap.add_argument("--width", type=int, default=256, help="MLP width")
    ap.add_argument("--depth", type=int, default=2, help="MLP depth or GPT-2 layers")
    ap.add_argument("--tokens", type=int, default=4096, help="GPT-2 tokens per step over both ranks")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--stages", type=int, nargs="*", default=[2])
    ap.add_argument("--basis", default="auto", help="overrides the config's basis")
    ap.add_argument("--alpha", default="1.0", help="overrides the config's alpha (a number or by_layer)")
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
            cmd += ["--width", str(args.width), "--depth", str(args.depth), "--model", args.model]
            cmd += ["--tokens", str(args.tokens), "--seq", str(args.seq), "--stages", *map(str, args.stages)]
            cmd += ["--basis", args.basis, "--alpha", str(args.alpha)]
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
