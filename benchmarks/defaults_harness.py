"""An independent harness for SpectralNewton's defaults (issue 22): plain PyTorch loops, own data and models.

Nothing here reuses ``benchmarks/sample_efficiency.py`` or the recipes: the data loaders, the models, the
training loop, the schedules and the baselines (AdamW, and a small fp32 batched Muon) are written out below.
SpectralNewton is built the way a user builds it, ``SpectralNewton.from_model(model, lr=lr)``, plus the
options a variant names.

Tasks (all offline, CPU):

* ``cnn``: a 2-conv CNN (conv 1->16, ReLU, conv 16->32, ReLU, 2x2 max pool, linear head) on scikit-learn's
  8x8 digits (1437 train / 360 val, batch 64). Metric: val accuracy.
* ``gpt``: a hand-written GPT (blocks of ``qkv``, ``proj``, ``up``, ``down`` nn.Linear layers, GELU called
  functionally, pre-LayerNorm, causal SDPA; width 64, 2 layers, 4 heads, context 64, batch 16) on bytes of
  the CPython standard library's sources. Metric: val loss (64 fixed windows).
* ``cnn_tanh``: the same convolutions with tanh and a 2x2 average pool before the head.
* ``resnet``: a ResNet-20-like CNN (3 stages x 3 basic blocks, widths 16/32/64, BatchNorm) on digits.
* ``gpt256``: the hand-written GPT at width 256, 4 layers, 8 heads.

Optimizers (``--optimizers``): ``adamw`` (torch.optim.AdamW, betas (0.9, 0.95)); ``muon`` (momentum 0.95,
Nesterov, 5 quintic Newton-Schulz steps in float32, update scaled to RMS 0.2 like
``adjust_lr_fn="match_rms_adamw"``, on every hidden matrix including conv kernels viewed as (out, in*k*k);
AdamW on embeddings, the head, norms and biases); ``sn`` (``SpectralNewton.from_model`` with its defaults);
``sn:key=value:...`` variants, keys: any SpectralNewton option (``damping``, ``scale``, ``momentum``,
``nesterov``, ``rms_target``, ``adamw_lr``), ``alpha`` (a number, ``by_layer``, ``auto``), one layer type's
alpha (``conv=1``, ``mlp_up=2``, ...), ``head=spectral`` (the head stepped as a spectral matrix with alpha 1),
``paper=1`` (the first paper's by-layer alphas: conv 2, attention 1, MLP-up 0.5, others 1, whatever the library
default is), ``sched=A-B`` (alpha moved linearly from A to B over training, on every spectral matrix), ``every=N``,
``ema=E``, ``amax=A`` (AutoAlpha's probe period, EMA weight and upper clamp for ``alpha=auto``). All use weight decay 0 and the same learning-rate grid per task
(``--lrs`` overrides it); with RMS-matched updates (Muon 0.2, SpectralNewton ``scale="rms"`` 0.2) one grid is
meaningful for all.

Schedules: ``constant`` and ``cosine`` (5% linear warmup, cosine decay to 0). For a given seed every run
starts from the same initialisation and sees the same batches.

Every finished run is appended as one JSON line to ``--out`` (a rerun skips runs already there), so a long
campaign can be stopped and resumed. ``--analyze`` reads one or more such files and prints the tables:

* CNN tasks: the target is AdamW's best final accuracy over the grid (seed-mean); for every optimizer, at its
  best lr, the first evaluated step at which the seed-mean curve reaches it and its ratio to AdamW's.
* Transformer tasks: the target is Muon's best final val loss (seed-mean); steps to reach it, and the final
  loss with its paired difference to Muon's (same seeds).

Confidence intervals are 95% t-intervals over seeds (mean +- t_{0.975, n-1} sd / sqrt(n)).

    python benchmarks/defaults_harness.py --tasks cnn --schedules constant cosine --seeds 5 \\
        --optimizers adamw muon sn sn:alpha=1 --out outputs/defaults/cnn.jsonl
    python benchmarks/defaults_harness.py --analyze outputs/defaults/cnn.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
import sysconfig
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ----------------------------------------------------------------------------------------------- data


def digits_data(seed: int = 0):
    """scikit-learn digits as (1, 8, 8) images scaled to [0, 1] and standardised; a fixed 1437 / 360 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_val = 360
    xt, yt, xv, yv = x[n_val:], y[n_val:], x[:n_val], y[:n_val]
    mu, sd = xt.mean(), xt.std()
    return ((xt - mu) / sd, yt), ((xv - mu) / sd, yv)


