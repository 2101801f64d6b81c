"""Full training-step overhead (forward, backward, optimizer) of SpectralNewton against AdamW and Muon.

Models are the small ViT and GPT of :mod:`spectral_dist.models` at realistic small sizes (ViT: 32x32 images,
patch 4, width 192, 6 layers; GPT: width 256, 4 layers, 128 tokens). SpectralNewton uses alpha by layer
(``from_model``) with each basis method (``svd``, ``gram``, ``tracked``; ``newton_schulz`` computes the polar
factor, so it runs with alpha = 1 everywhere). Muon is torch.optim.Muon on the 2-D hidden matrices with AdamW
on the rest. All optimizers are timed side by side in one process, interleaved round-robin, and reported as
the median step time and its ratio to AdamW, plus optimizer-state bytes per parameter byte.

    python benchmarks/step_overhead.py [--write]     # default sizes (about 2-4 min on an idle 2-core CPU)
    python benchmarks/step_overhead.py --quick       # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from recipes.common.optim import MuonWithAdamW  # noqa: E402
from spectral_dist import models  # noqa: E402
from spectral_dist.optim import SpectralNewton  # noqa: E402
from spectral_dist.optim.classify import classify_parameters  # noqa: E402

OPTIMIZERS = ("adamw", "muon", "sn_svd", "sn_gram", "sn_tracked", "sn_newton_schulz")
SIZES = {
    "default": dict(
        vit=dict(image_size=32, patch_size=4, hidden=192, layers=6, heads=3, batch=32),
        gpt=dict(n_embd=256, n_layer=4, n_head=4, seq=128, batch=8),
    ),
    "quick": dict(
        vit=dict(image_size=8, patch_size=4, hidden=16, layers=1, heads=2, batch=4),
        gpt=dict(n_embd=16, n_layer=1, n_head=2, seq=8, batch=2),
    ),
}


def make_model_and_batch(name: str, size: dict):
    """(model, loss_fn, batch) for ``vit`` or ``gpt`` at the given size (sdpa attention)."""
    torch.manual_seed(0)
    if name == "vit":
        s = size
        model = models.tiny_vit(
            image_size=s["image_size"],
            patch_size=s["patch_size"],
            hidden=s["hidden"],
            layers=s["layers"],
            heads=s["heads"],
            attn_implementation="sdpa",
        )
        batch = models.image_batch(s["batch"], channels=3, size=s["image_size"], num_classes=10)
        return model, models.classification_loss, batch
    if name == "gpt":
        s = size
        model = models.tiny_gpt(
            n_positions=s["seq"],
            n_embd=s["n_embd"],
            n_layer=s["n_layer"],
            n_head=s["n_head"],
            attn_implementation="sdpa",
        )
        return model, models.lm_loss, models.token_batch(s["batch"], s["seq"], 256)
    raise ValueError(f"unknown model {name!r} (vit, gpt)")


def build_optimizer(name: str, model, lr: float = 1e-3, rank: int = 32, refresh: int = 10):
    """adamw | muon | sn_svd | sn_gram | sn_tracked | sn_newton_schulz."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
    if name == "muon":
        infos = classify_parameters(model)
        hidden = [i.param for i in infos if i.spectral and i.param.ndim == 2]
        ids = {id(p) for p in hidden}
        rest = [i.param for i in infos if id(i.param) not in ids]
        return MuonWithAdamW(
            [{"params": hidden}],
            [{"params": rest}],
            muon_kwargs=dict(lr=lr, adjust_lr_fn="match_rms_adamw"),
            adamw_kwargs=dict(lr=lr, foreach=True),
        )
    if name.startswith("sn_"):
        basis = name[3:]
        kw = dict(rank=rank, refresh_every=refresh) if basis == "tracked" else {}
        alpha = 1.0 if basis == "newton_schulz" else "by_layer"
        return SpectralNewton.from_model(model, alpha=alpha, lr=lr, basis=basis, **kw)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def state_bytes(opt) -> int:
    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in tensors(st))


