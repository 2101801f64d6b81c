"""``spectral-dist report``: comparison table and plots from finished runs (their ``metrics.jsonl`` logs)."""

from __future__ import annotations

import sys

NAME = "report"
HELP = "compare finished runs: best metric per optimizer, steps to a target, mean/spread over seeds, plots"


def add_arguments(p) -> None:
    p.add_argument(
        "paths", nargs="+", help="run folders (output_dir of a recipe) or folders holding many runs"
    )
    p.add_argument(
        "--metric", default=None, help="metric to compare (default: the runs' main_metric, e.g. val/acc)"
    )
    p.add_argument("--target", type=float, default=None, help="report the first step reaching this value")
    p.add_argument(
        "--mode",
        choices=("auto", "min", "max"),
        default="auto",
        help="auto: min for loss/ppl/bpb metrics, max otherwise",
    )
    p.add_argument(
        "--out", default="outputs/report", help="output folder (report.md, runs.csv, summary.csv, *.png)"
    )


def run(args) -> int:
    from ..reporting import build_report, load_runs

    metric = args.metric
    if metric is None:
        mains = {r.config.get("main_metric") for r in load_runs(args.paths)} - {None}
        if len(mains) != 1:
            print(f"error: runs have main metrics {sorted(mains)}; pass --metric", file=sys.stderr)
            return 2
        metric = mains.pop()
    try:
        rep = build_report(args.paths, metric, args.out, target=args.target, mode=args.mode)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rep["markdown"].split("## All settings")[0].strip())
    print(f"\nwrote {args.out}/report.md, runs.csv, summary.csv and {len(rep['plots'])} plots")
    return 0
