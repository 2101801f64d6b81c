"""The eigenbasis QR a GPU gets, run here on the CPU: the choice by device, the float64 CholeskyQR's accuracy
against Householder's, and the optimizer end to end through each QR (its batches, its failure flags and the
owner's Householder redo). ``SPECTRAL_DIST_EIGENBASIS_QR`` selects a GPU's path on any device; the same
variable reaches spawned ranks (tests/test_step_syncs_dist.py runs the 2-rank redo case through it)."""

from __future__ import annotations

import statistics

import pytest
import torch
from test_spectral import _drifting_sequence, _top_error
from torch import nn

from spectral_dist import SpectralNewton
from spectral_dist.spectral import direction as dr
from spectral_dist.spectral import eigenbasis_batched, eigenbasis_direction
from spectral_dist.spectral.direction import EIGENBASIS_QR_ENV, auto_eigenbasis_qr


@pytest.fixture
def capability(monkeypatch):
    """Pretend torch.cuda.get_device_capability answers ``cap`` (no GPU is touched: only the choice is made)."""

    def set_cap(cap):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
        dr._fast_fp64.cache_clear()

    yield set_cap
    dr._fast_fp64.cache_clear()


def test_the_eigenbasis_qr_by_device_and_its_override(monkeypatch, capability):
    monkeypatch.delenv(EIGENBASIS_QR_ENV, raising=False)
    assert auto_eigenbasis_qr("cpu") == "householder"
    for cap, want in [
        ((9, 0), "cholesky_fp64"),  # H100, H200
        ((8, 0), "cholesky_fp64"),  # A100
        ((10, 0), "cholesky_fp64"),  # B200
        ((8, 9), "cholesky"),  # L4, L40, RTX 40xx: float64 at 1/64
        ((8, 6), "cholesky"),
        ((10, 3), "cholesky"),  # B300
        ((12, 0), "cholesky"),
    ]:
        capability(cap)
        assert auto_eigenbasis_qr(torch.device("cuda", 0)) == want, cap
    for forced in ("householder", "cholesky", "cholesky_fp64"):
        monkeypatch.setenv(EIGENBASIS_QR_ENV, forced)
        assert auto_eigenbasis_qr("cpu") == forced
        assert auto_eigenbasis_qr(torch.device("cuda", 0)) == forced
    monkeypatch.setenv(EIGENBASIS_QR_ENV, "auto")
    assert auto_eigenbasis_qr("cpu") == "householder"
    monkeypatch.setenv(EIGENBASIS_QR_ENV, "qr")
    with pytest.raises(
        ValueError, match="SPECTRAL_DIST_EIGENBASIS_QR must be .*householder, cholesky, cholesky_fp64"
    ):
        auto_eigenbasis_qr("cpu")


def test_float64_cholesky_qr_tracks_as_householder_does():
    """Along a drifting 1/i spectrum (256 x 128, alpha 1.65) the float64 CholeskyQR's top-direction error is
    Householder's (within 2%), where the float32 one, slowed by its larger shift, is >= 15% worse (measured
    0.054, 0.069, 0.054 for Householder, float32, float64; on a real run's attention inputs 0.23, 0.53, 0.23:
    benchmarks/basis_accuracy.py --real)."""
    # two 256 x 128 matrices per step (a batch), each a drifting 1/i spectrum
    seq = [torch.stack(pair) for pair in zip(*(_drifting_sequence(256, 128, 10, seed=s) for s in (0, 1)))]
    err = {}
    for qr in ("householder", "cholesky", "cholesky_fp64"):
        Q, errs = None, []
        for t, G in enumerate(seq):
            D, Q, ok = eigenbasis_batched(G.float(), 1.65, 1e-4, Q, t, qr=qr)
            assert bool(ok.all()), (qr, t)
            assert Q.dtype == torch.float32
            if t:
                errs.append(max(_top_error(D[i], G[i], 1.65) for i in range(G.shape[0])))
        err[qr] = statistics.median(errs)
    assert err["cholesky_fp64"] <= 1.02 * err["householder"], err
    assert err["cholesky"] >= 1.15 * err["householder"], err


def test_float64_cholesky_qr_on_structurally_rank_deficient_gradients():
    """Zero columns of X (an input feature never active) make A Q exactly rank deficient: the small float64
    shift fills them, so the factorisation succeeds and the basis is orthonormal at every step."""
    g = torch.Generator().manual_seed(1)
    k = 96
    Q = torch.linalg.qr(torch.randn(2, k, k, generator=g))[0]
    for t in range(1, 5):
        X = torch.randn(2, 2 * k, k, generator=g)
        X[..., :10] = 0
        D, Q, ok = eigenbasis_batched(X, 1.65, 1e-4, Q, t, qr="cholesky_fp64")
        assert bool(ok.all()), t
        assert torch.allclose(Q.mT @ Q, torch.eye(k).expand(2, k, k), atol=1e-5)
        assert torch.isfinite(D).all()


