"""``spectral-dist reproduce``: train and probe five architectures on offline data; print the paper's table.

Writes into ``--output_dir``: ``layers.csv`` (one transfer-test row per layer), ``alpha_training.csv`` (alpha
per layer at each probed step), ``summary.csv``, ``table.md`` and the plots ``transfer.png``,
``alpha_training.png``, ``alpha_by_type.png``, ``participation.png``, ``alignment.png``.
"""

from __future__ import annotations

import argparse

from . import require_positive

NAME = "reproduce"
HELP = (
    "Reproduce the curvature table (transfer identity s = alpha*gamma same-point and on independent batches, "
    "alpha by layer type and through training, participation ratio, K-FAC alpha) on MLP/CNN/ResNet/ViT/GPT "
    "trained on digits, breast cancer and stdlib bytes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..reproduce import ARCHITECTURES

    parser.add_argument(
        "--quick",
        action="store_true",
        help="width 1, 200 steps, alpha probed 4 times (< 5 min on 2 CPU cores)",
    )
    parser.add_argument("--archs", nargs="*", choices=ARCHITECTURES, default=None, help="default: all")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default 300)")
    parser.add_argument(
        "--checkpoints",
        type=float,
        nargs="*",
        default=None,
        help="fractions of training (0: initialisation) at which alpha is probed on batch A "
        "(default: 0 0.1 1/3 2/3 1; --quick: 0 0.1 0.5 1); the transfer test runs at the end",
    )
    parser.add_argument("--top_k", type=int, default=None, help="singular directions / eigenvalues per layer")
    parser.add_argument(
        "--fit_k",
        type=int,
        nargs=2,
        default=None,
        metavar=("K_LO", "K_HI"),
        help="the k (1-based, inclusive) every fit uses, in every mode (default: 1 top_k)",
    )
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=None,
        help="model size multipliers (default 1 2; --quick: 1); 2: twice as wide and deep",
    )
    parser.add_argument(
        "--probe_batch", type=int, default=None, help="samples in each probe batch A, B, C (default 128)"
    )
    parser.add_argument(
        "--same_point_only",
        action="store_true",
        help="skip the independent batches B and C (no Lanczos): the old, much faster, same-point table",
    )
    parser.add_argument("--hvp", choices=("autograd", "func", "fd"), default="autograd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine two threads per process stalled the probes "
        "for minutes; 0: leave torch's default)",
    )
    parser.add_argument("--no_plots", action="store_true")
    parser.add_argument("--output_dir", default="outputs/reproduce")


def setting_from_args(args: argparse.Namespace):
    from ..reproduce import ARCHITECTURES, Setting

    kw = dict(hvp=args.hvp, seed=args.seed, archs=tuple(args.archs or ARCHITECTURES))
    require_positive(args, "steps", "top_k", "probe_batch")
    kw.update(
        {n: getattr(args, n) for n in ("steps", "top_k", "probe_batch") if getattr(args, n) is not None}
    )
    if args.widths is not None:
        if not all(w >= 1 for w in args.widths):
            raise ValueError(f"--widths must be positive integers, got {args.widths}")
        kw["widths"] = tuple(dict.fromkeys(args.widths))
    if args.checkpoints is not None:
        if not args.checkpoints or not all(0 <= c <= 1 for c in args.checkpoints):
            raise ValueError(f"--checkpoints must be fractions in [0, 1], got {args.checkpoints}")
        kw["checkpoints"] = tuple(args.checkpoints)
    if args.fit_k is not None:
        lo, hi = args.fit_k
        if not 1 <= lo < hi:
            raise ValueError(f"--fit_k must be K_LO K_HI with 1 <= K_LO < K_HI, got {args.fit_k}")
        kw["fit_k"] = (lo, hi)
    kw["independent"] = not args.same_point_only
    return Setting.quick(**kw) if args.quick else Setting(**kw)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..reproduce import format_table, reference_checks, run_reproduction, write_outputs

    setting = setting_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, traj, summary = run_reproduction(setting)
    written = write_outputs(rows, traj, summary, args.output_dir, plots=not args.no_plots)
    print(format_table(summary))
    print()
    for line in reference_checks(summary):
        print(f"- {line}")
    print(
        f"\nreproduce took {summary['seconds']:.0f} s (load average {summary['load_start']:.1f} at the start, "
        f"{summary['load_end']:.1f} at the end); wrote {', '.join(str(p) for p in written)}"
    )
    return 0
