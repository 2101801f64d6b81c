"""SpectralNewton as a torch.optim.Optimizer: the step formula, AdamW part, resume, faults, bad input."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from spectral_dist import SpectralNewton
from spectral_dist.optim import NonFiniteGradientError
from spectral_dist.spectral import DecompositionError


def _np_direction(M, alpha, damping):
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    T = s / (s**alpha + damping * s[0] ** alpha)
    return (U * T) @ Vt


@pytest.mark.parametrize("scale", ["rms", "spectral", "none"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matrix_step_matches_float64_reference(scale, nesterov):
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(12, 8, dtype=torch.float64))
    opt = SpectralNewton(
        [W],
        lr=0.1,
        alpha=1.5,
        momentum=0.9,
        nesterov=nesterov,
        damping=1e-3,
        weight_decay=0.1,
        scale=scale,
        basis="svd",  # the reference formula, not an approximation of it
    )
    w, buf = W.detach().numpy().copy(), np.zeros((12, 8))
    for t in range(3):
        g = np.random.default_rng(t).standard_normal((12, 8))
        W.grad = torch.tensor(g)
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        M = g + 0.9 * (buf - g) if nesterov else buf
        D = _np_direction(M, 1.5, 1e-3)
        if scale == "rms":
            D = D * 0.2 * math.sqrt(96) / np.linalg.norm(D)
        elif scale == "spectral":
            D = D * math.sqrt(12 / 8)
        w = w * (1 - 0.1 * 0.1) - 0.1 * D
        np.testing.assert_allclose(W.detach().numpy(), w, rtol=1e-10, atol=1e-12)


def test_spectral_newton_is_exact_newton_on_kronecker_quadratic():
    """L = 0.5 tr(D^T B D), D = W - W*: with D0 = B^(-1/2) Q the gradient G = B^(1/2) Q has h_k = sigma_k^2
    along u_k v_k^T, so alpha=2, scale='none', lr=1, no momentum is Newton's step and lands on W*."""
    g = torch.Generator().manual_seed(1)
    n = 10
    Ub, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    b = torch.logspace(0, -3, n, dtype=torch.float64)
    B = (Ub * b) @ Ub.T
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    Ws = torch.randn(n, n, generator=g, dtype=torch.float64)
    W = nn.Parameter(Ws + (Ub * b.rsqrt()) @ Ub.T @ Q)
    opt = SpectralNewton([W], lr=1.0, alpha=2.0, momentum=0.0, nesterov=False, damping=0.0, scale="none")
    loss = 0.5 * torch.trace((W - Ws).T @ B @ (W - Ws))
    loss.backward()
    opt.step()
    assert (W - Ws).norm() / Ws.norm() < 1e-10


def _quadratic_run(opt_name, lr, alpha=None, steps=100):
    g = torch.Generator().manual_seed(0)
    n = 32
    Ub, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    b = torch.logspace(0, -4, n, dtype=torch.float64)
    B = (Ub * b) @ Ub.T
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    Ws = torch.randn(n, n, generator=g, dtype=torch.float64)
    W = nn.Parameter(Ws + 0.05 * (Ub * b.rsqrt()) @ Ub.T @ Q)
    if opt_name == "adamw":
        opt = torch.optim.AdamW([W], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    else:
        opt = SpectralNewton([W], lr=lr, alpha=alpha)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)

    def loss():
        return 0.5 * torch.trace((W - Ws).T @ B @ (W - Ws))

    l0 = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
        sched.step()
    return loss().item() / l0


def test_right_alpha_beats_tuned_adamw_on_known_curvature():
    """Kronecker quadratic with condition 1e4 whose gradients obey h_k = sigma_k^2 (alpha = 2), in a random
    basis. Both optimizers: same lr grid, same linear-decay schedule, 100 steps; the best of each grid."""
    grid = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    adamw = min(_quadratic_run("adamw", lr) for lr in grid)
    sn2 = min(_quadratic_run("sn", lr, alpha=2.0) for lr in grid)
    sn0 = min(_quadratic_run("sn", lr, alpha=0.0) for lr in grid)
    assert sn2 < adamw / 3, (sn2, adamw)  # measured: 0.021 vs 0.160
    assert sn2 < sn0 / 2, (sn2, sn0)  # the curvature-aware exponent beats alpha=0 (normalised momentum SGD)


def test_adamw_part_matches_torch_adamw():
    torch.manual_seed(0)
    bias = nn.Parameter(torch.randn(7))
    ref = nn.Parameter(bias.detach().clone())
    opt = SpectralNewton(
        [bias], lr=0.5, adamw_lr=0.01, adamw_betas=(0.8, 0.9), adamw_eps=1e-6, adamw_weight_decay=0.1
    )
    ref_opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for t in range(5):
        g = torch.randn(7, generator=torch.Generator().manual_seed(t))
        bias.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert torch.allclose(bias, ref, rtol=1e-6, atol=1e-7)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3)
    )


