"""Hessian-vector products of a batch loss with respect to chosen parameters, by three backends.

``make_hvp(model, loss_fn, batch, params, backend)`` returns a callable ``hvp(v) -> H v`` where ``v`` is a list of
tensors shaped like ``params`` (``None`` entries mean zero) and H is the Hessian of ``loss_fn(model, batch)``
with respect to ``params`` at their current values.

Backends:

* ``"autograd"``: double backward (``torch.autograd.grad`` with ``create_graph=True`` once, then one
  backward-of-backward per product). Exact; needs every op to be twice differentiable (math SDPA kernel).
  The graph is built at the first product and reused: build a new callable after the parameters change.
* ``"func"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` through ``functional_call``.
  Exact; same kernel requirement.
* ``"fd"``: central difference of two gradients, ``(g(p + eps v) - g(p - eps v)) / (2 eps)``. Needs only
  first-order gradients, so it works with fused attention kernels and sharded engines (DDP, FSDP2, ZeRO):
  pass ``grad_fn`` to compute gradients the engine's way. Both passes start from the same RNG state,
  buffers are reset between passes and parameters are copied back from a saved copy (no add/subtract drift).

Distributed (``layout``, a :class:`~spectral_dist.probes.sharding.ProbeLayout`): "replicated" (DDP, ZeRO-1/2)
runs any backend on this rank's batch and averages each product over ranks with one all-reduce; "sharded"
(FSDP2) runs ``"fd"`` on the local shards (``v`` and the result are this rank's row blocks) with gradients
from FSDP2's backward, and the step size uses global norms so every rank moves by the same ``h``.

Randomness: each product leaves the RNG state as it found it and all its forward passes start from that
state, so dropout draws the same mask in every pass (and in the probe's gradient pass, which resets the RNG
before the products).

Cost accounting: the callable counts ``calls`` (products), ``gradient_evals`` (first-order gradient passes it
ran) and ``cost`` (gradient-equivalents: exact for fd, ``NOMINAL_COST`` per product for the exact backends;
measured ratios are in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .state import preserve_training_state, rng_state, set_rng_state

__all__ = ["BACKENDS", "NOMINAL_COST", "HVP", "make_hvp", "math_attention", "preserve_training_state"]

BACKENDS = ("autograd", "func", "fd")
# Gradient-equivalents per product (fd: two gradient passes, exact; others: a nominal double backward).
NOMINAL_COST = {"autograd": 2.0, "func": 2.0, "fd": 2.0}


@contextlib.contextmanager
def math_attention():
    """Force the math SDPA kernel: fused (flash / memory-efficient) kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def default_fd_eps(params: Sequence[torch.Tensor]) -> float:
    """Relative step cbrt(machine epsilon) of the parameter dtype (optimal for a central difference)."""
    return float(torch.finfo(params[0].dtype).eps) ** (1.0 / 3.0)


