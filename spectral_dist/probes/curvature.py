"""CurvatureProbe: curvature of each weight matrix along its gradient's singular directions.

For a weight W (viewed as an (out, in) matrix; conv kernels as (out, in * kh * kw), GPT-2 Conv1D transposed)
with batch gradient G = U diag(sigma) V^T, the probe measures h_k = <E_k, H E_k>, E_k = u_k v_k^T, H the
Hessian block of the batch loss with respect to W, and fits the exponents of :mod:`.fits`.

Two estimators:

* ``"per_layer"`` (exact): one HVP per (layer, k): top_k * L HVPs for L layers.
* ``"all_layers"`` (random signs, unbiased): for each k and each of S samples, one HVP along
  Z = sum_l eps_l E_k^(l) with Rademacher eps_l; eps_l <E_k^(l), (H Z)_l> has expectation h_k^(l) because the
  cross terms eps_l eps_m (m != l) vanish in expectation. top_k * S HVPs for all layers at once.

K-FAC comparison (Linear, Conv2d, GPT-2 Conv1D; see :mod:`.kfac` for A and B): K-FAC's prediction
h_kfac_k = (u_k^T B u_k)(v_k^T A v_k), and

    Phi_k = (u_k^T B u_k)(v_k^T A v_k) / sigma_k^2,   so that   h_kfac_k = sigma_k^2 * Phi_k,

``alpha_kfac`` = 2 + slope(log Phi_k, log sigma_k) (least squares over the fit set of :mod:`.fits`, with
Phi_k > 0 in place of h_k > 0). For the K-FAC h the Spectral Alignment Decomposition
alpha = 2 + d log Phi / d log sigma is then an identity; comparing ``alpha_kfac`` with the HVP ``alpha``
tests how well K-FAC describes the layer. ``alignment`` is
alignment_k = (u_k^T B u_k)(v_k^T A v_k) / (lambda_max(B) lambda_max(A)) in [0, 1] (empirical factors): 1 when
u_k and v_k are top eigenvectors of B and A, e.g. for k = 1 at batch size 1 where G = g a^T, B = g g^T,
A = a a^T.

Two definitions of h_k (``h=``):

* ``"rayleigh"`` (default): h_k = <E_k, H E_k>, the curvature along the gradient's own singular directions.
  It answers "how curved is the loss along the directions the optimizer moves?": the quantity the Spectral
  Newton step sigma_k / h_k divides by, and the one alpha (h_k ~ sigma_k^alpha) is defined with. A Rayleigh
  quotient: between the block's extreme eigenvalues, possibly negative.
* ``"eigen"``: h_k = lambda_k(H), the k-th largest eigenvalue of the layer's Hessian block (Lanczos on HVPs,
  :func:`.lanczos.lanczos`), paired by rank with sigma_k. It answers "does the layer's own curvature spectrum
  decay like its gradient spectrum?" (the Hessian decay exponent s of h_k ~ k^-s, independent of the gradient
  directions), and needs no alignment assumption. ``overlap`` (reported next to ``phi``) is
  |<q_k, u_k v_k^T>| for the unit eigenvector q_k: when it is near 1 for every k the gradient's singular
  directions are the Hessian's eigenvectors and both definitions agree; when it is small, the Rayleigh h_k
  mixes several eigenvalues. Cost: the Lanczos HVPs (a few per pair) instead of one HVP per pair.

Cost is reported in gradient-equivalents: 1 for the probe's gradient, plus the HVP backend's cost
(fd: exactly 2 gradients per HVP), plus top_k double-backward products per layer for ``kfac_b="hessian"``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..optim.classify import classify_parameters
from .fits import DEFAULT_REL_FLOOR, loglog_slope, spectrum_fits
from .hvp import BACKENDS, NOMINAL_COST, make_hvp, math_attention
from .kfac import KFACCollector, kfac_kind, matrix_view, param_view
from .lanczos import lanczos
from .sharding import ProbeLayout
from .state import preserve_training_state, rng_state, set_rng_state

__all__ = ["CurvatureProbe", "LayerCurvature", "ProbeReport", "ESTIMATORS", "MODES", "H_DEFINITIONS"]

ESTIMATORS = ("per_layer", "all_layers")
MODES = ("eval", "train", "current")
KFAC_B = ("empirical", "hessian")
H_DEFINITIONS = ("rayleigh", "eigen")
EIGEN_TOL = 1e-4  # relative Lanczos residual for h="eigen" (eigenvalue error ~ tol^2 * ||H|| / gap)
DEFAULT_LAYER_TYPES = ("conv", "attention", "mlp_up", "mlp_down", "adapter", "matrix", "head")
SCALARS = (
    "alpha",
    "gamma",
    "s",
    "s_pred",
    "rel_err",
    "participation_ratio",
    "pr_bound",
    "negative_fraction",
    "alpha_kfac",
    "n_fit",
)
VECTORS = ("sigma", "h", "h_kfac", "phi", "alignment", "overlap")


@dataclass
class LayerCurvature:
    """One weight matrix's curvature spectrum and fits. Vectors have length min(top_k, out, in)."""

    name: str
    layer_type: str
    shape: tuple[int, int]
    sigma: torch.Tensor
    h: torch.Tensor
    alpha: float
    gamma: float
    s: float
    s_pred: float
    rel_err: float
    participation_ratio: float
    pr_bound: float
    negative_fraction: float
    n_fit: int
    h_kfac: torch.Tensor | None = None
    phi: torch.Tensor | None = None
    alignment: torch.Tensor | None = None
    alpha_kfac: float = math.nan
    overlap: torch.Tensor | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in VECTORS:
            d[k] = None if d[k] is None else [float(x) for x in d[k]]
        d["shape"] = list(self.shape)
        return d