def _train(model, opt, steps, start=0, sched=None):
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(16, 2, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("basis", ["svd", "gram", "tracked", "eigenbasis", "eigenbasis+jacobi", "auto"])
def test_resume_is_exact(basis, tmp_path):
    basis, _, jac = basis.partition("+")
    opts = dict(
        lr=0.02,
        basis=basis,
        rank=3 if basis == "tracked" else None,
        refresh_every=3,
        weight_decay=0.01,
        jacobi_steps=2 if jac else 0,
    )
    ref = _model()
    ref_opt = SpectralNewton.from_model(ref, **opts)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, 4, 0.5)
    _train(ref, ref_opt, 10, sched=ref_sched)

    a = _model()
    a_opt = SpectralNewton.from_model(a, **opts)
    a_sched = torch.optim.lr_scheduler.StepLR(a_opt, 4, 0.5)
    _train(a, a_opt, 5, sched=a_sched)
    torch.save(
        {"model": a.state_dict(), "opt": a_opt.state_dict(), "sched": a_sched.state_dict()},
        tmp_path / "ck.pt",
    )

    b = _model(seed=123)
    b_opt = SpectralNewton.from_model(b, **opts)
    b_sched = torch.optim.lr_scheduler.StepLR(b_opt, 4, 0.5)
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    b.load_state_dict(ck["model"])
    b_opt.load_state_dict(ck["opt"])
    b_sched.load_state_dict(ck["sched"])
    _train(b, b_opt, 5, start=5, sched=b_sched)
    for (n, p), q in zip(ref.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert b_opt.stats() == ref_opt.stats()


def test_groups_scheduler_closure_zero_grad():
    torch.manual_seed(0)
    W1, W2 = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4))
    opt = SpectralNewton([{"params": [W1], "lr": 0.1}, {"params": [W2], "lr": 0.0, "alpha": 2.0}], lr=0.05)
    assert opt.param_groups[1]["alpha"] == 2.0 and opt.param_groups[0]["alpha"] == 1.0
    before2 = W2.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (W1.sum() + W2.sum()) ** 2
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and torch.equal(W2, before2)
    # scale='rms': the update RMS is lr * 0.2, so a scheduler's lr is visible in the step size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
    w = W1.detach().clone()
    opt.step(closure)
    rms = ((W1 - w).pow(2).mean().sqrt()).item()
    assert math.isclose(rms, sched.get_last_lr()[0] * 0.2, rel_tol=1e-5)
    opt.zero_grad()
    assert W1.grad is None


def test_non_finite_gradients_skip_and_raise():
    torch.manual_seed(0)
    W, b = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(5))
    opt = SpectralNewton([W, b], lr=0.1, max_consecutive_skips=3)
    W.grad, b.grad = torch.randn(5, 4), torch.randn(5)
    opt.step()
    state_W = copy.deepcopy(opt.state[W])
    state_b = copy.deepcopy(opt.state[b])
    w0, b0 = W.detach().clone(), b.detach().clone()
    W.grad = torch.full((5, 4), float("nan"))
    b.grad = torch.tensor([1.0, float("inf"), 0, 0, 0])
    opt.step()
    assert torch.equal(W, w0) and torch.equal(b, b0)
    assert torch.equal(opt.state[W]["momentum_buffer"], state_W["momentum_buffer"])
    assert torch.equal(opt.state[b]["exp_avg"], state_b["exp_avg"])
    s = opt.stats()
    assert s["group0.param0"]["skipped"] == 1 and s["group0.param1"]["skipped"] == 1
    W.grad = torch.randn(5, 4)  # a finite step resets the consecutive count
    b.grad = torch.randn(5)
    opt.step()
    assert not torch.equal(W, w0)
    with pytest.raises(NonFiniteGradientError, match="group0.param0"):
        for _ in range(3):
            W.grad = torch.full((5, 4), float("nan"))
            b.grad = torch.randn(5)
            opt.step()