def local_grads(model, loss_fn, batch, params) -> list[torch.Tensor]:
    """``torch.autograd.grad`` of this process's loss (zeros for unused parameters; ``.grad`` untouched)."""
    loss = loss_fn(model, batch)
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, gs)]


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap the parameters."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class HVP:
    """Callable H v for one (model, loss_fn, batch, params); see the module docstring.

    Attributes:
        backend: ``"autograd"``, ``"func"`` or ``"fd"``.
        calls: products computed so far.
        gradient_evals: first-order gradient passes run so far (fd: 2 per product; autograd: 1 to build
            the graph; func: 0).
        cost: gradient-equivalents spent so far (see ``NOMINAL_COST``).
    """

    def __init__(
        self, model, loss_fn, batch, params, backend="autograd", fd_eps=None, grad_fn=None, layout=None
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(model, batch)")
        params = list(params)
        if not params:
            raise ValueError("params must be a non-empty list of parameters")
        for p in params:
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                raise ValueError("params must be tensors with requires_grad=True")
        if fd_eps is not None and not (isinstance(fd_eps, (int, float)) and fd_eps > 0):
            raise ValueError(f"fd_eps must be a positive number or None, got {fd_eps!r}")
        if layout is not None and layout.kind == "sharded" and backend != "fd":
            raise ValueError(
                f"parameters sharded by FSDP2 need hvp='fd' (double backward through FSDP2's all-gather "
                f"is not supported), got {backend!r}"
            )
        self.model, self.loss_fn, self.batch, self.params = model, loss_fn, batch, params
        self.layout = layout
        self.backend = backend
        self.fd_eps = fd_eps
        if grad_fn is None:
            grad_fn = layout.grads if layout is not None and layout.kind == "sharded" else local_grads
        self.grad_fn = grad_fn
        # the tensors v and H v are shaped like: this rank's shards under FSDP2, else the parameters
        self.local = [p if layout is None else layout.local(p) for p in params]
        self.calls = 0
        self.gradient_evals = 0
        self._eps_auto = None  # fd: relative step for the lowest precision seen in the forward
        self._grads = None  # autograd: first-order grads with their graph
        self._grad_func = None  # func: torch.func.grad of the loss as a function of params

    @property
    def cost(self) -> float:
        if self.backend == "fd":
            return float(self.gradient_evals)
        return self.gradient_evals + NOMINAL_COST[self.backend] * self.calls

    def _check(self, v):
        v = list(v)
        if len(v) != len(self.params):
            raise ValueError(f"v must have one tensor per parameter ({len(self.params)}), got {len(v)}")
        out = []
        for p, t in zip(self.local, v):
            if t is None:
                out.append(None)
                continue
            if t.shape != p.shape:
                raise ValueError(
                    f"v entry of shape {tuple(t.shape)} does not match parameter {tuple(p.shape)}"
                )
            out.append(t.to(device=p.device, dtype=p.dtype))
        return out

    def __call__(self, v: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        v = self._check(v)
        self.calls += 1
        if all(t is None for t in v):
            return [torch.zeros_like(p) for p in self.local]
        rng = rng_state()  # every pass of every product starts from the same RNG state (dropout masks)
        try:
            out = getattr(self, f"_{self.backend}")(v)
        finally:
            set_rng_state(rng)
        if self.layout is not None and self.layout.kind == "replicated":
            out = self.layout.mean_flat(out)  # this rank's batch -> the global batch
        return out

    # ------------------------------------------------------------------ backends
    def _autograd(self, v):
        if self._grads is None:
            with torch.enable_grad(), math_attention():
                loss = self.loss_fn(self.model, self.batch)
                gs = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            self._grads = gs
            self.gradient_evals += 1
        pairs = [
            (g, t) for g, t in zip(self._grads, v) if g is not None and g.requires_grad and t is not None
        ]
        if not pairs:
            return [torch.zeros_like(p) for p in self.params]
        with torch.enable_grad(), math_attention():
            hv = torch.autograd.grad(
                [g for g, _ in pairs],
                self.params,
                grad_outputs=[t for _, t in pairs],
                retain_graph=True,
                allow_unused=True,
            )
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, hv)]

    def _build_func(self):
        names = {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n)
        missing = [i for i, p in enumerate(self.params) if id(p) not in names]
        if missing:
            raise ValueError("backend='func' needs params that belong to model")
        keys = ["model." + names[id(p)] for p in self.params]
        wrapper, batch = _LossModule(self.model, self.loss_fn), self.batch

        bufs = {"model." + n: b for n, b in self.model.named_buffers()}

        def loss_of(ps):
            # buffers cloned inside the transform: train-mode BatchNorm may update them in place
            state = {n: b.clone() for n, b in bufs.items()}
            state.update(zip(keys, ps))
            return torch.func.functional_call(wrapper, state, (batch,))

        self._grad_func = torch.func.grad(loss_of)

    def _func(self, v):
        if self._grad_func is None:
            self._build_func()
        primals = tuple(p.detach() for p in self.params)
        tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, v))
        with torch.enable_grad(), math_attention():
            _, hv = torch.func.jvp(self._grad_func, (primals,), (tangents,))
        return [h.detach() for h in hv]

    def _fd(self, v):
        live = [i for i, t in enumerate(v) if t is not None]
        ps = [self.local[i] for i in live]
        vs = [v[i] for i in live]
        with torch.no_grad():
            # Step scale: the parameters' magnitude *along v*, ||theta * v|| / ||v|| (the per-coordinate
            # |theta_i| for v = e_i, the RMS of theta for a spread-out v). Scaling by the whole ||theta||
            # instead overshoots on many-parameter blocks: 30% eigenvalue error on a 35k-parameter model.
            sums = torch.zeros(2, dtype=torch.float64)
            for p, t in zip(ps, vs):
                t64 = t.detach().double()
                sums[0] += t64.pow(2).sum()
                sums[1] += (p.detach().double() * t64).pow(2).sum()
            if self.layout is not None and self.layout.kind == "sharded":  # global norms: one h everywhere
                sums = self.layout.sum(sums)
            vnorm = float(sums[0]) ** 0.5
        if vnorm == 0.0:
            return [torch.zeros_like(p) for p in self.local]
        scale = max(1.0, float(sums[1]) ** 0.5 / vnorm)
        saved = [p.detach().clone() for p in ps]
        buffers = list(self.model.buffers())
        saved_buf = [b.detach().clone() for b in buffers]
        rng = rng_state()
        try:
            while True:
                detect = self.fd_eps is None and self._eps_auto is None
                eps_rel = (
                    self.fd_eps
                    if self.fd_eps is not None
                    else (self._eps_auto or default_fd_eps(self.params))
                )
                h = eps_rel * scale / vnorm
                grads = []
                for sign in (1.0, -1.0):
                    with torch.no_grad():  # p = saved + sign * h * v, always from the saved copy
                        torch._foreach_copy_(ps, saved)
                        torch._foreach_add_(ps, vs, alpha=sign * h)
                    set_rng_state(rng)
                    watch = _LowestPrecision() if detect else contextlib.nullcontext()
                    with torch.enable_grad(), watch:
                        grads.append(self.grad_fn(self.model, self.loss_fn, self.batch, self.params))
                    self.gradient_evals += 1
                    if buffers:
                        with torch.no_grad():
                            torch._foreach_copy_(buffers, saved_buf)
                    if detect:
                        # The rounding floor is set by the lowest precision the forward computes in (a
                        # float32 softmax or loss in a float64 model, bf16 autocast), not the parameters'.
                        self._eps_auto = max(eps_rel, watch.eps ** (1.0 / 3.0))
                        if self._eps_auto > eps_rel:
                            break  # redo this product with the step for that precision
                if len(grads) == 2:
                    break
        finally:
            with torch.no_grad():
                torch._foreach_copy_(ps, saved)
                if buffers:
                    torch._foreach_copy_(buffers, saved_buf)
            set_rng_state(rng)
        out = torch._foreach_sub(grads[0], grads[1])
        torch._foreach_mul_(out, 1.0 / (2.0 * h))
        return out