def stdlib_bytes(max_bytes: int = 2_000_000):
    """The top-level ``*.py`` files of this interpreter's standard library, sorted by name, as one uint8
    tensor; the last 10% is the validation split."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chunks, total = [], 0
    for f in files:
        b = f.read_bytes()
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    data = torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()
    cut = int(0.9 * data.numel())
    return data[:cut], data[cut:]


# --------------------------------------------------------------------------------------------- models


class CNN2(nn.Module):
    """Two 3x3 convolutions with ReLU, a 2x2 max pool and a linear head."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 16, classes)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


class CNN2Tanh(nn.Module):
    """The same two convolutions with tanh and a 2x2 adaptive average pool (the layout of the project's
    ``tiny_cnn``, written out here)."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4, classes)

    def forward(self, x):
        x = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bna = nn.BatchNorm2d(cout)
        self.b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bnb = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bnb(self.b(F.relu(self.bna(self.a(x)))))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResNet20(nn.Module):
    """ResNet-20's layout (3 stages x 3 basic blocks, widths 16 / 32 / 64) for 1-channel 8x8 images."""

    def __init__(self, classes: int = 10, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, w in enumerate((16, 32, 64)):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class Block(nn.Module):
    """A GPT block as people write it: fused ``qkv``, ``proj``, ``up``, ``down``; GELU called functionally."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, ctx: int = 64, vocab: int = 256):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


# ---------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # "acc" (higher is better) or "loss"
    steps: int
    eval_every: int
    batch: int
    lrs: tuple[float, ...]


TASKS = {
    "cnn": Task("cnn", "acc", 300, 10, 64, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    "cnn_tanh": Task("cnn_tanh", "acc", 300, 10, 64, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    "resnet": Task("resnet", "acc", 300, 20, 64, (3e-3, 1e-2, 3e-2, 1e-1)),
    "gpt": Task("gpt", "loss", 300, 25, 16, (1e-3, 3e-3, 1e-2, 3e-2)),
    "gpt256": Task("gpt256", "loss", 1000, 50, 16, (1e-3, 3e-3, 1e-2, 3e-2)),
}
CTX = 64
_CACHE: dict = {}


def build_model(task: str) -> nn.Module:
    if task == "cnn":
        return CNN2()
    if task == "cnn_tanh":
        return CNN2Tanh()
    if task == "resnet":
        return ResNet20()
    if task == "gpt":
        return GPT(64, 2, 4, CTX)
    if task == "gpt256":
        return GPT(256, 4, 8, CTX)
    raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")


def data_for(task: str):
    key = "text" if task.startswith("gpt") else "digits"
    if key not in _CACHE:
        if key == "digits":
            _CACHE[key] = digits_data()
        else:
            train, val = stdlib_bytes()
            g = torch.Generator().manual_seed(12345)
            starts = torch.randint(0, val.numel() - CTX - 1, (64,), generator=g)
            _CACHE[key] = (train, torch.stack([val[s : s + CTX + 1] for s in starts.tolist()]))
    return _CACHE[key]


def batch_for(task: str, gen: torch.Generator, size: int):
    if task.startswith("gpt"):
        train, _ = data_for(task)
        starts = torch.randint(0, train.numel() - CTX - 1, (size,), generator=gen).tolist()
        return torch.stack([train[s : s + CTX + 1] for s in starts])
    (xt, yt), _ = data_for(task)
    idx = torch.randint(0, len(yt), (size,), generator=gen)
    return xt[idx], yt[idx]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):  # tokens (n, ctx + 1)
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate(task: str, model: nn.Module) -> tuple[float, float]:
    """(the task's metric, val loss): accuracy and cross-entropy on images, val loss twice on text."""
    model.eval()
    if task.startswith("gpt"):
        v = loss = loss_fn(model, data_for(task)[1]).item()
    else:
        _, (xv, yv) = data_for(task)
        logits = model(xv)
        v = (logits.argmax(1) == yv).float().mean().item()
        loss = F.cross_entropy(logits, yv).item()
    model.train()
    return v, loss


# ------------------------------------------------------------------------------------------ optimizers


def newton_schulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration on a batch (b, m, n), in float32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon in float32, batched over same-shape matrices: EMA-free momentum as in Keller Jordan's reference
    (buf = mu buf + g; Nesterov g + mu buf), Newton-Schulz, update RMS matched to ``rms`` (0.2 * sqrt(max(m, n))
    times the orthogonalised matrix, like torch.optim.Muon's ``match_rms_adamw``). Tensors of any ndim >= 2
    are viewed as (shape[0], rest)."""

    def __init__(self, params, lr: float, momentum: float = 0.95, nesterov: bool = True, rms: float = 0.2):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, rms=rms))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            by_shape = defaultdict(list)
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                buf = st.setdefault("buf", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(p.grad)
                u = p.grad.add(buf, alpha=g["momentum"]) if g["nesterov"] else buf
                by_shape[(p.shape[0], p[0].numel())].append((p, u.reshape(p.shape[0], -1)))
            for (m, n), items in by_shape.items():
                X = newton_schulz5(torch.stack([u for _, u in items]))
                scale = g["rms"] * math.sqrt(max(m, n))
                for (p, _), x in zip(items, X):
                    p.add_(x.view_as(p).to(p.dtype), alpha=-g["lr"] * scale)


def _harness_split(model: nn.Module):
    """The harness's own split for the baselines: hidden matrices (ndim >= 2, not an nn.Embedding, not the
    model's last nn.Linear) vs the rest. Independent of spectral_dist's classifier."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1].weight if linears else None
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden, rest = [], []
    for p in model.parameters():
        (hidden if p.ndim >= 2 and id(p) not in emb and p is not head else rest).append(p)
    return hidden, rest


def parse_variant(name: str) -> dict:
    """``sn:key=value:...`` -> {key: value} (numbers parsed; ``true``/``false`` as bools)."""
    out = {}
    for part in name.split(":")[1:]:
        k, _, v = part.partition("=")
        if v.lower() in ("true", "false", "on", "off"):
            out[k] = v.lower() in ("true", "on")
        else:
            try:
                out[k] = float(v) if any(c in v for c in ".e") else int(v)
            except ValueError:
                out[k] = v
    return out


# the first paper's by-layer exponents (the library default before issue 22), for ``sn:paper=1``
PAPER_ALPHA = {"conv": 2.0, "attention": 1.0, "mlp_up": 0.5, "mlp_down": 1.0, "matrix": 1.0}
SN_OPTIONS = ("damping", "scale", "momentum", "nesterov", "rms_target", "adamw_lr", "basis", "weight_decay")


class Run:
    """The optimizers of one run, with per-step hooks (alpha schedule, AutoAlpha) and the LR schedule."""

    def __init__(self, opt_name: str, model: nn.Module, lr: float, steps: int):
        from spectral_dist.optim import AutoAlpha, SpectralNewton, classify_parameters
        from spectral_dist.optim.classify import SPECTRAL_TYPES

        self.opts, self.auto, self.sched_alpha = [], None, None
        self.steps = steps
        if opt_name == "adamw":
            self.opts.append(
                torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
            )
        elif opt_name == "muon":
            hidden, rest = _harness_split(model)
            self.opts.append(Muon(hidden, lr=lr))
            self.opts.append(torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.95), weight_decay=0.0))
        elif opt_name == "sn" or opt_name.startswith("sn:"):
            v = parse_variant(opt_name)
            opts = {k: v.pop(k) for k in list(v) if k in SN_OPTIONS}
            if "nesterov" in opts:
                opts["nesterov"] = bool(opts["nesterov"])
            alpha = v.pop("alpha", "by_layer")
            if v.pop("paper", False):
                alpha = dict(PAPER_ALPHA)
            per_type = {k: float(v.pop(k)) for k in list(v) if k in SPECTRAL_TYPES}
            if per_type:
                if isinstance(alpha, dict):
                    alpha = {**alpha, **per_type}
                elif alpha == "by_layer":
                    alpha = per_type
                else:
                    alpha = {**dict.fromkeys(SPECTRAL_TYPES, alpha), **per_type}
            head = v.pop("head", "adamw")
            sched = v.pop("sched", None)
            every = int(v.pop("every", 50))
            auto_kw = {"ema": float(v.pop("ema", 0.5)), "clamp": (0.0, float(v.pop("amax", 2.5)))}
            if v:
                raise ValueError(f"unknown keys {sorted(v)} in optimizer {opt_name!r}")
            if head == "spectral":
                infos = classify_parameters(model)
                heads = [i for i in infos if i.layer_type == "head" and i.param.ndim >= 2]
                for i in heads:
                    i.param.requires_grad_(False)
                opt = SpectralNewton.from_model(model, alpha=alpha, lr=lr, **opts)
                for i in heads:
                    i.param.requires_grad_(True)
                opt.add_param_group(
                    {"params": [i.param for i in heads], "param_names": [i.name for i in heads], "alpha": 1.0,
                     "spectral": True, "layer_type": "matrix"}
                )  # fmt: skip
            else:
                opt = SpectralNewton.from_model(model, alpha=alpha, lr=lr, **opts)
            if sched is not None:
                a0, a1 = (float(s) for s in str(sched).split("-"))
                self.sched_alpha = (a0, a1, [g for g in opt.param_groups if g["spectral"]])
            if alpha == "auto":
                self.auto = AutoAlpha(opt, model, loss_fn, every=every, **auto_kw)
            self.opts.append(opt)
        else:
            raise ValueError(f"unknown optimizer {opt_name!r}")
        for o in self.opts:
            for g in o.param_groups:
                g["harness_lr"] = g["lr"]

    def step(self, step: int, schedule: str, batch) -> None:
        """Set this step's lr (and alpha), probe if due, step every optimizer. ``step`` counts from 0."""
        mult = lr_multiplier(schedule, step, self.steps)
        for o in self.opts:
            for g in o.param_groups:
                g["lr"] = g["harness_lr"] * mult
        if self.sched_alpha is not None:
            a0, a1, groups = self.sched_alpha
            a = a0 + (a1 - a0) * step / max(1, self.steps - 1)
            for g in groups:
                g["alpha"] = a
        for o in self.opts:
            o.step()

    def describe(self) -> dict:
        """What actually ran: per optimizer group, its layer type, alpha and the main options."""
        keys = ("alpha", "damping", "momentum", "nesterov", "scale", "rms_target", "basis", "layer_type")
        return {
            type(o).__name__: [
                {k: g[k] for k in keys if k in g} for g in o.param_groups if g.get("spectral", True)
            ]
            for o in self.opts
        }

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad(set_to_none=True)


def lr_multiplier(schedule: str, step: int, total: int) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        warm = max(1, total // 20)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    raise ValueError(f"unknown schedule {schedule!r}")


# ---------------------------------------------------------------------------------------------- training


def train(task: str, opt_name: str, lr: float, seed: int, schedule: str, steps: int | None = None) -> dict:
    spec = TASKS[task]
    steps = steps or spec.steps
    torch.manual_seed(seed)
    model = build_model(task)
    run = Run(opt_name, model, lr, steps)
    gen = torch.Generator().manual_seed(10_000 + seed)
    curve, loss_curve, t0 = [], [], time.perf_counter()
    for step in range(steps):
        batch = batch_for(task, gen, spec.batch)
        if run.auto is not None:
            run.auto.maybe_update(step, batch)
        loss = loss_fn(model, batch)
        run.zero_grad()
        loss.backward()
        run.step(step, schedule, batch)
        if not math.isfinite(loss.item()):
            curve.append((step + 1, math.nan))
            break
        if (step + 1) % spec.eval_every == 0 or step + 1 == steps:
            v, vl = evaluate(task, model)
            curve.append((step + 1, v))
            loss_curve.append((step + 1, vl))
    out = dict(task=task, opt=opt_name, lr=lr, seed=seed, schedule=schedule, steps=steps, curve=curve)
    if spec.metric == "acc":
        out["loss_curve"] = loss_curve
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["config"] = run.describe()
    if run.auto is not None:
        out["alpha_estimates"] = {k: v for k, v in run.auto.estimates().items()}
    return out


def _key(r: dict) -> tuple:
    return (r["task"], r["opt"], float(r["lr"]), int(r["seed"]), r["schedule"], int(r["steps"]))


def load_runs(paths) -> list[dict]:
    runs = []
    for p in paths:
        p = Path(p)
        if p.exists():  # .jsonl, or .jsonl.gz (the stored campaigns in benchmarks/results/defaults/)
            text = gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
            runs += [json.loads(line) for line in text.splitlines() if line.strip()]
    return runs


# ---------------------------------------------------------------------------------------------- analysis

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def ci95(xs) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width nan for fewer than 2 values."""
    xs = [float(x) for x in xs]
    if not xs:
        return math.nan, math.nan
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, _T975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def mean_curve(curves) -> list[tuple[int, float]]:
    n = min(len(c) for c in curves)
    return [(curves[0][i][0], statistics.fmean(c[i][1] for c in curves)) for i in range(n)]


def steps_to(curve, target: float, metric: str, tol: float = 1e-9) -> float:
    for s, v in curve:
        if math.isfinite(v) and (v >= target - tol if metric == "acc" else v <= target + tol):
            return s
    return math.inf


def analyze(runs: list[dict], task: str, schedule: str, baseline: str | None = None) -> dict:
    """Per optimizer: best lr (fewest steps to the target on the seed-mean curve; ties and never-reaching
    optimizers: the better final metric), steps to the target, per-seed steps, final metric with its 95% CI,
    and the paired (same seeds) difference of the final metric to the baseline's at its best lr."""
    spec = TASKS[task]
    metric = spec.metric
    baseline = baseline or ("adamw" if metric == "acc" else "muon")
    table: dict = defaultdict(lambda: defaultdict(dict))  # opt -> lr -> seed -> curve
    for r in runs:
        if r["task"] == task and r["schedule"] == schedule:
            table[r["opt"]][float(r["lr"])][int(r["seed"])] = r["curve"]
    if baseline not in table:
        return {}
    sign = 1.0 if metric == "acc" else -1.0  # larger sign * metric is better
    bad = 0.0 if metric == "acc" else 10.0  # a diverged run counts as chance / a large loss

    def final(c):
        v = c[-1][1] if c else math.nan
        return v if math.isfinite(v) else bad

    def summary(by_seed):
        ends = {c[-1][0] for c in by_seed.values() if c}
        full = [
            c for c in by_seed.values() if c and c[-1][0] == max(ends) and all(math.isfinite(v) for _, v in c)
        ]
        mc = mean_curve(full) if len(full) == len(by_seed) else []
        return mc, statistics.fmean(final(c) for c in by_seed.values())

    base_final = {lr: summary(s)[1] for lr, s in table[baseline].items()}
    target_lr = max(base_final, key=lambda lr: sign * base_final[lr])
    target = base_final[target_lr]
    out = {"task": task, "schedule": schedule, "metric": metric, "target": target, "baseline": baseline,
           "target_lr": target_lr, "optimizers": {}}  # fmt: skip
    base_seeds = None
    for opt in [baseline] + sorted(o for o in table if o != baseline):
        rows = {}
        for lr, by_seed in table[opt].items():
            mc, fm = summary(by_seed)
            rows[lr] = dict(steps=steps_to(mc, target, metric), final=fm)
        best_lr = min(rows, key=lambda lr: (rows[lr]["steps"], -sign * rows[lr]["final"]))
        by_seed = table[opt][best_lr]
        per_seed = [steps_to(c, target, metric) for c in by_seed.values()]
        reached = [s for s in per_seed if math.isfinite(s)]
        diff = None
        if opt == baseline:
            base_seeds = by_seed
        else:
            common = sorted(set(by_seed) & set(base_seeds))
            if common:
                diff = ci95([final(by_seed[s]) - final(base_seeds[s]) for s in common])
        ratio_ci = None
        if opt != baseline and base_seeds is not None:
            ratio_ci = bootstrap_ratio(by_seed, base_seeds, metric)
        out["optimizers"][opt] = dict(
            ratio_ci=ratio_ci,
            best_lr=best_lr,
            steps=rows[best_lr]["steps"],
            per_seed=ci95(reached),
            reached=f"{len(reached)}/{len(per_seed)}",
            final=ci95([final(c) for c in by_seed.values()]),
            diff=diff,
            by_lr={lr: (r["final"], r["steps"]) for lr, r in sorted(rows.items())},
            n=len(by_seed),
        )
    return out


def bootstrap_ratio(by_seed: dict, base_seeds: dict, metric: str, n: int = 2000, seed: int = 0):
    """95% percentile interval of (steps to target) / (baseline's steps to target), resampling the common seeds
    with replacement (paired: both runs of a seed share initialisation and batches). In every resample the
    target is recomputed as the resampled baseline's seed-mean final metric, and both step counts are read off
    the resampled seed-mean curves. Infinite when a resample never reaches the target."""
    import random

    common = sorted(set(by_seed) & set(base_seeds))
    if len(common) < 2:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(n):
        pick = [rng.choice(common) for _ in common]
        try:
            mb = mean_curve([base_seeds[s] for s in pick])
            mo = mean_curve([by_seed[s] for s in pick])
        except (IndexError, ValueError):
            return None
        target = mb[-1][1]
        sb, so = steps_to(mb, target, metric), steps_to(mo, target, metric)
        ratios.append(so / sb if math.isfinite(so) and math.isfinite(sb) else math.inf)
    ratios.sort()
    return ratios[int(0.025 * n)], ratios[min(n - 1, int(0.975 * n))]


def _fmt_ci(m, h, digits=4):
    if not math.isfinite(m):
        return "-"
    return f"{m:.{digits}f}" + (f" ± {h:.{digits}f}" if math.isfinite(h) else "")


def format_table(res: dict, order=None) -> str:
    if not res:
        return ""
    acc = res["metric"] == "acc"
    base = res["baseline"]
    bsteps = res["optimizers"][base]["steps"]
    what = "accuracy" if acc else "val loss"
    lines = [
        f"**{res['task']}, {res['schedule']} LR** — target: {base}'s best final {what} "
        f"{res['target']:.4f} (lr {res['target_lr']:g})",
        "",
        f"| optimizer | best lr | steps to target | ratio to {base} (bootstrap 95% CI) | steps per seed (mean ± 95% CI) | seeds "
        f"reaching | final {what} (mean ± 95% CI) | final − {base} (paired, ± 95% CI) | final by lr |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = list(res["optimizers"])
    if order:
        names = [n for n in order if n in res["optimizers"]] + [n for n in names if n not in order]
    for n in names:
        o = res["optimizers"][n]
        st = o["steps"]
        ratio = f"{st / bsteps:.2f}x" if math.isfinite(st) and math.isfinite(bsteps) else "-"
        if o.get("ratio_ci"):
            lo, hi = o["ratio_ci"]
            ratio += f" [{lo:.2f}, {hi:.2f}]" if math.isfinite(hi) else f" [{lo:.2f}, not reached]"
        ps = _fmt_ci(*o["per_seed"], digits=0) if o["per_seed"] and math.isfinite(o["per_seed"][0]) else "-"
        diff = _fmt_ci(*o["diff"]) if o["diff"] else "-"
        bylr = ", ".join(f"{lr:g}: {f:.3f}" for lr, (f, _) in o["by_lr"].items())
        lines.append(
            f"| `{n}` | {o['best_lr']:g} | {st if math.isfinite(st) else 'not reached'} | {ratio} | {ps} | "
            f"{o['reached']} | {_fmt_ci(*o['final'])} | {diff} | {bylr} |"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main


# The issue-22 campaign, phase by phase: (run file, task, schedules, optimizers, lr grid, seeds). ``sn`` is the
# library default at the time of running (conv 2, attention 1.65, MLP-up 2, damping 1e-4): the stored runs
# record what ran in their ``config``. Runs already in a file are skipped, so this resumes.
_CNN_ABLATIONS = ("sn:damping=1e-3", "sn:damping=1e-2", "sn:damping=1e-1", "sn:momentum=0.9", "sn:nesterov=off",
                  "sn:head=spectral", "sn:conv=1.5", "sn:sched=0.75-1.25")  # fmt: skip
_GRID_CNN = TASKS["cnn"].lrs
_AUTO_CNN = ("sn:alpha=auto:every=25", "sn:alpha=auto:every=25:amax=2")
_AUTO_GPT = ("sn:alpha=auto:every=50", "sn:alpha=auto:every=50:amax=2")
CAMPAIGN = (
    (
        "cnn",
        "cnn",
        ("constant", "cosine"),
        ("adamw", "muon", "sn", "sn:alpha=1") + _CNN_ABLATIONS,
        _GRID_CNN,
        range(5),
    ),
    ("cnn", "cnn", ("constant", "cosine"), _AUTO_CNN, (3e-3, 1e-2, 3e-2), range(5)),
    ("cnn", "cnn", ("constant", "cosine"), ("sn:scale=none",), (1e-5, 1e-4, 1e-3, 1e-2), range(5)),
    ("cnn", "cnn", ("constant",), ("adamw", "sn", "sn:alpha=1"), (3e-3,), range(5, 15)),
    ("cnn", "cnn", ("cosine",), ("adamw", "sn", "sn:alpha=1"), (1e-2,), range(5, 15)),
    (
        "cnn_tanh",
        "cnn_tanh",
        ("constant", "cosine"),
        ("adamw", "muon", "sn", "sn:alpha=1", "sn:conv=1.5"),
        _GRID_CNN,
        range(5),
    ),  # fmt: skip
    # hand-written GPT: constant LR on {3e-3, 1e-2, 3e-2}; cosine also on 1e-1 (Muon's and SN's optimum moved up)
    (
        "gpt",
        "gpt",
        ("constant",),
        ("muon", "sn", "sn:alpha=1", "sn:paper=1", _AUTO_GPT[0]),
        (3e-3, 1e-2, 3e-2),
        range(5),
    ),
    ("gpt", "gpt", ("cosine",), ("muon", "sn:alpha=1", "sn:paper=1"), (3e-3, 1e-2, 3e-2, 1e-1), range(5)),
    (
        "gpt",
        "gpt",
        ("cosine",),
        ("sn", "sn:alpha=1:basis=newton_schulz", "sn:alpha=1:damping=1e-2", "sn:sched=0.75-1.25") + _AUTO_GPT,
        (1e-2, 3e-2, 1e-1),
        range(5),
    ),
    ("gpt", "gpt", ("constant", "cosine"), ("adamw",), (1e-3, 3e-3, 1e-2), range(5)),
)


def run_grid(task, schedules, optimizers, lrs, seeds, out: Path, steps=None, log=print) -> None:
    """Every (schedule, optimizer, lr, seed) run not yet in ``out``, appended to it one JSON line each."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in load_runs([out])}
    steps = steps or TASKS[task].steps
    t_start = time.time()
    for sch in schedules:
        for opt in optimizers:
            for lr in lrs:
                for seed in seeds:
                    if (task, opt, float(lr), seed, sch, steps) in done:
                        continue
                    r = train(task, opt, lr, seed, sch, steps)
                    with out.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    last = r["curve"][-1][1] if r["curve"] else math.nan
                    log(f"[{time.time() - t_start:7.0f}s] {task} {sch} {opt} lr={lr:g} seed={seed}: "
                        f"{last:.4f} ({r['seconds']:.1f}s)")  # fmt: skip


def print_tables(runs, tasks, schedules, baseline=None, only=None, order=None) -> None:
    for task in tasks:
        for sch in schedules:
            sel = runs
            if only:
                keep = set(only) | {baseline or ("adamw" if TASKS[task].metric == "acc" else "muon")}
                sel = [r for r in runs if r["opt"] in keep]
            res = analyze(sel, task, sch, baseline)
            if res:
                print(format_table(res, order) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS))
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "muon", "sn"])
    ap.add_argument("--schedules", nargs="+", default=["constant", "cosine"], choices=["constant", "cosine"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed_list", type=int, nargs="+", default=None)
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="override every task's lr grid")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="outputs/defaults/runs.jsonl")
    ap.add_argument("--campaign", action="store_true", help="run issue 22's whole campaign into --out_dir")
    ap.add_argument("--out_dir", default="outputs/defaults")
    ap.add_argument("--analyze", nargs="*", default=None, help="print tables for these run files and exit")
    ap.add_argument("--order", nargs="*", default=None, help="table row order")
    ap.add_argument("--baseline", default=None, help="baseline of the tables (default: adamw / muon)")
    ap.add_argument(
        "--only", nargs="*", default=None, help="tables: only these optimizers (and the baseline)"
    )
    args = ap.parse_args(argv)
    if args.analyze is not None:
        runs = load_runs(args.analyze or [args.out])
        tasks = args.tasks or sorted({r["task"] for r in runs}, key=list(TASKS).index)
        print_tables(runs, tasks, args.schedules, args.baseline, args.only, args.order)
        return 0
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.campaign:
        t0 = time.time()
        for fname, task, schedules, optimizers, lrs, seeds in CAMPAIGN:
            run_grid(
                task, schedules, optimizers, lrs, list(seeds), Path(args.out_dir) / f"{fname}.jsonl", log=log
            )
        files = sorted(Path(args.out_dir).glob("*.jsonl"))
        print(f"campaign: {time.time() - t0:.0f} s wall in this invocation\n")
        runs = load_runs(files)
        print_tables(runs, [t for t in TASKS if any(r["task"] == t for r in runs)], ("constant", "cosine"))
        return 0
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    for task in args.tasks or ["cnn"]:
        run_grid(task, args.schedules, args.optimizers, args.lrs or TASKS[task].lrs, seeds, Path(args.out),
                 args.steps, log)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
