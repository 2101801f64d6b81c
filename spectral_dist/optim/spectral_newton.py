"""SpectralNewton: Newton's step along each weight matrix's gradient singular directions.

For a matrix parameter W (conv kernels viewed as (out, in * k...)) with momentum M = U diag(sigma) V^T the
update is ``W <- W * (1 - lr * wd) - lr * c * U diag(T(sigma; alpha)) V^T``, T = sigma / (sigma^alpha + lambda),
c set by ``scale``. Parameters that are not matrices (and those put in a group with ``spectral=False``)
get AdamW inside the same optimizer.

The per-matrix math (momentum, direction, scale) lives in :meth:`SpectralNewton.matrix_direction`; where it
runs is decided by an engine (``spectral_dist.optim.engine``): locally, or on an owner rank that gathers the
matrix's full gradient when a process group is initialised.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..spectral import METHODS, DecompositionError, spectral_direction
from ..spectral.decompose import compute_dtype
from ..spectral.transform import check_alpha, check_damping, inverse_transform, rank_floor
from .classify import DEFAULT_ALPHA, classification_table, classify_parameters, resolve_alpha_map

__all__ = ["SpectralNewton", "SCALES", "NonFiniteGradientError"]

SCALES = ("rms", "spectral", "none")
MAX_DECOMPOSITION_FAILURES = 3


class NonFiniteGradientError(FloatingPointError):
    """Too many consecutive non-finite gradients for one parameter."""


def _check_nonneg(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def validate_group(g: Mapping) -> None:
    """Raise ValueError naming the first invalid option of a param group."""
    _check_nonneg("lr", g["lr"])
    if g["alpha"] != "auto":
        check_alpha(g["alpha"])
    m = g["momentum"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {m!r}")
    check_damping(g["damping"])
    _check_nonneg("weight_decay", g["weight_decay"])
    if g["scale"] not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {g['scale']!r}")
    if g["basis"] not in METHODS:
        raise ValueError(f"basis must be one of {METHODS}, got {g['basis']!r}")
    if g["basis"] == "newton_schulz" and g["alpha"] not in (1, 1.0):
        raise ValueError(
            f"basis='newton_schulz' computes the polar factor and needs alpha=1, got alpha={g['alpha']!r}"
        )
    r = g["rank"]
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise ValueError(f"rank must be a positive integer or None, got {r!r}")
    k = g["refresh_every"]
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"refresh_every must be a positive integer, got {k!r}")
    if g["adamw_lr"] is not None:
        _check_nonneg("adamw_lr", g["adamw_lr"])
    b1, b2 = g["adamw_betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"adamw_betas must be two numbers in [0, 1), got {g['adamw_betas']!r}")
    if not g["adamw_eps"] > 0:
        raise ValueError(f"adamw_eps must be > 0, got {g['adamw_eps']!r}")
    _check_nonneg("adamw_weight_decay", g["adamw_weight_decay"])
    _check_nonneg("rms_target", g["rms_target"])
    if g["spectral"] not in (None, True, False):
        raise ValueError(f"spectral must be None (by ndim), True or False, got {g['spectral']!r}")


class SpectralNewton(torch.optim.Optimizer):
    """Spectral Newton for matrices, AdamW for the rest, in one ``torch.optim.Optimizer``.

    Args:
        params: parameters, named parameters (``model.named_parameters()``) or param-group dicts. Any option
            below can be set per group. Extra group keys: ``spectral`` (None: by ndim; False: AdamW for all
            of the group), ``layer_type`` (used by ``alpha="auto"`` before the first probe).
        lr: learning rate of the matrix step. With ``scale="rms"`` AdamW learning rates transfer.
        alpha: curvature exponent >= 0, or ``"auto"`` (estimated online by :class:`AutoAlpha`; until then
            the by-layer default of the group's ``layer_type``, 1.0 if none).
        momentum: EMA coefficient of the matrix momentum, M <- momentum * M + (1 - momentum) * G.
        nesterov: precondition G + momentum * (M - G) instead of M.
        damping: lambda = damping * sigma_1^alpha.
        weight_decay: decoupled weight decay of matrices (W *= 1 - lr * weight_decay).
        scale: ``"rms"`` rescales each direction to RMS ``rms_target`` (0.2, AdamW's typical update RMS);
            ``"spectral"`` multiplies by sqrt(max(1, m / n)) as Muon does; ``"none"`` keeps raw T, so lr = 1
            with momentum 0 is a damped Newton step when h_k = sigma_k^alpha.
        basis: ``"svd"``, ``"gram"``, ``"newton_schulz"`` (alpha = 1) or ``"tracked"``.
        rank: rank of the tracked basis (None: full).
        refresh_every: exact SVD refresh period of the tracked basis.
        adamw_lr: learning rate for non-matrix parameters (None: ``lr``).
        adamw_betas, adamw_eps, adamw_weight_decay: AdamW options for non-matrix parameters.
        rms_target: update RMS for ``scale="rms"``.
        ns_steps: Newton-Schulz iterations (``basis="newton_schulz"``).
        max_consecutive_skips: a parameter whose gradient is non-finite this many steps in a row raises
            :class:`NonFiniteGradientError` (its earlier non-finite steps are skipped and counted).

    Faults: a non-finite gradient skips that parameter's step (momentum, basis and AdamW moments untouched).
    A failing decomposition is retried in float64; if that fails too, a tracked basis falls back to its
    previous basis, other methods skip the matrix's step; 3 consecutive failures raise DecompositionError.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        alpha: float | str = 1.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        damping: float = 1e-4,
        weight_decay: float = 0.0,
        scale: str = "rms",
        basis: str = "svd",
        rank: int | None = None,
        refresh_every: int = 1,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        *,
        rms_target: float = 0.2,
        ns_steps: int = 5,
        max_consecutive_skips: int = 10,
        engine=None,
    ):
        defaults = dict(
            lr=lr,
            alpha=alpha,
            momentum=momentum,
            nesterov=nesterov,
            damping=damping,
            weight_decay=weight_decay,
            scale=scale,
            basis=basis,
            rank=rank,
            refresh_every=refresh_every,
            adamw_lr=adamw_lr,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            rms_target=rms_target,
            ns_steps=ns_steps,
            spectral=None,
            layer_type=None,
        )
        validate_group(defaults)
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(
                f"max_consecutive_skips must be a positive integer, got {max_consecutive_skips!r}"
            )
        self.max_consecutive_skips = max_consecutive_skips
        super().__init__(params, defaults)
        for g in self.param_groups:
            validate_group(g)
        from .engine import make_engine  # local import: engine imports distributed code lazily

        self._engine = make_engine(self) if engine is None else engine

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        alpha="by_layer",
        *,
        head_names: tuple[str, ...] = (),
        verbose: bool = False,
        **options,
    ) -> SpectralNewton:
        """Build the optimizer with one param group per layer type (see :mod:`spectral_dist.optim.classify`).

        ``alpha``: ``"by_layer"`` (conv 2.0, attention 1.0, MLP up 0.5, other matrices 1.0), a number,
        ``"auto"``, or a mapping {layer_type: alpha} overriding the defaults. Embeddings, heads, norms and
        biases get AdamW. ``verbose=True`` prints the classification table.
        """
        infos = classify_parameters(model, head_names=head_names)
        amap = resolve_alpha_map(alpha)
        if verbose:
            print(classification_table(infos, amap))
        by_type: dict[str, list] = {}
        for i in infos:
            by_type.setdefault(i.layer_type, []).append(i)
        groups = []
        for t, items in by_type.items():
            g = {"params": [i.param for i in items], "param_names": [i.name for i in items], "layer_type": t}
            if t in amap:
                g["alpha"] = amap[t]
                g["spectral"] = True
            else:
                g["spectral"] = False
            groups.append(g)
        if not groups:
            raise ValueError("model has no trainable parameters")
        opt = cls(groups, **options)
        opt.param_infos = infos
        return opt

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        validate_group(self.param_groups[-1])
        for p in self.param_groups[-1]["params"]:
            if self.param_groups[-1]["spectral"] is True and p.ndim < 2:
                raise ValueError(f"spectral=True needs matrix parameters; got one of shape {tuple(p.shape)}")

    # ------------------------------------------------------------------ bookkeeping
    def is_matrix(self, p: torch.Tensor, group: Mapping) -> bool:
        if group["spectral"] is False:
            return False
        return p.ndim >= 2

    def named_params(self) -> Iterable[tuple[str, torch.Tensor, dict]]:
        """(name, param, group); names come from named parameters / from_model, else "group{i}.param{j}"."""
        for gi, g in enumerate(self.param_groups):
            names = g.get("param_names")
            for i, p in enumerate(g["params"]):
                yield (names[i] if names is not None else f"group{gi}.param{i}"), p, g

    def resolve_alpha(self, p: torch.Tensor, group: Mapping) -> float:
        a = group["alpha"]
        if a != "auto":
            return float(a)
        est = self.state[p].get("alpha_estimate") if p in self.state else None
        if est is not None:
            return float(est)
        return DEFAULT_ALPHA.get(group.get("layer_type") or "matrix", 1.0)

    def _counters(self, p) -> dict:
        st = self.state[p]
        if "counters" not in st:
            st["counters"] = dict(
                steps=0,
                skipped=0,
                consecutive_skips=0,
                retries=0,
                refreshes=0,
                decomposition_failures=0,
                consecutive_failures=0,
                fallbacks=0,
            )
        return st["counters"]

    def stats(self) -> dict[str, dict]:
        """Per-parameter counters: steps, skipped (non-finite), retries (float64), refreshes (tracked SVD),
        decomposition failures and fallbacks. Keys are parameter names (FQNs with from_model)."""
        out = {}
        for name, p, g in self.named_params():
            c = self.state[p].get("counters") if p in self.state else None
            kind = "spectral" if self.is_matrix(p, g) else "adamw"
            base = dict(
                kind=kind, steps=0, skipped=0, retries=0, refreshes=0, decomposition_failures=0, fallbacks=0
            )
            if c:
                base.update({k: v for k, v in c.items() if not k.startswith("consecutive")})
            out[name] = base
        return out

    def _note_skip(self, p, name: str) -> None:
        c = self._counters(p)
        c["skipped"] += 1
        c["consecutive_skips"] += 1
        if c["consecutive_skips"] >= self.max_consecutive_skips:
            raise NonFiniteGradientError(
                f"parameter {name!r} had a non-finite gradient for {c['consecutive_skips']} consecutive steps "
                f"(max_consecutive_skips={self.max_consecutive_skips}); check the loss scale and learning rate"
            )

    # ------------------------------------------------------------------ the matrix math (runs on the owner)
    def matrix_direction(
        self, p: torch.Tensor, G: torch.Tensor, group: Mapping, name: str
    ) -> torch.Tensor | None:
        """Update p's momentum with the full gradient G (m x n) and return the scaled direction (fp32, m x n),
        or None when the step is skipped (non-finite G or a failed decomposition with no basis to fall back on).

        Only the rank that owns p calls this; p's momentum and basis live in ``self.state[p]`` there.
        """
        c = self._counters(p)
        G = G.detach().to(compute_dtype(G.dtype))  # fp32 for half precision; fp32/fp64 as they are
        if not torch.isfinite(G).all():
            self._note_skip(p, name)
            return None
        c["consecutive_skips"] = 0
        st = self.state[p]
        buf = st.get("momentum_buffer")
        if buf is None:
            buf = st["momentum_buffer"] = torch.zeros_like(G, memory_format=torch.contiguous_format)
        mom = group["momentum"]
        buf.lerp_(G, 1.0 - mom)
        M = G.lerp(buf, mom) if group["nesterov"] else buf
        alpha = self.resolve_alpha(p, group)
        basis = group["basis"]
        tracked = st.setdefault("tracked", {}) if basis == "tracked" else None
        try:
            D = spectral_direction(
                M,
                alpha,
                group["damping"],
                basis,
                state=tracked,
                rank=group["rank"],
                refresh_every=group["refresh_every"],
                ns_steps=group["ns_steps"],
                counter=c,
                check_finite=False,  # G was checked above; M blends finite tensors
            )
            c["consecutive_failures"] = 0
        except DecompositionError:
            c["decomposition_failures"] += 1
            c["consecutive_failures"] += 1
            if c["consecutive_failures"] >= MAX_DECOMPOSITION_FAILURES:
                raise
            if tracked is None or tracked.get("basis") is None:
                return None
            c["fallbacks"] += 1
            V = tracked["basis"].to(M.dtype)
            B = M @ V  # columns M v_k; their norms estimate sigma_k in the previous basis
            w = inverse_transform(B.norm(dim=0), alpha, group["damping"], rank_floor(*M.shape, M.dtype))
            D = (B * w) @ V.mT
        c["steps"] += 1
        return self._scale(D, group)

    @staticmethod
    def _scale(D: torch.Tensor, group: Mapping) -> torch.Tensor:
        m, n = D.shape
        s = group["scale"]
        if s == "spectral":
            return D * math.sqrt(max(1.0, m / n))
        if s == "rms":
            norm = D.norm()
            return D * (group["rms_target"] * math.sqrt(m * n) / norm) if norm > 0 else D
        return D

    @staticmethod
    def apply_matrix_update(p: torch.Tensor, D: torch.Tensor | None, group: Mapping) -> None:
        """p <- p * (1 - lr * wd) - lr * D, on whatever part of p this rank holds (D shaped like it)."""
        if D is None:
            return
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            p.mul_(1.0 - lr * wd)
        p.add_(D.to(p.dtype).view_as(p), alpha=-lr)

    # ------------------------------------------------------------------ AdamW for the rest
    def adamw_step(self, p: torch.Tensor, grad: torch.Tensor, group: Mapping, name: str) -> None:
        c = self._counters(p)
        if not torch.isfinite(grad).all():
            self._note_skip(p, name)
            return
        c["consecutive_skips"] = 0
        st = self.state[p]
        if "exp_avg" not in st:
            st["adam_step"] = 0
            dt = compute_dtype(p.dtype)
            st["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        st["adam_step"] += 1
        c["steps"] += 1
        t = st["adam_step"]
        b1, b2 = group["adamw_betas"]
        lr = group["lr"] if group["adamw_lr"] is None else group["adamw_lr"]
        g = grad.to(st["exp_avg"].dtype)
        st["exp_avg"].lerp_(g, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (st["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["adamw_eps"])
        update = st["exp_avg"] / (1 - b1**t) / denom
        if group["adamw_weight_decay"]:
            p.mul_(1 - lr * group["adamw_weight_decay"])
        p.add_(update.to(p.dtype), alpha=-lr)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrix_jobs = []
        for name, p, group in self.named_params():
            if self.is_matrix(p, group):
                matrix_jobs.append((name, p, group))
            elif p.grad is not None:
                self.adamw_step(p, p.grad, group, name)
        self._engine.matrix_step(self, matrix_jobs)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
