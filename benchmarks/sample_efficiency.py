"""Sample efficiency: steps to a target accuracy (digits CNN and ViT) and to a target loss (byte-level GPT).

SpectralNewton (alpha by layer) is compared with AdamW and torch.optim.Muon, each tuned over the same
learning-rate grid, with several seeds per setting. All runs use the same initialisation and data order for a
given seed, a 5% linear warmup and cosine decay, and decoupled weight decay 0.01 on matrices. Muon uses
``adjust_lr_fn="match_rms_adamw"`` and SpectralNewton ``scale="rms"``, so one learning-rate grid is meaningful
for all three. torch.optim.Muon takes 2-D matrices only: conv kernels and everything else get AdamW beside it
(on the CNN, ``sn_a1`` -- SpectralNewton with alpha = 1 everywhere, Muon's polar update applied to the conv
kernels too -- is the Muon-style comparison for convolutions). SpectralNewton's damping is also swept.

Target: the best final metric of AdamW over the learning-rate grid (mean over seeds). Steps to target are read
from the seed-averaged curve at each optimizer's best learning rate, and per seed (mean ± sd over the seeds
that reach it). Results go to stdout, JSON, and with --write to benchmarks/RESULTS.md.

    python benchmarks/sample_efficiency.py               # the default budget (~10-15 min, idle 2-core CPU)
    python benchmarks/sample_efficiency.py --tasks vit_digits --optimizers muon sn sn_d1e-2 --lrs 3e-3 1e-2
    python benchmarks/sample_efficiency.py --quick       # seconds: one seed, one lr, few steps
    python benchmarks/sample_efficiency.py --tasks gpt_bytes_d256   # d = 256: default vs Jacobi vs exact bases
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from recipes.common.data import digits_images, stdlib_corpus  # noqa: E402
from recipes.common.optim import MuonWithAdamW, warmup_cosine  # noqa: E402
from spectral_dist import models  # noqa: E402
from spectral_dist.optim import SpectralNewton  # noqa: E402
from spectral_dist.optim.classify import classify_parameters  # noqa: E402

# sn_j2: the eigenbasis with 2 Jacobi steps (jacobi_steps=2); sn_exact: basis="gram" (float64 eigh, exact for
# every alpha). Both only on request (--optimizers): do the bases' errors matter for training?
OPTIMIZERS = ("adamw", "muon", "sn", "sn_d1e-3", "sn_d1e-2", "sn_a1", "sn_j2", "sn_exact")
NO_DECAY = ("norm", "bias", "vector", "embedding")


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark task: metric ``acc`` (higher is better) or ``loss`` (lower is better)."""

    name: str
    metric: str
    steps: int
    eval_every: int
    batch_size: int
    optimizers: tuple[str, ...]
    lrs: tuple[float, ...]


TASKS = {
    "cnn_digits": TaskSpec("cnn_digits", "acc", 200, 10, 64, OPTIMIZERS, (3e-3, 1e-2, 3e-2, 1e-1)),
    # transformers: 3e-2 is where Muon and SpectralNewton do best (1e-1 is worse for all: RESULTS.md); sn_a1
    # (alpha = 1) beside the paper's by-layer alphas, whose MLP-up 0.5 falls short at this scale
    "vit_digits": TaskSpec(
        "vit_digits", "acc", 200, 10, 64, ("adamw", "muon", "sn", "sn_a1"), (1e-3, 3e-3, 1e-2, 3e-2)
    ),
    "gpt_bytes": TaskSpec(
        "gpt_bytes", "loss", 200, 20, 16, ("adamw", "muon", "sn", "sn_a1"), (1e-3, 3e-3, 1e-2, 3e-2)
    ),
    # 4x wider (d = 256, the width of basis_accuracy.py --real), on request only (--tasks): ~10x the time
    "gpt_bytes_d256": TaskSpec(
        "gpt_bytes_d256", "loss", 300, 30, 16, ("adamw", "sn", "sn_j2", "sn_exact"), (3e-3, 1e-2)
    ),
}
DEFAULT_TASKS = ("cnn_digits", "vit_digits", "gpt_bytes")
SEQ_LEN = 64
_DATA: dict = {}


