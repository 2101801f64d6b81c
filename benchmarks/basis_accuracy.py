"""Issue 16: every basis method against the float64 SVD reference (CPU), its FLOPs and its time on a device.

Errors are measured on the normalised direction D / ||D||_F (``scale="rms"`` rescales every direction, so only
its direction matters): ``full`` = || D/||D|| - R/||R|| ||_F with R the float64 SVD direction, and ``top`` = the
same restricted to the directions that carry the update, the singular directions of G with the largest
T(sigma) that hold 90% of ||R||_F^2 (``k`` of them). Matrices: GPT-2 shapes with a flat (Gaussian) spectrum and a
1/k power-law spectrum (singular vectors random). ``eigenbasis`` keeps state, so it is measured along a
drifting sequence (singular vectors rotating by ~0.05 rad per step, momentum-like noise), refresh_every=1.

    python benchmarks/basis_accuracy.py                 # CPU, GPT-2 shapes (a few minutes on 2 cores)
    python benchmarks/basis_accuracy.py --device cuda   # the GPU's results against the CPU float64 reference
    python benchmarks/basis_accuracy.py --quick
    python benchmarks/basis_accuracy.py --real          # along a real training run's inputs (~5 min on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spectral_dist.optim.matrix_step import method_flops  # noqa: E402
from spectral_dist.spectral import spectral_direction  # noqa: E402
from spectral_dist.spectral.direction import EIGENBASIS_QR, direction_unchecked  # noqa: E402

# (name, alpha, method, kwargs for direction_unchecked)
CASES = [
    ("svd", 1.0, "svd", {}),
    ("newton_schulz (Muon, 5)", 1.0, "newton_schulz", {}),
    ("polar_express 5", 1.0, "polar_express", {}),
    ("polar_express 5 bf16", 1.0, "polar_express", {"matmul_dtype": torch.bfloat16}),
    ("polar_express 6", 1.0, "polar_express", {"ns_steps": 6}),
    ("gram", 1.0, "gram", {}),
    ("cholesky", 2.0, "cholesky", {}),
    ("gram", 2.0, "gram", {}),
    ("svd", 2.0, "svd", {}),
    ("gram", 0.5, "gram", {}),
    ("gram", 1.5, "gram", {}),
    ("cholesky (closed form)", 0.0, "cholesky", {}),
]


def flops(method: str, m: int, n: int, steps: int = 5) -> float:
    """Approximate flops for one m x n matrix: the optimizer's own model (owner plans balance it)."""
    return float(method_flops((m, n), method, steps))


