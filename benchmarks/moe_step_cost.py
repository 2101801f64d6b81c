"""The optimizer step on fused MoE expert weights: one spectral step per expert (``batch_dims=1``, what
``from_model`` gives transformers' Mixtral-style experts) against the same experts held as separate Linear
modules, torch AdamW (foreach), and the step that treats each fused weight as one matrix over all its experts
(``batch_dims=0``: what the classification did before; cheaper, and wrong). Random gradients, median of
interleaved rounds.

Usage: ``python benchmarks/moe_step_cost.py [--experts 8 --hidden 512 --ffn 1408 --repeats 3 --threads 2]``
(Mixtral's layout at 1/8 of its width: gate_up (experts, 2 ffn, hidden), down (experts, hidden, ffn)).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from spectral_dist import SpectralNewton

OPTIMIZERS = ("adamw", "sn_fused", "sn_split", "sn_fused_one_matrix")


def make_model(kind: str, experts: int, hidden: int, ffn: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    if kind == "fused":
        model.experts = nn.Module()
        model.experts.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * ffn, hidden) * 0.02)
        model.experts.down_proj = nn.Parameter(torch.randn(experts, hidden, ffn) * 0.02)
        return model
    model.experts = nn.ModuleList()
    for _ in range(experts):
        e = nn.Module()
        e.gate_up_proj = nn.Linear(hidden, 2 * ffn, bias=False)
        e.down_proj = nn.Linear(ffn, hidden, bias=False)
        model.experts.append(e)
    return model


def build(name: str, experts: int, hidden: int, ffn: int):
    model = make_model("split" if name == "sn_split" else "fused", experts, hidden, ffn)
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), foreach=True)
    else:
        opt = SpectralNewton.from_model(model, distributed=False)
        if name == "sn_fused_one_matrix":
            for g in opt.param_groups:
                g["batch_dims"] = 0
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    opt.step()  # state built outside the timing
    return opt


def run(experts: int, hidden: int, ffn: int, repeats: int) -> dict[str, float]:
    """name -> median seconds of one optimizer step."""
    opts = {n: build(n, experts, hidden, ffn) for n in OPTIMIZERS}
    times: dict[str, list[float]] = {n: [] for n in opts}
    for _ in range(repeats):
        for n, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def table(med: dict[str, float], experts: int, hidden: int, ffn: int) -> str:
    rows = [
        f"MoE optimizer step, {experts} experts, gate_up ({experts}, {2 * ffn}, {hidden}), down ({experts}, "
        f"{hidden}, {ffn}), CPU {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        "| optimizer | ms | / adamw | / sn_split |",
        "|---|---|---|---|",
    ]
    for n, s in med.items():
        rows.append(f"| {n} | {s * 1e3:.1f} | {s / med['adamw']:.2f}x | {s / med['sn_split']:.2f}x |")
    return "\n".join(rows)


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="4 experts, 32 x 48, 1 repeat: a smoke run")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.experts, a.hidden, a.ffn, a.repeats = 4, 32, 48, 1
    med = run(a.experts, a.hidden, a.ffn, a.repeats)
    print(table(med, a.experts, a.hidden, a.ffn))
    return med


if __name__ == "__main__":
    main()
