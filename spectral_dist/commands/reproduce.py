"""``spectral-dist reproduce``: train and probe five architectures on offline data; print the paper's table.

Writes into ``--output_dir``: ``layers.csv`` (one row per probed layer and checkpoint), ``summary.csv``,
``table.md`` and the plots ``alpha_by_type.png``, ``transfer.png``, ``participation.png``, ``alignment.png``.
"""

from __future__ import annotations

import argparse

from . import require_positive

NAME = "reproduce"
HELP = (
    "Reproduce the curvature table (alpha by layer type, s vs alpha*gamma, participation ratio, K-FAC alpha) "
    "on MLP/CNN/ResNet/ViT/GPT trained on digits, breast cancer and stdlib bytes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..reproduce import ARCHITECTURES

    parser.add_argument("--quick", action="store_true", help="small models, one probe each (< 5 min on CPU)")
    parser.add_argument("--archs", nargs="*", choices=ARCHITECTURES, default=None, help="default: all")
    parser.add_argument("--steps", type=int, default=None, help="training steps per architecture")
    parser.add_argument(
        "--checkpoints",
        type=float,
        nargs="*",
        default=None,
        help="fractions of training at which to probe (default: 1/3 2/3 1; --quick: 1)",
    )
    parser.add_argument("--top_k", type=int, default=None, help="singular directions per layer")
    parser.add_argument(
        "--width", type=int, default=None, help="model size multiplier (default 1; 2: wider, deeper)"
    )
    parser.add_argument("--hvp", choices=("autograd", "func", "fd"), default="autograd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--no_plots", action="store_true")
    parser.add_argument("--output_dir", default="outputs/reproduce")


def setting_from_args(args: argparse.Namespace):
    from ..reproduce import ARCHITECTURES, Setting

    kw = dict(hvp=args.hvp, seed=args.seed, archs=tuple(args.archs or ARCHITECTURES))
    require_positive(args, "steps", "top_k", "width")
    kw.update({n: getattr(args, n) for n in ("steps", "top_k", "width") if getattr(args, n) is not None})
    if args.checkpoints is not None:
        if not args.checkpoints or not all(0 < c <= 1 for c in args.checkpoints):
            raise ValueError(f"--checkpoints must be fractions in (0, 1], got {args.checkpoints}")
        kw["checkpoints"] = tuple(args.checkpoints)
    return Setting.quick(**kw) if args.quick else Setting(**kw)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..reproduce import format_table, reference_checks, run_reproduction, write_outputs

    setting = setting_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, summary = run_reproduction(setting)
    written = write_outputs(rows, summary, args.output_dir, plots=not args.no_plots)
    print(format_table(summary))
    print()
    for line in reference_checks(summary):
        print(f"- {line}")
    print(f"\nreproduce took {summary['seconds']:.0f} s; wrote {', '.join(str(p) for p in written)}")
    return 0