class _LowestPrecision(TorchFunctionMode):
    """Records the largest machine epsilon among the floating-point results of torch functions."""

    def __init__(self):
        super().__init__()
        self.eps = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.eps = max(self.eps, float(torch.finfo(t.dtype).eps))
        return out


def make_hvp(
    model: nn.Module,
    loss_fn: Callable,
    batch,
    params: Sequence[torch.nn.Parameter],
    backend: str = "autograd",
    fd_eps: float | None = None,
    grad_fn: Callable | None = None,
    layout=None,
) -> HVP:
    """Build ``hvp(v) -> H v`` for the Hessian of ``loss_fn(model, batch)`` with respect to ``params``.

    Args:
        model: the module; it is run as is (set eval mode yourself, or use a probe with ``mode="eval"``).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: passed to ``loss_fn`` unchanged.
        params: parameters of ``model`` (requires_grad); ``v`` and the result are lists shaped like them.
        backend: ``"autograd"``, ``"func"`` or ``"fd"`` (see module docstring).
        fd_eps: relative finite-difference step; the absolute step along ``v`` is
            ``fd_eps * max(1, ||params * v|| / ||v||) / ||v||`` (the parameters' magnitude along ``v``).
            Default cbrt(machine epsilon) of the lowest precision the forward computes in: the first
            product watches the dtypes of the forward's results (a float32 softmax or loss inside a float64
            model, bf16 autocast) and, if one is coarser than the parameters, is redone with that step
            (one extra gradient pass, counted in ``gradient_evals``).
        grad_fn: fd only: ``grad_fn(model, loss_fn, batch, params) -> list of gradients``; default
            ``torch.autograd.grad`` (leaves ``.grad`` untouched). Use it to compute gradients through an engine.
        layout: a :class:`~spectral_dist.probes.sharding.ProbeLayout` for DDP / ZeRO-1/2 / FSDP2 (see the
            module docstring); None: one process.

    Returns:
        An :class:`HVP` callable with ``calls``, ``gradient_evals`` and ``cost`` counters.
    """
    return HVP(model, loss_fn, batch, params, backend=backend, fd_eps=fd_eps, grad_fn=grad_fn, layout=layout)
