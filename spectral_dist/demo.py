"""A small, fully offline comparison of SpectralNewton and AdamW on scikit-learn's digits (8x8 images).

    python -m spectral_dist.demo [--steps 300] [--seeds 2]

Trains the same small CNN with each optimizer from the same initialisation and data order, prints test
accuracy as it goes and a final table. Takes about a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from .models import tiny_cnn
from .optim import SpectralNewton


def load_digits_tensors(seed: int = 0):
    """Digits as (N, 1, 8, 8) float tensors scaled to [0, 1], split 80/20 with a fixed permutation."""
    from ._extras import require

    require("sklearn", extra="recipes", feature="spectral_dist.demo (scikit-learn's digits)")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(y))
    return (x[:n], y[:n]), (x[n:], y[n:])


def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(optimizer: str, lr: float, steps: int, seed: int, batch_size: int = 64, log_every: int = 100):
    (xtr, ytr), (xte, yte) = load_digits_tensors()
    torch.manual_seed(seed)
    model = tiny_cnn(in_ch=1, width=16, num_classes=10, image_size=8)
    if optimizer == "spectral_newton":
        opt = SpectralNewton.from_model(model, lr=lr, weight_decay=0.01, adamw_weight_decay=0.01)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    else:
        raise ValueError(f"optimizer must be 'spectral_newton' or 'adamw', got {optimizer!r}")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(ytr), (batch_size,), generator=g)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            acc = _accuracy(model, xte, yte)
            curve.append((step, acc))
            print(
                f"  {optimizer:16s} seed {seed} step {step:4d} loss {loss.item():.3f} test acc {acc:.3f}",
                flush=True,
            )
    return curve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--sn_lr", type=float, default=1e-2)
    ap.add_argument("--adamw_lr", type=float, default=1e-2)
    a = ap.parse_args(argv)
    results = {}
    for name, lr in (("spectral_newton", a.sn_lr), ("adamw", a.adamw_lr)):
        t0 = time.perf_counter()
        finals = [train(name, lr, a.steps, seed)[-1][1] for seed in range(a.seeds)]
        results[name] = (finals, time.perf_counter() - t0)
    print("\n| optimizer | lr | final test accuracy (mean ± sd over seeds) | wall time (s) |")
    print("|---|---|---|---|")
    for name, (finals, secs) in results.items():
        lr = a.sn_lr if name == "spectral_newton" else a.adamw_lr
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        print(f"| {name} | {lr:g} | {statistics.mean(finals):.3f} ± {sd:.3f} | {secs:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
