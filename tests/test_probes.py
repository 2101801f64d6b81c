"""Curvature probes against exact float64 references (torch.func.hessian, Kronecker-exact linear nets)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectral_dist.models import classification_loss, tiny_cnn, tiny_mlp
from spectral_dist.probes import BACKENDS, CurvatureProbe, make_hvp, math_attention

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyAttention(nn.Module):
    """One self-attention layer through F.scaled_dot_product_attention, mean-pooled, linear head."""

    def __init__(self, d=6, heads=2, n_out=3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        return self.head(torch.tanh(self.proj(y)).mean(1))


def _case(name):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if name == "mlp":
        model = tiny_mlp(in_dim=5, hidden=6, out_dim=3, depth=2)
        x = torch.randn(7, 5, generator=g)
    elif name == "cnn":
        model = tiny_cnn(in_ch=1, width=2, num_classes=3, image_size=4)
        x = torch.randn(5, 1, 4, 4, generator=g)
    else:
        model = TinyAttention()
        x = torch.randn(4, 5, 6, generator=g)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    return model.to(D), (x.to(D), y)


def _exact_h(model, loss_fn, batch, names, top_k):
    """h_k from the exact Hessian block (torch.func.hessian) along the gradient's singular directions."""
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        w = params[n].detach()

        def f(t, n=n):
            return F.cross_entropy(torch.func.functional_call(model, {n: t}, (batch[0],)), batch[1])

        g = torch.func.grad(f)(w).reshape(w.shape[0], -1)
        H = torch.func.hessian(f)(w).reshape(w.numel(), w.numel())
        U, S, Vh = torch.linalg.svd(g, full_matrices=False)
        r = min(top_k, S.numel())
        hs = []
        for k in range(r):
            e = torch.outer(U[:, k], Vh[k]).reshape(-1)
            hs.append(e @ H @ e)
        out[n] = (S[:r], torch.stack(hs))
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention"])
def test_backends_match_exact_hessian(name):
    model, batch = _case(name)
    model.eval()
    names = [n for n, p in model.named_parameters() if p.ndim >= 2]
    with math_attention():
        exact = _exact_h(model, classification_loss, batch, names, top_k=4)
    tol = {"autograd": 1e-8, "func": 1e-8, "fd": 1e-5}
    for backend in BACKENDS:
        rep = CurvatureProbe(model, classification_loss, top_k=4, hvp=backend, layers=names).measure(batch)
        for n in names:
            S, h = exact[n]
            lc = rep.layers[n]
            torch.testing.assert_close(lc.sigma, S, rtol=1e-10, atol=0)
            err = (lc.h - h).norm() / h.norm()
            assert err < tol[backend], (name, backend, n, float(err))


def test_make_hvp_full_hessian_with_cross_blocks():
    model, batch = _case("mlp")
    params = [model[0].weight, model[2].weight, model[2].bias]
    names = ["0.weight", "2.weight", "2.bias"]

    def f(*ts):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ts)), (batch[0],)), batch[1])

    H = torch.func.hessian(f, argnums=(0, 1, 2))(*[p.detach() for p in params])
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g, dtype=D) for p in params]
    exact = [
        sum(H[i][j].reshape(params[i].numel(), params[j].numel()) @ v[j].reshape(-1) for j in range(3))
        for i in range(3)
    ]
    for backend in BACKENDS:
        hvp = make_hvp(model, classification_loss, batch, params, backend=backend)
        out = hvp(v)
        for o, e in zip(out, exact):
            assert (o.reshape(-1) - e).norm() / e.norm() < (1e-5 if backend == "fd" else 1e-10)
        assert hvp.calls == 1
        assert hvp.cost == 2.0 + (1 if backend == "autograd" else 0)
    # zero entries (None) mean a zero direction
    hvp = make_hvp(model, classification_loss, batch, params, backend="fd")
    out = hvp([v[0], None, None])
    e0 = H[0][0].reshape(params[0].numel(), -1) @ v[0].reshape(-1)
    assert (out[0].reshape(-1) - e0).norm() / e0.norm() < 1e-5


