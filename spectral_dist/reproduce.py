"""Reproduce the first paper's curvature table on small models and real offline data.

Trains five architectures (MLP, CNN, ResNet-style, ViT, GPT) on three bundled datasets (scikit-learn's
digits and breast cancer, byte tokens of the Python standard library's sources), probes every weight matrix
with :class:`~spectral_dist.probes.CurvatureProbe` at a few points of training, and summarises:

* alpha (h_k ~ sigma_k^alpha) by layer type, mean and spread, against the paper (conv ~2, attention ~1,
  MLP up-projection < 1);
* the spectral transfer identity s = alpha * gamma: median relative error over all layers (paper: ~2% over
  93 layers);
* the participation ratio of h against the zeta bound zeta(s)^2 / zeta(2 s);
* alpha_kfac (Spectral Alignment Decomposition with K-FAC factors) against the HVP alpha.

:func:`run_reproduction` returns the per-layer rows and the summary; :func:`write_outputs` writes
``layers.csv``, ``summary.csv``, ``table.md`` and PNG plots.
"""

from __future__ import annotations

import copy
import csv
import math
import statistics
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import models
from .probes import CurvatureProbe
from .probes.curvature import SCALARS

__all__ = [
    "ARCHITECTURES",
    "PAPER",
    "Setting",
    "digits_data",
    "breast_cancer_data",
    "stdlib_bytes",
    "build_task",
    "run_reproduction",
    "summarize",
    "format_table",
    "reference_checks",
    "write_outputs",
]

ARCHITECTURES = ("mlp_digits", "mlp_cancer", "cnn", "resnet", "vit", "gpt")
PAPER = {
    "alpha": {"conv": "~2", "attention": "~1", "mlp_up": "< 1"},
    "median_rel_err": 0.02,
    "n_layers": 93,
}
ROW_FIELDS = ("arch", "dataset", "step", "layer", "layer_type", "out", "in", *SCALARS)


# ------------------------------------------------------------------------------------------ data
def digits_data(val_fraction: float = 0.2):
    """scikit-learn's 8x8 digits as ((x_train, y_train), (x_val, y_val)), x (N, 1, 8, 8) in [-1, 1]; fixed split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    return _split(x, y, val_fraction)


def breast_cancer_data(val_fraction: float = 0.2):
    """scikit-learn's breast cancer table (569 x 30), standardised with training statistics; fixed split."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    (xt, yt), (xv, yv) = _split(x, y, val_fraction)
    mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-8)
    return ((xt - mu) / sd, yt), ((xv - mu) / sd, yv)


def _split(x, y, val_fraction):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = int(round(len(y) * val_fraction))
    va, tr = perm[:n_val], perm[n_val:]
    return (x[tr], y[tr]), (x[va], y[va])