@dataclass
class ProbeReport:
    """Result of :meth:`CurvatureProbe.measure`: ``layers[name]`` plus settings, loss and cost."""

    layers: dict[str, LayerCurvature]
    backend: str
    estimator: str
    top_k: int
    samples: int
    loss: float
    cost: dict = field(default_factory=dict)
    h: str = "rayleigh"

    def to_dict(self) -> dict:
        return dict(
            backend=self.backend,
            estimator=self.estimator,
            top_k=self.top_k,
            samples=self.samples,
            loss=self.loss,
            cost=dict(self.cost),
            h=self.h,
            layers={n: lc.to_dict() for n, lc in self.layers.items()},
        )

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, default=_json_default)

    def to_markdown(self) -> str:
        head = "| layer | type | shape | alpha | gamma | s | alpha*gamma | rel err | PR | PR bound | neg | alpha_kfac |"
        rows = [head, "|" + "---|" * 12]
        for lc in self.layers.values():
            vals = [
                lc.alpha,
                lc.gamma,
                lc.s,
                lc.s_pred,
                lc.rel_err,
                lc.participation_ratio,
                lc.pr_bound,
                lc.negative_fraction,
                lc.alpha_kfac,
            ]
            cells = " | ".join(_fmt(v) for v in vals)
            rows.append(f"| {lc.name} | {lc.layer_type} | {lc.shape[0]}x{lc.shape[1]} | {cells} |")
        c = self.cost
        rows.append("")
        rows.append(
            f"backend={self.backend} estimator={self.estimator} top_k={self.top_k} samples={self.samples} "
            f"loss={self.loss:.6g} hvps={c.get('hvps')} cost={_fmt(c.get('gradient_equivalents', math.nan))} "
            "gradient-equivalents"
        )
        return "\n".join(rows)

    def to_csv(self, path) -> None:
        """One row per layer: name, type, shape, the scalar fits, and the vectors as ';'-joined numbers."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer", "layer_type", "out", "in", *SCALARS, *VECTORS])
            for lc in self.layers.values():
                d = lc.to_dict()
                vec = [";".join(f"{x:.10g}" for x in d[k]) if d[k] is not None else "" for k in VECTORS]
                w.writerow([lc.name, lc.layer_type, *lc.shape, *[d[k] for k in SCALARS], *vec])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return "nan" if math.isnan(v) else f"{v:.3g}"


def _json_default(o):
    if torch.is_tensor(o):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _check_positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


class CurvatureProbe:
    """Measure h_k, the power-law fits and the K-FAC comparison for each weight matrix of ``model``.

    Args:
        model: the module; left exactly as it was (parameters, buffers, ``.grad``, RNG, train/eval flags).
        loss_fn: ``loss_fn(model, batch) -> scalar`` (a mean over the batch, for the K-FAC scaling).
        top_k: singular directions per layer.
        hvp: HVP backend, ``"autograd"``, ``"func"`` or ``"fd"``.
        layers: parameter names to probe (matrices, ndim >= 2). None: every matrix that is not an embedding
            (conv, attention, MLP, other matrices and heads, as classified by ``classify_parameters``).
        mode: ``"eval"`` (model.eval() during the probe: BatchNorm running statistics, no dropout),
            ``"train"`` or ``"current"`` (leave the flags as they are). Previous flags are restored.
        estimator: ``"per_layer"`` (exact, top_k HVPs per layer) or ``"all_layers"`` (random signs,
            top_k * samples HVPs in all).
        samples: S, random-sign samples per k for ``"all_layers"``.
        rel_floor: fits use sigma_k > rel_floor * sigma_1 (and h_k > 0); see :mod:`.fits`.
        kfac: compute K-FAC factors, ``h_kfac``, ``phi``, ``alignment``, ``alpha_kfac``.
        kfac_b: ``"empirical"`` (B = E[d d^T], the default) or ``"hessian"`` (u^T B u from the exact loss
            Hessian w.r.t. the layer output: double backward through the gradient pass, whatever ``hvp`` is).
        fd_eps: relative finite-difference step (see :func:`.hvp.make_hvp`).
        grad_fn: fd only: how to compute gradients (see :func:`.hvp.make_hvp`).
        seed: seed of the Rademacher signs (a private generator: the global RNG is not consumed).
        optimizer: optional optimizer whose state is also guarded.
        h: ``"rayleigh"`` (h_k = <E_k, H E_k>) or ``"eigen"`` (h_k = k-th eigenvalue of the layer's Hessian
            block, with ``overlap``); see the module docstring for what each answers.
        process_group: data-parallel group for a plain module whose ranks hold different batches (DDP and
            DeepSpeed engines bring their own; FSDP2 uses its mesh's group).

    Distributed (DDP, DeepSpeed ZeRO-1/2, FSDP2; see :mod:`.sharding`): call :meth:`measure` on every rank
    with that rank's part of the batch (equal sizes, a mean loss). The gradient, every HVP and the K-FAC
    factors are those of the global batch: each rank runs the passes on its own part, one all-reduce (DDP)
    or FSDP2's reduce-scatter averages them. The singular bases are split over ranks: each matrix's full
    gradient is assembled on one owner rank (the optimizer's LPT plan, one all_to_all), the owner runs the
    SVD, and one all-reduce shares every basis. Under FSDP2 the directions and HVPs stay row-sharded and
    inner products are all-reduced; use ``hvp="fd"`` there. Every rank returns the same report, equal to
    one process's on the global batch up to rounding.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        top_k: int = 16,
        hvp: str = "autograd",
        layers: Sequence[str] | None = None,
        mode: str = "eval",
        *,
        estimator: str = "per_layer",
        samples: int = 4,
        rel_floor: float = DEFAULT_REL_FLOOR,
        kfac: bool = True,
        kfac_b: str = "empirical",
        fd_eps: float | None = None,
        grad_fn: Callable | None = None,
        seed: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        h: str = "rayleigh",
        process_group=None,
    ):
        layout = ProbeLayout.detect(model, process_group)
        model = layout.module
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(model, batch)")
        _check_positive_int("top_k", top_k)
        _check_positive_int("samples", samples)
        if hvp not in BACKENDS:
            raise ValueError(f"hvp must be one of {BACKENDS}, got {hvp!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if h not in H_DEFINITIONS:
            raise ValueError(f"h must be one of {H_DEFINITIONS}, got {h!r}")
        if h == "eigen" and estimator == "all_layers":
            raise ValueError(
                "h='eigen' runs Lanczos per layer; estimator='all_layers' applies to h='rayleigh'"
            )
        if kfac_b not in KFAC_B:
            raise ValueError(f"kfac_b must be one of {KFAC_B}, got {kfac_b!r}")
        if not 0 <= rel_floor < 1:
            raise ValueError(f"rel_floor must be in [0, 1), got {rel_floor!r}")
        if layout.kind == "sharded" and hvp != "fd":
            raise ValueError(f"an FSDP2 (fully_shard) model needs hvp='fd', got {hvp!r}")
        if layout.distributed and kfac and kfac_b == "hessian":
            raise ValueError(
                "kfac_b='hessian' runs one process only; use kfac_b='empirical' when distributed"
            )
        self.layout = layout
        self.model, self.loss_fn = model, loss_fn
        self.top_k, self.hvp, self.mode = top_k, hvp, mode
        self.estimator, self.samples, self.rel_floor = estimator, samples, rel_floor
        self.kfac, self.kfac_b, self.fd_eps, self.grad_fn = kfac, kfac_b, fd_eps, grad_fn
        self.seed, self.optimizer = seed, optimizer
        self.h = h
        self.specs = self._select(layers)

    def _select(self, layers):
        infos = {i.name: i for i in classify_parameters(self.model)}
        owner = {}
        for mod_name, mod in self.model.named_modules():
            for pname, _p in mod.named_parameters(recurse=False):
                owner.setdefault(f"{mod_name}.{pname}" if mod_name else pname, mod)
        if layers is None:
            # stacks of matrices (fused MoE experts) are left out: a probe measures one matrix's spectrum
            names = [
                n
                for n, i in infos.items()
                if i.param.ndim >= 2 and i.layer_type in DEFAULT_LAYER_TYPES and not i.batch_dims
            ]
        else:
            if isinstance(layers, str):
                raise ValueError("layers must be a list of parameter names, not a single string")
            names = list(layers)
            for n in names:
                if n not in infos:
                    raise ValueError(f"layers: {n!r} is not a trainable parameter name of the model")
                if infos[n].param.ndim < 2:
                    raise ValueError(f"layers: {n!r} has shape {tuple(infos[n].param.shape)}; need a matrix")
                if infos[n].batch_dims:
                    raise ValueError(
                        f"layers: {n!r} is a stack of {infos[n].param.shape[0]} matrices (fused MoE experts, "
                        f"shape {tuple(infos[n].param.shape)}); the probes measure one matrix at a time and do not "
                        "take expert stacks yet: probe the model's other matrices"
                    )
        if not names:
            raise ValueError("layers: the model has no matrix parameters to probe")
        specs = []
        for n in names:
            mod = owner[n]
            kind = kfac_kind(mod) if getattr(mod, "weight", None) is infos[n].param else None
            specs.append(
                dict(name=n, param=infos[n].param, layer_type=infos[n].layer_type, module=mod, kind=kind)
            )
        return specs

    # ------------------------------------------------------------------ measurement
    def measure(self, batch) -> ProbeReport:
        """Probe ``batch``; the model, its gradients and the RNG are left exactly as they were."""
        self.layout.reshard()  # snapshot the FSDP2 shards, not unsharded views freed at the next reshard
        with preserve_training_state(self.model, self.optimizer):
            if self.mode == "eval":
                self.model.eval()
            elif self.mode == "train":
                self.model.train()
            return self._measure(batch)

    def gradient_singular_values(self, batch) -> dict[str, torch.Tensor]:
        """Top ``top_k`` singular values (float64, descending) of each probed layer's gradient on ``batch``.

        One gradient pass and the SVDs, no HVPs: the gradient spectrum of another batch or step, e.g. to fit
        gamma (sigma_k ~ k^-gamma) on data independent of the batch the curvature was measured on. The model,
        its gradients and the RNG are left as they were (as for :meth:`measure`)."""
        self.layout.reshard()
        params = [s["param"] for s in self.specs]
        layout = self.layout
        with preserve_training_state(self.model, self.optimizer):
            if self.mode == "eval":
                self.model.eval()
            elif self.mode == "train":
                self.model.train()
            with torch.enable_grad(), math_attention():
                loss = self.loss_fn(self.model, batch)
                if layout.kind == "sharded":
                    grads = layout.backward_grads(self.model, loss, params)
                else:
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(layout.local(p)) if g is None else g for p, g in zip(params, grads)]
            if layout.distributed and layout.kind == "replicated":
                grads = layout.mean_flat([g.detach() for g in grads])
            bases = self._bases(grads)
        return {s["name"]: S.detach().double().cpu().clone() for s, (_U, S, _V) in zip(self.specs, bases)}

    def _measure(self, batch) -> ProbeReport:
        specs = self.specs
        params = [s["param"] for s in specs]
        kspecs = {s["name"]: s["module"] for s in specs if self.kfac and s["kind"] is not None}
        hessian_b = self.kfac_b == "hessian" and bool(kspecs)
        collector = KFACCollector(kspecs, keep_outputs=hessian_b)
        extra_cost = 0.0
        rng0 = rng_state()
        layout = self.layout
        with torch.enable_grad(), math_attention(), collector:
            if layout.kind == "sharded":  # FSDP2's backward: .grad holds this rank's rows of the mean
                loss = self.loss_fn(self.model, batch)
                grads = layout.backward_grads(self.model, loss, params)
                gouts = {}
            else:
                loss = self.loss_fn(self.model, batch)
                outs = [collector.layers[n].output for n in kspecs] if hessian_b else []
                grads = torch.autograd.grad(loss, params + outs, allow_unused=True, create_graph=hessian_b)
                gouts = dict(zip(kspecs, grads[len(params) :]))
                grads = grads[: len(params)]
            collector.active = False
        grads = [torch.zeros_like(layout.local(p)) if g is None else g for p, g in zip(params, grads)]
        loss_value = float(loss.detach())
        if layout.distributed:
            if layout.kind == "replicated":
                grads = layout.mean_flat([g.detach() for g in grads])
            loss_value = float(layout.mean_flat([torch.tensor([loss_value], dtype=torch.float64)])[0][0])
        bases = self._bases(grads)
        dirs = []
        for s, g, (U, _S, V) in zip(specs, grads, bases):
            t = s["kind"] == "conv1d_t"
            full = [param_view(torch.outer(U[:, k], V[:, k]), s["param"].shape, t) for k in range(U.shape[1])]
            dirs.append([layout.local_part(s["param"], E).to(g.dtype).contiguous() for E in full])

        set_rng_state(rng0)  # HVP passes draw the same dropout masks as the gradient pass
        hvp = make_hvp(
            self.model, self.loss_fn, batch, params, self.hvp, self.fd_eps, self.grad_fn, layout=layout
        )
        overlaps = None
        if self.h == "eigen":
            h, overlaps = self._eigen(hvp, dirs, rng0)
        elif self.estimator == "per_layer":
            h = self._per_layer(hvp, dirs)
        else:
            h = self._all_layers(hvp, dirs)

        factors = self._factors(collector, kspecs)
        layers = {}
        for i, s in enumerate(specs):
            U, S, V = bases[i]
            fits = spectrum_fits(S, h[i], self.rel_floor)
            lc = LayerCurvature(
                name=s["name"],
                layer_type=s["layer_type"],
                shape=(U.shape[0], V.shape[0]),
                sigma=S.clone(),
                h=h[i].clone(),
                **fits,
            )
            if overlaps is not None:
                lc.overlap = overlaps[i]
            A, B = factors.get(s["name"], (None, None))
            if A is not None and B is not None:
                vAv = torch.einsum("ik,ij,jk->k", V, A.double(), V)
                if hessian_b:
                    with torch.enable_grad():
                        uBu = collector.output_quadratic(s["name"], gouts[s["name"]], U)
                    extra_cost += NOMINAL_COST["autograd"] * U.shape[1]
                else:
                    uBu = torch.einsum("ik,ij,jk->k", U, B.double(), U)
                self._add_kfac(lc, uBu.detach(), vAv, A.double(), B.double(), U)
            layers[s["name"]] = lc
        cost = dict(
            hvps=hvp.calls,
            gradient_evals=1 + hvp.gradient_evals,
            gradient_equivalents=1.0 + hvp.cost + extra_cost,
        )
        return ProbeReport(
            layers, self.hvp, self.estimator, self.top_k, self.samples, loss_value, cost, h=self.h
        )

    def _factors(self, collector: KFACCollector, kspecs) -> dict:
        """{name: (A, B)} K-FAC factors of the global batch (per-rank factors averaged: one all-reduce)."""
        out = {n: collector.factors(n) for n in kspecs}
        if not self.layout.distributed or not out:
            return out
        names = [n for n, (A, B) in out.items() if A is not None and B is not None]
        flat = self.layout.mean_flat([t.double() for n in names for t in out[n]])
        return {n: (flat[2 * i], flat[2 * i + 1]) for i, n in enumerate(names)}

    def _bases(self, grads: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(U, S, V), float64, top ``top_k`` singular triplets of each layer's global-batch gradient.

        One process: an SVD per layer. Distributed: each full gradient is assembled on one owner rank
        (LPT plan, one all_to_all), owners run their SVDs, and one all-reduce of the packed triplets gives
        every rank every basis (identical bits everywhere, so all ranks probe the same directions)."""
        specs = self.specs

        def svd(s, G):
            t = s["kind"] == "conv1d_t"
            U, S, Vh = torch.linalg.svd(matrix_view(G.double(), t), full_matrices=False)
            r = min(self.top_k, S.numel())
            return U[:, :r], S[:r], Vh[:r].mT

        if not self.layout.distributed:
            return [svd(s, g.detach()) for s, g in zip(specs, grads)]
        import torch.distributed as dist

        from ..distributed.describe import describe
        from ..distributed.exchange import comm_device, gather_to_owners
        from ..distributed.layout import build_plan

        layout, group = self.layout, self.layout.group
        world = layout.world_size
        ranks = dist.get_process_group_ranks(group) if group is not None else None
        plan = build_plan([describe(s["name"], s["param"], world, ranks) for s in specs], world)
        full = gather_to_owners(
            plan, {s["name"]: g.detach() for s, g in zip(specs, grads)}, group, dtype=torch.float64
        )
        shapes = []
        for s in specs:
            out_dim, in_dim = matrix_view(
                torch.empty(s["param"].shape, device="meta"), s["kind"] == "conv1d_t"
            ).shape
            r = min(self.top_k, out_dim, in_dim)
            shapes.append((out_dim, in_dim, r))
        sizes = [r * (m + n + 1) for m, n, r in shapes]
        device = comm_device(group)
        packed = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
        for piece, s in zip(torch.split(packed, sizes), specs):
            if s["name"] in full:
                U, S, V = svd(s, full[s["name"]].view(s["param"].shape))
                piece.copy_(torch.cat([U.reshape(-1), S, V.reshape(-1)]).to(device))
        dist.all_reduce(packed, group=group)  # each piece is nonzero on its owner only
        out = []
        for piece, (m, n, r) in zip(torch.split(packed, sizes), shapes):
            U, S, V = torch.split(piece, [m * r, r, n * r])
            dev = grads[0].device
            out.append((U.view(m, r).to(dev), S.clone().to(dev), V.view(n, r).to(dev)))
        return out

    def _add_kfac(self, lc: LayerCurvature, uBu, vAv, A, B, U) -> None:
        S = lc.sigma
        lc.h_kfac = uBu * vAv
        with torch.no_grad():
            lc.phi = torch.where(S > 0, lc.h_kfac / S.clamp_min(1e-300) ** 2, torch.full_like(S, math.nan))
            lam = torch.linalg.eigvalsh(A)[-1] * torch.linalg.eigvalsh(B)[-1]
            emp_uBu = torch.einsum("ik,ij,jk->k", U, B, U)
            lc.alignment = emp_uBu * vAv / lam if lam > 0 else torch.full_like(S, math.nan)
        mask = (lc.phi > 0) & (S > self.rel_floor * S[0]) & torch.isfinite(lc.phi)
        slope = loglog_slope(S[mask], lc.phi[mask])
        lc.alpha_kfac = 2.0 + slope

    @staticmethod
    def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
        """This rank's part of <a, b> (the whole of it unless sharded; see :meth:`_total`)."""
        return float((a.double() * b.double()).sum())

    def _total(self, partial: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum per-rank partial inner products over ranks (FSDP2 shards) with one all-reduce."""
        return self.layout.sum_flat(partial)

    def _per_layer(self, hvp, dirs) -> list[torch.Tensor]:
        L = len(dirs)
        out = []
        for i in range(L):
            vals = []
            for E in dirs[i]:
                v = [None] * L
                v[i] = E
                vals.append(self._inner(E, hvp(v)[i]))
            out.append(torch.tensor(vals, dtype=torch.float64))
        return self._total(out)

    def _eigen(self, hvp, dirs, rng) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Top eigenpairs of each layer's Hessian block (as many as sigma_k) and |<q_k, E_k>|."""
        L = len(dirs)
        hs, overlaps = [], []
        for i in range(L):
            p = self.specs[i]["param"]

            local = self.layout.local(p)

            def matvec(x, i=i, local=local):
                set_rng_state(rng)  # one fixed operator, also under dropout
                v = [None] * L
                v[i] = x.view(local.shape).to(local.dtype)
                return hvp(v)[i].reshape(-1).double()

            r = len(dirs[i])
            space = self.layout.space([p])
            res = lanczos(
                matvec,
                p.numel(),
                r,
                tol=EIGEN_TOL,
                seed=self.seed,
                dtype=torch.float64,
                device=local.device,
                space=space,
            )
            E = torch.stack([e.reshape(-1).double() for e in dirs[i]])
            hs.append(res.eigenvalues.cpu())
            dots = space.reduce((res.eigenvectors * E.to(res.eigenvectors.device)).sum(1))
            overlaps.append(dots.abs().cpu())
        return hs, overlaps

    def _all_layers(self, hvp, dirs) -> list[torch.Tensor]:
        L = len(dirs)
        gen = torch.Generator().manual_seed(self.seed)
        sums = [torch.zeros(len(d), dtype=torch.float64) for d in dirs]
        kmax = max(len(d) for d in dirs)
        for k in range(kmax):
            active = [i for i in range(L) if k < len(dirs[i])]
            for _ in range(self.samples):
                eps = torch.randint(0, 2, (L,), generator=gen).double() * 2 - 1
                v = [dirs[i][k] * eps[i].item() if k < len(dirs[i]) else None for i in range(L)]
                hv = hvp(v)
                for i in active:
                    sums[i][k] += eps[i].item() * self._inner(dirs[i][k], hv[i])
        return [s_ / self.samples for s_ in self._total(sums)]