def _attention_like(k=24) -> tuple[nn.Module, list[nn.Parameter]]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(k, k, bias=False) for _ in range(3)])
    return model, list(model.parameters())


@pytest.mark.parametrize("qr", ["cholesky", "cholesky_fp64"])
def test_the_optimizer_steps_through_a_gpu_qr(monkeypatch, qr):
    """Under basis="auto" at alpha 1.65 with the QR forced, the optimizer's batched step is the batched
    eigenbasis with that QR (float64 CholeskyQR input for cholesky_fp64), and its bases are carried on."""
    monkeypatch.setenv(EIGENBASIS_QR_ENV, qr)
    seen = []
    real = dr._cholesky_qr
    monkeypatch.setattr(dr, "_cholesky_qr", lambda Y, **kw: (seen.append(Y.dtype), real(Y, **kw))[1])
    model, Ws = _attention_like()
    opt = SpectralNewton(
        Ws, lr=1.0, alpha=1.65, momentum=0.0, nesterov=False, scale="none", distributed=False
    )
    g = torch.Generator().manual_seed(3)
    Q, calls = None, []
    for t in range(3):
        grads = [torch.randn(W.shape, generator=g) for W in Ws]
        for W, gr in zip(Ws, grads):
            W.grad = gr.clone()
        before = [W.detach().clone() for W in Ws]
        n = len(seen)
        opt.step()
        calls.append(len(seen) - n)
        want, Q, ok = eigenbasis_batched(torch.stack(grads), 1.65, opt.defaults["damping"], Q, t, qr=qr)
        assert bool(ok.all())
        for i, W in enumerate(Ws):
            assert torch.allclose(before[i] - W.detach(), want[i], atol=1e-5), (qr, t, i)
    assert seen and set(seen) == {torch.float64 if qr == "cholesky_fp64" else torch.float32}, seen
    assert calls == [0, 1, 1], calls  # one batch per step; step 0 starts the bases with an SVD


@pytest.mark.parametrize("qr", ["cholesky", "cholesky_fp64"])
def test_a_failed_cholesky_qr_is_redone_alone_with_householder(monkeypatch, qr):
    """A CholeskyQR that reports failure for one matrix of the batch (the flag a GPU step reads with the
    others) sends that matrix alone through the Householder eigenbasis; its batch-mates keep the CholeskyQR
    result, and no step is skipped."""
    monkeypatch.setenv(EIGENBASIS_QR_ENV, qr)
    real = dr._cholesky_qr

    def fail_first(Y, **kw):
        Q, ok = real(Y, **kw)
        ok = ok.clone()
        ok[0] = False
        return Q, ok

    model, Ws = _attention_like()
    opt = SpectralNewton(
        Ws, lr=1.0, alpha=1.65, momentum=0.0, nesterov=False, scale="none", distributed=False
    )
    g = torch.Generator().manual_seed(4)
    grads0 = [torch.randn(W.shape, generator=g) for W in Ws]
    for W, gr in zip(Ws, grads0):
        W.grad = gr.clone()
    opt.step()  # step 0: SVD start, no QR
    states = [dict(basis=opt.state[W]["tracked"]["basis"].clone(), step=1) for W in Ws]
    grads = [torch.randn(W.shape, generator=g) for W in Ws]
    for W, gr in zip(Ws, grads):
        W.grad = gr.clone()
    before = [W.detach().clone() for W in Ws]
    monkeypatch.setattr(dr, "_cholesky_qr", fail_first)
    opt.step()
    upd = [b - W.detach() for b, W in zip(before, Ws)]
    alone = eigenbasis_direction(grads[0], 1.65, opt.defaults["damping"], dict(states[0]), refresh_every=1)
    assert torch.allclose(upd[0], alone, atol=1e-5)
    batched, _, _ = eigenbasis_batched(
        torch.stack(grads), 1.65, opt.defaults["damping"], torch.stack([s["basis"] for s in states]), 1, qr=qr
    )
    for i in (1, 2):
        assert torch.allclose(upd[i], batched[i], atol=1e-5), i
    assert not torch.allclose(upd[0], batched[0], atol=1e-5)  # the redo is told apart from the batch
    stats = opt.stats()
    assert all(s["skipped"] == 0 and s["steps"] == 2 for s in stats.values()), stats