def task_data(name: str):
    """(train, val) tensors of a task, cached per process: digits 8x8 (1 channel) or stdlib bytes."""
    if name not in _DATA:
        if name.startswith("gpt_bytes"):
            train, val = stdlib_corpus(max_bytes=1_000_000)
            n = 32
            vb = torch.stack([val[i * (SEQ_LEN + 1) : (i + 1) * (SEQ_LEN + 1)] for i in range(n)]).long()
            _DATA[name] = (train, vb)
        else:
            tr, va = digits_images(size=8, channels=1)
            _DATA[name] = ((tr.x, tr.y), (va.x, va.y))
    return _DATA[name]


def build_model(name: str) -> torch.nn.Module:
    if name == "cnn_digits":
        return models.tiny_cnn(in_ch=1, width=16, num_classes=10)
    if name == "vit_digits":
        return models.tiny_vit(image_size=8, patch_size=2, hidden=64, layers=2, heads=4, channels=1)
    if name == "gpt_bytes":
        return models.tiny_gpt(n_positions=SEQ_LEN + 1, n_embd=64, n_layer=2, n_head=2)
    if name == "gpt_bytes_d256":
        return models.tiny_gpt(n_positions=SEQ_LEN + 1, n_embd=256, n_layer=2, n_head=4)
    raise ValueError(f"unknown task {name!r}; choose from {list(TASKS)}")


def build_optimizer(name: str, model: torch.nn.Module, lr: float, wd: float = 0.01):
    """adamw | muon | sn (damping 1e-4) | sn_d1e-3 | sn_d1e-2 | sn_a1 (alpha = 1 for every matrix) | sn_j2
    (jacobi_steps=2) | sn_exact (basis="gram")."""
    infos = classify_parameters(model)
    decay = [i.param for i in infos if i.layer_type not in NO_DECAY]
    rest = [i.param for i in infos if i.layer_type in NO_DECAY]
    groups = [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))
    if name == "muon":
        hidden = [i.param for i in infos if i.spectral and i.param.ndim == 2]
        if (
            not hidden
        ):  # e.g. the CNN: conv kernels are 4-D and the head gets AdamW, so Muon has nothing to do
            return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))
        ids = {id(p) for p in hidden}
        others = [
            {"params": [p for p in g["params"] if id(p) not in ids], "weight_decay": g["weight_decay"]}
            for g in groups
        ]
        return MuonWithAdamW(
            [{"params": hidden, "lr": lr}],
            [g for g in others if g["params"]],
            muon_kwargs=dict(lr=lr, momentum=0.95, weight_decay=wd, adjust_lr_fn="match_rms_adamw"),
            adamw_kwargs=dict(lr=lr, betas=(0.9, 0.95)),
        )
    if name.startswith("sn"):
        damping = {"sn_d1e-3": 1e-3, "sn_d1e-2": 1e-2}.get(name, 1e-4)
        alpha = 1.0 if name == "sn_a1" else "by_layer"
        extra = {"sn_j2": dict(jacobi_steps=2), "sn_exact": dict(basis="gram")}.get(name, {})
        return SpectralNewton.from_model(
            model, alpha=alpha, lr=lr, damping=damping, weight_decay=wd, adamw_weight_decay=0.0, **extra
        )
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


@torch.no_grad()
def evaluate(task: str, model) -> float:
    model.eval()
    if task.startswith("gpt_bytes"):
        val = task_data(task)[1]
        v = models.lm_loss(model, val).item()
    else:
        (_, _), (xv, yv) = task_data(task)
        out = model(xv)
        logits = out.logits if hasattr(out, "logits") else out
        v = (logits.argmax(1) == yv).float().mean().item()
    model.train()
    return v


