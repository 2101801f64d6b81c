"""Turn finished runs into comparison tables and plots (no W&B API needed).

A run is a folder with the recipes' ``metrics.jsonl`` (and ``config.json``), or a W&B offline run folder
(``offline-run-*``, parsed from its ``run-*.wandb`` file). :func:`load_runs` finds runs under any number of
paths; :func:`per_run` gives each run's best and final value of a metric and the first step at which it
reached a target; :func:`compare` aggregates over seeds (mean, std, min, max) per recipe, optimizer and
learning rate, and :func:`best_per_optimizer` picks each optimizer's best learning rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .logging.jsonl import read_jsonl
from .logging.wandb_logger import read_offline_run

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
    source: str  # "jsonl" or "wandb"
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


def _from_wandb(folder: Path) -> Run:
    d = read_offline_run(folder)
    config = {
        k: (v.get("value") if isinstance(v, dict) and "value" in v else v) for k, v in d["config"].items()
    }
    hist = pd.DataFrame(d["history"])
    if not hist.empty:
        hist = hist.rename(columns={"_step": "step"})
        hist = hist[[c for c in hist.columns if not c.startswith("_")]]
        hist = hist.groupby("step", as_index=False).last()
    name = config.get("run_name") or d["run_id"] or folder.name
    return Run(str(name), folder, config, hist, "wandb", d["summary"])


def load_runs(paths, prefer: str = "jsonl") -> list[Run]:
    """All runs under ``paths`` (run folders or folders of runs). A run folder with both a JSONL log and a
    W&B offline run is read once, from ``prefer`` (``"jsonl"`` or ``"wandb"``)."""
    if prefer not in ("jsonl", "wandb"):
        raise ValueError(f"prefer must be jsonl or wandb, got {prefer!r}")
    runs, seen = [], set()
    for p in [Path(x) for x in ([paths] if isinstance(paths, (str, Path)) else paths)]:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such run folder")
        jsonl_dirs = sorted(
            {f.parent for f in p.rglob("metrics.jsonl")} | ({p} if (p / "metrics.jsonl").exists() else set())
        )
        wandb_dirs = sorted(
            d
            for d in ([p] if p.name.startswith("offline-run-") else []) + list(p.rglob("offline-run-*"))
            if d.is_dir() and not d.name.endswith(".abandoned")  # a killed run's rows after its checkpoint
        )
        owners = {}
        for w in wandb_dirs:  # output_dir/wandb/offline-run-* belongs to output_dir
            owner = w.parent.parent if w.parent.name == "wandb" else w
            owners.setdefault(owner, []).append(w)
        for d in jsonl_dirs:
            if d in seen:
                continue
            if prefer == "wandb" and d in owners:
                continue
            seen.add(d)
            runs.append(_from_jsonl(d))
        for owner, ws in owners.items():
            if owner in seen or (prefer == "jsonl" and owner in jsonl_dirs):
                continue
            seen.add(owner)
            parts = [_from_wandb(w) for w in sorted(ws)]  # a resumed run has one offline folder per launch
            run = parts[0]
            if len(parts) > 1:
                run.history = pd.concat([r.history for r in parts]).groupby("step", as_index=False).last()
            run.path = owner
            runs.append(run)
    if not runs:
        raise FileNotFoundError(
            f"no runs (metrics.jsonl or wandb offline-run-*) under {list(map(str, paths))}"
        )
    return runs


def metric_mode(metric: str) -> str:
    """``"min"`` for losses, perplexities and error rates, ``"max"`` otherwise."""
    return "min" if any(t in metric.lower() for t in LOWER_IS_BETTER) else "max"


def per_run(runs: list[Run], metric: str, target: float | None = None, mode: str = "auto") -> pd.DataFrame:
    """One row per run: recipe, optimizer, lr, seed, best, final, best_step, steps_to_target."""
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
                steps_to_target=reached,
                path=str(r.path),
            )
        )
    if not rows:
        raise ValueError(f"no run logged the metric {metric!r}")
    return pd.DataFrame(rows)


def compare(table: pd.DataFrame, by=("recipe", "optimizer", "lr")) -> pd.DataFrame:
    """Mean, std, min and max over seeds of best and final; steps to target (mean over the seeds that
    reached it, and how many did)."""
    by = [b for b in by if b in table.columns]
    t = table.copy()
    t["lr"] = t["lr"].astype(str) if "lr" in t else t.get("lr")
    g = t.groupby(by, dropna=False)
    out = g.agg(
        seeds=("best", "size"),
        best_mean=("best", "mean"),
        best_std=("best", "std"),
        best_min=("best", "min"),
        best_max=("best", "max"),
        final_mean=("final", "mean"),
        final_std=("final", "std"),
        steps_to_target=("steps_to_target", lambda s: s.dropna().mean() if s.notna().any() else math.nan),
        reached=("steps_to_target", lambda s: int(s.notna().sum())),
    ).reset_index()
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

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict = {}
    for r in runs:
        if r.history.empty or metric not in r.history.columns:
            continue
        s = r.history[["step", metric]].dropna().set_index("step")[metric].astype(float)
        groups.setdefault((r.optimizer, str(r.lr)), []).append(s)
    if not groups:
        plt.close(fig)
        raise ValueError(f"no run logged the metric {metric!r}")
    for (opt, lr), series in sorted(groups.items()):
        df = pd.concat(series, axis=1).sort_index()
        mean = df.mean(axis=1)
        ax.plot(mean.index, mean.values, label=f"{opt} lr={lr} (n={df.shape[1]})")
        if df.shape[1] > 1:
            ax.fill_between(df.index, df.min(axis=1), df.max(axis=1), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title or metric, fontsize=9)
    ax.legend(fontsize=7)
    return _save_figure(fig, path)


def _save_figure(fig, path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_best(summary: pd.DataFrame, metric: str, path: Path) -> Path:
    """Bar chart of the best value per optimizer (its best learning rate), with the spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r.recipe}\n{r.optimizer}" if "recipe" in summary else r.optimizer for r in summary.itertuples()
    ]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels)), 3.5))
    ax.bar(range(len(labels)), summary["best_mean"], yerr=summary["best_std"], capsize=4)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel(f"best {metric}")
    return _save_figure(fig, path)


def build_report(
    paths, metric: str, out_dir, target: float | None = None, mode: str = "auto", prefer: str = "jsonl"
) -> dict:
    """Load runs, write ``runs.csv``, ``summary.csv``, ``report.md`` and PNG plots to ``out_dir``.

    Returns {"runs": DataFrame, "summary": DataFrame, "best": DataFrame, "markdown": str, "plots": [paths]}.
    """
    runs = load_runs(paths, prefer=prefer)
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
            "## Best learning rate per optimizer (mean and std over seeds)",
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
