"""HessianSpectrum against exact Hessian blocks (torch.func.hessian) of tiny float64 models."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectral_dist.models import classification_loss, tiny_cnn, tiny_mlp
from spectral_dist.probes.spectrum import HessianSpectrum, unflatten, weight_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyAttention(nn.Module):
    """One softmax self-attention layer (2 heads, residual), tanh, mean-pool and a linear head."""

    def __init__(self, d=6, heads=2, classes=3):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        n, t, d = x.shape

        def split(z):
            return z.view(n, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        z = self.o((a @ v).transpose(1, 2).reshape(n, t, d)) + x
        return self.head(torch.tanh(z).mean(1))


def _setup(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model = tiny_mlp(in_dim=5, hidden=6, out_dim=3).double()
        batch = (
            torch.randn(12, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (12,), generator=g),
        )
    elif kind == "cnn":
        model = tiny_cnn(in_ch=1, width=2, num_classes=3, image_size=4).double()
        batch = (
            torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g),
        )
    else:
        model = TinyAttention().double()
        with torch.no_grad():  # sharper attention than at init, so the softmax curvature matters
            model.q.weight.mul_(3)
            model.k.weight.mul_(3)
        batch = (
            torch.randn(6, 4, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g),
        )
    return model, batch


def _exact_hessian(model, batch, names):
    """Dense Hessian of classification_loss w.r.t. the named parameters, by torch.func.hessian."""
    params = dict(model.named_parameters())
    shapes = [tuple(params[n].shape) for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(flat):
        sub = dict(zip(names, unflatten(flat, shapes)))
        return classification_loss(lambda *a, **k: torch.func.functional_call(model, sub, a, k), batch)

    return torch.func.hessian(loss)(flat0).detach()


RTOL = {"autograd": 1e-8, "func": 1e-8, "fd": 1e-5}


@pytest.mark.parametrize("kind", ["mlp", "cnn", "attention"])
@pytest.mark.parametrize("backend", ["autograd", "fd"])
def test_block_eigenvalues_and_trace_match_the_exact_block(kind, backend):
    model, batch = _setup(kind)
    model.eval()
    spec = HessianSpectrum(model, classification_loss, hvp=backend, tol=1e-7)
    res = spec.measure(batch, top_k=6, trace=True, include_model=False, trace_matvecs=24)
    assert set(res.layers) == set(weight_blocks(model))
    for name, block in res.layers.items():
        H = _exact_hessian(model, batch, [name])
        ev = torch.linalg.eigvalsh(H).flip(0)
        k = min(6, ev.numel())
        scale = float(ev.abs().max())
        err = float((block.eigenvalues - ev[:k]).abs().max()) / scale
        assert err <= RTOL[backend], (name, err)
        assert block.residuals.shape == (k,) and block.converged
        assert (block.relative_residuals <= 1e-7).all()
        assert block.num_hvps >= block.eig_hvps > 0 and block.hvp_cost > 0
        # Trace: Hutch++ is within 4 of its own standard errors (exact once the sketch spans the block).
        exact = float(H.trace())
        assert abs(block.trace - exact) <= 4 * block.trace_stderr + 1e-6 * scale * ev.numel(), name


def test_func_backend_and_whole_model_block():
    model, batch = _setup("mlp")
    spec = HessianSpectrum(model, classification_loss, hvp="func", tol=1e-7, layers=["4"])
    res = spec.measure(batch, top_k=5, trace=False)
    assert list(res.layers) == ["4.weight"]
    ev = torch.linalg.eigvalsh(_exact_hessian(model, batch, ["4.weight"])).flip(0)
    assert torch.allclose(
        res.layers["4.weight"].eigenvalues, ev[:5], rtol=0, atol=1e-8 * float(ev.abs().max())
    )
    # res.model: all parameters (weights and biases) in one Hessian.
    names = [n for n, _ in model.named_parameters()]
    evm = torch.linalg.eigvalsh(_exact_hessian(model, batch, names)).flip(0)
    assert res.model.dim == evm.numel() and res.model.param_names == names
    assert torch.allclose(res.model.eigenvalues, evm[:5], rtol=0, atol=1e-8 * float(evm.abs().max()))


def test_attention_func_backend():
    model, batch = _setup("attention")
    res = HessianSpectrum(model, classification_loss, hvp="func", tol=1e-7, layers=["q"]).measure(
        batch, top_k=4, trace=False, include_model=False
    )
    ev = torch.linalg.eigvalsh(_exact_hessian(model, batch, ["q.weight"])).flip(0)
    err = (res.layers["q.weight"].eigenvalues - ev[:4]).abs().max() / ev.abs().max()
    assert err <= 1e-8


def test_eigenvectors_on_request_are_eigenvectors_of_the_exact_block():
    model, batch = _setup("attention")
    spec = HessianSpectrum(model, classification_loss, layers=["v.weight"], tol=1e-8)
    res = spec.measure(batch, top_k=3, trace=False, include_model=False, eigenvectors=True)
    block = res.layers["v.weight"]
    H = _exact_hessian(model, batch, ["v.weight"])
    for i in range(3):
        (q,) = block.eigenvector(i)
        assert q.shape == model.v.weight.shape
        r = H @ q.reshape(-1) - block.eigenvalues[i] * q.reshape(-1)
        assert float(r.norm()) <= 1e-7 * float(block.eigenvalues.abs().max())
        assert abs(float(r.norm()) - float(block.residuals[i])) <= 1e-12
    without = spec.measure(batch, top_k=3, trace=False, include_model=False)
    assert without.layers["v.weight"].eigenvectors is None
    with pytest.raises(ValueError, match="eigenvectors"):
        without.layers["v.weight"].eigenvector(0)


def test_density_integrates_to_one_and_matches_exact_histogram():
    model, batch = _setup("mlp")
    spec = HessianSpectrum(model, classification_loss, layers=["4.weight"])
    probes = 32
    res = spec.measure(
        batch,
        top_k=2,
        trace=False,
        density=True,
        include_model=False,
        density_probes=probes,
        density_steps=18,
    )
    dens = res.layers["4.weight"].density
    assert abs(dens.integral() - 1.0) < 1e-4
    ev = torch.linalg.eigvalsh(_exact_hessian(model, batch, ["4.weight"]))
    n = ev.numel()
    edges = np.linspace(float(ev.min()) - 1e-3, float(ev.max()) + 1e-3, 6)
    count = np.histogram(ev.numpy(), bins=edges)[0]
    cdf = np.concatenate([[0.0], torch.cumulative_trapezoid(dens.values, dens.grid).numpy()])
    mass = np.diff(np.interp(edges, dens.grid.numpy(), cdf))
    # With as many Lanczos steps as dimensions each probe's quadrature is exact; what remains is the
    # probe average. A Rademacher probe puts mass z^T P_b z / n on bin b (P_b: projector on its
    # eigenvectors), variance <= 2 count_b / n^2: allow 4 standard deviations plus broadening leakage.
    sd = np.sqrt(2 * count / n**2 / probes)
    assert (np.abs(mass - count / n) <= 4 * sd + 0.02).all(), (mass, count / n, sd)


def test_training_state_is_untouched():
    torch.manual_seed(0)
    model = tiny_cnn(in_ch=1, width=2, num_classes=3, image_size=4, batchnorm=True, dropout=0.3).double()
    g = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (6,), generator=g),
    )
    model.train()
    classification_loss(model, batch).backward()  # .grad set, BN running stats moved
    model.conv1.bias.grad = None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    for mode, backend in (("eval", "fd"), ("train", "autograd")):
        HessianSpectrum(model, classification_loss, hvp=backend, mode=mode, layers=["conv2"]).measure(
            batch, top_k=2, trace=True, trace_matvecs=6, include_model=False
        )
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n])), n


@pytest.mark.parametrize("backend", ["autograd", "fd"])
def test_train_mode_dropout_is_one_fixed_operator(backend):
    torch.manual_seed(0)
    model = tiny_cnn(in_ch=1, width=2, num_classes=3, image_size=4, dropout=0.5).double()
    g = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (6,), generator=g),
    )
    spec = HessianSpectrum(model, classification_loss, hvp=backend, mode="train", layers=["fc"], tol=1e-6)
    a = spec.measure(batch, top_k=3, trace=False, include_model=False).layers["fc.weight"]
    b = spec.measure(batch, top_k=3, trace=False, include_model=False).layers["fc.weight"]
    # Random masks per product would make the operator non-symmetric and the residuals large.
    assert a.converged and (a.relative_residuals <= 1e-6).all()
    assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=0)
    ev = HessianSpectrum(model, classification_loss, mode="eval", layers=["fc"]).measure(
        batch, top_k=3, trace=False, include_model=False
    )
    assert not torch.allclose(a.eigenvalues, ev.layers["fc.weight"].eigenvalues, rtol=1e-3)


def test_power_method_and_hutchinson_options():
    model, batch = _setup("mlp")
    spec = HessianSpectrum(model, classification_loss, method="power", layers=["2.weight"], tol=1e-6)
    res = spec.measure(batch, top_k=2, include_model=False, trace_method="hutchinson", trace_matvecs=200)
    H = _exact_hessian(model, batch, ["2.weight"])
    ev = torch.linalg.eigvalsh(H).flip(0)
    block = res.layers["2.weight"]
    assert block.method == "power"
    assert torch.allclose(block.eigenvalues, ev[:2], rtol=0, atol=1e-9 * float(ev.abs().max()))
    assert abs(block.trace - float(H.trace())) <= 4 * block.trace_stderr
    d = res.to_dict()
    assert d["layers"]["2.weight"]["eigenvalues"] == block.eigenvalues.tolist() and d["model"] is None


def test_errors():
    model, batch = _setup("mlp")
    with pytest.raises(ValueError, match="hvp"):
        HessianSpectrum(model, classification_loss, hvp="jax")
    with pytest.raises(ValueError, match="mode"):
        HessianSpectrum(model, classification_loss, mode="test")
    with pytest.raises(ValueError, match="neither"):
        HessianSpectrum(model, classification_loss, layers=["nope"])
    with pytest.raises(ValueError, match="method"):
        HessianSpectrum(model, classification_loss, method="arnoldi")
    spec = HessianSpectrum(model, classification_loss)
    with pytest.raises(ValueError, match="top_k"):
        spec.measure(batch, top_k=0)
    with pytest.raises(ValueError, match="nothing to measure"):
        spec.measure(batch, include_model=False, include_layers=False)
    with pytest.raises(ValueError, match="trace_method"):
        spec.measure(batch, trace_method="exact")
    with pytest.raises(ValueError, match="weight blocks"):
        HessianSpectrum(nn.Sequential(nn.ReLU()), classification_loss)


def test_fd_step_is_honoured():
    model, batch = _setup("mlp")
    coarse = HessianSpectrum(model, classification_loss, hvp="fd", fd_eps=1e-1, layers=["4"], tol=1e-6)
    fine = HessianSpectrum(model, classification_loss, hvp="fd", layers=["4"], tol=1e-6)
    a = coarse.measure(batch, top_k=1, trace=False, include_model=False).layers["4.weight"].eigenvalues
    b = fine.measure(batch, top_k=1, trace=False, include_model=False).layers["4.weight"].eigenvalues
    assert not torch.allclose(a, b, rtol=1e-8)
    assert torch.allclose(a, b, rtol=1e-1)


def test_loss_used_is_the_given_one():
    model, batch = _setup("mlp")

    def double_loss(m, b):
        return 2.0 * F.cross_entropy(m(b[0]), b[1])

    one = HessianSpectrum(model, classification_loss, layers=["4"]).measure(batch, top_k=2, trace=False)
    two = HessianSpectrum(model, double_loss, layers=["4"]).measure(batch, top_k=2, trace=False)
    assert torch.allclose(
        two.layers["4.weight"].eigenvalues, 2 * one.layers["4.weight"].eigenvalues, rtol=1e-10
    )


def test_auto_method_falls_back_to_power_iteration(monkeypatch):
    import spectral_dist.probes.spectrum as S

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("tridiagonal eigensolver failed")

    monkeypatch.setattr(S, "lanczos", broken)
    model, batch = _setup("mlp")
    res = HessianSpectrum(model, classification_loss, layers=["4"], tol=1e-6).measure(
        batch, top_k=2, trace=False, include_model=False
    )
    block = res.layers["4.weight"]
    ev = torch.linalg.eigvalsh(_exact_hessian(model, batch, ["4.weight"])).flip(0)
    assert block.method == "power" and block.converged
    assert torch.allclose(block.eigenvalues, ev[:2], rtol=0, atol=1e-9 * float(ev.abs().max()))
    with pytest.raises(torch.linalg.LinAlgError):
        HessianSpectrum(model, classification_loss, layers=["4"], method="lanczos").measure(batch, top_k=2)