def test_decomposition_failures(monkeypatch):
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(6, 4))
    V = nn.Parameter(torch.randn(6, 4))
    opt = SpectralNewton([W], lr=0.1, basis="svd")  # the SVD is what the test breaks
    topt = SpectralNewton([V], lr=0.1, basis="tracked", rank=2, refresh_every=100)
    for p, o in ((W, opt), (V, topt)):
        p.grad = torch.randn(6, 4)
        o.step()

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    w, v = W.detach().clone(), V.detach().clone()
    W.grad, V.grad = torch.randn(6, 4), torch.randn(6, 4)
    opt.step()  # svd: no basis is kept, so the step is skipped
    topt.step()  # tracked: previous basis
    assert torch.equal(W, w) and not torch.equal(V, v)
    assert opt.stats()["group0.param0"]["decomposition_failures"] == 1
    assert topt.stats()["group0.param0"]["fallbacks"] == 1
    with pytest.raises(DecompositionError):
        for _ in range(2):
            opt.step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha="fast"), "alpha"),
        (dict(scale="unit"), "scale"),
        (dict(basis="qr"), "basis"),
        (dict(rank=0), "rank"),
        (dict(lr=-1e-3), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(basis="newton_schulz", alpha=2.0), "alpha=1"),
        (dict(adamw_betas=(0.9, 1.5)), "adamw_betas"),
        # bools are not numbers here, and every message names its argument
        (dict(momentum=True), "momentum"),
        (dict(rank=True), "rank"),
        (dict(rank=2.0), "rank"),
        (dict(ns_steps=True), "ns_steps"),
        (dict(adamw_eps=True), "adamw_eps"),
        (dict(adamw_eps=0.0), "adamw_eps"),
        (dict(adamw_eps=float("inf")), "adamw_eps"),
        (dict(adamw_betas=(0.9,)), "adamw_betas"),
        (dict(adamw_betas=(0.9, 1.0)), "adamw_betas"),
        (dict(adamw_betas=(True, 0.9)), "adamw_betas"),
        (dict(weight_decay=True), "weight_decay"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(adamw_lr=-1.0), "adamw_lr"),
        (dict(adamw_weight_decay=-1.0), "adamw_weight_decay"),
        (dict(basis="cholesky", alpha=1.0), "cholesky"),
        (dict(max_consecutive_skips=0), "max_consecutive_skips"),
        (dict(max_consecutive_skips=True), "max_consecutive_skips"),
        (dict(max_consecutive_skips=2.0), "max_consecutive_skips"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpectralNewton([nn.Parameter(torch.randn(3, 3))], **kwargs)
    if "max_consecutive_skips" not in kwargs:  # an optimizer-wide option, not a group's
        with pytest.raises(ValueError, match=match):  # per-group options are validated too
            SpectralNewton([{"params": [nn.Parameter(torch.randn(3, 3))], **kwargs}])


def test_boundary_arguments_are_valid():
    """The edges of the valid ranges: rank 1, a beta of 0, momentum 0, one allowed skip, integer lr."""
    p = nn.Parameter(torch.randn(4, 3))
    for kwargs in (
        dict(rank=1, basis="tracked"),
        dict(adamw_betas=(0.0, 0.0)),
        dict(adamw_betas=[0.8, 0.9]),
        dict(momentum=0.0),
        dict(max_consecutive_skips=1),
        dict(lr=1, weight_decay=0),
        dict(basis="cholesky", alpha=0.0),
    ):
        opt = SpectralNewton([p], **kwargs)
        assert isinstance(opt.param_groups[0]["adamw_betas"], tuple), kwargs


def test_jacobi_steps_reach_the_batched_eigenbasis(monkeypatch):
    """The group's jacobi_steps reaches eigenbasis_batched (the path of every engine's owner), changes the
    step, and a per-group value applies to that group only."""
    from spectral_dist.optim import matrix_step as ms

    seen = []
    real = ms.eigenbasis_batched

    def spy(*a, **kw):
        seen.append(kw["jacobi_steps"])
        return real(*a, **kw)

    monkeypatch.setattr(ms, "eigenbasis_batched", spy)
    finals = {}
    for jac in (0, 1):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.Tanh(), nn.Linear(6, 5, bias=False))
        groups = [
            {"params": [model[0].weight], "jacobi_steps": jac},
            {"params": [model[2].weight], "jacobi_steps": 0},
        ]
        opt = SpectralNewton(groups, lr=0.05, alpha=1.5, basis="eigenbasis", distributed=False)
        seen.clear()
        for i in range(4):
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(i))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        assert sorted(seen) == sorted([jac, 0] * 4), seen
        finals[jac] = [p.detach().clone() for p in model.parameters()]
    assert not torch.equal(finals[0][0], finals[1][0])  # the first layer's steps differ