def matrix(m, n, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (U * torch.arange(1, k + 1, dtype=torch.float64) ** -1.0) @ V.T


def errors(D: torch.Tensor, G: torch.Tensor, alpha: float, damping: float = 1e-4, energy: float = 0.9):
    """(full, top, k): normalised errors of D against the float64 SVD direction of G (both on the CPU)."""
    D = D.detach().to("cpu", torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    T = S / (S**alpha + damping * S[0] ** alpha)
    R = (U * T) @ Vh
    Dn, Rn = D / D.norm(), R / R.norm()
    order = torch.argsort(T, descending=True)
    share = torch.cumsum(T[order] ** 2, 0) / (T**2).sum()
    k = int((share < energy).sum()) + 1
    idx = order[:k]

    def proj(X):
        return U[:, idx].T @ X @ Vh[idx].T

    return (Dn - Rn).norm().item(), ((proj(Dn) - proj(Rn)).norm() / proj(Rn).norm()).item(), k


def _time(fn, device, reps=3):
    fn()
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def eigenbasis_drift(m, n, alpha, device, steps=12, angle=0.05, seed=0):
    """Median and max error of ``eigenbasis`` (refresh_every=1) along a drifting sequence."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -1.0
    state, errs = {}, []
    for _ in range(steps):
        K = torch.randn(k, k, generator=g, dtype=torch.float64)
        R = torch.linalg.matrix_exp(angle * (K - K.T) / (2 * math.sqrt(k)))
        V = V @ R
        G = (U * s) @ V.T + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
        D = spectral_direction(
            G.to(device, torch.float32), alpha, 1e-4, "eigenbasis", state=state, refresh_every=1
        )
        errs.append(errors(D, G, alpha)[1])
    return statistics.median(errs[1:]), max(errs[1:])


def eigenbasis_qr(device, shapes, alpha=1.65, steps=12, angle=0.05, batch=2, seed=0) -> list[dict]:
    """The QRs of the batched eigenbasis (``householder``: CPU default; ``cholesky_fp64``: CUDA with fast float64;
    ``cholesky``: other CUDA devices) on one device: ms per matrix of one refresh step and the top error along the drifting sequence of
    :func:`eigenbasis_drift` (1/k spectrum), batch of ``batch`` same-shape matrices."""
    from spectral_dist.spectral import eigenbasis_batched

    rows = []
    for m, n in shapes:
        g = torch.Generator().manual_seed(seed)
        k = min(m, n)
        U, _ = torch.linalg.qr(torch.randn(batch, m, k, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(batch, n, k, generator=g, dtype=torch.float64))
        s = torch.arange(1, k + 1, dtype=torch.float64) ** -1.0
        seq = []
        for _ in range(steps):
            K = torch.randn(batch, k, k, generator=g, dtype=torch.float64)
            V = V @ torch.linalg.matrix_exp(angle * (K - K.mT) / (2 * math.sqrt(k)))
            seq.append(
                (U * s) @ V.mT
                + 1e-3 * torch.randn(batch, m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
            )
        for qr in EIGENBASIS_QR:
            Q, errs, fails = None, [], 0
            for step, G in enumerate(seq):
                D, Q, ok = eigenbasis_batched(G.to(device, torch.float32), alpha, 1e-4, Q, step, qr=qr)
                fails += int((~ok).sum())
                if step:
                    errs.append(max(errors(D[i], G[i], alpha)[1] for i in range(batch)))
            X = seq[-1].to(device, torch.float32)
            sec = _time(lambda X=X, Q=Q, qr=qr: eigenbasis_batched(X, alpha, 1e-4, Q, 1, qr=qr), device)
            rows.append(
                dict(
                    shape=f"{m}x{n}",
                    qr=qr,
                    ms_per_matrix=1000 * sec / batch,
                    top_median=statistics.median(errs),
                    top_max=max(errs),
                    failed=fails,
                )
            )
    return rows


# (label, method, options) evaluated on the recorded inputs of each layer type's alpha
REAL_CASES = {
    1.0: [
        ("polar_express 5, float32", "polar_express", {}),
        ("polar_express 5, bf16 matmuls", "polar_express", {"matmul_dtype": torch.bfloat16}),
        ("newton_schulz 5 (Muon), float32", "newton_schulz", {}),
        ("eigenbasis", "eigenbasis", {}),
        ("eigenbasis, jacobi_steps=1", "eigenbasis", {"jacobi_steps": 1}),
    ],
    2.0: [
        ("cholesky (auto)", "cholesky", {}),
        ("eigenbasis", "eigenbasis", {}),
        ("eigenbasis, jacobi_steps=1", "eigenbasis", {"jacobi_steps": 1}),
    ],
    "other": [
        ("eigenbasis, float32", "eigenbasis", {}),
        (
            "eigenbasis, last product in bf16 (auto where bf16 is native)",
            "eigenbasis",
            {"apply_dtype": torch.bfloat16},
        ),
        ("eigenbasis, jacobi_steps=1", "eigenbasis", {"jacobi_steps": 1}),
        ("eigenbasis, jacobi_steps=2", "eigenbasis", {"jacobi_steps": 2}),
        ("eigenbasis, refresh_every=2", "eigenbasis", {"refresh_every": 2}),
        ("eigenbasis, CholeskyQR in float64 (CUDA with fast float64)", "eigenbasis", {"qr": "cholesky_fp64"}),
        (
            "eigenbasis, CholeskyQR in float64, jacobi_steps=1",
            "eigenbasis",
            {"qr": "cholesky_fp64", "jacobi_steps": 1},
        ),
        (
            "eigenbasis, CholeskyQR in float64, jacobi_steps=2",
            "eigenbasis",
            {"qr": "cholesky_fp64", "jacobi_steps": 2},
        ),
        ("eigenbasis, CholeskyQR (other CUDA devices)", "eigenbasis", {"qr": "cholesky"}),
        ("eigenbasis, CholeskyQR, jacobi_steps=2", "eigenbasis", {"qr": "cholesky", "jacobi_steps": 2}),
        ("eigenbasis, CholeskyQR, jacobi_steps=1", "eigenbasis", {"qr": "cholesky", "jacobi_steps": 1}),
        ("gram (float64 eigh)", "gram", {}),
        ("TF32 matmuls (emulated): eigenbasis", "eigenbasis", {"tf32": True}),
    ],
}
REAL_CASES[2.0].append(("TF32 matmuls (emulated): cholesky", "cholesky", {"tf32": True}))


class TF32Emulation(torch.overrides.TorchFunctionMode):
    """float32 matmuls with their operands rounded to TF32 (10 mantissa bits, round to nearest; products
    accumulated in float32, as tensor cores do): what a training script's ``allow_tf32 = True`` would do to the
    optimizer's math if the optimizer did not turn it off (spectral_dist/spectral/precision.py)."""

    OPS = {torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.Tensor.__matmul__, torch.Tensor.matmul}

    @staticmethod
    def _round(x):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            return x
        i = x.contiguous().view(torch.int32)
        return ((i + 0x1000) & ~0x1FFF).view(torch.float32)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            if func is torch.baddbmm:  # baddbmm(input, b1, b2): only the product's operands
                args = (args[0], *map(self._round, args[1:3]), *args[3:])
            else:
                args = tuple(map(self._round, args))
        return func(*args, **kwargs)


def record_inputs(steps: int = 60, d: int = 256, layers: int = 2, seq: int = 128, batch: int = 16, lr=3e-3):
    """Train a GPT-2-style model (``d`` wide, ``layers`` deep, byte tokens of the standard library's source, the
    same corpus as the recipes) with SpectralNewton (alpha by layer, exact ``svd`` basis) for ``steps`` steps
    and record what each hidden matrix's direction is computed from (the Nesterov momentum blend), in float64.
    Returns {name: (layer_type, alpha, [M_1, ..., M_steps])} and the last loss."""
    from spectral_dist import models
    from spectral_dist.optim import SpectralNewton
    from spectral_dist.optim import matrix_step as ms
    from spectral_dist.reproduce import stdlib_bytes

    torch.manual_seed(0)
    model = models.tiny_gpt(n_positions=seq, n_embd=d, n_layer=layers, n_head=max(1, d // 64))
    train, _ = stdlib_bytes(max(200_000, steps * batch * seq))
    opt = SpectralNewton.from_model(model, alpha="by_layer", lr=lr, basis="svd", distributed=False)
    types = {i.name: i.layer_type for i in opt.param_infos}
    rec: dict = {}
    # every engine's owner computes through owner_directions_and_read (owner_directions calls it too)
    real = ms.owner_directions_and_read

    def spy(jobs, *args, **kwargs):
        for j in jobs:
            rec.setdefault(j.key, (j.alpha, []))[1].append(j.M.detach().to("cpu", torch.float64).clone())
        return real(jobs, *args, **kwargs)

    ms.owner_directions_and_read = spy
    try:
        for i in range(steps):
            g = torch.Generator().manual_seed(i)
            idx = torch.randint(0, len(train) - seq - 1, (batch,), generator=g)
            x = torch.stack([train[j : j + seq].long() for j in idx])
            opt.zero_grad()
            loss = models.lm_loss(model, x)
            loss.backward()
            opt.step()
    finally:
        ms.owner_directions_and_read = real
    if not rec:
        raise RuntimeError(
            "recorded no matrix inputs: the optimizer no longer computes through owner_directions_and_read"
        )
    # one process, so a job's key is its parameter's name
    out = {key: (types[key], float(alpha), seq_m) for key, (alpha, seq_m) in rec.items()}
    return out, float(loss.detach())


def real_gradients(
    device: torch.device, steps: int = 60, d: int = 256, progress: bool = True, cost: bool = True
) -> dict:
    """Top-direction error of each basis along the recorded inputs of a real training run
    (:func:`record_inputs`): stateful bases are carried through the sequence as the optimizer carries them
    (first step: an SVD, not counted). Rows: median over matrices of each matrix's median error over all
    steps after the first, and over the second half of the run."""
    from spectral_dist.spectral import eigenbasis_batched

    inputs, loss = record_inputs(steps, d)
    per: dict = {}
    items = list(inputs.items())
    for idx, (name, (ltype, alpha, seq_m)) in enumerate(items):
        if progress:
            print(
                f"  [{idx + 1}/{len(items)}] {name} {tuple(seq_m[0].shape)} alpha {alpha:g}", file=sys.stderr
            )
        cases = REAL_CASES.get(alpha, REAL_CASES["other"])
        for label, method, kw in cases:
            errs, Q = [], None
            kw = dict(kw)
            mode = TF32Emulation() if kw.pop("tf32", False) else contextlib.nullcontext()
            for t, M in enumerate(seq_m):
                X = M.to(device, torch.float32).unsqueeze(0)
                with mode:
                    if method == "eigenbasis":
                        D, Q, _ = eigenbasis_batched(X, alpha, 1e-4, Q, t, **kw)
                    else:
                        D, _ = direction_unchecked(X, alpha, 1e-4, method, **kw)
                if t:
                    errs.append(errors(D[0], M, alpha)[1])
            late = errs[len(errs) // 2 :]
            per.setdefault((ltype, alpha, label), []).append(
                (statistics.median(errs), statistics.median(late), max(errs))
            )
    rows = [
        dict(
            layer_type=lt,
            alpha=a,
            method=label,
            matrices=len(v),
            median=statistics.median(x[0] for x in v),
            late=statistics.median(x[1] for x in v),
            max=max(x[2] for x in v),
        )
        for (lt, a, label), v in per.items()
    ]
    shapes = [(64, 64)] if d < 256 else [(768, 768), (768, 2304)]
    out = {"rows": rows, "steps": steps, "d": d, "loss": loss}
    if cost:  # and what the Jacobi steps cost on this device
        out["jacobi_cost"] = jacobi_cost(device, shapes)
    return out


def jacobi_cost(device: torch.device, shapes, batch: int = 4, seed: int = 0) -> list[dict]:
    """ms per matrix of one batched eigenbasis refresh step with 0, 1 and 2 Jacobi steps, for both QRs."""
    from spectral_dist.spectral import eigenbasis_batched

    rows = []
    for m, n in shapes:
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(batch, m, n, generator=g).to(device)
        k = min(m, n)
        Q = torch.linalg.qr(torch.randn(batch, k, k, generator=g))[0].to(device)
        for qr in EIGENBASIS_QR:
            for jac in (0, 1, 2):
                sec = _time(
                    lambda X=X, Q=Q, qr=qr, jac=jac: eigenbasis_batched(
                        X, 1.65, 1e-4, Q, 1, qr=qr, jacobi_steps=jac
                    ),
                    device,
                )
                rows.append(dict(shape=f"{m}x{n}", qr=qr, jacobi_steps=jac, ms_per_matrix=1000 * sec / batch))
    return rows


def format_jacobi_cost_md(rows: list[dict], device_name: str) -> str:
    """The :func:`jacobi_cost` table: ms per matrix for 0, 1, 2 Jacobi steps, per shape and QR."""
    lines = [
        f"Cost of the Jacobi steps on {device_name}: ms per matrix of one eigenbasis refresh step (batch of 4, "
        "alpha 1.65):",
        "",
        "| shape | qr | jacobi_steps 0 | 1 | 2 |",
        "|---|---|---|---|---|",
    ]
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["shape"], r["qr"]), {})[r["jacobi_steps"]] = r["ms_per_matrix"]
    for (shape, qr), v in cells.items():
        lines.append(f"| {shape} | {qr} | " + " | ".join(f"{v[j]:.2f}" for j in sorted(v)) + " |")
    return "\n".join(lines) + "\n"


def format_real_md(res: dict, device_name: str) -> str:
    lines = [
        f"Bases on the recorded inputs of a real run (GPT-2-style, d={res['d']}, 2 layers, byte tokens of the "
        f"standard library, SpectralNewton by layer, {res['steps']} steps, final loss {res['loss']:.2f}), "
        f"computed on {device_name} in float32; top-direction error against the float64 SVD (median over the "
        "layer type's matrices of each matrix's median over the steps; `late`: second half of the run; max: "
        "worst step of any matrix):",
        "",
        "| layer type | alpha | method | matrices | top error median | late | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['layer_type']} | {r['alpha']:g} | {r['method']} | {r['matrices']} | {r['median']:.3f} | "
            f"{r['late']:.3f} | {r['max']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    if res.get("jacobi_cost"):
        text += "\n" + format_jacobi_cost_md(res["jacobi_cost"], device_name)
    return text


def run(
    device: torch.device, shapes, kinds=("gauss", "power"), batch: int = 4, drift_shape=(512, 256)
) -> dict:
    rows = []
    for m, n in shapes:
        for kind in kinds:
            G = matrix(m, n, kind)
            Gd = G.to(device, torch.float32)
            for name, alpha, method, kw in CASES:
                D, ok = direction_unchecked(Gd.unsqueeze(0), alpha, 1e-4, method, **kw)
                full, top, k = errors(D[0], G, alpha)
                Xb = Gd.expand(batch, m, n).contiguous()
                sec = _time(
                    lambda Xb=Xb, a=alpha, me=method, kw=kw: direction_unchecked(Xb, a, 1e-4, me, **kw),
                    device,
                )
                rows.append(
                    dict(
                        shape=f"{m}x{n}",
                        spectrum=kind,
                        alpha=alpha,
                        method=name,
                        full=full,
                        top=top,
                        k=k,
                        ok=bool(ok.all()),
                        ms_per_matrix=1000 * sec / batch,
                        gflop=flops(method, m, n, kw.get("ns_steps", 5)) / 1e9,
                    )
                )
    drift = {a: eigenbasis_drift(*drift_shape, a, device) for a in (0.5, 1.0, 1.5)}
    return {
        "rows": rows,
        "eigenbasis_qr": eigenbasis_qr(device, [drift_shape] + [s for s in shapes if min(s) >= 256]),
        "eigenbasis_drift": {str(a): v for a, v in drift.items()},
        "drift_shape": drift_shape,
    }


def format_md(res: dict, device_name: str) -> str:
    lines = [
        f"Bases against the float64 SVD reference (CPU), computed on {device_name} in float32. Errors of the "
        "normalised direction: full, and on the directions carrying 90% of the update (k). GFLOP per matrix "
        "(approximate), ms per matrix (median of 3, batch of 4).",
        "",
        "| shape | spectrum | alpha | method | full error | top error (k) | GFLOP | ms / matrix |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['shape']} | {r['spectrum']} | {r['alpha']:g} | {r['method']} | {r['full']:.1e} | "
            f"{r['top']:.1e} ({r['k']}) | {r['gflop']:.1f} | {r['ms_per_matrix']:.1f} |"
        )
    m, n = res["drift_shape"]
    lines += [
        "",
        f"`eigenbasis` (refresh_every=1) along a drifting {m}x{n} sequence (1/k spectrum, ~0.05 rad per "
        "step, noise), top error median / max over 11 steps: "
        + ", ".join(f"alpha {a}: {v[0]:.1e} / {v[1]:.1e}" for a, v in res["eigenbasis_drift"].items()),
    ]
    if res.get("eigenbasis_qr"):
        lines += [
            "",
            f"The batched eigenbasis's two QRs on {device_name} (alpha 1.65, batch of 2, the drifting 1/k sequence "
            "above; time of one refresh step; `failed`: matrices whose CholeskyQR said no, redone alone):",
            "",
            "| shape | qr | ms / matrix | top error median / max | failed |",
            "|---|---|---|---|---|",
        ]
        for r in res["eigenbasis_qr"]:
            lines.append(
                f"| {r['shape']} | {r['qr']} | {r['ms_per_matrix']:.2f} | {r['top_median']:.1e} / "
                f"{r['top_max']:.1e} | {r['failed']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--real",
        action="store_true",
        help="only the bases' errors along the recorded inputs of a short real training run",
    )
    ap.add_argument("--real_steps", type=int, default=60)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if a.real:
        res = real_gradients(device, steps=8 if a.quick else a.real_steps, d=64 if a.quick else 256)
        print(format_real_md(res, name))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return res
    shapes = [(96, 64)] if a.quick else [(768, 768), (3072, 768), (768, 2304)]
    res = run(device, shapes, drift_shape=(96, 48) if a.quick else (512, 256))
    text = format_md(res, name)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
