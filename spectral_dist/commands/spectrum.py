"""``spectral-dist spectrum``: Hessian spectrum of a built-in tiny model, per weight block and whole model.

Writes ``spectrum.json`` (eigenvalues, measured residuals, traces, densities, HVP counts),
``eigenvalues.png`` (|lambda_k| against k on log-log axes per block: the decay the paper's exponent s
describes) and, with ``--density``, ``density.png`` into ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from . import require_positive

NAME = "spectrum"
HELP = "Hessian spectrum (top eigenvalues, trace, density) of a built-in tiny model on a fixed batch."

MODELS = ("mlp", "cnn", "vit", "gpt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="mlp", help="built-in tiny model")
    parser.add_argument("--top_k", type=int, default=8, help="eigenpairs per block")
    parser.add_argument("--hvp", choices=("autograd", "func", "fd"), default="autograd", help="HVP backend")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval", help="module mode while probing")
    parser.add_argument("--method", choices=("auto", "lanczos", "power"), default="auto")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative residual target")
    parser.add_argument("--layers", nargs="*", default=None, help="parameter or module names (default: all)")
    parser.add_argument("--no_model", action="store_true", help="skip the whole-model Hessian")
    parser.add_argument("--no_trace", action="store_true", help="skip the trace estimate")
    parser.add_argument("--trace_matvecs", type=int, default=48, help="HVPs for Hutch++")
    parser.add_argument("--density", action="store_true", help="also estimate spectral densities (SLQ)")
    parser.add_argument("--density_probes", type=int, default=4)
    parser.add_argument("--density_steps", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0, help="model init, batch and probe vectors")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1)")
    parser.add_argument("--output_dir", default="outputs/spectrum")


def build(name: str, batch_size: int, seed: int, dtype: torch.dtype):
    """``(model, loss_fn, batch)`` for a built-in tiny model (see :func:`spectral_dist.models.builtin_task`)."""
    from ..models import builtin_task

    return builtin_task(name, batch_size, seed, dtype)


def plot_eigenvalues(result, path: Path, title: str = "") -> None:
    """|lambda_k| against k on log-log axes, one line per block (hollow markers: negative eigenvalues)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = dict(result.layers)
    if result.model is not None:
        blocks["model (all parameters)"] = result.model
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, b in blocks.items():
        ev = b.eigenvalues.double()
        k = torch.arange(1, ev.numel() + 1)
        mag = ev.abs().clamp_min(1e-300)
        style = "k-" if name.startswith("model") else "-"
        (line,) = ax.loglog(
            k.numpy(), mag.numpy(), style, lw=2 if name.startswith("model") else 1, label=name
        )
        neg = ev < 0
        if neg.any():
            ax.loglog(k[neg].numpy(), mag[neg].numpy(), "o", mfc="none", color=line.get_color(), ms=4)
    ax.set_xlabel("k")
    ax.set_ylabel("|lambda_k| (hollow: lambda_k < 0)")
    ax.set_title(title or "Hessian eigenvalue decay per weight block", fontsize=9)
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_densities(result, path: Path, title: str = "") -> None:
    """SLQ densities (log scale, floored at 1e-6 of the peak) of each block, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = {n: b for n, b in result.layers.items() if b.density is not None}
    if result.model is not None and result.model.density is not None:
        blocks["model (all parameters)"] = result.model
    if not blocks:
        raise ValueError("no densities to plot: measure(..., density=True)")
    cols = min(4, len(blocks))
    rows = math.ceil(len(blocks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax, (name, b) in zip(axes.flat, blocks.items()):
        d = b.density
        vals = d.values.clamp_min(1e-6 * float(d.values.max()))
        ax.semilogy(d.grid.numpy(), vals.numpy(), lw=1)
        ax.set_title(name, fontsize=6)
        ax.set_xlabel("lambda", fontsize=6)
        ax.tick_params(labelsize=5)
    for ax in list(axes.flat)[len(blocks) :]:
        ax.axis("off")
    fig.suptitle(title or "Hessian spectral density (SLQ, Gaussian-broadened)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from ..probes.spectrum import HessianSpectrum

    require_positive(args, "top_k", "threads")
    torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model, loss, batch = build(args.model, args.batch_size, args.seed, dtype)
    spec = HessianSpectrum(
        model,
        loss,
        layers=args.layers,
        hvp=args.hvp,
        mode=args.mode,
        method=args.method,
        tol=args.tol,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    res = spec.measure(
        batch,
        top_k=args.top_k,
        trace=not args.no_trace,
        density=args.density,
        include_model=not args.no_model,
        trace_matvecs=args.trace_matvecs,
        density_probes=args.density_probes,
        density_steps=args.density_steps,
    )
    seconds = time.perf_counter() - t0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "seconds": seconds}
    summary.update(res.to_dict())
    summary["num_hvps"] = res.num_hvps
    (out / "spectrum.json").write_text(json.dumps(summary, indent=1))
    title = f"{args.model}: top {args.top_k} Hessian eigenvalues ({args.hvp}, {args.mode})"
    plot_eigenvalues(res, out / "eigenvalues.png", title)
    if args.density:
        plot_densities(res, out / "density.png", f"{args.model}: Hessian spectral density (SLQ)")
    blocks = list(res.layers.values()) + ([res.model] if res.model is not None else [])
    print(
        f"{'block':48s} {'dim':>7s} {'lambda_1':>11s} {'lambda_k':>11s} {'max rel res':>11s} {'trace':>11s} hvps"
    )
    for b in blocks:
        tr = "-" if b.trace is None else f"{b.trace:.4g}"
        print(
            f"{b.name[:48]:48s} {b.dim:7d} {float(b.eigenvalues[0]):11.4g} {float(b.eigenvalues[-1]):11.4g} "
            f"{float(b.relative_residuals.max()):11.2e} {tr:>11s} {b.num_hvps}"
        )
    print(
        f"{res.num_hvps} HVPs in {seconds:.1f} s; wrote {out}/spectrum.json, eigenvalues.png"
        + (", density.png" if args.density else "")
    )
    return 0
