"""Hessian spectrum of each weight block and of the whole model on one fixed batch.

:class:`HessianSpectrum` gives, per weight block (the Hessian of the loss with respect to one weight matrix
or conv kernel) and for all parameters together: the top eigenvalues with their eigenvectors and measured
residuals (Lanczos with full reorthogonalization, deflated power iteration as fallback), the trace
(Hutch++ or Hutchinson, with a standard error) and, on request, a spectral density (stochastic Lanczos
quadrature). The eigenvalues of a block are the second reading of the paper's ``h_k`` ("the k-th
eigenvalue of the layer's Hessian block, paired by rank with sigma_k"); see
:mod:`spectral_dist.probes.curvature` for both readings.

Guarantees shared with the other probes: the batch is fixed, the training state (parameters, buffers,
``.grad``, train/eval flags, RNG) is restored exactly afterwards, and the global RNG is reset to the same
state before every Hessian-vector product, so dropout masks (``mode="train"``) are identical across
products and the operator stays one fixed symmetric matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .hvp import BACKENDS, make_hvp
from .lanczos import (
    EigenResult,
    SpectralDensity,
    VectorSpace,
    exact_residuals,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
    slq_density,
)
from .sharding import ProbeLayout
from .state import preserve_training_state, rng_state, set_rng_state

__all__ = ["BlockSpectrum", "SpectrumResult", "HessianSpectrum", "weight_blocks", "flat_hvp"]

_METHODS = ("auto", "lanczos", "power")
_TRACE = ("hutch++", "hutchinson")


@dataclass
class BlockSpectrum:
    """Spectrum of the Hessian with respect to one group of parameters.

    Attributes:
        name: block name (parameter name, or ``"model"``).
        param_names: parameters in the block, in the order their entries appear in flat vectors.
        shapes: their shapes.
        dim: number of scalar parameters (the Hessian is ``dim x dim``).
        eigenvalues: ``(k,)`` float64, descending.
        eigenvectors: ``(k, dim)`` unit rows (flattened in ``param_names`` order), or None unless asked.
        residuals: ``(k,)`` float64 ``||H q - lambda q||`` (measured with one extra product per pair when
            ``verify_residuals``; else the Lanczos estimate ``|beta_m s_mk|``).
        relative_residuals: ``residuals / ||H||`` (``||H||`` estimated by the largest Ritz magnitude), the
            scale-free figure ``tol`` refers to.
        converged: every pair met ``tol``.
        method: ``"lanczos"`` or ``"power"``.
        trace: estimated trace of the block (None when not asked).
        trace_stderr: its standard error (0 when exact: Hutch++ whose sketch spans the block).
        density: :class:`~spectral_dist.probes.lanczos.SpectralDensity` (``grid``, ``values``) or None.
        num_hvps: Hessian-vector products spent on this block (eigen + residual check + trace + density).
        eig_hvps: of which for the eigenpairs (Lanczos or power iteration) alone.
        hvp_cost: the same in gradient-equivalents (the HVP backend's ``cost``).
        sharded: measured on FSDP2 shards: ``eigenvectors`` hold this rank's entries of the flat vector.
    """

    name: str
    param_names: list[str]
    shapes: list[tuple[int, ...]]
    dim: int
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    relative_residuals: torch.Tensor
    converged: bool
    method: str
    trace: float | None = None
    trace_stderr: float | None = None
    density: SpectralDensity | None = None
    num_hvps: int = 0
    eig_hvps: int = 0
    hvp_cost: float = 0.0
    sharded: bool = False

    def eigenvector(self, i: int) -> list[torch.Tensor]:
        """The ``i``-th eigenvector split into tensors shaped like the block's parameters."""
        if self.eigenvectors is None:
            raise ValueError("eigenvectors were not requested: measure(..., eigenvectors=True)")
        return unflatten(self.eigenvectors[i], self.shapes)

    def to_dict(self) -> dict:
        """JSON-friendly summary (no eigenvectors)."""
        out = {
            "name": self.name,
            "dim": self.dim,
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.tolist(),
            "relative_residuals": self.relative_residuals.tolist(),
            "converged": self.converged,
            "method": self.method,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "num_hvps": self.num_hvps,
            "eig_hvps": self.eig_hvps,
            "hvp_cost": self.hvp_cost,
        }
        if self.density is not None:
            out["density"] = {
                "grid": self.density.grid.tolist(),
                "values": self.density.values.tolist(),
                "sigma": self.density.sigma,
            }
        return out


@dataclass
class SpectrumResult:
    """Result of :meth:`HessianSpectrum.measure`: ``layers[name]`` per weight block, ``model`` for all
    parameters (None when ``include_model=False``)."""

    layers: dict[str, BlockSpectrum] = field(default_factory=dict)
    model: BlockSpectrum | None = None

    @property
    def num_hvps(self) -> int:
        blocks = list(self.layers.values()) + ([self.model] if self.model is not None else [])
        return sum(b.num_hvps for b in blocks)

    def to_dict(self) -> dict:
        return {
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "model": None if self.model is None else self.model.to_dict(),
        }


def unflatten(flat: torch.Tensor, shapes: Iterable[tuple[int, ...]]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``shapes``."""
    shapes = [tuple(s) for s in shapes]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [t.view(s) for t, s in zip(torch.split(flat, sizes), shapes)]


def weight_blocks(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight blocks of ``model``: trainable parameters named ``*weight`` with at least 2 dimensions
    (linear and GPT-2 ``Conv1D`` matrices, conv kernels, embeddings); biases, norms and position/class
    tokens are left to the whole-model block."""
    return {
        n: p
        for n, p in model.named_parameters()
        if p.requires_grad and p.ndim >= 2 and n.rsplit(".", 1)[-1] == "weight"
    }


def flat_hvp(
    hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    params: list[torch.Tensor],
    work_dtype: torch.dtype = torch.float64,
    rng: dict | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a list-of-tensors HVP as a flat ``v -> H v`` in ``work_dtype``.

    When ``rng`` is given the global RNG is reset to it before every product (a fixed operator under
    dropout; the fd backend already does this for its own two passes, the others do not).
    """
    shapes = [tuple(p.shape) for p in params]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        if rng is not None:
            set_rng_state(rng)
        parts = [t.to(dtype=p.dtype, device=p.device) for t, p in zip(unflatten(v, shapes), params)]
        out = hvp(parts)
        return torch.cat([o.reshape(-1) for o in out]).to(dtype=work_dtype, device=v.device)

    return matvec


class HessianSpectrum:
    """Top eigenpairs, trace and density of Hessian blocks of ``loss_fn(model, batch)``.

    Args:
        model: the module (left exactly as it was after each :meth:`measure`).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        layers: which weight blocks: None for :func:`weight_blocks`, or an iterable of parameter names or
            module names (a module name means its ``weight``).
        hvp: backend of :func:`~spectral_dist.probes.hvp.make_hvp`: ``"autograd"``, ``"func"`` or ``"fd"``.
        mode: ``"eval"`` (dropout off, BatchNorm uses running statistics: a deterministic Hessian) or
            ``"train"`` (the training-time Hessian; dropout masks are frozen by the fixed RNG).
        method: ``"lanczos"``, ``"power"`` (deflated power iteration) or ``"auto"`` (Lanczos, falling
            back to power iteration when Lanczos fails: its Krylov basis does not fit in memory, the small
            eigenproblem fails, or it returns non-finite values).
        tol: relative residual target ``||H q - lambda q|| <= tol * ||H||`` (``||H||`` estimated by the
            largest Ritz magnitude, so the target does not depend on the loss scale).
        max_iter: Lanczos Krylov dimension cap (default ``min(dim, max(10 k, 100))``); for power iteration
            the cap on products per eigenpair (default 1000).
        fd_eps: relative finite-difference step for ``hvp="fd"``.
        seed: seed of start vectors and trace/density probes.
        work_dtype: dtype of the Krylov vectors (float64 keeps reorthogonalization clean whatever the model
            dtype; the products themselves run in the parameters' dtype).
        grad_fn: for ``hvp="fd"``, how gradients are computed (see :func:`~spectral_dist.probes.hvp.make_hvp`).
        process_group: data-parallel group (default: the world group when ``model`` is DDP-wrapped).

    Data parallel (DDP, DeepSpeed ZeRO-1/2): pass the wrapped model (or the module and a ``process_group``)
    and each rank's local batch. Parameters are replicated, so each rank computes the Hessian-vector product
    of its local loss on the unwrapped module (any backend, ``"fd"`` included) and one all-reduce averages
    it: the product of the global-batch loss when local batches have equal size and the loss is a mean.
    Krylov and probe vectors are replicated too (same seed, same all-reduced products on every rank), so no
    inner product needs a collective.

    Sharded (FSDP2, ``fully_shard``): pass the sharded model, each rank's local batch and ``hvp="fd"``.
    Products are finite differences of FSDP2's own (reduce-scattered, averaged) gradients with the local
    shards perturbed; Lanczos, trace and density vectors are row-sharded like the parameters (a rank keeps
    only its rows of the Krylov basis) and every inner product is a local dot plus one all-reduce. Random
    vectors are drawn whole from the seeded generator and sliced. Eigenvectors, when requested, hold this
    rank's entries only (``BlockSpectrum.sharded``).

    Either way every rank returns the same eigenvalues, traces and densities, equal to one process on the
    global batch up to rounding. Use ``mode="eval"``: train-mode BatchNorm statistics are per rank.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        layers: Iterable[str] | None = None,
        hvp: str = "autograd",
        mode: str = "eval",
        method: str = "auto",
        tol: float = 1e-3,
        max_iter: int | None = None,
        fd_eps: float | None = None,
        seed: int = 0,
        work_dtype: torch.dtype = torch.float64,
        grad_fn: Callable | None = None,
        process_group=None,
    ):
        layout = ProbeLayout.detect(model, process_group)
        model = layout.module
        if layout.kind == "sharded" and hvp != "fd":
            raise ValueError(f"an FSDP2 (fully_shard) model needs hvp='fd', got {hvp!r}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(model, batch)")
        if hvp not in BACKENDS:
            raise ValueError(f"hvp must be one of {BACKENDS}, got {hvp!r}")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.model, self.loss_fn = model, loss_fn
        self.hvp, self.mode, self.method = hvp, mode, method
        self.tol, self.max_iter, self.fd_eps = tol, max_iter, fd_eps
        self.seed, self.work_dtype = seed, work_dtype
        self.grad_fn = grad_fn
        self.layout = layout
        self.process_group = layout.group
        self.distributed = layout.distributed
        self.blocks = self._resolve(layers)

    def _resolve(self, layers) -> dict[str, nn.Parameter]:
        if layers is None:
            blocks = weight_blocks(self.model)
            if not blocks:
                raise ValueError("model has no weight blocks (>= 2-D parameters named '*weight')")
            return blocks
        if isinstance(layers, str):
            layers = [layers]
        params = dict(self.model.named_parameters())
        modules = dict(self.model.named_modules())
        out = {}
        for name in layers:
            if name in params:
                out[name] = params[name]
            elif name in modules and isinstance(getattr(modules[name], "weight", None), nn.Parameter):
                out[f"{name}.weight" if name else "weight"] = modules[name].weight
            else:
                raise ValueError(f"{name!r} is neither a parameter nor a module with a weight of the model")
        for name, p in out.items():
            if not p.requires_grad:
                raise ValueError(f"parameter {name!r} does not require grad")
        if not out:
            raise ValueError("layers is empty")
        return out

    def measure(
        self,
        batch,
        top_k: int = 8,
        trace: bool = True,
        density: bool = False,
        eigenvectors: bool = False,
        include_model: bool = True,
        include_layers: bool = True,
        verify_residuals: bool = True,
        trace_method: str = "hutch++",
        trace_matvecs: int = 48,
        density_probes: int = 4,
        density_steps: int = 48,
        density_points: int = 256,
        density_sigma: float | None = None,
    ) -> SpectrumResult:
        """Measure the spectrum on ``batch``.

        Args:
            batch: passed to ``loss_fn`` unchanged, for every product.
            top_k: eigenpairs per block (clipped to the block's dimension).
            trace: estimate the trace.
            density: estimate the spectral density.
            eigenvectors: keep the eigenvectors in the result.
            include_model: also measure the Hessian of all trainable parameters (``res.model``).
            include_layers: measure each weight block (``res.layers``).
            verify_residuals: measure ``||H q - lambda q||`` with one product per pair instead of reporting
                the Lanczos estimate.
            trace_method: ``"hutch++"`` or ``"hutchinson"``.
            trace_matvecs: products for the trace.
            density_probes, density_steps, density_points, density_sigma: see
                :func:`~spectral_dist.probes.lanczos.slq_density`.

        Returns:
            :class:`SpectrumResult`.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if trace_method not in _TRACE:
            raise ValueError(f"trace_method must be one of {_TRACE}, got {trace_method!r}")
        if not (include_model or include_layers):
            raise ValueError("nothing to measure: include_model and include_layers are both False")
        res = SpectrumResult()
        self.layout.reshard()  # snapshot the FSDP2 shards, not unsharded views freed at the next reshard
        opts = dict(
            top_k=top_k,
            trace=trace,
            density=density,
            eigenvectors=eigenvectors,
            verify_residuals=verify_residuals,
            trace_method=trace_method,
            trace_matvecs=trace_matvecs,
            density_probes=density_probes,
            density_steps=density_steps,
            density_points=density_points,
            density_sigma=density_sigma,
        )
        with preserve_training_state(self.model):
            self.model.train(self.mode == "train")
            if include_layers:
                for name, p in self.blocks.items():
                    res.layers[name] = self._block(batch, name, [name], [p], **opts)
            if include_model:
                named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
                res.model = self._block(batch, "model", [n for n, _ in named], [p for _, p in named], **opts)
        return res

    def operator(self, batch, params: list[torch.Tensor]):
        """``(matvec, hvp)``: the flat Hessian operator of ``params`` on ``batch`` (on this rank's part of
        flat vectors when sharded) and the underlying :class:`~spectral_dist.probes.hvp.HVP` (for its
        counters). Call inside :func:`~spectral_dist.probes.state.preserve_training_state` with the wanted
        train/eval mode."""
        h = make_hvp(
            self.model,
            self.loss_fn,
            batch,
            params,
            backend=self.hvp,
            fd_eps=self.fd_eps,
            grad_fn=self.grad_fn,
            layout=self.layout,
        )
        local = [self.layout.local(p) for p in params]
        matvec = flat_hvp(h, local, self.work_dtype, rng=rng_state())
        return matvec, h

    def eigenpairs(self, matvec, dim: int, k: int, device, space: VectorSpace | None = None) -> EigenResult:
        """Top ``k`` eigenpairs of ``matvec`` by the configured method (see the class docstring)."""
        kw = dict(which="LA", tol=self.tol, seed=self.seed, dtype=self.work_dtype, device=device, space=space)
        pkw = {} if self.max_iter is None else {"max_iter": self.max_iter}
        if self.method == "power":
            return power_iteration(matvec, dim, k, **kw, **pkw)
        try:
            out = lanczos(matvec, dim, k, max_iter=self.max_iter, **kw)
            if not (torch.isfinite(out.eigenvalues).all() and torch.isfinite(out.residuals).all()):
                raise FloatingPointError("Lanczos returned non-finite values")
            return out
        except (torch.linalg.LinAlgError, torch.OutOfMemoryError, FloatingPointError):
            if self.method == "lanczos":
                raise
            return power_iteration(matvec, dim, k, **kw, **pkw)

    def _block(
        self,
        batch,
        name,
        names,
        params,
        *,
        top_k,
        trace,
        density,
        eigenvectors,
        verify_residuals,
        trace_method,
        trace_matvecs,
        density_probes,
        density_steps,
        density_points,
        density_sigma,
    ) -> BlockSpectrum:
        matvec, h = self.operator(batch, params)
        space = self.layout.space(params)
        dim = space.dim
        device = self.layout.local(params[0]).device
        k = min(top_k, dim)
        eig = self.eigenpairs(matvec, dim, k, device, space)
        eig_hvps = h.calls
        residuals = eig.residuals
        if verify_residuals:
            residuals = exact_residuals(matvec, eig.eigenvalues, eig.eigenvectors, space)
        scale = max(eig.norm_estimate, float(eig.eigenvalues.abs().max()), 1e-300)
        out = BlockSpectrum(
            name=name,
            param_names=list(names),
            shapes=[tuple(p.shape) for p in params],
            dim=dim,
            eigenvalues=eig.eigenvalues,
            eigenvectors=eig.eigenvectors if eigenvectors else None,
            residuals=residuals,
            relative_residuals=residuals / scale,
            converged=bool((residuals <= self.tol * scale).all()),
            method=eig.method,
            eig_hvps=eig_hvps,
            sharded=space.sharded,
        )
        if trace:
            kw = dict(seed=self.seed + 1, dtype=self.work_dtype, device=device, space=space)
            if trace_method == "hutch++":
                t = hutchpp(matvec, dim, trace_matvecs, **kw)
            else:
                t = hutchinson(matvec, dim, trace_matvecs, **kw)
            out.trace, out.trace_stderr = t.value, t.stderr
        if density:
            out.density = slq_density(
                matvec,
                dim,
                num_probes=density_probes,
                num_steps=density_steps,
                num_points=density_points,
                sigma=density_sigma,
                seed=self.seed + 2,
                dtype=self.work_dtype,
                device=device,
                space=space,
            )
        out.num_hvps = h.calls
        out.hvp_cost = float(h.cost)
        return out
