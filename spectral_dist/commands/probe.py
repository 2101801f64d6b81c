"""``spectral-dist probe``: curvature along gradient singular directions, per weight matrix.

Builds a tiny model (``--model``) or loads a checkpoint for the ``--model`` architecture, probes one
deterministic synthetic batch with :class:`CurvatureProbe`, prints the per-layer table and writes into
``--output_dir``: ``probe.csv``, ``probe.json``, ``curvature_loglog.png`` (log h_k against log sigma_k with
the fitted line, one panel per layer) and ``transfer.png`` (s against alpha * gamma over layers, with the
line s = alpha * gamma).

A checkpoint is read without running code from it: a ``.safetensors`` file, or a ``torch.save``'d state dict
(optionally under a ``"model"`` key) read with ``torch.load(weights_only=True)``. A ``torch.save``'d whole
module needs full unpickling, which runs whatever code the file names; it is refused unless
``--trust-checkpoint`` says the file is trusted.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import time
from pathlib import Path

import torch

from . import require_positive

NAME = "probe"
HELP = "Curvature exponents (alpha, gamma, s), K-FAC alignment and participation ratio of each weight matrix."

MODELS = ("mlp", "cnn", "resnet", "vit", "gpt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default=None, help="built-in tiny model (default: mlp)")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="state dict for the --model architecture: a .safetensors file, or a torch.save'd file read "
        "with torch.load(weights_only=True) (no code from the file runs); a torch.save'd whole module only "
        "with --trust-checkpoint",
    )
    parser.add_argument(
        "--trust-checkpoint",
        "--trust_checkpoint",
        dest="trust_checkpoint",
        action="store_true",
        help="unpickle --checkpoint fully (torch.load(weights_only=False)), e.g. a torch.save'd whole module. "
        "Unpickling runs any code the file names: only for files you wrote or whose author you trust",
    )
    parser.add_argument("--top_k", type=int, default=16, help="singular directions per layer")
    parser.add_argument("--hvp", choices=("autograd", "func", "fd"), default="autograd", help="HVP backend")
    parser.add_argument("--estimator", choices=("per_layer", "all_layers"), default="per_layer")
    parser.add_argument("--samples", type=int, default=4, help="random-sign samples (all_layers)")
    parser.add_argument("--mode", choices=("eval", "train", "current"), default="eval")
    parser.add_argument("--kfac_b", choices=("empirical", "hessian"), default="empirical")
    parser.add_argument(
        "--h",
        choices=("rayleigh", "eigen"),
        default="rayleigh",
        help="h_k definition: curvature along u_k v_k^T (rayleigh) or the k-th eigenvalue of the layer's "
        "Hessian block (eigen; adds the overlap |<q_k, u_k v_k^T>|)",
    )
    parser.add_argument("--layers", nargs="*", default=None, help="parameter names (default: all matrices)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--seed", type=int, default=0, help="model init, batch and random signs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1)")
    parser.add_argument("--no_plots", action="store_true")
    parser.add_argument("--output_dir", default="outputs/probe")


def build(name: str, batch_size: int, seed: int, dtype: torch.dtype):
    """``(model, loss_fn, batch)`` for a built-in tiny model (see :func:`spectral_dist.models.builtin_task`)."""
    from ..models import builtin_task

    return builtin_task(name, batch_size, seed, dtype)


def _unsupported_global(err: Exception) -> str | None:
    """The Python global (``module.name``) that torch's weights-only unpickler refused, if it says so."""
    found = re.search(r"GLOBAL ([\w.]+)", re.sub(r"\x1b\[[0-9;]*m", "", str(err)))
    return found.group(1) if found else None