def stdlib_bytes(max_bytes: int = 1_000_000, val_every: int = 20):
    """Byte tokens (uint8) of the standard library's ``*.py`` files in sorted order; every ``val_every``-th file
    is held out. Returns (train, val), train capped at ``max_bytes`` and val at ``max_bytes // val_every``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library at {root}")
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    caps = {False: max_bytes, True: max(1, max_bytes // val_every)}
    for i, f in enumerate(files):
        is_val = i % val_every == val_every - 1
        if sizes[is_val] >= caps[is_val]:
            if all(sizes[k] >= caps[k] for k in caps):
                break
            continue
        try:
            data = f.read_bytes() + b"\n"
        except OSError:
            continue
        parts[is_val].append(data)
        sizes[is_val] += len(data)

    def tensor(is_val):
        buf = b"".join(parts[is_val])[: caps[is_val]]
        return torch.frombuffer(bytearray(buf), dtype=torch.uint8).clone()

    return tensor(False), tensor(True)


# ------------------------------------------------------------------------------------------ tasks
@dataclass
class Task:
    """A model factory, its loss, a training-batch sampler and a fixed probe batch."""

    arch: str
    dataset: str
    make_model: Callable[[], nn.Module]
    loss_fn: Callable
    sample: Callable[[torch.Generator], object]
    probe_batch: object
    lr: float = 3e-3


@dataclass
class Setting:
    """How much to train and probe. ``quick()`` fits in well under 5 minutes on an idle 2-core CPU."""

    steps: int = 300
    checkpoints: tuple[float, ...] = (1 / 3, 2 / 3, 1.0)
    top_k: int = 16
    batch_size: int = 64
    probe_batch: int = 256
    width: int = 1  # model size multiplier (2: twice as wide and deep; probes get much slower)
    seq_len: int = 64
    seed: int = 0
    hvp: str = "autograd"
    archs: tuple[str, ...] = ARCHITECTURES

    @classmethod
    def quick(cls, **kw) -> Setting:
        return cls(**{**dict(steps=200, checkpoints=(1.0,), top_k=12, probe_batch=128, width=1), **kw})


def _image_sampler(x, y, bs):
    def sample(g):
        idx = torch.randint(0, len(y), (bs,), generator=g)
        return x[idx], y[idx]

    return sample


def _token_sampler(tokens, seq_len, bs):
    n = tokens.numel() - seq_len - 1

    def sample(g):
        starts = torch.randint(0, n, (bs,), generator=g)
        return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()

    return sample


def build_task(arch: str, setting: Setting) -> Task:
    """The model, loss and data of one architecture; ``setting.width`` scales the model."""
    w, bs, pb = setting.width, setting.batch_size, setting.probe_batch
    if arch in ("mlp_digits", "cnn", "resnet", "vit"):
        (xt, yt), (xv, yv) = digits_data()
        if arch == "mlp_digits":
            xt, xv = xt.flatten(1), xv.flatten(1)
        probe = (xv[:pb], yv[:pb])
        sample = _image_sampler(xt, yt, bs)
        if arch == "mlp_digits":
            make = lambda: models.tiny_mlp(in_dim=64, hidden=64 * w, out_dim=10, depth=2 + w)  # noqa: E731
            return Task(arch, "digits", make, models.classification_loss, sample, probe)
        if arch == "cnn":
            make = lambda: models.tiny_cnn(in_ch=1, width=16 * w, num_classes=10)  # noqa: E731
            return Task(arch, "digits", make, models.classification_loss, sample, probe)
        if arch == "resnet":
            make = lambda: models.tiny_resnet(in_ch=1, width=16 * w, blocks=2 * w, num_classes=10)  # noqa: E731
            return Task(arch, "digits", make, models.classification_loss, sample, probe)
        make = lambda: models.tiny_vit(  # noqa: E731
            image_size=8, patch_size=2, hidden=32 * w, layers=2 * w, heads=2 * w, channels=1
        )
        return Task(arch, "digits", make, models.classification_loss, sample, probe, lr=2e-3)
    if arch == "mlp_cancer":
        (xt, yt), (xv, yv) = breast_cancer_data()
        make = lambda: models.tiny_mlp(in_dim=30, hidden=32 * w, out_dim=2, depth=2 + w)  # noqa: E731
        probe = (xv[:pb], yv[:pb])
        return Task(
            arch, "breast_cancer", make, models.classification_loss, _image_sampler(xt, yt, bs), probe
        )
    if arch == "gpt":
        train, val = stdlib_bytes(max_bytes=300_000 * w)
        L = setting.seq_len
        n = max(4, pb // 8)
        probe = torch.stack([val[i * (L + 1) : (i + 1) * (L + 1)] for i in range(n)]).long()
        make = lambda: models.tiny_gpt(n_positions=L + 1, n_embd=64 * w, n_layer=2 * w, n_head=2 * w)  # noqa: E731
        sample = _token_sampler(train, L, max(8, bs // 4))
        return Task(arch, "stdlib_bytes", make, models.lm_loss, sample, probe)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")


def _to_double(batch):
    if isinstance(batch, tuple):
        return tuple(_to_double(b) for b in batch)
    return batch.double() if batch.is_floating_point() else batch


def probe_model(model: nn.Module, task: Task, setting: Setting) -> dict:
    """Probe a float64 copy of ``model`` on the task's probe batch; returns ``report.layers``."""
    m = copy.deepcopy(model).double()
    probe = CurvatureProbe(m, task.loss_fn, top_k=setting.top_k, hvp=setting.hvp, mode="eval")
    return probe.measure(_to_double(task.probe_batch)).layers