def bench_model(name: str, size: dict, optimizers, repeats: int, refresh: int, rank: int) -> dict:
    """name -> dict(seconds (median full step), ratio to AdamW, state bytes per param byte, params)."""
    runs = {}
    for o in optimizers:
        model, loss_fn, batch = make_model_and_batch(name, size)
        runs[o] = (model, loss_fn, batch, build_optimizer(o, model, rank=rank, refresh=refresh), [])

    def step(model, loss_fn, batch, opt):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()

    for model, loss_fn, batch, opt, _ in runs.values():  # warm-up: allocations, a tracked basis
        for _ in range(2):
            step(model, loss_fn, batch, opt)
    per_rep = max(1, refresh)
    for _ in range(repeats):
        for model, loss_fn, batch, opt, times in runs.values():
            t0 = time.perf_counter()
            for _ in range(per_rep):
                step(model, loss_fn, batch, opt)
            times.append((time.perf_counter() - t0) / per_rep)
    out = {}
    for o, (model, _, _, opt, times) in runs.items():
        pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        out[o] = dict(
            seconds=statistics.median(times),
            state_per_param_byte=state_bytes(opt) / pbytes,
            params=sum(p.numel() for p in model.parameters()),
        )
    base = out["adamw"]["seconds"]
    for d in out.values():
        d["ratio"] = d["seconds"] / base
    return out


def machine() -> str:
    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )


def format_results(res: dict, sizes: dict, repeats: int, refresh: int, rank: int) -> str:
    lines = [
        f"Full training step (forward, backward, optimizer), median of {repeats} interleaved repeats of {refresh} "
        f"steps; tracked basis rank {rank}, refresh every {refresh}. Load average at start: {os.getloadavg()[0]:.1f}.",
        "",
    ]
    for m, r in res.items():
        n = next(iter(r.values()))["params"]
        lines += [
            f"**{m}** {sizes[m]} ({n / 1e6:.2f} M parameters)",
            "",
            "| optimizer | step (ms) | ratio to AdamW | state bytes / param byte |",
            "|---|---|---|---|",
        ]
        for o, d in r.items():
            lines.append(
                f"| {o} | {1000 * d['seconds']:.1f} | {d['ratio']:.2f}x | {d['state_per_param_byte']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["vit", "gpt"], choices=["vit", "gpt"])
    ap.add_argument("--only", nargs="*", default=None, help="optimizer subset (adamw always runs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--refresh", type=int, default=5, help="tracked refresh period = steps per repeat")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny models, 2 repeats: a smoke run in seconds")
    ap.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS.md")
    a = ap.parse_args(argv)
    if a.threads or a.quick:  # tiny models: one thread avoids thread thrash on a busy machine
        torch.set_num_threads(a.threads or 1)
    sizes = SIZES["quick" if a.quick else "default"]
    if a.quick:
        a.repeats, a.refresh, a.rank = 2, 2, 4
    opts = [o for o in OPTIMIZERS if o == "adamw" or a.only is None or o in a.only]
    res = {}
    for m in a.models:  # print each model's table as soon as it is measured
        res[m] = bench_model(m, sizes[m], opts, a.repeats, a.refresh, a.rank)
        print(format_results({m: res[m]}, {m: sizes[m]}, a.repeats, a.refresh, a.rank), flush=True)
    text = "\n".join(
        [
            f"### Step overhead — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}",
            "",
            f"`python benchmarks/step_overhead.py{' --quick' if a.quick else ''}`.",
            format_results(res, {m: sizes[m] for m in a.models}, a.repeats, a.refresh, a.rank),
        ]
    )
    print(text)
    if a.write:
        with Path(__file__).with_name("RESULTS.md").open("a") as f:
            f.write("\n" + text + "\n")
    return res


if __name__ == "__main__":
    main()
