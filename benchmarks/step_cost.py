"""Issue 16: the cost of a SpectralNewton step at GPT-2-small and ViT-B/16 shapes, against torch AdamW (foreach)
and a batched fp32 Muon, as ratios measured side by side in one run (optimizers interleaved round-robin).

Two measurements:

1. **optimizer step** on the model's parameters with random gradients (default 12 layers: GPT-2-small is
   12 x [c_attn 768x2304, attn c_proj 768x768, c_fc 768x3072, mlp c_proj 3072x768] plus embeddings, norms and
   biases; ViT-B/16 is 12 x [q, k, v, o 768x768, fc1 3072x768, fc2 768x3072] plus the 16x16 patch conv);
2. **full step** (forward, backward, optimizer) on token batches (``--tokens``, default 4096). On a CPU the full
   step runs ``--full_layers`` layers (default 2): optimizer and forward/backward cost both grow linearly with
   the number of layers, so the ratio is the 12-layer ratio up to the embeddings and head.

Optimizers: ``adamw`` (torch.optim.AdamW, foreach), ``muon`` (:class:`BatchedMuon`: momentum + 5 quintic
Newton-Schulz steps in fp32, batched by shape; AdamW on the rest; the issue's reference and the ``/ muon``
column), ``muon_bf16`` (the same in bf16, as Muon runs on GPUs: SpectralNewton's ``basis="auto"`` uses bf16
matmuls where they are native, see docs/benchmarks.md), and SpectralNewton (``from_model``: hidden
matrices spectral, embeddings/head/norms/biases AdamW) at ``alpha`` 1 (the optimizer's default alpha), by layer
(``DEFAULT_ALPHA``: attention 1.65, MLP up 2, MLP down 1), 0.5, 1.5 and 2, every one with the default ``basis="auto"``;
``--only sn_alpha0.5@eigenbasis`` adds a variant with another basis.

    python benchmarks/step_cost.py --model gpt2 --write         # CPU: optimizer step at 12 layers, full at 2
    python benchmarks/step_cost.py --model vit --tokens 4096 16384
    python benchmarks/step_cost.py --quick                      # tiny shapes, seconds
    python benchmarks/step_cost.py --device cuda --full_layers 12 --tokens 65536   # GPU (benchmarks/gpu/run.sh)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spectral_dist import models  # noqa: E402
from spectral_dist.optim import SpectralNewton  # noqa: E402
from spectral_dist.optim.classify import classify_parameters  # noqa: E402

OPTIMIZERS = (
    "adamw",
    "muon",
    "muon_bf16",
    "sn_alpha1",
    "sn_by_layer",
    "sn_alpha0.5",
    "sn_alpha1.5",
    "sn_alpha2",
)
NS_QUINTIC = (3.4445, -4.7750, 2.0315)


class BatchedMuon(torch.optim.Optimizer):
    """The Muon reference of issue 16: Nesterov momentum + 5 quintic Newton-Schulz steps in fp32 on the smaller
    side, same-shape matrices stacked into one batch, update scaled by sqrt(max(1, m/n)) (Keller Jordan's).
    ``matmul_dtype=torch.bfloat16``: the iteration in bf16, as Muon runs on GPUs (``muon_bf16``: the fair
    reference wherever SpectralNewton's ``basis="auto"`` uses bf16 itself)."""

    def __init__(self, params, lr=0.02, momentum=0.95, steps=5, matmul_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, steps=steps))
        self.matmul_dtype = matmul_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            bufs = []
            for p in ps:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                bufs.append(st["momentum_buffer"])
            grads = [p.grad.float() for p in ps]
            torch._foreach_lerp_(bufs, grads, 1 - g["momentum"])
            Ms = torch._foreach_lerp(grads, bufs, g["momentum"])
            by_shape: dict = {}
            for p, M in zip(ps, Ms):
                by_shape.setdefault(tuple(M.reshape(M.shape[0], -1).shape), []).append((p, M))
            for (m, n), items in by_shape.items():
                X = torch.stack([M.reshape(m, n) for _, M in items]).to(self.matmul_dtype)
                if m > n:
                    X = X.mT
                X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
                a, b, c = NS_QUINTIC
                for _ in range(g["steps"]):
                    A = X @ X.mT
                    B = b * A + c * A @ A
                    X = a * X + B @ X
                if m > n:
                    X = X.mT
                X = X.float()
                scale = -g["lr"] * max(1.0, m / n) ** 0.5
                torch._foreach_add_(
                    [p for p, _ in items], [x.view_as(p) for (p, _), x in zip(items, X)], alpha=scale
                )


def make_model(name: str, layers: int, quick: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        d, h = (64, 2) if quick else (768, 12)
        return models.tiny_gpt(
            n_positions=128 if quick else 1024, n_embd=d, n_layer=layers, n_head=h, attn_implementation="sdpa"
        )
    if name == "vit":
        d, h = (64, 2) if quick else (768, 12)
        return models.tiny_vit(
            image_size=32 if quick else 224,
            patch_size=16,
            hidden=d,
            layers=layers,
            heads=h,
            num_labels=1000 if not quick else 10,
            attn_implementation="sdpa",
        )
    raise ValueError(f"unknown model {name!r} (gpt2, vit)")


def make_batch(name: str, tokens: int, quick: bool, device):
    """A batch with about ``tokens`` tokens: GPT-2 sequences of 1024 (128 quick), ViT images of 197 tokens."""
    if name == "gpt2":
        seq = 128 if quick else 1024
        return models.token_batch(max(1, tokens // seq), seq, 256).to(device), models.lm_loss
    size = 32 if quick else 224
    per = (size // 16) ** 2 + 1
    x, y = models.image_batch(max(1, tokens // per), channels=3, size=size, num_classes=10)
    return (x.to(device), y.to(device)), models.classification_loss


def build_optimizer(name: str, model: nn.Module, lr: float = 1e-3):
    if name == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)]
    if name in ("muon", "muon_bf16"):
        infos = classify_parameters(model)
        hidden = [i.param for i in infos if i.spectral]
        ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if id(p) not in ids]
        dt = torch.bfloat16 if name == "muon_bf16" else torch.float32
        return [BatchedMuon(hidden, lr=lr, matmul_dtype=dt), torch.optim.AdamW(rest, lr=lr, foreach=True)]
    if name.startswith("sn_"):  # sn_<alpha>[@<basis>]: e.g. sn_alpha1, sn_by_layer, sn_alpha0.5@eigenbasis
        a, _, basis = name[3:].partition("@")
        alpha = "by_layer" if a == "by_layer" else float(a.removeprefix("alpha"))
        return [
            SpectralNewton.from_model(model, alpha=alpha, lr=lr, basis=basis or "auto", distributed=False)
        ]
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _interleaved(runs: dict, fn, repeats: int, device) -> dict:
    """name -> median seconds of fn(*runs[name]) over ``repeats`` round-robin rounds (after one warm-up)."""
    for args in runs.values():
        fn(*args)
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, args in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            fn(*args)
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_optimizer_step(model_name, layers, opts, repeats, device, quick) -> dict:
    runs = {}
    for o in opts:
        model = make_model(model_name, layers, quick).to(device)
        g = torch.Generator(device="cpu").manual_seed(1)
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(device)
        runs[o] = (build_optimizer(o, model),)

    def step(optims):
        for opt in optims:
            opt.step()

    return _interleaved(runs, step, repeats, device)


def bench_full_step(model_name, layers, tokens, opts, repeats, device, quick, amp: bool = False) -> dict:
    """Forward (bf16 autocast with ``amp``, CUDA), backward and optimizer; parameters stay fp32."""
    runs = {}
    for o in opts:
        model = make_model(model_name, layers, quick).to(device)
        batch, loss_fn = make_batch(model_name, tokens, quick, device)
        runs[o] = (model, build_optimizer(o, model), batch, loss_fn)

    def step(model, optims, batch, loss_fn):
        for opt in optims:
            opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = loss_fn(model, batch)
        loss.backward()
        for opt in optims:
            opt.step()

    return _interleaved(runs, step, repeats, device)


def machine(device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
        f"threads, load average {load:.1f} at start, torch {torch.__version__}"
    )


def table(title: str, med: dict, refs=("adamw", "muon", "muon_bf16")) -> str:
    refs = [r for r in refs if r in med]
    lines = [
        title,
        "",
        "| optimizer | seconds | " + " | ".join(f"/ {r}" for r in refs) + " |",
        "|---|---|" + "---|" * len(refs),
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.4f} | " + " | ".join(f"{v / med[r]:.2f}x" for r in refs) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="*", default=["gpt2"], choices=["gpt2", "vit"])
    ap.add_argument("--layers", type=int, default=12, help="layers of the optimizer-step measurement")
    ap.add_argument(
        "--full_layers", type=int, default=2, help="layers of the full-step measurement (0: skip)"
    )
    ap.add_argument("--tokens", type=int, nargs="*", default=[4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="optimizer subset (adamw and muon always run)")
    ap.add_argument("--skip_opt_step", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast in the forward of the full step")
    ap.add_argument("--quick", action="store_true", help="d=64, 2 layers, 1 repeat: a smoke run")
    ap.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.layers, a.full_layers, a.repeats, a.tokens = 2, 1, 1, [256]
    device = torch.device(a.device)
    opts = [o for o in OPTIMIZERS if o in ("adamw", "muon") or a.only is None or o in a.only]
    opts += [o for o in (a.only or []) if o not in opts]  # variants such as sn_alpha0.5@eigenbasis
    head = f"### Step cost (issue 16) — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(device)}"
    out = {"machine": machine(device), "results": {}}
    texts = [
        head,
        "",
        f"`python benchmarks/step_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    print(head, flush=True)
    for m in a.model:
        res = out["results"].setdefault(m, {})
        if not a.skip_opt_step:
            med = bench_optimizer_step(m, a.layers, opts, a.repeats, device, a.quick)
            res["optimizer_step"] = med
            t = table(
                f"**{m}**, optimizer step, {a.layers} layers, median of {a.repeats} interleaved rounds", med
            )
            print(t, flush=True)
            texts.append(t)
        if a.full_layers:
            for tok in a.tokens:
                med = bench_full_step(m, a.full_layers, tok, opts, a.repeats, device, a.quick, a.amp)
                res[f"full_step_{tok}"] = med
                t = table(
                    f"**{m}**, full step (forward, backward, optimizer), {a.full_layers} layers, ~{tok} tokens, "
                    f"median of {a.repeats} interleaved rounds",
                    med,
                )
                print(t, flush=True)
                texts.append(t)
    text = "\n".join(texts)
    if a.write:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as f:
            f.write("\n" + text + "\n")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