@pytest.mark.parametrize("flag", ["0", "1"])
def test_auto_polar_express_runs_in_the_device_matmul_dtype(monkeypatch, flag):
    """The optimizer's alpha = 1 step under basis="auto" is Polar Express in the matmul dtype the device gets
    (here forced through SPECTRAL_DIST_CPU_BF16); a named basis and float64 parameters keep their own dtype."""
    from spectral_dist.spectral import polar_express

    monkeypatch.setenv("SPECTRAL_DIST_CPU_BF16", flag)
    torch.manual_seed(0)
    g = torch.randn(16, 48)
    bf16, fp32 = (polar_express(g.unsqueeze(0), matmul_dtype=dt)[0] for dt in (torch.bfloat16, None))
    assert not torch.allclose(bf16, fp32, atol=1e-3)  # the two dtypes are told apart

    def update(basis, dtype=torch.float32):
        W = nn.Parameter(torch.zeros(16, 48, dtype=dtype))
        opt = SpectralNewton([W], lr=1.0, alpha=1.0, momentum=0.0, nesterov=False, scale="none", basis=basis)
        W.grad = g.to(dtype)
        opt.step()
        return -W.detach().float()

    assert torch.allclose(update("auto"), bf16 if flag == "1" else fp32, atol=1e-6)
    assert torch.allclose(update("polar_express"), fp32, atol=1e-6)
    want64 = polar_express(g.double().unsqueeze(0))[0].float()
    assert torch.allclose(update("auto", torch.float64), want64, atol=1e-6)


@pytest.mark.parametrize("flag", ["0", "1"])
def test_auto_eigenbasis_applies_its_last_product_in_the_device_dtype(monkeypatch, flag):
    """alpha 1.5 under basis="auto" is the eigenbasis with its last product D = (B w) Q^T in the device's bf16
    (forced here through SPECTRAL_DIST_CPU_BF16); a group that names basis="eigenbasis" stays in float32, and
    the two are not batched together."""
    from spectral_dist.spectral import eigenbasis_batched

    monkeypatch.setenv("SPECTRAL_DIST_CPU_BF16", flag)
    torch.manual_seed(0)
    gs = [torch.randn(24, 40) for _ in range(2)]
    Ws = [nn.Parameter(torch.zeros(24, 40)) for _ in range(2)]
    opt = SpectralNewton(
        [dict(params=[Ws[0]], basis="auto"), dict(params=[Ws[1]], basis="eigenbasis")],
        lr=1.0,
        alpha=1.5,
        momentum=0.0,
        nesterov=False,
        scale="none",
    )
    for _ in range(2):  # step 0 starts the basis with an SVD; step 1 is a tracked step
        for W, gr in zip(Ws, gs):
            W.grad = gr.clone()
        before = [W.detach().clone() for W in Ws]
        opt.step()
    upd = [(b - W.detach()) for b, W in zip(before, Ws)]
    for i, (gr, apply) in enumerate(zip(gs, (torch.bfloat16 if flag == "1" else None, None))):
        X = gr.unsqueeze(0)
        _, Q, _ = eigenbasis_batched(X, 1.5, opt.defaults["damping"], None, 0)
        want, _, _ = eigenbasis_batched(X, 1.5, opt.defaults["damping"], Q, 1, apply_dtype=apply)
        other, _, _ = eigenbasis_batched(
            X, 1.5, opt.defaults["damping"], Q, 1, apply_dtype=None if apply else torch.bfloat16
        )
        assert torch.allclose(upd[i], want[0], rtol=0, atol=1e-6), (i, flag)
        assert not torch.allclose(upd[i], other[0], rtol=0, atol=1e-5), (i, flag)


def test_torch_compile_compiles_around_the_step():
    """A compiled training step that calls opt.step() traces the model and leaves the optimizer step to run as
    it is: no recompilation from one step to the next (dynamo would otherwise specialise on per-matrix counters
    and basis phases and recompile every step until its limit), and the same parameters as eager steps."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
        return model, SpectralNewton(model.parameters(), lr=0.02, alpha=1.65, distributed=False)

    xs = [torch.randn(8, 16, generator=torch.Generator().manual_seed(t)) for t in range(6)]
    model, opt = setup()
    for x in xs:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    ref = [p.detach().clone() for p in model.parameters()]

    model, opt = setup()
    cnt = CompileCounter()

    @torch.compile(backend=cnt)
    def train_step(x):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        return loss

    frames = []
    for x in xs:
        train_step(x)
        frames.append(cnt.frame_count)
    try:
        assert frames[1] == frames[-1], f"recompiled between steps: frames compiled after each step {frames}"
        for p, q in zip(model.parameters(), ref):
            assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("alpha", [1.0, 1.65, 2.0])
def test_channels_last_conv_kernels_step_as_contiguous_ones(alpha):
    """Conv kernels in channels_last memory (a common GPU setting for CNNs) are viewed as (out, in * kh * kw)
    in their logical order: with the same gradients, the parameters equal a contiguous run's bit for bit and
    keep their memory format."""
    outs = []
    for cl in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = SpectralNewton(model.parameters(), alpha=alpha, lr=0.02, distributed=False)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                gr = torch.randn(p.shape, generator=g)
                p.grad = gr.contiguous(memory_format=torch.channels_last) if cl and p.ndim == 4 else gr
            opt.step()
        if cl:
            assert all(
                p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.ndim == 4
            )
        outs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b), (a - b).abs().max()
