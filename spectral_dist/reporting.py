"""Turn finished runs into comparison tables and plots (no W&B API needed).

A run is a folder with the recipes' ``metrics.jsonl`` (and ``config.json``): the project's own record of
every logged metric (W&B's offline run files are W&B's private format and are not read). :func:`load_runs`
finds runs under any number of paths; :func:`per_run` gives each run's best and final value of a metric and the first step at which it
reached a target; :func:`compare` aggregates over seeds (mean, std, min, max) per recipe, optimizer and
learning rate, and :func:`best_per_optimizer` picks each optimizer's best learning rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ._extras import require

require("pandas", "matplotlib", extra="report", feature="spectral_dist.reporting (spectral-dist report)")

import pandas as pd  # noqa: E402

from .logging.jsonl import read_jsonl  # noqa: E402

__all__ = [
    "Run",
    "load_runs",
    "metric_mode",
    "per_run",
    "compare",
    "best_per_optimizer",
    "to_markdown",
    "plot_curves",
    "plot_best",
    "build_report",
]

LOWER_IS_BETTER = ("loss", "ppl", "bpb", "err", "perplexity")


@dataclass
class Run:
    """One finished (or partial) run: its config and a history DataFrame indexed by row, with a step column."""

    name: str
    path: Path
    config: dict
    history: pd.DataFrame
    source: str  # "jsonl"
    summary: dict = field(default_factory=dict)

    @property
    def recipe(self) -> str:
        return str(self.config.get("recipe", "?"))

    @property
    def optimizer(self) -> str:
        return str(self.config.get("optimizer", "?"))

    @property
    def lr(self):
        return self.config.get("lr")

    @property
    def seed(self):
        return self.config.get("seed")


def _from_jsonl(folder: Path) -> Run:
    records = read_jsonl(folder / "metrics.jsonl")
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    rows = [r for r in records if r.get("step") is not None and not r.get("summary") and "images" not in r]
    summary = {}
    for r in records:
        if r.get("summary"):
            summary.update({k: v for k, v in r.items() if k not in ("summary", "step", "time")})
    hist = pd.DataFrame(rows)
    if not hist.empty:
        hist = hist.drop(columns=["time"], errors="ignore")
        hist = hist.groupby("step", as_index=False).last()  # one row per step (resumed runs repeat steps)
    return Run(config.get("run_name") or folder.name, folder, config, hist, "jsonl", summary)


def load_runs(paths) -> list[Run]:
    """All runs under ``paths``: run folders (a recipe's ``output_dir``) or folders of runs."""
    runs = []
    for p in [Path(x) for x in ([paths] if isinstance(paths, (str, Path)) else paths)]:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such run folder")
        for d in sorted({f.parent for f in p.rglob("metrics.jsonl")}):
            runs.append(_from_jsonl(d))
    if not runs:
        raise FileNotFoundError(f"no runs (metrics.jsonl) under {[str(p) for p in paths]}")
    return runs


def metric_mode(metric: str) -> str:
    """``"min"`` for losses, perplexities and error rates, ``"max"`` otherwise."""
    return "min" if any(t in metric.lower() for t in LOWER_IS_BETTER) else "max"


def per_run(runs: list[Run], metric: str, target: float | None = None, mode: str = "auto") -> pd.DataFrame:
    """One row per run: recipe, optimizer, lr, seed, best, final, best_step; with a ``target``, also
    steps_to_target (the first step at which the metric reached it, or empty)."""
    mode = metric_mode(metric) if mode == "auto" else mode
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be min, max or auto, got {mode!r}")
    rows = []
    for r in runs:
        h = r.history
        if h.empty or metric not in h.columns:
            continue
        s = h[["step", metric]].dropna()
        s = s[pd.to_numeric(s[metric], errors="coerce").notna()]
        if s.empty:
            continue
        vals = s[metric].astype(float)
        i = vals.idxmin() if mode == "min" else vals.idxmax()
        reached = None
        if target is not None:
            hit = s[(vals <= target) if mode == "min" else (vals >= target)]
            reached = int(hit["step"].iloc[0]) if not hit.empty else None
        rows.append(
            dict(
                run=r.name,
                recipe=r.recipe,
                optimizer=r.optimizer,
                lr=r.lr,
                seed=r.seed,
                best=float(vals[i]),
                best_step=int(s.loc[i, "step"]),
                final=float(vals.iloc[-1]),
                final_step=int(s["step"].iloc[-1]),
                **({"steps_to_target": reached} if target is not None else {}),
                path=str(r.path),
            )
        )
    if not rows:
        raise ValueError(f"no run logged the metric {metric!r}")
    return pd.DataFrame(rows)


def compare(table: pd.DataFrame, by=("recipe", "optimizer", "lr")) -> pd.DataFrame:
    """Mean, std, min and max over seeds of best and final; with a target (``steps_to_target`` not all
    empty), steps to target: mean over the seeds that reached it, and how many did."""
    by = [b for b in by if b in table.columns]
    t = table.copy()
    t["lr"] = t["lr"].astype(str) if "lr" in t else t.get("lr")
    g = t.groupby(by, dropna=False)
    aggs = dict(
        seeds=("best", "size"),
        best_mean=("best", "mean"),
        best_std=("best", "std"),
        best_min=("best", "min"),
        best_max=("best", "max"),
        final_mean=("final", "mean"),
        final_std=("final", "std"),
    )
    if "steps_to_target" in t:  # only with a target: without one nothing is "reached"
        aggs.update(
            steps_to_target=("steps_to_target", lambda s: s.dropna().mean() if s.notna().any() else math.nan),
            reached=("steps_to_target", lambda s: int(s.notna().sum())),
        )
    out = g.agg(**aggs).reset_index()
    out["best_std"] = out["best_std"].fillna(0.0)
    out["final_std"] = out["final_std"].fillna(0.0)
    return out


def best_per_optimizer(summary: pd.DataFrame, mode: str) -> pd.DataFrame:
    """For each (recipe, optimizer) the learning rate with the best mean ``best``."""
    keys = [k for k in ("recipe", "optimizer") if k in summary.columns]
    idx = (
        summary.groupby(keys)["best_mean"].idxmin()
        if mode == "min"
        else summary.groupby(keys)["best_mean"].idxmax()
    )
    return summary.loc[idx.values].reset_index(drop=True)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no tabulate dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[Run], metric: str, path: Path, title: str = "") -> Path:
    """``metric`` against step: one line per (optimizer, lr), the mean over seeds with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict = {}
    for r in runs:
        if r.history.empty or metric not in r.history.columns:
            continue
        s = r.history[["step", metric]].dropna().set_index("step")[metric].astype(float)
        groups.setdefault((r.optimizer, str(r.lr)), []).append(s)
    if not groups:
        plt.close(fig)
        raise ValueError(f"no run logged the metric {metric!r}")
    banded = False
    for (opt, lr), series in sorted(groups.items()):
        df = pd.concat(series, axis=1).sort_index()
        mean = df.mean(axis=1)
        ax.plot(mean.index, mean.values, label=f"{opt} lr={lr} (n={df.shape[1]} seeds)")
        if df.shape[1] > 1:
            ax.fill_between(df.index, df.min(axis=1), df.max(axis=1), alpha=0.2)
            banded = True
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    how = "lines: mean over seeds; bands: min-max over seeds" if banded else "one seed per line"
    ax.set_title(f"{title or metric}\n({how})", fontsize=11)
    ax.legend(fontsize=9)
    return _save_figure(fig, path)


def _save_figure(fig, path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_best(summary: pd.DataFrame, metric: str, path: Path) -> Path:
    """Bar chart of the best value per optimizer (its best learning rate): the mean over seeds, with error
    bars of one standard deviation over seeds (labelled on the chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r.recipe}\n{r.optimizer}" if "recipe" in summary else r.optimizer for r in summary.itertuples()
    ]
    labels = [f"{lab}\nn={int(n)}" for lab, n in zip(labels, summary["seeds"])]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(labels)), 5))
    ax.bar(range(len(labels)), summary["best_mean"], yerr=summary["best_std"], capsize=6)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=10)
    ax.set_ylabel(f"best {metric}: mean over seeds", fontsize=11)
    ax.set_title(
        f"best {metric} at each optimizer's best learning rate\nerror bars: ±1 standard deviation over the n seeds",
        fontsize=11,
    )
    return _save_figure(fig, path)