def train_run(task: str, opt_name: str, lr: float, seed: int, steps: int, eval_every: int, batch_size: int):
    """One run; returns dict(curve=[(step, metric)], seconds, final)."""
    torch.set_num_threads(1)
    data = task_data(task)
    torch.manual_seed(seed)
    model = build_model(task)
    opt = build_optimizer(opt_name, model, lr)
    sched = warmup_cosine(opt, max(1, steps // 20), steps, 0.0)
    g = torch.Generator().manual_seed(1000 + seed)
    curve = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if task.startswith("gpt_bytes"):
            starts = torch.randint(0, data[0].numel() - SEQ_LEN - 1, (batch_size,), generator=g).tolist()
            batch = torch.stack([data[0][s : s + SEQ_LEN + 1] for s in starts]).long()
            loss = models.lm_loss(model, batch)
        else:
            (xt, yt), _ = data
            idx = torch.randint(0, len(yt), (batch_size,), generator=g)
            out = model(xt[idx])
            loss = F.cross_entropy(out.logits if hasattr(out, "logits") else out, yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            curve.append((step, math.nan))
            break
        if step % eval_every == 0 or step == steps:
            curve.append((step, evaluate(task, model)))
    return dict(
        task=task, opt=opt_name, lr=lr, seed=seed, curve=curve, seconds=time.perf_counter() - t0, steps=steps
    )


def _job(args):
    return train_run(*args)


def run_all(
    tasks, lrs, seeds, jobs: int = 1, steps: int | None = None, progress: bool = True, optimizers=None
) -> list[dict]:
    """Every (task, optimizer, lr, seed) run; in ``jobs`` processes (1: in this process). ``lrs`` (None: each
    task's grid) and ``optimizers`` (None: each task's list) override the task's defaults; AdamW always runs
    (it sets the target)."""
    from tqdm.auto import tqdm

    work = []
    for t in tasks:
        spec = TASKS[t]
        n = steps or spec.steps
        ev = min(spec.eval_every, n)
        opts = spec.optimizers if optimizers is None else ("adamw", *(o for o in optimizers if o != "adamw"))
        for o in opts:
            for lr in lrs or spec.lrs:
                for s in seeds:
                    work.append((t, o, lr, s, n, ev, spec.batch_size))
    bar = tqdm(total=len(work), desc="sample efficiency", unit="run", disable=not progress, mininterval=2.0)
    out = []
    if jobs <= 1:
        for w in work:
            out.append(train_run(*w))
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            for r in ex.map(_job, work):
                out.append(r)
                bar.update(1)
    bar.close()
    return out


# ------------------------------------------------------------------------------------------ analysis
def _reached(value: float, target: float, metric: str) -> bool:
    if not math.isfinite(value):
        return False
    return value >= target - 1e-9 if metric == "acc" else value <= target + 1e-9


def steps_to_target(curve, target: float, metric: str) -> float:
    """First evaluated step whose metric reaches ``target`` (inf if never)."""
    for step, v in curve:
        if _reached(v, target, metric):
            return float(step)
    return math.inf


def mean_curve(curves):
    """Pointwise mean over seeds (curves cut to the shortest; a diverged seed gives NaN)."""
    n = min(len(c) for c in curves)
    full = max(len(c) for c in curves)
    mc = [(curves[0][i][0], statistics.fmean(c[i][1] for c in curves)) for i in range(n)]
    return mc + [(None, math.nan)] * (full - n) if n < full else mc


def _final(curve):
    return curve[-1][1] if curve else math.nan


def analyze(runs: list[dict], reference: str = "adamw") -> dict:
    """Per task: target (``reference``'s best final metric over the lr grid), and for each optimizer its best
    lr, steps to target, finals, and its steps as a ratio to the reference's (key ``ratio_to_adamw`` when the
    reference is AdamW, else ``ratio_to_<reference>``)."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        metric = TASKS[task].metric
        better = max if metric == "acc" else min
        rs = [r for r in runs if r["task"] == task]
        cells: dict[tuple[str, float], list[dict]] = {}
        for r in rs:
            cells.setdefault((r["opt"], r["lr"]), []).append(r)
        finals = {k: [_final(r["curve"]) for r in v] for k, v in cells.items()}
        mean_final = {
            k: statistics.fmean(v) if all(map(math.isfinite, v)) else math.nan for k, v in finals.items()
        }
        adam = {k: v for k, v in mean_final.items() if k[0] == reference and math.isfinite(v)}
        if not adam:
            raise ValueError(f"{task}: no {reference} run finished; cannot set the target")
        target = better(adam.values())
        opts = {}
        for o in dict.fromkeys(k[0] for k in cells):
            cand = []
            for (oo, lr), v in cells.items():
                if oo != o:
                    continue
                mc = mean_curve([r["curve"] for r in v])
                st = steps_to_target(mc, target, metric)
                per_seed = [steps_to_target(r["curve"], target, metric) for r in v]
                mf = mean_final[(oo, lr)]
                key = (st, -mf if metric == "acc" else mf) if math.isfinite(mf) else (math.inf, math.inf)
                cand.append((key, lr, st, per_seed, v))
            cand.sort(key=lambda c: c[0])
            _, lr, st, per_seed, v = cand[0]
            fin = finals[(o, lr)]
            hit = [p for p in per_seed if math.isfinite(p)]
            best_final_any = (
                better(x for x in (mean_final[(o, c[1])] for c in cand) if math.isfinite(x))
                if any(math.isfinite(mean_final[(o, c[1])]) for c in cand)
                else math.nan
            )
            opts[o] = dict(
                best_lr=lr,
                steps_mean_curve=st,
                steps_seed_mean=statistics.fmean(hit) if hit else math.inf,
                steps_seed_sd=statistics.stdev(hit) if len(hit) > 1 else 0.0,
                seeds_reached=len(hit),
                seeds=len(per_seed),
                final_mean=statistics.fmean(fin),
                final_sd=statistics.stdev(fin) if len(fin) > 1 else 0.0,
                best_final_any_lr=best_final_any,
                sec_per_step=statistics.fmean(r["seconds"] / r["steps"] for r in v),
                by_lr={
                    str(c[1]): dict(steps=c[2], final=mean_final[(o, c[1])])
                    for c in sorted(cand, key=lambda c: c[1])
                },
            )
        a = opts[reference]["steps_mean_curve"]
        for d in opts.values():
            d[f"ratio_to_{reference}"] = (
                d["steps_mean_curve"] / a if math.isfinite(d["steps_mean_curve"]) else math.inf
            )
        out[task] = dict(
            metric=metric, target=target, steps=rs[0]["steps"], optimizers=opts, reference=reference
        )
    return out


def _fmt_steps(v):
    return "not reached" if not math.isfinite(v) else f"{v:.0f}"


def format_results(res: dict, lrs, seeds) -> str:
    lines = []
    for task, d in res.items():
        m = "accuracy" if d["metric"] == "acc" else "val loss"
        ref = d.get("reference", "adamw")
        name = {"adamw": "AdamW", "muon": "Muon"}.get(ref, ref)
        lines += [
            f"**{task}** ({d['steps']} steps; target = {name}'s best final {m} over the lr grid: {d['target']:.4f})",
            "",
            f"| optimizer | best lr | steps to target (mean curve) | ratio to {name} | steps per seed (mean ± sd) "
            f"| seeds reaching | final {m} (mean ± sd) | ms/step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for o, x in d["optimizers"].items():
            r = x[f"ratio_to_{ref}"]
            ratio = "-" if not math.isfinite(r) else f"{r:.2f}x"
            per = (
                f"{x['steps_seed_mean']:.0f} ± {x['steps_seed_sd']:.0f}"
                if x["seeds_reached"]
                else "not reached"
            )
            lines.append(
                f"| {o} | {x['best_lr']:g} | {_fmt_steps(x['steps_mean_curve'])} | {ratio} | {per} | "
                f"{x['seeds_reached']}/{x['seeds']} | {x['final_mean']:.4f} ± {x['final_sd']:.4f} | "
                f"{1000 * x['sec_per_step']:.1f} |"
            )
        if "muon" in d["optimizers"] and task == "cnn_digits" and ref == "adamw":
            lines.append(
                "\nThe CNN has no 2-D hidden matrix (conv kernels are 4-D, the head gets AdamW), so torch.optim.Muon "
                "runs as AdamW here; `sn_a1` (alpha = 1: Muon's polar update on the conv kernels) is the Muon-style "
                "comparison."
            )
        lines.append("")
        grid = " ".join(
            f"{o}: " + ", ".join(f"{lr}->{v['final']:.3f}" for lr, v in x["by_lr"].items())
            for o, x in d["optimizers"].items()
        )
        if ref == "adamw":
            lines += [f"Final {m} by lr (mean over seeds): {grid}", ""]
    return "\n".join(lines)


def machine() -> str:
    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="*", default=list(DEFAULT_TASKS), choices=list(TASKS))
    ap.add_argument("--lrs", type=float, nargs="*", default=None, help="lr grid (default: each task's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="override every task's step budget")
    ap.add_argument(
        "--optimizers", nargs="*", default=None, choices=OPTIMIZERS, help="subset (adamw always runs)"
    )
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 lr, 30 steps: a smoke run in seconds")
    ap.add_argument("--json", default="outputs/benchmarks/sample_efficiency.json")
    ap.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS.md")
    ap.add_argument(
        "--from_json",
        nargs="*",
        default=None,
        help="analyse the runs saved in these --json files (no training)",
    )
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.lrs, a.steps = 1, [3e-3], a.steps or 30
    t0 = time.perf_counter()
    if a.from_json:
        runs = [r for f in a.from_json for r in json.loads(Path(f).read_text())["runs"]]
        runs = [r for r in runs if r["task"] in a.tasks]
        seen, unique = set(), []  # a run repeated across files (e.g. AdamW, which always runs) counts once
        for r in runs:
            key = (r["task"], r["opt"], r["lr"], r["seed"])
            if key not in seen:
                seen.add(key)
                unique.append(r)
        runs = unique
        a.lrs = sorted({r["lr"] for r in runs})
        a.seeds = len({r["seed"] for r in runs})
    else:
        runs = run_all(
            a.tasks, a.lrs, list(range(a.seeds)), jobs=a.jobs, steps=a.steps, optimizers=a.optimizers
        )
    res = analyze(runs)
    has_muon = [t for t in res if t != "cnn_digits" and "muon" in res[t]["optimizers"]]
    vs_muon = {t: analyze([r for r in runs if r["task"] == t], "muon")[t] for t in has_muon}
    wall = time.perf_counter() - t0
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(dict(runs=runs, results=res, lrs=a.lrs, seeds=a.seeds), default=str))
    text = "\n".join(
        [
            f"### Sample efficiency — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}",
            "",
            f"`python benchmarks/sample_efficiency.py {' '.join(sys.argv[1:] if argv is None else argv)}`: "
            f"lr grid {a.lrs or {t: list(TASKS[t].lrs) for t in a.tasks}}, "
            f"{a.seeds} seeds, {len(runs)} runs "
            + (
                f"re-analysed from {', '.join(a.from_json)}"
                if a.from_json
                else f"in {wall:.0f} s ({a.jobs} processes)"
            )
            + ". Step counts do not depend on machine load; ms/step does.",
            "",
            format_results(res, a.lrs, a.seeds),
            *(
                [
                    "Transformer tasks against Muon's best final metric instead:",
                    "",
                    format_results(vs_muon, a.lrs, a.seeds),
                ]
                if vs_muon
                else []
            ),
        ]
    )
    print(text)
    if a.write:
        with (Path(__file__).with_name("RESULTS.md")).open("a") as f:
            f.write("\n" + text + "\n")
    return res


if __name__ == "__main__":
    main()
