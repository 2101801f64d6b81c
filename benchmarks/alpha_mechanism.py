"""Why alpha = 2 on conv kernels loses to alpha = 1 under ``scale="rms"``: where the update's norm goes.

Trains the harness's 2-conv CNN on digits (``benchmarks/defaults_harness.py``) with SpectralNewton (conv alpha
by ``--alpha``, constant lr ``--lr``) and at a few steps takes, for each conv kernel, the optimizer's momentum
M = U diag(sigma) V^T and the full-batch gradient G (all 1437 training images). It reports, for several
(alpha, damping) pairs applied to the same M, with the RMS rescaling SpectralNewton applies:

* ``cos``: cosine between the update direction D and G, i.e. the share of the update's fixed norm that
  descends the full-batch loss to first order;
* ``noise``: the share of ||D||^2 on singular directions whose signal ratio u_k^T G v_k / sigma_k is below
  0.25 (directions of M that the full-batch gradient barely has: minibatch noise);
* ``top``: the step along the top singular direction, relative to alpha = 1's (RMS fixes the total, so
  weight put on small sigma_k is taken from the top directions);
* the curvature exponent measured by ``CurvatureProbe`` (h_k along the gradient's singular directions) on
  256 training images.

    python benchmarks/alpha_mechanism.py --steps 300 --checkpoints 50 150 300
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import defaults_harness as H  # noqa: E402

from spectral_dist.optim import SpectralNewton  # noqa: E402
from spectral_dist.spectral.transform import spectral_transform  # noqa: E402

PAIRS = ((0.0, 1e-4), (1.0, 1e-4), (1.5, 1e-4), (2.0, 1e-4), (2.0, 1e-2), (2.0, 1e-1))


def weights(sigma: torch.Tensor, alpha: float, damping: float) -> torch.Tensor:
    """Per-direction coefficients of the RMS-rescaled update (unit Frobenius norm)."""
    T = spectral_transform(sigma, alpha, damping)
    return T / T.norm()


def analyse(M: torch.Tensor, G: torch.Tensor, curv) -> dict:
    """``curv(D) -> D^T H D`` (full-batch Hessian of this kernel). For each (alpha, damping): cos(D, G), the
    share of ||D||^2 on noise directions, the top direction's step relative to alpha 1, and along D scaled to
    RMS 0.2 (what SpectralNewton steps with lr = 1) the best step size of the full-batch quadratic model,
    eta* = <G, D> / D^T H D, with the loss decrease it gives, <G, D>^2 / (2 D^T H D)."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    Gd = G.double()
    signal = torch.einsum("mk,mn,kn->k", U, Gd, Vh) / S.clamp_min(1e-30)
    out = {"signal": signal.tolist()}
    ref = None
    m, n = M.shape
    for alpha, damping in PAIRS:
        w = weights(S, alpha, damping)
        D = (U * w) @ Vh * (0.2 * math.sqrt(m * n))
        gd = (D * Gd).sum().item()
        dhd = curv(D.to(G.dtype)).item()
        cos = gd / (D.norm() * Gd.norm()).item()
        noise = (w[signal < 0.25] ** 2).sum().item()
        if alpha == 1.0:
            ref = w[0].item()
        eta = gd / dhd if dhd > 0 else math.inf
        dec = gd * gd / (2 * dhd) if dhd > 0 else math.inf
        out[(alpha, damping)] = dict(cos=cos, noise=noise, top=w[0].item(), eta=eta, dec=dec)
    for alpha, damping in PAIRS:
        out[(alpha, damping)]["top"] /= ref
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alpha", type=float, default=2.0, help="conv alpha of the training run")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[50, 150, 300])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe", action="store_true", help="also measure alpha with CurvatureProbe")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = H.build_model("cnn")
    opt = SpectralNewton.from_model(model, alpha={"conv": args.alpha}, lr=args.lr)
    (xt, yt), _ = H.data_for("cnn")
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    convs = {n: p for n, p in model.named_parameters() if p.ndim == 4}
    print(
        f"CNN, SpectralNewton conv alpha {args.alpha:g}, lr {args.lr:g} constant, seed {args.seed}; "
        "cos = cos(D, full-batch G); top = step on the top direction / alpha 1's; eta* = best step size of "
        "the full-batch quadratic model along D at RMS 0.2 (an lr), decrease = its loss decrease"
    )
    rows = []
    for step in range(1, args.steps + 1):
        loss = H.loss_fn(model, H.batch_for("cnn", gen, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step not in args.checkpoints:
            continue
        full_loss = F.cross_entropy(model(xt), yt)
        grads = dict(zip(convs, torch.autograd.grad(full_loss, list(convs.values()), create_graph=True)))
        full = {n: g.detach() for n, g in grads.items()}
        probe = {}
        if args.probe:
            from spectral_dist.probes import CurvatureProbe

            idx = torch.randperm(len(yt), generator=torch.Generator().manual_seed(step))[:256]
            rep = CurvatureProbe(
                model, H.loss_fn, top_k=8, hvp="autograd", layers=list(convs), kfac=False
            ).measure((xt[idx], yt[idx]))
            probe = {n: rep.layers[n].alpha for n in convs}
        for n, p in convs.items():
            M = opt.state[p]["momentum_buffer"].reshape(p.shape[0], -1)

            def curv(D, n=n, p=p, grads=grads):
                hv = torch.autograd.grad((grads[n] * D.view_as(p)).sum(), p, retain_graph=True)[0]
                return (hv * D.view_as(p)).sum()

            r = analyse(M, full[n].reshape(p.shape[0], -1), curv)
            sig = r["signal"]
            line = (
                f"| {step} | {n} {tuple(M.shape)} | {probe.get(n, math.nan):.2f} | "
                f"{sum(s < 0.25 for s in sig)}/{len(sig)} | "
            )
            line += " | ".join(
                f"{r[pr]['cos']:.2f} / {r[pr]['top']:.2f} / {r[pr]['eta']:.3f} / {1e3 * r[pr]['dec']:.2f}"
                for pr in PAIRS
            )
            rows.append(line + " |")
    head = "| step | kernel (m x n) | probe alpha | noise directions | " + " | ".join(
        f"alpha {a:g}, damping {d:g}: cos / top / eta* / decrease x1e3" for a, d in PAIRS
    )
    print(head + " |")
    print("|" + "---|" * (4 + len(PAIRS)))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