def build_report(paths, metric: str, out_dir, target: float | None = None, mode: str = "auto") -> dict:
    """Load runs, write ``runs.csv``, ``summary.csv``, ``report.md`` and PNG plots to ``out_dir``.

    Returns {"runs": DataFrame, "summary": DataFrame, "best": DataFrame, "markdown": str, "plots": [paths]}.
    """
    runs = load_runs(paths)
    mode = metric_mode(metric) if mode == "auto" else mode
    table = per_run(runs, metric, target, mode)
    summary = compare(table)
    best = best_per_optimizer(summary, mode)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    plots = []
    safe = metric.replace("/", "_")
    for recipe in sorted(table["recipe"].unique()):
        rr = [r for r in runs if r.recipe == recipe]
        plots.append(
            plot_curves(rr, metric, out / f"{recipe}_{safe}_curves.png", title=f"{recipe}: {metric}")
        )
    plots.append(plot_best(best, metric, out / f"best_{safe}.png"))
    tgt = f", steps to {metric} {'<=' if mode == 'min' else '>='} {target}" if target is not None else ""
    md = "\n\n".join(
        [
            f"# Optimizer comparison: {metric} ({'lower' if mode == 'min' else 'higher'} is better{tgt})",
            f"{len(table)} runs from {len({str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)})} "
            "path(s).",
            "## Best learning rate per optimizer (mean and std over seeds; the plot's error bars: ±1 std)",
            to_markdown(best[[c for c in best.columns if c not in ("final_std",)]]),
            "## All settings",
            to_markdown(summary),
            "## Runs",
            to_markdown(table.drop(columns=["path"])),
            "## Plots",
            "\n".join(f"![{p.stem}]({p.name})" for p in plots),
        ]
    )
    (out / "report.md").write_text(md + "\n")
    return {"runs": table, "summary": summary, "best": best, "markdown": md, "plots": plots}
