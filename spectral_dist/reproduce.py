"""Reproduce the first paper's curvature table on small models and real offline data.

Trains five architectures (MLP, CNN, ResNet-style, ViT, GPT; the MLP on two datasets) on three bundled
datasets (scikit-learn's digits images and breast-cancer table, byte tokens of the Python standard library's
sources), at one or more widths, and probes every weight matrix with
:class:`~spectral_dist.probes.CurvatureProbe`:

* the spectral transfer identity s = alpha * gamma in two forms, on one explicit index set K per layer:

  - same point: alpha (log h_k on log sigma_k), gamma (log sigma_k on log k) and s (log h_k on log k) all
    from one probe on batch A. With sigma_k an exact power of k this holds for any h (the regressions on
    log sigma and on log k coincide), so a small error here is nearly an algebraic restatement;
  - independent (the default in the table): alpha from h_k along batch A's gradient singular directions,
    gamma from batch B's gradient SVD, s from the top-k eigenvalues of the layer's Hessian block on a
    held-out batch C (Lanczos, ``h="eigen"``). Sorted Hessian eigenvalues are not h_k along the gradient
    directions, so this also tests whether those directions are the curved ones;
  - in between, reported too: alpha from A, gamma from B, s from h_k along C's own gradient directions
    (independent data, same object);

* alpha by layer type at the end of training against the paper (conv ~2, attention ~1, MLP up < 1), with
  alpha_kfac (K-FAC factors) and the participation ratio against the zeta bound zeta(s)^2 / zeta(2 s);
* alpha through training: alpha on batch A at several checkpoints (from initialisation), per layer type and
  width, and whether the paper's ordering conv > attention > MLP-up appears at any of them.

:func:`run_reproduction` returns the per-layer rows, the alpha-through-training rows and the summary;
:func:`write_outputs` writes ``layers.csv``, ``alpha_training.csv``, ``summary.csv``, ``table.md`` and PNG
plots.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import statistics
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import models
from .probes import CurvatureProbe, ProbeReport
from .probes.fits import fit_mask, transfer_fit

__all__ = [
    "ARCHITECTURES",
    "DATASETS",
    "MODES",
    "PAPER",
    "Setting",
    "digits_data",
    "breast_cancer_data",
    "stdlib_bytes",
    "build_task",
    "alpha_rows",
    "transfer_rows",
    "transfer_probe",
    "train_and_probe",
    "run_reproduction",
    "alpha_through_training",
    "summarize",
    "format_table",
    "reference_checks",
    "write_outputs",
]

ARCHITECTURES = ("mlp_digits", "mlp_cancer", "cnn", "resnet", "vit", "gpt")
ARCH_ORDER = {a: i for i, a in enumerate(ARCHITECTURES)}
FAMILY = {
    "mlp_digits": "mlp",
    "mlp_cancer": "mlp",
    "cnn": "cnn",
    "resnet": "resnet",
    "vit": "vit",
    "gpt": "gpt",
}
DATASETS = {
    "digits": "scikit-learn's 8x8 handwritten digits (1797 grey images, 10 classes; images)",
    "breast_cancer": "scikit-learn's Wisconsin breast-cancer table (569 rows x 30 features, 2 classes; tabular)",
    "stdlib_bytes": "bytes of the CPython standard library's *.py sources (next-byte prediction; text)",
}
PAPER = {
    "alpha": {"conv": "~2", "attention": "~1", "mlp_up": "< 1"},
    "median_rel_err": 0.02,
    "n_layers": 93,
}
ORDER = ("conv", "attention", "mlp_up")  # the paper's ordering of alpha, largest first
PAPER_RANGES = {"conv": (1.5, 2.5), "attention": (0.5, 1.5), "mlp_up": (-math.inf, 1.0)}
AGREE_WITHIN = 0.05  # a median relative error up to 5% counts as agreeing with the paper's ~2%
MODES = ("same", "indep", "indep_rayleigh")
MODE_NAMES = {
    "same": "same-point",
    "indep": "independent",
    "indep_rayleigh": "independent data, Rayleigh s",
}
ROW_FIELDS = (
    "arch",
    "dataset",
    "width",
    "step",
    "layer",
    "layer_type",
    "out",
    "in",
    "n_fit",
    "k_fit",
    "alpha",
    "alpha_r2",
    "alpha_c",
    *(f"{k}_{m}" for m in MODES for k in ("gamma", "s", "s_pred", "rel_err")),
    "overlap_median",
    "participation_ratio",
    "pr_bound",
    "negative_fraction",
    "alpha_kfac",
    "train_loss",
)
TRAJ_FIELDS = (
    "arch",
    "dataset",
    "width",
    "step",
    "layer",
    "layer_type",
    "alpha",
    "alpha_r2",
    "gamma",
    "s",
    "rel_err",
    "n_fit",
    "train_loss",
)


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
    """A model factory, its loss, a training-batch sampler and the three probe batches A, B, C.

    ``batches``: "A" (alpha: h_k along its gradient's singular directions), "B" (gamma: its gradient's
    singular values), "C" (s: the Hessian block's top eigenvalues, and h_k along C's own gradient directions);
    three disjoint sets of held-out samples, described by ``batch_note``."""

    arch: str
    dataset: str
    width: int
    make_model: Callable[[], nn.Module]
    loss_fn: Callable
    sample: Callable[[torch.Generator], object]
    batches: dict
    batch_note: str
    lr: float = 3e-3


@dataclass
class Setting:
    """How much to train and probe. The defaults are the full run; ``quick()`` fits in under 5 minutes on a
    2-core CPU.

    ``checkpoints``: fractions of training (0 = initialisation) at which alpha is probed on batch A (the
    alpha-through-training curves); the transfer test (batches A, B, C) runs once, at the end of training.
    ``fit_k``: (k_lo, k_hi), 1-based and inclusive, the k used by every fit (None: 1..top_k).
    ``probe_batch``: samples in each of A, B, C (capped at a third of the held-out split: they are disjoint;
    GPT: ``probe_batch // 8`` windows of ``seq_len + 1`` bytes).
    ``independent``: False skips B and C (the same-point fits only; much faster)."""

    steps: int = 300
    checkpoints: tuple[float, ...] = (0.0, 0.1, 1 / 3, 2 / 3, 1.0)
    top_k: int = 12
    fit_k: tuple[int, int] | None = None
    batch_size: int = 64
    probe_batch: int = 128
    widths: tuple[int, ...] = (1, 2)  # model size multipliers (2: twice as wide and deep)
    seq_len: int = 64
    seed: int = 0
    hvp: str = "autograd"
    archs: tuple[str, ...] = ARCHITECTURES
    independent: bool = True

    @classmethod
    def quick(cls, **kw) -> Setting:
        return cls(**{**dict(steps=200, checkpoints=(0.0, 0.1, 0.5, 1.0), widths=(1,)), **kw})

    @property
    def k_range(self) -> tuple[int, int]:
        return tuple(self.fit_k) if self.fit_k is not None else (1, self.top_k)


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


def _classification_batches(val, pb):
    """A, B, C: three disjoint slices of n held-out samples (n = min(pb, n_val // 3)), all from the held-out
    split, so that the batches differ only by sampling (a training batch has a different gradient spectrum)."""
    xv, yv = val
    n = max(2, min(pb, len(yv) // 3))
    batches = {name: (xv[i * n : (i + 1) * n], yv[i * n : (i + 1) * n]) for i, name in enumerate("ABC")}
    note = f"A, B, C: held-out samples 0..{n - 1}, {n}..{2 * n - 1}, {2 * n}..{3 * n - 1}"
    return batches, note


def build_task(arch: str, setting: Setting, width: int = 1) -> Task:
    """The model, loss, data and probe batches of one architecture; ``width`` scales the model."""
    w, bs, pb = width, setting.batch_size, setting.probe_batch
    if arch in ("mlp_digits", "cnn", "resnet", "vit"):
        (xt, yt), (xv, yv) = digits_data()
        if arch == "mlp_digits":
            xt, xv = xt.flatten(1), xv.flatten(1)
        batches, note = _classification_batches((xv, yv), pb)
        sample = _image_sampler(xt, yt, bs)
        lr = 3e-3
        if arch == "mlp_digits":
            make = lambda: models.tiny_mlp(in_dim=64, hidden=64 * w, out_dim=10, depth=2 + w)  # noqa: E731
        elif arch == "cnn":
            make = lambda: models.tiny_cnn(in_ch=1, width=16 * w, num_classes=10)  # noqa: E731
        elif arch == "resnet":
            make = lambda: models.tiny_resnet(in_ch=1, width=16 * w, blocks=2 * w, num_classes=10)  # noqa: E731
        else:
            make = lambda: models.tiny_vit(  # noqa: E731
                image_size=8, patch_size=2, hidden=32 * w, layers=2 * w, heads=2 * w, channels=1
            )
            lr = 2e-3
        return Task(arch, "digits", w, make, models.classification_loss, sample, batches, note, lr=lr)
    if arch == "mlp_cancer":
        train, val = breast_cancer_data()
        make = lambda: models.tiny_mlp(in_dim=30, hidden=32 * w, out_dim=2, depth=2 + w)  # noqa: E731
        batches, note = _classification_batches(val, pb)
        sample = _image_sampler(*train, bs)
        return Task(arch, "breast_cancer", w, make, models.classification_loss, sample, batches, note)
    if arch == "gpt":
        train, val = stdlib_bytes(max_bytes=300_000 * w)
        L = setting.seq_len
        n = max(4, pb // 8)
        n_win = val.numel() // (L + 1)
        if 3 * n > n_win:
            raise ValueError(f"held-out stdlib bytes ({val.numel()}) too few for 3 x {n} windows of {L + 1}")
        # windows spread over the whole held-out stream (consecutive ones would come from one or two files)
        pick = torch.randperm(n_win, generator=torch.Generator().manual_seed(setting.seed))[: 3 * n]
        windows = torch.stack([val[i * (L + 1) : (i + 1) * (L + 1)] for i in pick.tolist()]).long()
        batches = {name: windows[i * n : (i + 1) * n] for i, name in enumerate("ABC")}
        note = (
            f"A, B, C: three disjoint sets of {n} held-out windows of {L + 1} bytes, drawn at random from "
            f"{n_win} non-overlapping windows"
        )
        make = lambda: models.tiny_gpt(n_positions=L + 1, n_embd=64 * w, n_layer=2 * w, n_head=2 * w)  # noqa: E731
        sample = _token_sampler(train, L, max(8, bs // 4))
        return Task(arch, "stdlib_bytes", w, make, models.lm_loss, sample, batches, note)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")


def _to_double(batch):
    if isinstance(batch, tuple):
        return tuple(_to_double(b) for b in batch)
    return batch.double() if batch.is_floating_point() else batch


# ------------------------------------------------------------------------------------------ probes
def _k_label(mask: torch.Tensor) -> str:
    """The k of a fit mask as ranges, e.g. "1-9,11"."""
    ks = [i + 1 for i, m in enumerate(mask.tolist()) if m]
    parts, i = [], 0
    while i < len(ks):
        j = i
        while j + 1 < len(ks) and ks[j + 1] == ks[j] + 1:
            j += 1
        parts.append(str(ks[i]) if i == j else f"{ks[i]}-{ks[j]}")
        i = j + 1
    return ",".join(parts)


def alpha_rows(report: ProbeReport, k_range=None) -> dict[str, dict]:
    """Same-point fits on one probe report (alpha, gamma, s from one batch) over ``k_range``; one dict per layer."""
    out = {}
    for name, lc in report.layers.items():
        mask = fit_mask(len(lc.sigma), k_range, sigmas=[lc.sigma], curvatures=[lc.h])
        f = transfer_fit(lc.sigma, lc.h, lc.sigma, lc.h, mask)
        out[name] = dict(
            layer=name,
            layer_type=lc.layer_type,
            alpha=f["alpha"],
            alpha_r2=f["alpha_r2"],
            gamma=f["gamma"],
            s=f["s"],
            rel_err=f["rel_err"],
            n_fit=f["n_fit"],
        )
    return out


def transfer_rows(
    report_a: ProbeReport,
    sigma_b: dict[str, torch.Tensor] | None = None,
    report_eig: ProbeReport | None = None,
    report_c: ProbeReport | None = None,
    k_range=None,
) -> dict[str, dict]:
    """Per layer: the transfer test in every mode of :data:`MODES`, all fitted on one index set K.

    K = the k in ``k_range`` where every gradient spectrum (A, B, C) is above the floor and every curvature
    vector (h along A's directions, C's Hessian eigenvalues, h along C's directions) is positive. Without
    ``sigma_b``/``report_eig``/``report_c`` only the same-point mode is filled (the others are NaN)."""
    independent = sigma_b is not None and report_eig is not None and report_c is not None
    out = {}
    for name, la in report_a.layers.items():
        r = len(la.sigma)
        if independent:
            le, lc = report_eig.layers[name], report_c.layers[name]
            sb = sigma_b[name]
            mask = fit_mask(r, k_range, sigmas=[la.sigma, sb, lc.sigma], curvatures=[la.h, le.h, lc.h])
        else:
            mask = fit_mask(r, k_range, sigmas=[la.sigma], curvatures=[la.h])
        same = transfer_fit(la.sigma, la.h, la.sigma, la.h, mask)
        row = dict(
            layer=name,
            layer_type=la.layer_type,
            out=la.shape[0],
            n_fit=same["n_fit"],
            k_fit=_k_label(mask),
            alpha=same["alpha"],
            alpha_r2=same["alpha_r2"],
            **{"in": la.shape[1]},
        )
        fits = {"same": same}
        if independent:
            fits["indep"] = transfer_fit(la.sigma, la.h, sb, le.h, mask)
            fits["indep_rayleigh"] = transfer_fit(la.sigma, la.h, sb, lc.h, mask)
        for mode in MODES:
            f = fits.get(mode)
            for key in ("gamma", "s", "s_pred", "rel_err"):
                row[f"{key}_{mode}"] = f[key] if f is not None else math.nan
        if independent:
            row["alpha_c"] = transfer_fit(lc.sigma, lc.h, lc.sigma, lc.h, mask)["alpha"]
            ov = le.overlap[mask] if le.overlap is not None and le.overlap.numel() == r else None
            row["overlap_median"] = float(ov.median()) if ov is not None and ov.numel() else math.nan
        else:
            row["alpha_c"] = row["overlap_median"] = math.nan
        row.update(
            participation_ratio=float(la.participation_ratio),
            pr_bound=float(la.pr_bound),
            negative_fraction=float(la.negative_fraction),
            alpha_kfac=float(la.alpha_kfac),
        )
        out[name] = row
    return out


def transfer_probe(
    model: nn.Module,
    loss_fn: Callable,
    batches: dict,
    top_k: int,
    k_range=None,
    hvp: str = "autograd",
    independent: bool = True,
    layers=None,
) -> tuple[dict[str, dict], ProbeReport]:
    """Probe ``model`` (used as given: pass a float64 copy) on batches A, B, C; returns
    (:func:`transfer_rows`, the report on A).

    A: h_k = <E_k, H E_k> along A's gradient singular directions (and K-FAC); B: the gradient's singular values
    only; C: the top-k eigenvalues of each layer's Hessian block (Lanczos, ``h="eigen"``) and h_k along C's own
    gradient directions."""

    def probe(**kw):
        return CurvatureProbe(model, loss_fn, top_k=top_k, hvp=hvp, mode="eval", layers=layers, **kw)

    report_a = probe().measure(batches["A"])
    if not independent:
        return transfer_rows(report_a, k_range=k_range), report_a
    sigma_b = probe(kfac=False).gradient_singular_values(batches["B"])
    report_eig = probe(kfac=False, h="eigen").measure(batches["C"])
    report_c = probe(kfac=False).measure(batches["C"])
    return transfer_rows(report_a, sigma_b, report_eig, report_c, k_range), report_a


def train_and_probe(task: Task, setting: Setting, progress=None) -> tuple[list[dict], list[dict]]:
    """Train with AdamW (warmup + cosine); probe alpha on batch A at each checkpoint and run the transfer test
    at the end. Returns (one transfer row per layer, one alpha row per (checkpoint, layer))."""
    torch.manual_seed(setting.seed)
    model = task.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=0.01)
    warm = max(1, setting.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / setting.steps))),
    )
    marks = sorted({round(c * setting.steps) for c in setting.checkpoints} | {setting.steps})
    g = torch.Generator().manual_seed(setting.seed)
    base = dict(arch=task.arch, dataset=task.dataset, width=task.width)
    traj: list[dict] = []
    k_range = setting.k_range
    batch_a = _to_double(task.batches["A"])

    def phase(text):
        if progress is not None:
            progress.set_postfix_str(f"{task.arch} w{task.width} {text}")

    def log_alpha(step, report, loss):
        for r in alpha_rows(report, k_range).values():
            traj.append(dict(base, step=step, train_loss=loss, **r))

    def probe_alpha(step, loss):
        phase("probe alpha")
        m = copy.deepcopy(model).double()
        probe = CurvatureProbe(m, task.loss_fn, top_k=setting.top_k, hvp=setting.hvp, kfac=False)
        log_alpha(step, probe.measure(batch_a), loss)
        phase("train")

    loss_value = math.nan
    if 0 in marks:
        probe_alpha(0, math.nan)
    model.train()
    phase("train")
    for step in range(1, setting.steps + 1):
        loss = task.loss_fn(model, task.sample(g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if progress is not None:
            progress.update(1)
        if step in marks and step != setting.steps:
            probe_alpha(step, loss_value)
    phase("transfer probe (A, B, C)" if setting.independent else "probe A")
    m = copy.deepcopy(model).double()
    rows_by_layer, report_a = transfer_probe(
        m,
        task.loss_fn,
        {k: _to_double(b) for k, b in task.batches.items()},
        setting.top_k,
        k_range,
        setting.hvp,
        setting.independent,
    )
    log_alpha(setting.steps, report_a, loss_value)
    rows = [dict(base, step=setting.steps, train_loss=loss_value, **r) for r in rows_by_layer.values()]
    return rows, traj


def run_reproduction(setting: Setting, verbose: bool = True) -> tuple[list[dict], list[dict], dict]:
    """Train and probe every (width, architecture) of ``setting``; returns (rows, trajectory rows, summary)."""
    from tqdm.auto import tqdm

    for a in setting.archs:
        if a not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {a!r}; choose from {ARCHITECTURES}")
    t0 = time.perf_counter()
    load0 = _loadavg()
    rows: list[dict] = []
    traj: list[dict] = []
    task_seconds = {}
    notes = {}
    total = setting.steps * len(setting.archs) * len(setting.widths)
    with tqdm(total=total, desc="reproduce", disable=not verbose, unit="step", mininterval=2.0) as bar:
        for width in setting.widths:
            for arch in setting.archs:
                t = time.perf_counter()
                task = build_task(arch, setting, width)
                notes.setdefault(task.dataset, [])
                if task.batch_note not in notes[task.dataset]:
                    notes[task.dataset].append(task.batch_note)
                r, tr = train_and_probe(task, setting, bar)
                rows += r
                traj += tr
                task_seconds[f"{arch} w{width}"] = time.perf_counter() - t
    summary = summarize(rows, traj)
    summary.update(
        seconds=time.perf_counter() - t0,
        task_seconds=task_seconds,
        load_start=load0,
        load_end=_loadavg(),
        k_range=setting.k_range,
        top_k=setting.top_k,
        steps=setting.steps,
        batch_notes={d: " | ".join(n) for d, n in notes.items()},
        independent=setting.independent,
    )
    return rows, traj, summary


def _loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return math.nan


# ------------------------------------------------------------------------------------------ summary
def _finite(xs):
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def _mean_sd(xs):
    xs = _finite(xs)
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _median(xs):
    xs = _finite(xs)
    return statistics.median(xs) if xs else math.nan


def _corr(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pts) < 3:
        return math.nan
    try:
        return statistics.correlation([p[0] for p in pts], [p[1] for p in pts])
    except statistics.StatisticsError:
        return math.nan


def _err_stats(errs) -> dict:
    errs = _finite(errs)
    n = len(errs)
    return dict(
        n=n,
        median=statistics.median(errs) if errs else math.nan,
        mean=statistics.fmean(errs) if errs else math.nan,
        below_5pct=sum(e < 0.05 for e in errs) / n if n else math.nan,
        below_10pct=sum(e < 0.10 for e in errs) / n if n else math.nan,
    )


def alpha_through_training(traj: list[dict]) -> list[dict]:
    """Per (width, step): mean alpha, its sd and layer count per layer type (pooled over architectures), and
    whether the paper's ordering conv > attention > MLP-up holds (None if a type is missing), the two gaps
    (conv - attention, attention - MLP-up) and whether the paper's values hold (conv in [1.5, 2.5], attention
    in [0.5, 1.5], MLP-up < 1)."""
    groups: dict[tuple[int, int], dict[str, list[float]]] = {}
    for r in traj:
        groups.setdefault((r["width"], r["step"]), {}).setdefault(r["layer_type"], []).append(r["alpha"])
    out = []
    for (w, step), by_type in sorted(groups.items()):
        types = {}
        for t, xs in sorted(by_type.items()):
            m, sd = _mean_sd(xs)
            types[t] = dict(mean=m, sd=sd, n=len(_finite(xs)))
        mean = {t: types[t]["mean"] for t in ORDER if t in types and math.isfinite(types[t]["mean"])}
        ordering = values = gaps = None
        if len(mean) == len(ORDER):
            c, a, u = (mean[t] for t in ORDER)
            ordering = c > a > u
            gaps = (c - a, a - u)
            values = all(PAPER_RANGES[t][0] <= mean[t] <= PAPER_RANGES[t][1] for t in ORDER)
        out.append(dict(width=w, step=step, types=types, ordering=ordering, paper_values=values, gaps=gaps))
    return out


def summarize(rows: list[dict], traj: list[dict] | None = None) -> dict:
    """The paper-style table: per layer type and over all layers, the transfer error in every mode, alpha,
    alpha_kfac and the participation ratio; alpha through training from ``traj``."""
    by_type: dict[str, list[dict]] = {}
    for r in rows:
        by_type.setdefault(r["layer_type"], []).append(r)
    types = {}
    for t, rs in sorted(by_type.items()):
        a_mean, a_sd = _mean_sd(r["alpha"] for r in rs)
        k_mean, k_sd = _mean_sd(r["alpha_kfac"] for r in rs)
        alphas = _finite(r["alpha"] for r in rs)
        d = dict(
            n=len(rs),
            alpha_mean=a_mean,
            alpha_sd=a_sd,
            alpha_min=min(alphas) if alphas else math.nan,
            alpha_max=max(alphas) if alphas else math.nan,
            alpha_r2_median=_median(r["alpha_r2"] for r in rs),
            alpha_ac_abs_diff_median=_median(abs(r["alpha_c"] - r["alpha"]) for r in rs),
            overlap_median=_median(r["overlap_median"] for r in rs),
            alpha_kfac_mean=k_mean,
            alpha_kfac_sd=k_sd,
            kfac_abs_diff_median=_median(abs(r["alpha_kfac"] - r["alpha"]) for r in rs),
            pr_median=_median(r["participation_ratio"] for r in rs),
            pr_bound_median=_median(r["pr_bound"] for r in rs),
        )
        for mode in MODES:
            d[f"gamma_{mode}_median"] = _median(r[f"gamma_{mode}"] for r in rs)
            d[f"s_{mode}_median"] = _median(r[f"s_{mode}"] for r in rs)
            d[f"rel_err_{mode}_median"] = _median(r[f"rel_err_{mode}"] for r in rs)
        types[t] = d
    pr_pairs = [
        (r["participation_ratio"], r["pr_bound"])
        for r in rows
        if math.isfinite(r["participation_ratio"]) and not math.isnan(r["pr_bound"])
    ]
    finite_bound = [(p, b) for p, b in pr_pairs if math.isfinite(b)]
    layer_keys = {(r["arch"], r["width"], r["layer"]) for r in rows}
    by_model = {}
    for r in rows:
        by_model.setdefault((r["arch"], r["width"]), []).append(r)
    models_ = [
        dict(
            arch=a,
            width=w,
            dataset=rs[0]["dataset"],
            n=len(rs),
            train_loss=rs[0].get("train_loss", math.nan),
            alpha_median=_median(r["alpha"] for r in rs),
            **{f"rel_err_{m}_median": _median(r[f"rel_err_{m}"] for r in rs) for m in MODES},
        )
        for (a, w), rs in sorted(by_model.items(), key=lambda kv: (kv[0][1], ARCH_ORDER.get(kv[0][0], 99)))
    ]
    return dict(
        n_layers=len(rows),
        n_distinct_layers=len(layer_keys),
        n_fitted=len(_finite(r["rel_err_same"] for r in rows)),
        architectures=sorted({r["arch"] for r in rows}),
        model_families=sorted({FAMILY.get(r["arch"], r["arch"]) for r in rows}),
        datasets=sorted({r["dataset"] for r in rows}),
        widths=sorted({r["width"] for r in rows}),
        modes={mode: _err_stats(r[f"rel_err_{mode}"] for r in rows) for mode in MODES},
        alpha_r2_median=_median(r["alpha_r2"] for r in rows),
        alpha_ac_abs_diff_median=_median(abs(r["alpha_c"] - r["alpha"]) for r in rows),
        overlap_median=_median(r["overlap_median"] for r in rows),
        pr_median=_median(p for p, _ in pr_pairs),
        pr_below_bound_frac=sum(p <= b for p, b in pr_pairs) / len(pr_pairs) if pr_pairs else math.nan,
        pr_bound_finite=len(finite_bound),
        pr_bound_median=_median(b for _, b in finite_bound),
        s_le_1=len(pr_pairs) - len(finite_bound),
        kfac_corr=_corr([r["alpha"] for r in rows], [r["alpha_kfac"] for r in rows]),
        kfac_abs_diff_median=_median(abs(r["alpha_kfac"] - r["alpha"]) for r in rows),
        negative_fraction_mean=_mean_sd(r["negative_fraction"] for r in rows)[0],
        types=types,
        models=models_,
        training=alpha_through_training(traj or []),
    )


def _f(v, fmt=".2f"):
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _pct(v):
    return "nan" if v is None or math.isnan(v) else f"{100 * v:.1f}%"


def _verdict(err):
    if err is None or math.isnan(err):
        return "no fit"
    return "agrees" if err <= AGREE_WITHIN else "DISAGREES"


def format_transfer_table(summary: dict) -> str:
    """Markdown: the transfer identity in both forms (same-point and independent) side by side."""
    s = summary
    lo, hi = s.get("k_range", (1, s.get("top_k", "top_k")))
    lines = [
        f"Fit range: k = {lo}..{hi} (of the top {s.get('top_k', '?')} singular directions / eigenvalues); in each "
        "layer the same index set K serves every fit in every mode (k dropped where any gradient spectrum is "
        "below 1e-6 sigma_1 or any curvature vector is <= 0).",
        "",
        "| layer type | layers | alpha (A) mean ± sd | paper alpha | median R² of alpha fit | gamma A / B "
        "| s same-point (A) | s independent (eig C) | s Rayleigh C | rel err same-point | rel err independent "
        "| rel err indep. data, Rayleigh s | median overlap abs(q_k·E_k) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t, d in s["types"].items():
        lines.append(
            f"| {t} | {d['n']} | {_f(d['alpha_mean'])} ± {_f(d['alpha_sd'])} | {PAPER['alpha'].get(t, '-')} | "
            f"{_f(d['alpha_r2_median'])} | {_f(d['gamma_same_median'])} / {_f(d['gamma_indep_median'])} | "
            f"{_f(d['s_same_median'])} | {_f(d['s_indep_median'])} | {_f(d['s_indep_rayleigh_median'])} | "
            f"{_pct(d['rel_err_same_median'])} | **{_pct(d['rel_err_indep_median'])}** | "
            f"{_pct(d['rel_err_indep_rayleigh_median'])} | {_f(d['overlap_median'])} |"
        )
    m = s["modes"]
    lines.append(
        f"| **all** | {s['n_layers']} | | | {_f(s['alpha_r2_median'])} | | | | | "
        f"{_pct(m['same']['median'])} | **{_pct(m['indep']['median'])}** | {_pct(m['indep_rayleigh']['median'])} "
        f"| {_f(s['overlap_median'])} |"
    )
    lines += [
        "",
        f"Layers: {s['n_layers']} probed ({s['n_distinct_layers']} distinct weight matrices, {s['n_fitted']} with "
        f"finite fits) in {len(s['architectures'])} models ({', '.join(s['architectures'])}; "
        f"{len(s['model_families'])} architectures: {', '.join(s['model_families'])}), widths "
        f"{', '.join(str(w) for w in s['widths'])}, on {len(s['datasets'])} datasets ({', '.join(s['datasets'])}).",
        "",
        "median |s - alpha*gamma| / |s| over all layers (paper: "
        f"~{100 * PAPER['median_rel_err']:.0f}% over {PAPER['n_layers']} layers):",
        "",
        "| form | alpha from | gamma from | s from | layers | median | mean | < 5% | < 10% | vs paper |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    sources = {
        "same": ("A", "A", "A: h_k along A's gradient directions"),
        "indep": ("A", "B", "C: top-k Hessian-block eigenvalues (Lanczos)"),
        "indep_rayleigh": ("A", "B", "C: h_k along C's gradient directions"),
    }
    for mode, (a, g, src) in sources.items():
        e = m[mode]
        lines.append(
            f"| {MODE_NAMES[mode]} | {a} | {g} | {src} | {e['n']} | {_pct(e['median'])} | {_pct(e['mean'])} | "
            f"{_f(100 * e['below_5pct'], '.0f')}% | {_f(100 * e['below_10pct'], '.0f')}% | {_verdict(e['median'])} |"
        )
    if s.get("models"):
        lines += [
            "",
            "| model | width | dataset | layers | final train loss | median alpha | rel err same-point "
            "| rel err independent | rel err indep. data, Rayleigh s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in s["models"]:
            lines.append(
                f"| {d['arch']} | {d['width']} | {d['dataset']} | {d['n']} | {_f(d['train_loss'], '.3f')} | "
                f"{_f(d['alpha_median'])} | {_pct(d['rel_err_same_median'])} | {_pct(d['rel_err_indep_median'])} | "
                f"{_pct(d['rel_err_indep_rayleigh_median'])} |"
            )
    notes = s.get("batch_notes") or {}
    if notes:
        lines += [
            "",
            "Batches (disjoint samples): " + "; ".join(f"{d}: {n}" for d, n in sorted(notes.items())) + ".",
        ]
    lines += [
        "",
        f"alpha on batch C against alpha on batch A: median |alpha_C - alpha_A| {_f(s['alpha_ac_abs_diff_median'])}. "
        f"Median overlap |<q_k, E_k>| of C's Hessian eigenvectors with C's gradient directions "
        f"{_f(s['overlap_median'])} (1: the gradient's singular directions are Hessian eigenvectors).",
    ]
    return "\n".join(lines)


def format_alpha_table(summary: dict) -> str:
    """Markdown: alpha by layer type with the paper's values, alpha_kfac and the participation ratio."""
    lines = [
        "| layer type | layers | alpha mean ± sd | alpha range | paper alpha | alpha_kfac mean ± sd "
        "| median abs(alpha_kfac - alpha) | median PR | median zeta bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t, d in summary["types"].items():
        lines.append(
            f"| {t} | {d['n']} | {_f(d['alpha_mean'])} ± {_f(d['alpha_sd'])} | "
            f"{_f(d['alpha_min'])} .. {_f(d['alpha_max'])} | {PAPER['alpha'].get(t, '-')} | "
            f"{_f(d['alpha_kfac_mean'])} ± {_f(d['alpha_kfac_sd'])} | {_f(d['kfac_abs_diff_median'])} | "
            f"{_f(d['pr_median'])} | {_f(d['pr_bound_median'])} |"
        )
    s = summary
    lines += [
        "",
        f"Participation ratio: median {_f(s['pr_median'])}; PR <= zeta(s)^2/zeta(2s) in "
        f"{_f(100 * s['pr_below_bound_frac'], '.0f')}% of layers (finite bound in {s['pr_bound_finite']}, "
        f"median bound {_f(s['pr_bound_median'])}; {s['s_le_1']} layers with s <= 1 have no finite bound).",
        f"alpha_kfac against alpha: correlation {_f(s['kfac_corr'])}, median abs difference "
        f"{_f(s['kfac_abs_diff_median'])}. Mean fraction of negative h_k: {_f(s['negative_fraction_mean'], '.3f')}.",
    ]
    return "\n".join(lines)


def format_training_table(summary: dict) -> str:
    """Markdown: mean alpha per layer type at each probed step, and whether the paper's ordering holds."""
    tr = summary.get("training") or []
    if not tr:
        return "(no alpha-through-training probes)"
    types = sorted({t for e in tr for t in e["types"]})
    lines = [
        "| width | step | " + " | ".join(types) + " | conv > attention > mlp_up | paper values |",
        "|---|---|" + "---|" * len(types) + "---|---|",
    ]

    def yes(v):
        return "-" if v is None else ("yes" if v else "no")

    for e in tr:
        cells = [
            f"{_f(e['types'][t]['mean'])} ({e['types'][t]['n']})" if t in e["types"] else "-" for t in types
        ]
        lines.append(
            f"| {e['width']} | {e['step']} | "
            + " | ".join(cells)
            + f" | {yes(e['ordering'])} | {yes(e['paper_values'])} |"
        )
    lines += ["", "Cells: mean alpha over the layers of that type (count), pooled over architectures."]
    lines += ["", ordering_statement(summary)]
    return "\n".join(lines)


def ordering_statement(summary: dict) -> str:
    """Plain language: at which widths and steps the paper's ordering (and its values) appear."""
    tr = summary.get("training") or []
    parts = []
    for w in sorted({e["width"] for e in tr}):
        es = [e for e in tr if e["width"] == w]
        held = [e["step"] for e in es if e["ordering"]]
        vals = [e["step"] for e in es if e["paper_values"]]
        probed = [e["step"] for e in es if e["ordering"] is not None]
        if not probed:
            parts.append(f"width {w}: not testable (conv, attention and mlp_up layers not all probed)")
            continue
        if held:
            gaps = ", ".join(
                f"{e['step']}: {e['gaps'][0]:+.2f} / {e['gaps'][1]:+.2f}" for e in es if e["ordering"]
            )
            txt = (
                f"width {w}: ordering conv > attention > MLP-up at steps {held} of {probed} "
                f"(mean-alpha gaps conv - attention / attention - MLP-up at step {gaps})"
            )
        else:
            txt = f"width {w}: the ordering conv > attention > MLP-up appears at none of steps {probed}"
        txt += "; the paper's values (conv 1.5-2.5, attention 0.5-1.5, MLP-up < 1) " + (
            f"at steps {vals}" if vals else "at no step"
        )
        parts.append(txt)
    return "Paper's ordering through training: " + ("; ".join(parts) if parts else "no probes") + "."


def format_table(summary: dict) -> str:
    """The three tables: transfer identity (both forms), alpha by layer type, alpha through training."""
    return "\n\n".join(
        [
            "## Transfer identity s = alpha * gamma, same-point and independent",
            format_transfer_table(summary),
            "## alpha by layer type (end of training, batch A)",
            format_alpha_table(summary),
            "## alpha through training (batch A, per layer type)",
            format_training_table(summary),
        ]
    )


def reference_checks(summary: dict) -> list[str]:
    """Plain-language comparisons with the paper's claims (agreements and disagreements)."""
    notes = []
    t = summary["types"]
    for name in ORDER:
        if name in t:
            lo, hi = PAPER_RANGES[name]
            a = t[name]["alpha_mean"]
            verdict = "agrees" if lo <= a <= hi else "DISAGREES"
            notes.append(
                f"{name}: alpha {_f(a)} ± {_f(t[name]['alpha_sd'])} vs paper {PAPER['alpha'][name]}: {verdict}"
            )
    for mode in MODES:
        e = summary["modes"][mode]
        notes.append(
            f"s vs alpha*gamma, {MODE_NAMES[mode]}: median rel err {_pct(e['median'])} over {e['n']} layers vs "
            f"paper ~2% over 93: {_verdict(e['median'])} (agreement: median <= {100 * AGREE_WITHIN:.0f}%)"
        )
    notes.append(ordering_statement(summary))
    f = summary["pr_below_bound_frac"]
    notes.append(f"PR <= zeta bound in {_f(100 * f, '.0f')}% of layers; median PR {_f(summary['pr_median'])}")
    return notes


# ------------------------------------------------------------------------------------------ outputs
def _write_csv(path, rows, fields):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})


def write_outputs(
    rows: list[dict], traj: list[dict], summary: dict, out_dir, plots: bool = True
) -> list[Path]:
    """layers.csv (one transfer row per layer), alpha_training.csv (one row per probed step and layer),
    summary.csv (per layer type), table.md and PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "layers.csv", out / "alpha_training.csv", out / "summary.csv", out / "table.md"]
    _write_csv(written[0], rows, ROW_FIELDS)
    _write_csv(written[1], traj, TRAJ_FIELDS)
    tfields = ["layer_type"] + list(next(iter(summary["types"].values())).keys()) if summary["types"] else []
    with open(written[2], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(tfields)
        for t, d in summary["types"].items():
            w.writerow([t, *d.values()])
        w.writerow([])
        for k, v in summary.items():
            if k in ("types", "training", "models"):
                continue
            if isinstance(v, dict):
                for kk, vv in v.items():
                    w.writerow([f"{k}.{kk}", vv])
            else:
                w.writerow([k, v if not isinstance(v, list) else ";".join(map(str, v))])
    text = (
        format_table(summary)
        + "\n\n## Against the paper\n\n"
        + "\n".join(f"- {n}" for n in reference_checks(summary))
    )
    if "seconds" in summary:
        text += (
            f"\n\nRun time {summary['seconds']:.0f} s (load average {_f(summary.get('load_start'), '.1f')} at the "
            f"start, {_f(summary.get('load_end'), '.1f')} at the end); per model: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in summary.get("task_seconds", {}).items())
            + "."
        )
    written[3].write_text(text + "\n")
    if plots:
        written += plot_summary(rows, traj, out)
    return written


def plot_summary(rows: list[dict], traj: list[dict], out: Path) -> list[Path]:
    """alpha_by_type.png, transfer.png (both forms), alpha_training.png, participation.png, alignment.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .reporting import _save_figure

    types = sorted({r["layer_type"] for r in rows} | {r["layer_type"] for r in traj})
    colors = {t: f"C{i}" for i, t in enumerate(types)}
    paths = []

    def save(fig, name):
        paths.append(_save_figure(fig, out / name))

    fig, ax = plt.subplots(figsize=(6, 4.2))
    rtypes = sorted({r["layer_type"] for r in rows})
    for i, t in enumerate(rtypes):
        ys = _finite(r["alpha"] for r in rows if r["layer_type"] == t)
        xs = [i + 0.08 * ((j % 7) - 3) for j in range(len(ys))]
        ax.plot(xs, ys, "o", ms=4, alpha=0.7, color=colors[t])
        if ys:
            ax.plot([i - 0.3, i + 0.3], [statistics.fmean(ys)] * 2, "k-", lw=2)
    for t, ref in (("conv", 2.0), ("attention", 1.0), ("mlp_up", 1.0)):
        if t in rtypes:
            style = "r:" if t == "mlp_up" else "r--"
            ax.plot([rtypes.index(t) - 0.4, rtypes.index(t) + 0.4], [ref] * 2, style, lw=1.5)
    ax.set_xticks(range(len(rtypes)), rtypes, rotation=20)
    ax.set_ylabel("alpha (h_k ~ sigma_k^alpha)")
    ax.set_title("alpha by layer type, end of training (red: paper; dotted: MLP-up bound < 1)", fontsize=9)
    save(fig, "alpha_by_type.png")

    fig, axes = plt.subplots(1, len(MODES), figsize=(4.6 * len(MODES), 4.4))
    for ax, mode in zip(axes, MODES):
        allv = []
        for t in rtypes:
            pts = [
                (r[f"s_pred_{mode}"], r[f"s_{mode}"])
                for r in rows
                if r["layer_type"] == t
                and math.isfinite(r[f"s_pred_{mode}"])
                and math.isfinite(r[f"s_{mode}"])
            ]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=4, label=t, color=colors[t])
                allv += [v for p in pts for v in p]
        if allv:
            lo, hi = min(allv), max(allv)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="s = alpha*gamma")
        med = _median(r[f"rel_err_{mode}"] for r in rows)
        ax.set_xlabel("alpha * gamma  (alpha: A, gamma: " + ("A)" if mode == "same" else "B)"))
        ax.set_ylabel(
            {
                "same": "s from h_k on A",
                "indep": "s from Hessian eigenvalues on C",
                "indep_rayleigh": "s from h_k on C",
            }[mode]
        )
        ax.set_title(f"{MODE_NAMES[mode]}: median rel err {_pct(med)}", fontsize=9)
        ax.legend(fontsize=7)
    save(fig, "transfer.png")

    widths = sorted({r["width"] for r in traj})
    if widths:
        fig, axes = plt.subplots(1, len(widths), figsize=(5.5 * len(widths), 4.2), squeeze=False, sharey=True)
        for ax, w in zip(axes[0], widths):
            for t in types:
                steps = sorted({r["step"] for r in traj if r["width"] == w and r["layer_type"] == t})
                if not steps:
                    continue
                ms, sds = [], []
                for st in steps:
                    m, sd = _mean_sd(
                        r["alpha"]
                        for r in traj
                        if r["width"] == w and r["layer_type"] == t and r["step"] == st
                    )
                    ms.append(m)
                    sds.append(sd)
                ax.errorbar(steps, ms, yerr=sds, marker="o", ms=4, capsize=2, label=t, color=colors[t])
            for t, ref, style in (("conv", 2.0, "--"), ("attention", 1.0, "--"), ("mlp_up", 1.0, ":")):
                if t in colors:
                    ax.axhline(ref, color=colors[t], ls=style, lw=1)
            ax.set_xlabel("training step")
            ax.set_ylabel("alpha (mean ± sd over layers)")
            ax.set_title(
                f"alpha through training, width {w} (lines: paper conv 2, attn 1; dotted: MLP-up < 1)",
                fontsize=8,
            )
            ax.legend(fontsize=7)
        save(fig, "alpha_training.png")

    def scatter(xkey, ykey, xlabel, ylabel, title, name, log=False):
        fig, ax = plt.subplots(figsize=(4.8, 4.4))
        allv = []
        for t in rtypes:
            pts = [
                (r[xkey], r[ykey])
                for r in rows
                if r["layer_type"] == t and math.isfinite(r[xkey]) and math.isfinite(r[ykey])
            ]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=4, label=t, color=colors[t])
                allv += [v for p in pts for v in p]
        if allv:
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
