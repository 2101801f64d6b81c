"""Step time of SpectralNewton (each basis method) against torch.optim.AdamW (foreach) and torch.optim.Muon.

Two measurements, each side by side in one run with the optimizers interleaved round-robin so that machine
noise hits all of them alike; every number is reported as a ratio to AdamW (median over repeats):

1. optimizer step only, on transformer-shaped matrix sets (per layer: 4 x d*d attention, d*4d and 4d*d MLP);
2. a full training step (forward, backward, optimizer) of a residual MLP/attention-shaped stack on a token
   batch, where the optimizer's share is what a user pays.

It also reports optimizer-state bytes per parameter byte. Results go to stdout and, with --write, to
benchmarks/RESULTS.md under a section naming the machine and date.

    python benchmarks/optimizer_step.py            # the shapes of the issue (d=768, 12 layers)
    python benchmarks/optimizer_step.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spectral_dist import SpectralNewton  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matrix_set(d: int, layers: int, device, dtype=torch.float32) -> list[nn.Parameter]:
    shapes = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]
    g = torch.Generator(device="cpu").manual_seed(0)
    return [
        nn.Parameter((torch.randn(*s, generator=g) / s[1] ** 0.5).to(device, dtype))
        for _ in range(layers)
        for s in shapes
    ]


class Block(nn.Module):
    """Attention-shaped (4 d x d, no softmax: the optimizer does not care) plus an MLP, residual."""

    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.o(torch.tanh(self.q(h)) * self.k(h) + self.v(h))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


def make_optimizers(params_fn, rank: int, refresh: int, include=None):
    """name -> factory(params) for every optimizer in the comparison."""
    sn = dict(lr=1e-3, alpha=1.0)
    facts = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "muon": lambda ps: torch.optim.Muon([p for p in ps if p.ndim == 2], lr=1e-3),
        "sn_svd": lambda ps: SpectralNewton(ps, basis="svd", **sn),
        "sn_gram": lambda ps: SpectralNewton(ps, basis="gram", **sn),
        "sn_newton_schulz": lambda ps: SpectralNewton(ps, basis="newton_schulz", **sn),
        f"sn_tracked_r{rank}_k{refresh}": lambda ps: SpectralNewton(
            ps, basis="tracked", rank=rank, refresh_every=refresh, **sn
        ),
    }
    if include:
        facts = {k: v for k, v in facts.items() if k == "adamw" or any(k.startswith(i) for i in include)}
    return facts


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in _tensors(st))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def bench_optimizer_step(d, layers, repeats, device, rank, refresh, include):
    facts = make_optimizers(None, rank, refresh, include)
    runs = {}
    for name, fact in facts.items():
        ps = matrix_set(d, layers, device)
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-2
        opt = fact(ps)
        for _ in range(2):  # warm-up; also lets a tracked basis exist so we time the steady state
            opt.step()
        runs[name] = (ps, opt, [])
    n_param_bytes = sum(p.numel() * p.element_size() for p in runs["adamw"][0])
    # refresh-period-aligned repeats: a tracked basis refreshes once in every `refresh` steps
    steps_per_rep = max(1, refresh)
    for _ in range(repeats):
        for _name, (_ps, opt, times) in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_rep):
                opt.step()
            _sync(device)
            times.append((time.perf_counter() - t0) / steps_per_rep)
    med = {k: statistics.median(v[2]) for k, v in runs.items()}
    mem = {k: state_bytes(v[1]) / n_param_bytes for k, v in runs.items()}
    return med, mem


def bench_full_step(d, layers, tokens, repeats, device, rank, refresh, include):
    facts = make_optimizers(None, rank, refresh, include)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(tokens, d, generator=g).to(device)
    runs = {}
    for name, fact in facts.items():
        torch.manual_seed(0)
        model = nn.Sequential(*[Block(d) for _ in range(layers)]).to(device)
        if name == "muon":  # Muon takes matrices only; the LayerNorms get AdamW beside it, as users do
            opts = [
                fact(list(model.parameters())),
                torch.optim.AdamW([p for p in model.parameters() if p.ndim < 2]),
            ]
        else:
            opts = [fact(list(model.parameters()))]
        runs[name] = (model, opts, [])

    def step(model, opts):
        for o in opts:
            o.zero_grad()
        model(x).pow(2).mean().backward()
        for o in opts:
            o.step()

    for model, opts, _ in runs.values():
        for _ in range(2):
            step(model, opts)
    for _ in range(repeats):
        for model, opts, times in runs.values():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(max(1, refresh)):
                step(model, opts)
            _sync(device)
            times.append((time.perf_counter() - t0) / max(1, refresh))
    return {k: statistics.median(v[2]) for k, v in runs.items()}


def machine(device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    import os

    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12, help="layers in the optimizer-only matrix set")
    ap.add_argument("--full_layers", type=int, default=2, help="layers in the full-training-step model")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per full training step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--refresh", type=int, default=10)
    ap.add_argument(
        "--only", nargs="*", default=None, help="subset of optimizer name prefixes (adamw always runs)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes (d=128, 2 layers)")
    ap.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS.md")
    a = ap.parse_args(argv)
    if a.quick:
        a.d, a.layers, a.full_layers, a.tokens, a.repeats, a.rank = 128, 2, 1, 256, 2, 16
    device = torch.device(a.device)
    torch.manual_seed(0)
    med, mem = bench_optimizer_step(a.d, a.layers, a.repeats, device, a.rank, a.refresh, a.only)
    full = bench_full_step(a.d, a.full_layers, a.tokens, a.repeats, device, a.rank, a.refresh, a.only)
    lines = [
        f"### {datetime.date.today()} — {machine(device)}, torch {torch.__version__}",
        "",
        f"Optimizer step on {a.layers} layers x (4 x {a.d}x{a.d}, {4 * a.d}x{a.d}, {a.d}x{4 * a.d}); full training step "
        f"on {a.full_layers} residual blocks of the same shapes with {a.tokens} tokens. Median of {a.repeats} repeats of "
        f"{a.refresh} steps (one tracked refresh period), interleaved.",
        "",
        "| optimizer | optimizer step (s) | ratio to AdamW | full step (s) | ratio to AdamW | state bytes / param byte |",
        "|---|---|---|---|---|---|",
    ]
    for k in med:
        lines.append(
            f"| {k} | {med[k]:.4f} | {med[k] / med['adamw']:.2f}x | {full[k]:.4f} | {full[k] / full['adamw']:.2f}x | {mem[k]:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write:
        path = Path(__file__).with_name("RESULTS.md")
        with path.open("a") as f:
            f.write("\n" + text)
        print(f"appended to {path}")
    return med, full, mem


if __name__ == "__main__":
    main()