def _deep_linear(widths, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]).to(D)


def _mse(model, batch):
    x, t = batch
    return F.mse_loss(model(x), t)


@pytest.mark.parametrize("widths", [(5, 4), (5, 6, 4, 3)])
def test_kfac_exact_for_linear_networks_with_mse(widths):
    """H = A kron B exactly (B: output Hessian) for a deep linear net with MSE, so h_kfac = h."""
    model = _deep_linear(widths)
    g = torch.Generator().manual_seed(2)
    batch = (
        torch.randn(9, widths[0], generator=g, dtype=D),
        torch.randn(9, widths[-1], generator=g, dtype=D),
    )
    rep = CurvatureProbe(model, _mse, top_k=3, kfac_b="hessian", rel_floor=0.0).measure(batch)
    for lc in rep.layers.values():
        torch.testing.assert_close(lc.h_kfac, lc.h, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(lc.phi, lc.h / lc.sigma**2, rtol=1e-10, atol=0)
        if math.isfinite(lc.alpha):
            assert abs(lc.alpha_kfac - lc.alpha) < 1e-8
    # single layer y = W x: also check A against the explicit formula and B = 2/d I (mean MSE)
    if len(widths) == 2:
        x = batch[0]
        lc = rep.layers["0.weight"]
        V = torch.linalg.svd(torch.func.grad(lambda w: _mse_w(w, model, batch))(model[0].weight.detach()))[2]
        A = x.T @ x / x.shape[0]
        vAv = torch.einsum("ki,ij,kj->k", V[:3], A, V[:3])
        torch.testing.assert_close(lc.h_kfac, vAv * 2.0 / widths[-1], rtol=1e-10, atol=0)


def _mse_w(w, model, batch):
    return F.mse_loss(torch.func.functional_call(model, {"0.weight": w}, (batch[0],)), batch[1])


def test_empirical_factors_match_per_sample_formula():
    model, batch = _case("mlp")
    n = batch[0].shape[0]
    rep = CurvatureProbe(model, classification_loss, top_k=3, layers=["4.weight"]).measure(batch)
    # per-sample gradients of the head's output: softmax(z) - onehot(y)
    with torch.no_grad():
        a = model[:4](batch[0])
        d = torch.softmax(model[4](a), -1) - F.one_hot(batch[1], 3).to(D)
    A, B = a.T @ a / n, d.T @ d / n
    G = d.T @ a / n
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    expect = torch.einsum("ik,ij,jk->k", U[:, :3], B, U[:, :3]) * torch.einsum(
        "ki,ij,kj->k", Vh[:3], A, Vh[:3]
    )
    torch.testing.assert_close(rep.layers["4.weight"].h_kfac, expect, rtol=1e-10, atol=1e-15)


def test_alignment_is_one_at_batch_size_one():
    """At batch size 1, G = g a^T, A = a a^T and B = g g^T: u_1, v_1 are their top eigenvectors."""
    model, batch = _case("mlp")
    b1 = (batch[0][:1], batch[1][:1])
    rep = CurvatureProbe(model, classification_loss, top_k=3).measure(b1)
    for lc in rep.layers.values():
        assert abs(float(lc.alignment[0]) - 1.0) < 1e-10
        assert (lc.alignment[1:].abs() < 1e-8).all()  # rank one: the other directions see nothing
    rep = CurvatureProbe(model, classification_loss, top_k=3).measure(batch)
    assert all(float(lc.alignment[0]) < 1 - 1e-6 for lc in rep.layers.values())


def test_random_sign_estimate_converges():
    model, batch = _case("mlp")
    exact = CurvatureProbe(model, classification_loss, top_k=2, kfac=False).measure(batch)

    def err(S):
        rep = CurvatureProbe(
            model, classification_loss, top_k=2, estimator="all_layers", samples=S, kfac=False, seed=5
        ).measure(batch)
        assert rep.cost["hvps"] == 2 * S
        num = sum(float((rep.layers[n].h - exact.layers[n].h).norm() ** 2) for n in exact.layers)
        den = sum(float(exact.layers[n].h.norm() ** 2) for n in exact.layers)
        return math.sqrt(num / den)

    e = [err(S) for S in (4, 400)]
    assert e[1] < e[0] / 3 and e[1] < 0.1, e


def test_fits_on_exact_power_law():
    from spectral_dist.probes import pr_bound, spectrum_fits

    k = torch.arange(1, 17, dtype=D)
    sigma = 3.0 * k**-0.8
    h = 0.5 * sigma**1.5
    f = spectrum_fits(sigma, h)
    assert abs(f["alpha"] - 1.5) < 1e-12 and abs(f["gamma"] - 0.8) < 1e-12 and abs(f["s"] - 1.2) < 1e-12
    assert f["rel_err"] < 1e-12 and f["negative_fraction"] == 0 and f["n_fit"] == 16
    assert abs(pr_bound(2.0) - 2.5) < 1e-12  # zeta(2)^2 / zeta(4) = 90 / 36
    assert pr_bound(1.0) == math.inf
    h2 = h.clone()
    h2[[3, 7]] = -h2[[3, 7]]
    f2 = spectrum_fits(sigma, h2)
    assert f2["negative_fraction"] == 2 / 16 and f2["n_fit"] == 14 and abs(f2["alpha"] - 1.5) < 1e-12
    sigma3 = sigma.clone()
    sigma3[-4:] = 1e-9
    assert spectrum_fits(sigma3, h, rel_floor=1e-6)["n_fit"] == 12


def test_report_outputs(tmp_path):
    model, batch = _case("cnn")
    rep = CurvatureProbe(model, classification_loss, top_k=3, hvp="fd").measure(batch)
    md = rep.to_markdown()
    for n in ("conv1.weight", "conv2.weight", "fc.weight"):
        assert n in md
    rep.to_csv(tmp_path / "p.csv")
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("layer,layer_type")
    import json

    rep.to_json(tmp_path / "p.json")
    d = json.loads((tmp_path / "p.json").read_text())
    assert set(d["layers"]) == set(rep.layers)
    assert rep.cost["gradient_equivalents"] == 1 + 2 * rep.cost["hvps"]
    lc = rep.layers["conv2.weight"]
    assert lc.shape == (4, 18) and lc.layer_type == "conv" and lc.phi is not None
    assert math.isclose(lc.s_pred, lc.alpha * lc.gamma, rel_tol=1e-12) or math.isnan(lc.alpha)


def test_gpt2_conv1d_is_transposed_linear():
    """transformers' Conv1D (weight stored (in, out)) gives the same spectra and K-FAC as nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    c1 = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)).to(D)
    with torch.no_grad():
        for a, b in ((lin[0], c1[0]), (lin[2], c1[2])):
            b.weight.copy_(a.weight.T)
            b.bias.copy_(a.bias)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 6, 4, generator=g, dtype=D), torch.randint(0, 3, (2,), generator=g))

    def loss(m, b):
        return F.cross_entropy(m(b[0]).mean(1), b[1])

    r1 = CurvatureProbe(lin, loss, top_k=3, layers=["0.weight", "2.weight"]).measure(batch)
    r2 = CurvatureProbe(c1, loss, top_k=3, layers=["0.weight", "2.weight"]).measure(batch)
    for n in r1.layers:
        a, b = r1.layers[n], r2.layers[n]
        assert a.shape == b.shape
        for field in ("sigma", "h", "h_kfac", "alignment"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-10, atol=1e-14)


def test_bad_arguments():
    model, _ = _case("mlp")
    with pytest.raises(ValueError, match="hvp"):
        CurvatureProbe(model, classification_loss, hvp="bogus")
    with pytest.raises(ValueError, match="top_k"):
        CurvatureProbe(model, classification_loss, top_k=0)
    with pytest.raises(ValueError, match="mode"):
        CurvatureProbe(model, classification_loss, mode="sideways")
    with pytest.raises(ValueError, match="layers"):
        CurvatureProbe(model, classification_loss, layers=["nope.weight"])
    with pytest.raises(ValueError, match="layers"):
        CurvatureProbe(model, classification_loss, layers=["0.bias"])
    with pytest.raises(ValueError, match="estimator"):
        CurvatureProbe(model, classification_loss, estimator="some")
    with pytest.raises(ValueError, match="backend"):
        make_hvp(model, classification_loss, None, [model[0].weight], backend="x")
    with pytest.raises(ValueError, match="v must have"):
        make_hvp(model, classification_loss, None, [model[0].weight])([])


def test_gpt2_sdpa_backends_agree():
    """transformers GPT-2 with SDPA attention: the math kernel is forced for double backward and forward AD."""
    from spectral_dist.models import tiny_gpt, token_batch

    torch.manual_seed(0)
    model = tiny_gpt(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, attn_implementation="sdpa")
    model = model.to(D)
    batch = token_batch(3, 6, 11)

    def lm_loss64(m, b):
        logits = m(input_ids=b).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))

    hs = {}
    for backend in BACKENDS:
        rep = CurvatureProbe(model, lm_loss64, top_k=2, hvp=backend).measure(batch)
        assert len(rep.layers) == 4 and all(lc.h_kfac is not None for lc in rep.layers.values())
        hs[backend] = torch.cat([lc.h for lc in rep.layers.values()])
    ref = hs["autograd"]
    assert (hs["func"] - ref).norm() < 1e-10 * ref.norm()
    assert (hs["fd"] - ref).norm() < 1e-5 * ref.norm()


def _rel_err(a, b):
    num = torch.stack([(x - y).double().norm() for x, y in zip(a, b)]).norm()
    return float(num / torch.stack([y.double().norm() for y in b]).norm())


def test_fd_step_follows_the_parameters_along_v_not_the_whole_model():
    """A whole-model fd HVP of a 35k-parameter GPT in float32 agrees with autograd to 2e-4 (scaling the step
    by ||theta|| of all parameters gave 1.6e-3 here, and a 30% top-eigenvalue error)."""
    from spectral_dist.models import builtin_task

    torch.set_num_threads(1)
    model, loss, batch = builtin_task("gpt", 8, 0, torch.float32)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g) for p in params]
    exact = make_hvp(model, loss, batch, params, "autograd")(v)
    assert _rel_err(make_hvp(model, loss, batch, params, "fd")(v), exact) < 2e-4


def test_fd_step_adapts_to_float32_inside_a_float64_model():
    """A float64 model whose middle runs in float32: the first fd product sees float32 results, takes the
    float32 step (one extra gradient pass) and stays accurate; float64's step would drown in float32 noise."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x).float()).double())

    torch.manual_seed(0)
    model = Mixed().double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)

    def loss(m, b):
        return (m(b[0]) - b[1]).pow(2).mean()

    params = list(model.parameters())
    v = [torch.randn(p.shape, dtype=torch.float64) for p in params]
    exact = make_hvp(model, loss, (x, y), params, "autograd")(v)
    fd = make_hvp(model, loss, (x, y), params, "fd")
    got = fd(v)
    assert fd._eps_auto == pytest.approx(torch.finfo(torch.float32).eps ** (1 / 3))
    assert fd.gradient_evals == 3  # the redone first product
    assert _rel_err(got, exact) < 1e-4
    fd(v)
    assert fd.gradient_evals == 5  # later products: two passes each
    forced = make_hvp(model, loss, (x, y), params, "fd", fd_eps=torch.finfo(torch.float64).eps ** (1 / 3))
    assert _rel_err(forced(v), exact) > 10 * _rel_err(got, exact)