def read_checkpoint(path: Path, trust: bool = False):
    """What ``--checkpoint`` holds, read without running code from the file unless ``trust``.

    ``.safetensors``: a state dict of tensors (no code can be stored there). Anything else:
    ``torch.load(weights_only=True)``, which rebuilds tensors, numbers, strings and containers only. A file
    that needs more (a pickled whole module) raises ValueError naming ``--trust-checkpoint``; with ``trust``
    it is unpickled fully (``weights_only=False``), which runs whatever code the file names.
    """
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # a dependency of transformers, so normally present
            raise ValueError(
                f"--checkpoint {str(path)!r}: reading .safetensors needs `pip install safetensors`"
            ) from e
        return load_file(str(path), device="cpu")
    if trust:  # the user vouched for the file: full unpickling, code in the file runs
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = _unsupported_global(e)
        what = (
            f"it names the Python global {name}, which full unpickling would import and call"
            if name
            else "torch.load(weights_only=True) could not read it (not a state dict of tensors, or damaged)"
        )
        raise ValueError(
            f"--checkpoint {str(path)!r} refused: {what}. Full unpickling (needed e.g. for a torch.save'd "
            "whole nn.Module) runs whatever code the file names, so whoever wrote the file could run commands "
            "as you. If you trust the file (you wrote it, or you trust whoever did), pass --trust-checkpoint. "
            "Otherwise ask for a state dict: torch.save(model.state_dict(), 'model.pt') or "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."
        ) from None


def load_model(args, dtype):
    """The model (built, or loaded from ``--checkpoint``), its loss and batch (from ``--model``'s family)."""
    if args.checkpoint is None:
        model, loss, batch = build(args.model or "mlp", args.batch_size, args.seed, dtype)
        return model.to(dtype), loss, batch
    if args.model is None:
        raise ValueError("--checkpoint needs --model: its architecture family decides the batch and the loss")
    path = Path(args.checkpoint)
    if not path.is_file():
        raise ValueError(f"--checkpoint {str(path)!r} is not a file")
    model, loss, batch = build(args.model, args.batch_size, args.seed, dtype)
    obj = read_checkpoint(path, trust=getattr(args, "trust_checkpoint", False))
    if isinstance(obj, torch.nn.Module):
        return obj.to(dtype), loss, batch
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"--checkpoint holds a {type(obj).__name__}; expected a module or a state dict")
    model.load_state_dict(obj)
    return model.to(dtype), loss, batch


def plot_transfer(report, path: Path, title: str = "") -> None:
    """s (fitted from h_k against k) against alpha * gamma (fitted independently), one point per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [
        (lc.s_pred, lc.s, lc.layer_type)
        for lc in report.layers.values()
        if math.isfinite(lc.s) and math.isfinite(lc.s_pred)
    ]
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for t in sorted({p[2] for p in pts}):
        xs = [p[0] for p in pts if p[2] == t]
        ys = [p[1] for p in pts if p[2] == t]
        ax.plot(xs, ys, "o", label=t)
    if pts:
        lo = min(min(p[0], p[1]) for p in pts)
        hi = max(max(p[0], p[1]) for p in pts)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="s = alpha * gamma")
        ax.legend(fontsize=7)
    ax.set_xlabel("alpha * gamma")
    ax.set_ylabel("s")
    ax.set_title(title or "spectral transfer identity", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loglog(report, path: Path, title: str = "") -> None:
    from ..logging.plots import curvature_grid

    fig = curvature_grid(report.layers, max_panels=len(report.layers), title=title)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from ..probes import CurvatureProbe

    require_positive(args, "top_k", "samples", "batch_size", "threads")
    torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model, loss, batch = load_model(args, dtype)
    probe = CurvatureProbe(
        model,
        loss,
        top_k=args.top_k,
        hvp=args.hvp,
        layers=args.layers,
        mode=args.mode,
        estimator=args.estimator,
        samples=args.samples,
        kfac_b=args.kfac_b,
        seed=args.seed,
        h=args.h,
    )
    t0 = time.perf_counter()
    report = probe.measure(batch)
    seconds = time.perf_counter() - t0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.to_csv(out / "probe.csv")
    report.to_json(out / "probe.json")
    print(report.to_markdown())
    written = ["probe.csv", "probe.json"]
    if not args.no_plots:
        label = args.model or "checkpoint"
        plot_loglog(report, out / "curvature_loglog.png", f"{label}: h_k vs sigma_k ({args.hvp})")
        plot_transfer(report, out / "transfer.png", f"{label}: s vs alpha * gamma")
        written += ["curvature_loglog.png", "transfer.png"]
    print(f"probe took {seconds:.1f} s; wrote {', '.join(str(out / w) for w in written)}")
    return 0
