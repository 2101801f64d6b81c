"""K-FAC factors of Linear, Conv2d and GPT-2 Conv1D layers, collected with hooks during one gradient pass.

For a layer z = W a (W viewed as (out, in); Conv2d as (out, in * kh * kw) acting on unfolded patches; GPT-2's
Conv1D stores W^T as (in, out) and is transposed) and a loss that is a mean over the n samples of the batch:

    A = (1/n) sum_i sum_p a_ip a_ip^T          (layer inputs, no bias column)
    B = (1/n) sum_i (1/P) sum_p d_ip d_ip^T    (d_ip = n * dL/dz_ip: per-sample output gradients)

p runs over the P positions that share the weight (conv spatial positions, sequence tokens; P = 1 for a plain
(n, in) input). Summing over positions in A and averaging in B is the KFC convention (Grosse & Martens 2016):
it makes H ~ A kron B have the scale of the Hessian of the mean loss. Inputs are not augmented with a ones
column for the bias: the weight block of the Hessian is what the probe measures.

K-FAC predicts h_k = <E_k, H E_k> ~ (u_k^T B u_k)(v_k^T A v_k) for E_k = u_k v_k^T. With ``b="hessian"`` the
empirical B above is replaced in that prediction by the exact second derivative of the loss with respect to
the layer output, u^T B u = (1/P) U^T (d^2 L / dz^2) U with U = u at every sample and position; for a deep
linear network with MSE loss (and any network where samples and positions do not interact after the layer)
H = A kron B holds exactly in this form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KFAC_MODULES", "KFACCollector", "kfac_kind", "matrix_view", "param_view"]


def _conv1d_cls():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None


def kfac_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"``, ``"conv1d_t"`` (GPT-2 Conv1D, weight (in, out)) or None (no K-FAC)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return "conv2d"
    c1 = _conv1d_cls()
    if c1 is not None and isinstance(module, c1):
        return "conv1d_t"
    return None


KFAC_MODULES = ("Linear", "Conv2d", "Conv1D (transformers)")


def matrix_view(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A weight-shaped tensor as the (out, in) matrix the probe decomposes."""
    return t.mT if transposed else t.reshape(t.shape[0], -1)


def param_view(m: torch.Tensor, shape: torch.Size, transposed: bool) -> torch.Tensor:
    """Inverse of :func:`matrix_view`."""
    return m.mT.contiguous() if transposed else m.reshape(shape)


class _Layer:
    def __init__(self, module: nn.Module, kind: str):
        self.module, self.kind = module, kind
        self.A = self.B = None
        self.n = 0
        self.P = 1
        self.output = None  # kept (with graph) for b="hessian"


class KFACCollector:
    """Context manager: hooks on ``modules`` ({name: module}) accumulate A and B during one backward.

    Use it around a single forward + ``torch.autograd.grad`` (or backward) of a mean-over-batch loss. With
    ``keep_outputs=True`` the layer outputs are kept for :meth:`output_quadratic`.
    """

    def __init__(self, modules: dict[str, nn.Module], keep_outputs: bool = False):
        self.layers = {}
        for name, mod in modules.items():
            kind = kfac_kind(mod)
            if kind is None:
                raise ValueError(f"module {name!r} ({type(mod).__name__}) has no K-FAC support")
            self.layers[name] = _Layer(mod, kind)
        self.keep_outputs = keep_outputs
        self.active = True  # set False after the first backward: later passes must not add to B
        self._handles = []

    def __enter__(self):
        for layer in self.layers.values():
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def _forward_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if not self.active:
                return
            a = inputs[0].detach()
            n = a.shape[0]
            if layer.kind == "conv2d":
                cols = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
                rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (n * P, in * kh * kw)
                P = cols.shape[2]
            else:
                rows = a.reshape(-1, a.shape[-1])
                P = rows.shape[0] // max(n, 1)
            A = rows.mT @ rows / n
            layer.A = A if layer.A is None else layer.A + A
            layer.n, layer.P = n, P
            if self.keep_outputs:
                layer.output = output
            if output.requires_grad:
                output.register_hook(self._grad_hook(layer))

        return hook

    def _grad_hook(self, layer: _Layer):
        def hook(g):
            if not self.active:
                return
            g = g.detach()
            n = g.shape[0]
            rows = (
                g.movedim(1, -1).reshape(-1, g.shape[1])
                if layer.kind == "conv2d"
                else g.reshape(-1, g.shape[-1])
            )
            P = rows.shape[0] // max(n, 1)
            d = rows * n  # per-sample gradients of a mean loss
            B = d.mT @ d / (n * P)
            layer.B = B if layer.B is None else layer.B + B

        return hook

    def factors(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        layer = self.layers[name]
        return layer.A, layer.B

    def output_quadratic(self, name: str, grad_out: torch.Tensor, us: torch.Tensor) -> torch.Tensor:
        """u^T B u with B the loss Hessian w.r.t. the layer output (see module docstring), for each column u
        of ``us`` (out, K). ``grad_out`` is dL/dz for the kept output z, computed with ``create_graph=True``.
        """
        layer = self.layers[name]
        z = layer.output
        vals = []
        for k in range(us.shape[1]):
            u = us[:, k].to(z.dtype)
            U = u.view(1, -1, 1, 1).expand_as(z) if layer.kind == "conv2d" else u.expand_as(z)
            (hu,) = torch.autograd.grad(grad_out, z, grad_outputs=U, retain_graph=True)
            vals.append((U * hu).sum() / layer.P)
        return torch.stack(vals).double()