def train_and_probe(task: Task, setting: Setting, progress=None) -> list[dict]:
    """Train with AdamW (warmup + cosine), probe at each checkpoint; one row per (checkpoint, layer)."""
    torch.manual_seed(setting.seed)
    model = task.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=0.01)
    warm = max(1, setting.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / setting.steps))),
    )
    marks = sorted({max(1, round(c * setting.steps)) for c in setting.checkpoints})
    g = torch.Generator().manual_seed(setting.seed)
    rows = []
    model.train()
    for step in range(1, setting.steps + 1):
        loss = task.loss_fn(model, task.sample(g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress.update(1)
        if step in marks:
            for name, lc in probe_model(model, task, setting).items():
                row = dict(arch=task.arch, dataset=task.dataset, step=step, layer=name)
                row.update(layer_type=lc.layer_type, out=lc.shape[0], **{"in": lc.shape[1]})
                for k in ROW_FIELDS[7:]:
                    row[k] = float(getattr(lc, k))
                row["train_loss"] = float(loss.detach())
                rows.append(row)
    return rows


def run_reproduction(setting: Setting, verbose: bool = True) -> tuple[list[dict], dict]:
    """Train and probe every architecture of ``setting``; returns (rows, summary)."""
    from tqdm.auto import tqdm

    for a in setting.archs:
        if a not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {a!r}; choose from {ARCHITECTURES}")
    t0 = time.perf_counter()
    rows: list[dict] = []
    total = setting.steps * len(setting.archs)
    with tqdm(total=total, desc="reproduce", disable=not verbose, unit="step", mininterval=2.0) as bar:
        for arch in setting.archs:
            bar.set_postfix_str(arch)
            rows += train_and_probe(build_task(arch, setting), setting, bar)
    summary = summarize(rows)
    summary["seconds"] = time.perf_counter() - t0
    return rows, summary


# ------------------------------------------------------------------------------------------ summary
def _finite(xs):
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def _mean_sd(xs):
    xs = _finite(xs)
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _corr(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pts) < 3:
        return math.nan
    try:
        return statistics.correlation([p[0] for p in pts], [p[1] for p in pts])
    except statistics.StatisticsError:
        return math.nan


def summarize(rows: list[dict]) -> dict:
    """The paper-style table: per layer type (alpha, alpha_kfac, PR), and over all layers (transfer error)."""
    by_type: dict[str, list[dict]] = {}
    for r in rows:
        by_type.setdefault(r["layer_type"], []).append(r)
    types = {}
    for t, rs in sorted(by_type.items()):
        a_mean, a_sd = _mean_sd(r["alpha"] for r in rs)
        k_mean, k_sd = _mean_sd(r["alpha_kfac"] for r in rs)
        alphas = _finite(r["alpha"] for r in rs)
        diffs = _finite(abs(r["alpha_kfac"] - r["alpha"]) for r in rs)
        types[t] = dict(
            n=len(rs),
            alpha_mean=a_mean,
            alpha_sd=a_sd,
            alpha_min=min(alphas) if alphas else math.nan,
            alpha_max=max(alphas) if alphas else math.nan,
            alpha_kfac_mean=k_mean,
            alpha_kfac_sd=k_sd,
            kfac_abs_diff_median=statistics.median(diffs) if diffs else math.nan,
            pr_median=_median(r["participation_ratio"] for r in rs),
            pr_bound_median=_median(r["pr_bound"] for r in rs),
            rel_err_median=_median(r["rel_err"] for r in rs),
        )
    errs = _finite(r["rel_err"] for r in rows)
    pr_pairs = [
        (r["participation_ratio"], r["pr_bound"])
        for r in rows
        if math.isfinite(r["participation_ratio"]) and not math.isnan(r["pr_bound"])
    ]
    finite_bound = [(p, b) for p, b in pr_pairs if math.isfinite(b)]
    return dict(
        n_layers=len(rows),
        n_fitted=len(errs),
        architectures=sorted({r["arch"] for r in rows}),
        datasets=sorted({r["dataset"] for r in rows}),
        rel_err_median=statistics.median(errs) if errs else math.nan,
        rel_err_mean=statistics.fmean(errs) if errs else math.nan,
        rel_err_frac_below_5pct=sum(e < 0.05 for e in errs) / len(errs) if errs else math.nan,
        rel_err_frac_below_10pct=sum(e < 0.10 for e in errs) / len(errs) if errs else math.nan,
        pr_median=_median(p for p, _ in pr_pairs),
        pr_below_bound_frac=sum(p <= b for p, b in pr_pairs) / len(pr_pairs) if pr_pairs else math.nan,
        pr_bound_finite=len(finite_bound),
        pr_bound_median=_median(b for _, b in finite_bound),
        s_le_1=len(pr_pairs) - len(finite_bound),
        kfac_corr=_corr([r["alpha"] for r in rows], [r["alpha_kfac"] for r in rows]),
        kfac_abs_diff_median=_median(abs(r["alpha_kfac"] - r["alpha"]) for r in rows),
        negative_fraction_mean=_mean_sd(r["negative_fraction"] for r in rows)[0],
        types=types,
    )


def _median(xs):
    xs = _finite(xs)
    return statistics.median(xs) if xs else math.nan


def _f(v, fmt=".2f"):
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_table(summary: dict) -> str:
    """Markdown: alpha by layer type with the paper's values, then the all-layer statistics."""
    lines = [
        "| layer type | layers | alpha mean ± sd | alpha range | paper alpha | alpha_kfac mean ± sd "
        "| median abs(alpha_kfac - alpha) | median PR | median zeta bound | median rel err s vs alpha*gamma |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t, d in summary["types"].items():
        lines.append(
            f"| {t} | {d['n']} | {_f(d['alpha_mean'])} ± {_f(d['alpha_sd'])} | "
            f"{_f(d['alpha_min'])} .. {_f(d['alpha_max'])} | {PAPER['alpha'].get(t, '-')} | "
            f"{_f(d['alpha_kfac_mean'])} ± {_f(d['alpha_kfac_sd'])} | {_f(d['kfac_abs_diff_median'])} | "
            f"{_f(d['pr_median'])} | {_f(d['pr_bound_median'])} | {_f(100 * d['rel_err_median'], '.1f')}% |"
        )
    s = summary
    lines += [
        "",
        f"Layers probed: {s['n_layers']} ({s['n_fitted']} with finite fits) over "
        f"{len(s['architectures'])} architectures ({', '.join(s['architectures'])}) and "
        f"{len(s['datasets'])} datasets ({', '.join(s['datasets'])}).",
        f"Spectral transfer s = alpha * gamma: median relative error {_f(100 * s['rel_err_median'], '.1f')}% "
        f"(mean {_f(100 * s['rel_err_mean'], '.1f')}%; {_f(100 * s['rel_err_frac_below_5pct'], '.0f')}% of layers "
        f"below 5%, {_f(100 * s['rel_err_frac_below_10pct'], '.0f')}% below 10%); paper: "
        f"~{100 * PAPER['median_rel_err']:.0f}% over {PAPER['n_layers']} layers.",
        f"Participation ratio: median {_f(s['pr_median'])}; PR <= zeta(s)^2/zeta(2s) in "
        f"{_f(100 * s['pr_below_bound_frac'], '.0f')}% of layers (finite bound in {s['pr_bound_finite']}, "
        f"median bound {_f(s['pr_bound_median'])}; {s['s_le_1']} layers with s <= 1 have no finite bound).",
        f"alpha_kfac against alpha: correlation {_f(s['kfac_corr'])}, median abs difference "
        f"{_f(s['kfac_abs_diff_median'])}. Mean fraction of negative h_k: {_f(s['negative_fraction_mean'], '.3f')}.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ outputs
def write_outputs(rows: list[dict], summary: dict, out_dir, plots: bool = True) -> list[Path]:
    """layers.csv (one row per probed layer), summary.csv (one row per layer type), table.md and PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "layers.csv", out / "summary.csv", out / "table.md"]
    fields = list(ROW_FIELDS) + ["train_loss"]
    with open(written[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})
    tfields = ["layer_type"] + list(next(iter(summary["types"].values())).keys()) if summary["types"] else []
    with open(written[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(tfields)
        for t, d in summary["types"].items():
            w.writerow([t, *d.values()])
        w.writerow([])
        for k, v in summary.items():
            if k != "types":
                w.writerow([k, v if not isinstance(v, list) else ";".join(v)])
    written[2].write_text(format_table(summary) + "\n")
    if plots:
        written += plot_summary(rows, out)
    return written


def plot_summary(rows: list[dict], out: Path) -> list[Path]:
    """alpha_by_type.png, transfer.png (s vs alpha*gamma), participation.png, alignment.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({r["layer_type"] for r in rows})
    colors = {t: f"C{i}" for i, t in enumerate(types)}
    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for i, t in enumerate(types):
        ys = _finite(r["alpha"] for r in rows if r["layer_type"] == t)
        xs = [i + 0.08 * ((j % 7) - 3) for j in range(len(ys))]
        ax.plot(xs, ys, "o", ms=4, alpha=0.7, color=colors[t])
        if ys:
            ax.plot([i - 0.3, i + 0.3], [statistics.fmean(ys)] * 2, "k-", lw=2)
    for t, ref in (("conv", 2.0), ("attention", 1.0)):
        if t in types:
            ax.plot([types.index(t) - 0.4, types.index(t) + 0.4], [ref] * 2, "r--", lw=1)
    ax.set_xticks(range(len(types)), types, rotation=20)
    ax.set_ylabel("alpha (h_k ~ sigma_k^alpha)")
    ax.set_title("curvature exponent by layer type (red: paper)", fontsize=9)
    save(fig, "alpha_by_type.png")

    def scatter(xkey, ykey, xlabel, ylabel, title, name, diag=True, log=False):
        fig, ax = plt.subplots(figsize=(4.4, 4))
        allv = []
        for t in types:
            pts = [
                (r[xkey], r[ykey])
                for r in rows
                if r["layer_type"] == t and math.isfinite(r[xkey]) and math.isfinite(r[ykey])
            ]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=4, label=t, color=colors[t])
                allv += [v for p in pts for v in p]
        if diag and allv:
            lo, hi = min(allv), max(allv)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        save(fig, name)

    scatter("s_pred", "s", "alpha * gamma", "s (h_k ~ k^-s)", "spectral transfer identity", "transfer.png")
    scatter(
        "pr_bound",
        "participation_ratio",
        "zeta(s)^2 / zeta(2s)",
        "participation ratio",
        "participation ratio vs zeta bound",
        "participation.png",
        log=True,
    )
    scatter("alpha", "alpha_kfac", "alpha (HVP)", "alpha_kfac", "K-FAC alignment vs HVP", "alignment.png")
    return paths


def reference_checks(summary: dict) -> list[str]:
    """Plain-language comparisons with the paper's claims (agreements and disagreements)."""
    notes = []
    t = summary["types"]
    for name, lo, hi, claim in (
        ("conv", 1.5, 2.5, "~2"),
        ("attention", 0.5, 1.5, "~1"),
        ("mlp_up", -math.inf, 1.0, "< 1"),
    ):
        if name in t:
            a = t[name]["alpha_mean"]
            verdict = "agrees" if lo <= a <= hi else "DISAGREES"
            notes.append(f"{name}: alpha {_f(a)} ± {_f(t[name]['alpha_sd'])} vs paper {claim}: {verdict}")
    e = summary["rel_err_median"]
    verdict = "agrees" if e <= 0.05 else "DISAGREES"
    notes.append(
        f"s vs alpha*gamma: median rel err {_f(100 * e, '.1f')}% over {summary['n_fitted']} layers "
        f"vs paper ~2% over 93: {verdict} (within 5%)"
    )
    f = summary["pr_below_bound_frac"]
    notes.append(f"PR <= zeta bound in {_f(100 * f, '.0f')}% of layers; median PR {_f(summary['pr_median'])}")
    return notes
