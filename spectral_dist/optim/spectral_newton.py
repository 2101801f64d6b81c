"""SpectralNewton: Newton's step along each weight matrix's gradient singular directions.

For a matrix parameter W (conv kernels viewed as (out, in * k...)) with momentum M = U diag(sigma) V^T the
update is ``W <- W * (1 - lr * wd) - lr * c * U diag(T(sigma; alpha)) V^T``, T = sigma / (sigma^alpha + lambda),
c set by ``scale``. Parameters that are not matrices (and those put in a group with ``spectral=False``)
get AdamW inside the same optimizer.

Where the work runs is the engine's business (:mod:`spectral_dist.distributed.engine`): one process, or an
owner rank per matrix over a process group (DDP, FSDP2, ZeRO). The optimizer keeps the torch.optim
contracts on every engine: ``param_groups`` are read live at every step (LR schedulers, ``load_state_dict``
and ``add_param_group`` always take effect), every rank's state has the parameters' own layout (momentum and
AdamW moments sharded like the parameter; the per-matrix tracked basis and counters identical on all ranks),
so ``state_dict()`` works on any rank without collectives and torch DCP, accelerate, the HF Trainer and
DeepSpeed save and restore it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..spectral import BASES, STATEFUL, DecompositionError
from ..spectral.decompose import compute_dtype
from ..spectral.direction import JACOBI_STEPS, check_jacobi_steps
from ..spectral.transform import check_alpha, check_damping
from . import matrix_step as ms
from .classify import (
    _EXPERTS,
    DEFAULT_ALPHA,
    classification_table,
    classify_parameters,
    fallback_warning,
    resolve_alpha_map,
)

__all__ = ["SpectralNewton", "SCALES", "NonFiniteGradientError", "validate_group", "normalize_name"]

SCALES = ("rms", "spectral", "none")
MAX_DECOMPOSITION_FAILURES = ms.MAX_DECOMPOSITION_FAILURES
_GROUP_META = ("params", "param_names")
# wrapper segments that torch.compile, DDP, FSDP1 and activation checkpointing insert into parameter names
_WRAPPER_SEGMENTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
_COUNTERS = (
    "steps",
    "skipped",
    "consecutive_skips",
    "retries",
    "refreshes",
    "decomposition_failures",
    "consecutive_failures",
    "fallbacks",
)


class NonFiniteGradientError(FloatingPointError):
    """Too many consecutive non-finite gradients for one parameter."""


def normalize_name(name: str) -> str:
    """A parameter name without wrapper segments (``module.``, ``_orig_mod.``, ...), for matching."""
    return ".".join(s for s in name.split(".") if s not in _WRAPPER_SEGMENTS)


def _label(p: torch.Tensor, name: str | None) -> str:
    """How an error names a parameter: by name when the group has names, else by shape."""
    return f"parameter {name!r}" if name else f"a parameter of shape {tuple(p.shape)}"


def _check_nonneg(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        hint = ""
        # torch's own optimizers take a tensor lr for a compiled or captured step
        if isinstance(value, torch.Tensor):
            hint = (
                f" (a tensor {name} is for torch optimizers whose step is compiled or captured; SpectralNewton's "
                f"step runs eagerly, so pass a float, e.g. {name}=float({name}))"
            )
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}{hint}")


def validate_group(g: Mapping) -> None:
    """Raise ValueError naming the first invalid option of a param group."""
    _check_nonneg("lr", g["lr"])
    if g["alpha"] != "auto":
        check_alpha(g["alpha"])
    m = g["momentum"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {m!r}")
    if not isinstance(g["nesterov"], bool):
        raise ValueError(f"nesterov must be True or False, got {g['nesterov']!r}")
    check_damping(g["damping"])
    _check_nonneg("weight_decay", g["weight_decay"])
    if g["scale"] not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {g['scale']!r}")
    if g["basis"] not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {g['basis']!r}")
    if g["basis"] in ("newton_schulz", "polar_express") and g["alpha"] not in (1, 1.0):
        raise ValueError(
            f"basis={g['basis']!r} computes the polar factor and needs alpha=1, got alpha={g['alpha']!r}"
        )
    if g["basis"] == "cholesky" and (isinstance(g["alpha"], str) or float(g["alpha"]) not in (0.0, 2.0)):
        raise ValueError(f"basis='cholesky' is exact for alpha = 0 or 2 only, got alpha={g['alpha']!r}")
    r = g["rank"]
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise ValueError(f"rank must be a positive integer or None, got {r!r}")
    for key in ("refresh_every", "ns_steps"):
        k = g[key]
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"{key} must be a positive integer, got {k!r}")
    check_jacobi_steps(g["jacobi_steps"])
    if g["adamw_lr"] is not None:
        _check_nonneg("adamw_lr", g["adamw_lr"])
        base = g.get("base_lr", g["lr"])
        if not base > 0:
            raise ValueError(
                f"adamw_lr={g['adamw_lr']!r} follows lr's schedule as adamw_lr * lr / (lr at construction), "
                "so it needs lr > 0 at construction; leave adamw_lr unset (AdamW then uses lr) or pass lr > 0"
            )
    betas = g["adamw_betas"]
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"adamw_betas must be two numbers in [0, 1), got {betas!r}")
    eps = g["adamw_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"adamw_eps must be a finite number > 0, got {eps!r}")
    _check_nonneg("adamw_weight_decay", g["adamw_weight_decay"])
    _check_nonneg("rms_target", g["rms_target"])
    if g["spectral"] not in (None, True, False):
        raise ValueError(f"spectral must be None (by ndim), True or False, got {g['spectral']!r}")
    k = g.get("batch_dims", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"batch_dims must be an integer >= 0, got {k!r}")
    if k and g["basis"] in STATEFUL:
        raise ValueError(
            f"batch_dims={k} (a stack of matrices, such as fused MoE experts) needs a basis kept by no state: "
            f"basis={g['basis']!r} keeps one per matrix; use 'auto' (its eigenbasis becomes 'gram' there), "
            "'gram', 'svd', 'cholesky', 'polar_express' or 'newton_schulz'"
        )


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
        basis: ``"auto"`` (default) picks per device and alpha (:func:`~spectral_dist.spectral.auto_method`):
            alpha = 0 or 2 (damping > 0): ``"cholesky"``, exact closed forms, a Cholesky solve; alpha = 1:
            ``"polar_express"``, matmuls only (bf16 on CUDA, on CPUs with
            ``SPECTRAL_DIST_CPU_BF16=auto`` or ``1``; float64 parameters keep float64), singular values of the direction within
            [0.89, 1.11] of the polar factor's at 5 steps; other alpha: ``"eigenbasis"`` (a basis tracked
            across steps by one power step and a QR each step; see ``jacobi_steps`` for its error).
            Measured reasons in docs/benchmarks.md. Explicit choices: ``"svd"`` (the reference),
            ``"gram"``, ``"newton_schulz"`` / ``"polar_express"`` (alpha = 1), ``"cholesky"`` (alpha 0, 2),
            ``"tracked"``, ``"eigenbasis"`` (stateful, any alpha, matmuls plus a QR).
        rank: rank of the tracked / eigenbasis basis (None: full).
        refresh_every: ``"tracked"``: exact SVD refresh period; ``"eigenbasis"``: period of its power
            iteration + QR (1, the default; 10 lets it drift to 5-90%).
        jacobi_steps: ``"eigenbasis"``: parallel Jacobi steps after each power step
            (:func:`~spectral_dist.spectral.jacobi_rotate`). They rotate the tracked basis within the bulk of the
            spectrum, where a power step barely moves it and where an alpha > 1 update lies. Measured on the
            inputs of a real training run (top-direction error against the SVD, alpha 1.65): 23% with 0,
            15% with 1, 9% with 2 with Householder QR (CPU) or float64 CholeskyQR (A100, H100, H200, B200); 53%,
            31%, 21% with the float32 CholeskyQR of other GPUs (docs/benchmarks.md). Each
            step costs about one more eigenbasis step (matmuls and a QR; measured +100% on CPU at 768 x 768).
        adamw_lr: AdamW's learning rate for non-matrix parameters *when lr is at its constructed value*. The
            AdamW step follows lr's schedule: it uses ``adamw_lr * lr / base_lr`` with ``base_lr`` the group's
            lr at construction (kept in the group as ``base_lr``). None: AdamW uses ``lr``.
        adamw_betas, adamw_eps, adamw_weight_decay: AdamW options for non-matrix parameters.
        rms_target: update RMS for ``scale="rms"``.
        ns_steps: Newton-Schulz / Polar Express iterations.
        batch_dims: how many leading dims of a parameter index separate matrices: 0 (default) steps each
            parameter as one matrix (a conv kernel as (out, in * k...)); 1 steps a fused MoE expert weight
            (experts, out, in) as one matrix per expert, batched (``from_model`` sets it for fused experts).
            Such groups use the stateless bases (``"auto"`` picks ``"gram"`` where it would keep an eigenbasis).
        max_consecutive_skips: a parameter whose gradient is non-finite this many steps in a row raises
            :class:`NonFiniteGradientError` (its earlier non-finite steps are skipped and counted).
        master_weights: keep an fp32 master copy (4 bytes per element, in the state as ``master``) of bf16 /
            fp16 parameters and step that, so small updates are not rounded away. False adds the update in
            the parameter's dtype (at lr 1e-4 most bf16 entries then never change).
        max_batch_mb: the most MiB of same-shape inputs stacked into one batched decomposition (256; None:
            no limit). A batch's workspace is about 7 stacks of its inputs: unbounded, one step's transient
            memory measured 6-8x the size of the matrices; in batches of 1/8 of them, 2.6-3.6x
            (benchmarks/step_memory.py). Results do not depend on it beyond float32 rounding.
        distributed: ``"auto"``: one process, or owner-sharded over the default process group when one with
            more than one rank is initialised (decided at the first step; every rank must then call step());
            ``False``: this process alone (an EMA copy, an eval helper); a ``ProcessGroup``: that group.
        engine: an engine instance (e.g. :class:`~spectral_dist.distributed.ShardLocalEngine`), overriding
            ``distributed``.

    Faults: a parameter whose gradient is non-finite on any rank skips its step on every rank (momentum,
    basis and AdamW moments untouched). A failing decomposition is retried in float64; if that fails too, a
    tracked basis falls back to its previous basis, other methods skip the matrix's step; 3 consecutive
    failures raise DecompositionError on every rank.
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
        basis: str = "auto",
        rank: int | None = None,
        refresh_every: int = 1,
        jacobi_steps: int = JACOBI_STEPS,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        *,
        rms_target: float = 0.2,
        ns_steps: int = 5,
        batch_dims: int = 0,
        max_consecutive_skips: int = 10,
        master_weights: bool = True,
        max_batch_mb: float | None = ms.BATCH_MB,
        distributed="auto",
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
            jacobi_steps=jacobi_steps,
            adamw_lr=adamw_lr,
            adamw_betas=tuple(adamw_betas) if isinstance(adamw_betas, (list, tuple)) else adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            rms_target=rms_target,
            ns_steps=ns_steps,
            batch_dims=batch_dims,
            spectral=None,
            layer_type=None,
        )
        validate_group(defaults)
        if (
            isinstance(max_consecutive_skips, bool)
            or not isinstance(max_consecutive_skips, int)
            or (max_consecutive_skips < 1)
        ):
            raise ValueError(
                f"max_consecutive_skips must be a positive integer, got {max_consecutive_skips!r}"
            )
        if not isinstance(master_weights, bool):
            raise ValueError(f"master_weights must be True or False, got {master_weights!r}")
        mb = max_batch_mb
        if mb is not None and (
            isinstance(mb, bool) or not isinstance(mb, (int, float)) or not math.isfinite(mb) or mb <= 0
        ):
            raise ValueError(
                f"max_batch_mb must be a positive number of MiB or None (unbounded batches), got {mb!r}"
            )
        self.max_batch_bytes = None if mb is None else int(mb * 2**20)
        self.max_consecutive_skips = max_consecutive_skips
        self.master_weights = master_weights
        self._distributed = distributed
        self._engine = engine
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        alpha="by_layer",
        *,
        head_names: tuple[str, ...] = (),
        example_input=None,
        verbose: bool = False,
        **options,
    ) -> SpectralNewton:
        """Build the optimizer with one param group per layer type (see :mod:`spectral_dist.optim.classify`).

        ``alpha``: ``"by_layer"`` (:data:`~spectral_dist.optim.classify.DEFAULT_ALPHA` per layer type: conv
        2.0, attention 1.65, MLP up 2.0, MLP down and other matrices 1.0, as measured in issue 22), a number,
        ``"auto"``, or a mapping {layer_type: alpha} overriding the defaults (``PAPER_ALPHA`` is the first
        paper's conv 2, attention 1, MLP up 0.5). Embeddings, heads, norms
        and biases get AdamW. Layer types come from module types, names and the model's layout; pass
        ``example_input`` (a batch: tensor, tuple of arguments or dict of keyword arguments) to also classify
        from one traced forward (no step is taken). ``verbose=True`` prints the table with how each parameter
        was recognised. A warning is issued when no hidden matrix was recognised (all generic ``"matrix"``)
        and ``alpha`` is not a single number.
        """
        infos = classify_parameters(model, head_names=head_names, example_input=example_input)
        amap = resolve_alpha_map(alpha)
        if verbose:
            print(classification_table(infos, amap))
        if isinstance(alpha, (str, Mapping)):
            msg = fallback_warning(infos)
            if msg is not None:
                warnings.warn(f"SpectralNewton.from_model: {msg}", UserWarning, stacklevel=2)
        by_type: dict[tuple, list] = {}
        for i in infos:  # fused MoE experts (batch_dims 1) in groups of their own
            by_type.setdefault((i.layer_type, i.batch_dims), []).append(i)
        groups = []
        for (t, bdims), items in by_type.items():
            g = {"params": [i.param for i in items], "param_names": [i.name for i in items], "layer_type": t}
            if bdims:
                g["batch_dims"] = bdims
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
        """torch.optim's ``add_param_group``, validated: a rejected group leaves the optimizer unchanged."""
        n_before = len(self.param_groups)
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        try:
            g.setdefault("base_lr", g["lr"])
            validate_group(g)
            names = g.get("param_names") or [None] * len(g["params"])
            for p, name in zip(g["params"], names):
                if not p.is_floating_point():
                    what = _label(p, name)
                    raise ValueError(
                        f"{what} has dtype {p.dtype}: SpectralNewton steps real floating-point parameters only "
                        "(its transposes and norms are those of real matrices, and a complex gradient would be "
                        "cast to real); keep a complex weight as two real parameters (torch.view_as_real) or give "
                        "it another optimizer"
                    )
                k = g.get("batch_dims", 0)
                if k and p.ndim >= 2 and g["spectral"] is not False and p.ndim < k + 2:
                    what = _label(p, name)
                    raise ValueError(
                        f"batch_dims={k} needs parameters with at least {k + 2} dims (a stack of matrices); "
                        f"{what} has shape {tuple(p.shape)}: put it in a group with batch_dims=0"
                    )
                if not k and name and p.ndim == 3 and g["spectral"] is not False and _EXPERTS.search(name):
                    warnings.warn(
                        f"parameter {name!r} of shape {tuple(p.shape)} looks like fused MoE experts (experts, out, "
                        "in) but its group has batch_dims=0, so it is stepped as one matrix over all experts; give "
                        "it a group with batch_dims=1 (one step per expert), or build with SpectralNewton.from_model",
                        UserWarning,
                        stacklevel=2,
                    )
                if g["spectral"] is True and p.ndim < 2:
                    raise ValueError(
                        f"spectral=True needs matrix parameters; got one of shape {tuple(p.shape)}"
                    )
        except Exception:
            del self.param_groups[n_before:]
            raise

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

    def resolve_alpha_meta(self, meta: Mapping, group: Mapping) -> float:
        a = group["alpha"]
        if a != "auto":
            return float(a)
        est = meta.get("alpha_estimate")
        if est is not None:
            return float(est)
        return DEFAULT_ALPHA.get(group.get("layer_type") or "matrix", 1.0)

    def resolve_alpha(self, p: torch.Tensor, group: Mapping) -> float:
        return self.resolve_alpha_meta(self.state[p] if p in self.state else {}, group)

    @staticmethod
    def counters(meta: dict) -> dict:
        c = meta.get("counters")
        if c is None:
            c = meta["counters"] = dict.fromkeys(_COUNTERS, 0)
        return c

    @staticmethod
    def adamw_lr(group: Mapping) -> float:
        """AdamW's current learning rate in ``group``: ``lr``, or ``adamw_lr * lr / base_lr``."""
        if group["adamw_lr"] is None:
            return group["lr"]
        base = group.get("base_lr") or group["lr"]
        return group["adamw_lr"] * (group["lr"] / base) if base else 0.0

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

    def note_skip(self, meta: dict, name: str) -> NonFiniteGradientError | None:
        """Count a skipped step; the error to raise (on every rank) after too many in a row."""
        c = self.counters(meta)
        c["skipped"] += 1
        c["consecutive_skips"] += 1
        if c["consecutive_skips"] >= self.max_consecutive_skips:
            return NonFiniteGradientError(
                f"parameter {name!r} had a non-finite gradient for {c['consecutive_skips']} consecutive steps "
                f"(max_consecutive_skips={self.max_consecutive_skips}); check the loss scale and learning rate"
            )
        return None

    # ------------------------------------------------------------------ the per-slot math the engine calls
    def _half(self, slot) -> bool:
        return self.master_weights and slot.local().dtype in (torch.float16, torch.bfloat16)

    def _master(self, slot) -> torch.Tensor:
        """fp32 master elements of a half-precision parameter, re-synced where the parameter was changed
        from outside (weights loaded, EMA swapped in) so the optimizer never overwrites such a change."""
        m = slot.buffer("master", torch.float32, init=lambda t: t.float())
        cur = slot.local().reshape(-1)
        m.copy_(torch.where(m.to(cur.dtype) == cur, m, cur.float()))
        return m

    def _update(self, slot, delta_fn) -> None:
        """Apply ``x <- delta_fn(x)`` in place to the parameter's local elements (through the master copy for
        half precision)."""
        if self._half(slot):
            m = self._master(slot)
            delta_fn(m)
            slot.apply(lambda flat: flat.copy_(m))
        else:
            slot.apply(delta_fn)

    def init_state(self, slot) -> None:
        """Create a parameter's state (zeros) if missing, gradient or not: every trainable parameter then has
        the same state keys on every rank and in every run, which DCP and resumed runs rely on."""
        meta = slot.meta()
        if "counters" in meta:
            return
        self.counters(meta)
        cd = compute_dtype(slot.local().dtype)
        if slot.kind == "matrix":
            slot.buffer("momentum_buffer", cd)
            meta.setdefault("alpha_estimate", None)  # set by AutoAlpha; present from the start so it resumes
            method = ms.slot_method(self, slot)
            if method in STATEFUL:  # step 0: the first use starts from an exact SVD
                shape = ms.basis_shape(slot.mshape, slot.group, method)
                meta.setdefault(
                    "tracked", {"basis": torch.zeros(shape, dtype=cd, device=slot.local().device), "step": 0}
                )
        else:
            meta.setdefault("adam_step", 0)
            slot.buffer("exp_avg", cd)
            slot.buffer("exp_avg_sq", cd)
        if self._half(slot):
            slot.buffer("master", torch.float32, init=lambda t: t.float())

    def momentum_slot(self, slot, g: torch.Tensor) -> torch.Tensor:
        """Fold this rank's gradient elements into the momentum; return the local M to precondition."""
        return self.momentum_slots([(slot, g)])[0]

    def momentum_slots(self, items, nonfinite=None) -> list[torch.Tensor]:
        """:meth:`momentum_slot` for many ``(slot, local gradient)`` pairs with foreach ops, per param group.

        ``nonfinite``: per item, a 0-d bool tensor (or None) saying the gradient is to be skipped, for a caller
        that decides after the directions are computed (one host sync per step): such a gradient enters as
        the buffer itself, so the buffer stays bit for bit what it was (lerp(b, b, w) = b) and M = b is finite."""
        out: list = [None] * len(items)
        work: dict = {}
        for i, (slot, grad) in enumerate(items):
            cd = compute_dtype(slot.local().dtype)
            buf, g = slot.buffer("momentum_buffer", cd), grad.to(cd)
            bad = None if nonfinite is None else nonfinite[i]
            if bad is not None:
                g = torch.where(bad, buf, g)
            # a copy of the gradient (cast or masked) is ours: Nesterov's M is formed in it, one allocation
            # per matrix instead of two
            work.setdefault((slot.gi, cd), []).append((i, buf, g, g is not grad))
        for (gi, _), its in work.items():
            group = self.param_groups[gi]
            mom = group["momentum"]
            bufs, gs = [b for _, b, _, _ in its], [g for _, _, g, _ in its]
            torch._foreach_lerp_(bufs, gs, 1.0 - mom)
            if not group["nesterov"]:
                Ms = bufs
            elif all(own for *_, own in its):
                torch._foreach_lerp_(gs, bufs, mom)
                Ms = gs
            else:
                Ms = torch._foreach_lerp(gs, bufs, mom)
            for (i, *_), M in zip(its, Ms):
                out[i] = M
        return out

    def _apply_foreach(self, slots, deltas, lr: float, wd: float) -> None:
        """x <- x (1 - lr wd) - lr delta for every slot's local elements (through fp32 master copies for
        half-precision parameters): the per-slot :meth:`_update` with foreach ops, the same arithmetic."""
        targets, ds, back = [], [], []
        for s, d in zip(slots, deltas):
            if self._half(s):
                m = self._master(s)
                targets.append(m)
                back.append((s, m))
            else:
                lt = s.local()
                if not lt.is_contiguous():  # e.g. channels_last: the per-slot path copies and writes back
                    self._update(
                        s, lambda x, d=d: (x.mul_(1.0 - lr * wd) if wd else x).add_(d.to(x.dtype), alpha=-lr)
                    )
                    continue
                targets.append(lt.view(-1))
            ds.append(d.reshape(-1).to(targets[-1].device, targets[-1].dtype))
        if targets:
            if wd:
                torch._foreach_mul_(targets, 1.0 - lr * wd)
            torch._foreach_add_(targets, ds, alpha=-lr)
        for s, m in back:
            s.apply(lambda flat, m=m: flat.copy_(m))

    def apply_matrix_updates(self, updates) -> None:
        """Apply the ``(slot, local direction)`` pairs :meth:`finish_matrix` collected, per param group."""
        work: dict = {}
        for slot, D in updates:
            work.setdefault(slot.gi, []).append((slot, D))
        for gi, its in work.items():
            group = self.param_groups[gi]
            self._apply_foreach([s for s, _ in its], [d for _, d in its], group["lr"], group["weight_decay"])

    def finish_matrix(self, slot, status, D, extra, retries, refreshes, result, owner, updates=None):
        """Every rank, every stepped matrix: counters from the owner's header, tracked basis, the update (applied
        here, or appended to ``updates`` for :meth:`apply_matrix_updates` to apply with foreach ops)."""
        meta = slot.meta()
        c = self.counters(meta)
        group = slot.group
        c["consecutive_skips"] = 0
        c["retries"] += retries
        c["refreshes"] += refreshes
        if status in (ms.OK, ms.FALLBACK):
            c["steps"] += 1
            if status == ms.OK:
                c["consecutive_failures"] = 0
                basis = result.basis if result is not None and result.basis is not None else extra
                method = ms.slot_method(self, slot)
                if basis is not None and method in STATEFUL:
                    shape = ms.basis_shape(slot.mshape, group, method)
                    device = slot.local().device
                    tr = meta.setdefault("tracked", {})
                    tr["basis"] = (
                        basis.detach().reshape(shape).to(device, compute_dtype(slot.local().dtype)).clone()
                    )
                    tr["step"] = int(tr.get("step", 0)) + 1
            else:
                c["decomposition_failures"] += 1
                c["consecutive_failures"] += 1
                c["fallbacks"] += 1
            if D is not None and D.numel() and updates is not None:
                updates.append((slot, D))
            elif D is not None and D.numel():
                lr, wd = group["lr"], group["weight_decay"]

                def delta(x, D=D):
                    if wd:
                        x.mul_(1.0 - lr * wd)
                    x.add_(D.to(x.device, x.dtype), alpha=-lr)

                self._update(slot, delta)
            return None
        c["decomposition_failures"] += 1
        c["consecutive_failures"] += 1
        if status == ms.SKIP:
            return None
        if status == ms.RAISE:
            if result is not None and result.exc is not None:
                return result.exc
            return DecompositionError(
                f"the decomposition of {slot.key!r} failed {c['consecutive_failures']} times in a row on its "
                f"owner rank {owner}; see that rank's error"
            )
        detail = f": {result.error}" if result is not None else "; see that rank's error"
        return RuntimeError(
            f"computing the direction of {slot.key!r} failed on its owner rank {owner}{detail}"
        )

    def adamw_slot(self, slot, g: torch.Tensor | None) -> None:
        """AdamW on this rank's elements of a non-matrix parameter (counters on every rank)."""
        self.adamw_slots([(slot, g)])

    def adamw_slots(self, items) -> None:
        """AdamW for many ``(slot, local gradient or None)`` pairs: counters per slot (every rank), the moments
        and the update with foreach ops per param group and dtype (the same arithmetic as one slot at a time;
        each slot keeps its own step count for the bias corrections)."""
        work: dict = {}
        for slot, g in items:
            meta = slot.meta()
            c = self.counters(meta)
            c["consecutive_skips"] = 0
            c["steps"] += 1
            meta["adam_step"] = t = int(meta.get("adam_step", 0)) + 1
            if g is None or g.numel() == 0:
                continue
            cd = compute_dtype(slot.local().dtype)
            work.setdefault((slot.gi, cd), []).append((slot, g.to(cd), t))
        for (gi, cd), its in work.items():
            group = self.param_groups[gi]
            b1, b2 = group["adamw_betas"]
            gs = [g for _, g, _ in its]
            ea = [s.buffer("exp_avg", cd) for s, _, _ in its]
            eas = [s.buffer("exp_avg_sq", cd) for s, _, _ in its]
            torch._foreach_lerp_(ea, gs, 1 - b1)
            torch._foreach_mul_(eas, b2)
            torch._foreach_addcmul_(eas, gs, gs, value=1 - b2)
            denom = torch._foreach_div(eas, [1 - b2**t for _, _, t in its])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["adamw_eps"])
            update = torch._foreach_div(ea, [1 - b1**t for _, _, t in its])
            torch._foreach_div_(update, denom)
            self._apply_foreach(
                [s for s, _, _ in its], update, self.adamw_lr(group), group["adamw_weight_decay"]
            )

    # ------------------------------------------------------------------ step
    def _get_engine(self):
        if self._engine is None:
            from ..distributed.engine import make_engine  # distributed code stays out of the math's imports

            self._engine = make_engine(self, self._distributed)
        return self._engine

    # Not traced by torch.compile: the step is a few large batched matmuls per shape already, and its
    # bookkeeping (per-matrix counters, basis phases, the plan) would make dynamo specialise and recompile at
    # every step (measured: 8 recompiles, ~30 s, then its silent eager fallback). A compiled training step
    # that calls opt.step() compiles around it.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:  # a group added by a plain dict edit still gets its base lr
            g.setdefault("base_lr", g["lr"])
            for i, p in enumerate(g["params"]):
                if p.grad is not None and p.grad.layout != torch.strided:  # before anything changes
                    name = (g.get("param_names") or [None] * (i + 1))[i]
                    what = _label(p, name)
                    raise RuntimeError(
                        f"{what} has a {p.grad.layout} gradient: SpectralNewton (like torch's AdamW) "
                        "needs dense gradients; build the module without sparse gradients, e.g. "
                        "nn.Embedding(..., sparse=False)"
                    )
        self._get_engine().step(self)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ state dict
    def state_dict(self):
        """torch.optim's state dict (state by parameter index, ``param_names`` in the groups). Every rank
        holds the state of every parameter it has in its own layout (DTensors stay DTensors), so this needs
        no collective and any rank's copy of a replicated (DDP) run is the whole state."""
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        """Load a state dict, matching parameters by name when both sides know names (wrapper prefixes such as
        ``module.`` are ignored), else by position; shapes and hyperparameters are validated and every error
        names the parameter. State tensors keep their saved dtype (fp32 momentum of bf16 parameters stays
        fp32) and follow the parameter's device and sharding."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        if (
            not isinstance(state_dict, Mapping)
            or "param_groups" not in state_dict
            or "state" not in state_dict
        ):
            raise ValueError("not an optimizer state dict: it needs 'state' and 'param_groups'")
        saved_groups = list(state_dict["param_groups"])
        saved_state = state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
                " (build the optimizer the same way, e.g. SpectralNewton.from_model on the same model)"
            )
        mapping = self._match_params(saved_groups)  # saved id -> (current param, name)
        new_groups = []
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            merged = {**g, **{k: v for k, v in sg.items() if k not in _GROUP_META}}
            if isinstance(merged.get("adamw_betas"), list):
                merged["adamw_betas"] = tuple(merged["adamw_betas"])
            merged.setdefault("base_lr", merged["lr"])
            try:
                validate_group(merged)
            except ValueError as e:
                names = g.get("param_names") or []
                raise ValueError(
                    f"param group {gi} ({', '.join(names[:3])}...) in the state dict: {e}"
                ) from None
            new_groups.append(merged)
        new_state: dict = {}
        for sid, entry in saved_state.items():
            if sid not in mapping:
                raise ValueError(
                    f"the state dict has state for parameter {sid!r}, which no param group lists"
                )
            p, name, group = mapping[sid]
            new_state[p] = self._load_param_state(p, name, group, entry)
        for g, merged in zip(self.param_groups, new_groups):
            params, names = g["params"], g.get("param_names")
            g.clear()
            g.update(merged)
            g["params"] = params
            if names is not None:
                g["param_names"] = names
        self.state.clear()
        self.state.update(new_state)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _match_params(self, saved_groups) -> dict:
        cur = [
            (gi, p, n if n is not None else f"group{gi}.param{i}")
            for gi, g in enumerate(self.param_groups)
            for i, (n, p) in enumerate(zip(g.get("param_names") or [None] * len(g["params"]), g["params"]))
        ]
        named_here = all(g.get("param_names") is not None for g in self.param_groups)
        saved = [
            (gi, sid, n)
            for gi, sg in enumerate(saved_groups)
            for sid, n in zip(sg["params"], sg.get("param_names") or [None] * len(sg["params"]))
        ]
        fqn_keyed = any(isinstance(sid, str) for _, sid, _ in saved)  # torch DCP: already matched by FQN
        by_name = not fqn_keyed and named_here and all(n is not None for *_, n in saved)
        mapping = {}
        if by_name:
            want = {normalize_name(n): (gi, p, n) for gi, p, n in cur}
            have = {normalize_name(n): (gi, sid, n) for gi, sid, n in saved}
            missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            if missing or unexpected:
                raise ValueError(
                    "the state dict's parameter names do not match this optimizer's: "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} (wrapper prefixes such as "
                    "'module.' are ignored); build the optimizer over the same parameters"
                )
            for key, (gi, sid, _) in have.items():
                cgi, p, cname = want[key]
                if cgi != gi:
                    raise ValueError(
                        f"parameter {cname!r} is in param group {cgi} here but in group {gi} in the state dict"
                    )
                mapping[sid] = (p, cname, self.param_groups[cgi])
            return mapping
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {gi} has {len(g['params'])} parameters here and {len(sg['params'])} in the "
                    "state dict"
                )
        for (cgi, p, n), (_, sid, _) in zip(cur, saved):
            mapping[sid] = (p, n, self.param_groups[cgi])
        return mapping

    def _load_param_state(self, p, name, group, entry) -> dict:
        from ..distributed.describe import is_dtensor

        if not isinstance(entry, Mapping):
            raise ValueError(f"state of parameter {name!r} must be a dict, got {type(entry).__name__}")
        out = {}
        for k, v in entry.items():
            if k == "tracked":
                out[k] = self._load_tracked(p, name, group, v)
            elif isinstance(v, torch.Tensor):
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(
                        f"state {k!r} of parameter {name!r} has shape {tuple(v.shape)}, the parameter "
                        f"{tuple(p.shape)}"
                    )
                if not v.is_floating_point():
                    raise ValueError(
                        f"state {k!r} of parameter {name!r} must be floating point, got {v.dtype}"
                    )
                if is_dtensor(p):
                    out[k] = self._as_dtensor_like(p, v, name, k)
                elif is_dtensor(v):
                    raise ValueError(
                        f"state {k!r} of parameter {name!r} is sharded (DTensor) but the parameter is not: load it "
                        "with torch.distributed.checkpoint's set_optimizer_state_dict, or gather it first"
                    )
                else:
                    out[k] = v.detach().to(p.device).clone()
            elif isinstance(v, Mapping):
                out[k] = {
                    kk: (vv.detach().clone() if isinstance(vv, torch.Tensor) else vv) for kk, vv in v.items()
                }
            else:
                out[k] = v
        return out

    @staticmethod
    def _as_dtensor_like(p, v, name, key):
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(v, DTensor):
            if v.device_mesh != p.device_mesh or tuple(v.placements) != tuple(p.placements):
                v = v.redistribute(p.device_mesh, p.placements)  # collective: every rank loads together
            return DTensor.from_local(
                v.to_local().detach().to(p.to_local().device).clone(),
                p.device_mesh,
                p.placements,
                shape=p.shape,
                stride=p.stride(),
            )
        # a full tensor (every rank has all of it): keep this rank's part, no communication
        return distribute_tensor(
            v.detach().to(p.to_local().device), p.device_mesh, p.placements, src_data_rank=None
        )

    def _load_tracked(self, p, name, group, v):
        if not isinstance(v, Mapping):
            raise ValueError(f"tracked state of parameter {name!r} must be a dict")
        out = dict(v)
        basis = v.get("basis")
        if basis is not None:
            m = int(p.shape[0])
            n = p.numel() // max(1, m)
            method = "tracked" if group["basis"] == "tracked" else "eigenbasis"  # "auto" never picks tracked
            want = ms.basis_shape((m, n), group, method)
            dev = p.to_local().device if hasattr(p, "to_local") else p.device
            legacy = ms.basis_shape((m, n), group, "tracked")
            if method == "eigenbasis" and tuple(basis.shape) == legacy != want:
                # saved before the eigenbasis moved to the smaller side (a wide matrix's right basis): start
                # again from an exact SVD at the next step, as a fresh run does
                out["basis"] = torch.zeros(want, dtype=basis.dtype, device=dev)
                out["step"] = 0
                return out
            if tuple(basis.shape) != want:
                raise ValueError(
                    f"tracked basis of parameter {name!r} has shape {tuple(basis.shape)}, expected {want} "
                    f"(rank={group['rank']})"
                )
            out["basis"] = basis.detach().to(dev).clone()
        return out
