"""spectral_direction against float64 NumPy references, per method, with stated tolerances."""

import math

import numpy as np
import pytest
import torch

from spectral_dist import spectral_direction, spectral_transform
from spectral_dist.spectral import DecompositionError, newton_schulz


def _batch(shape=(3, 24, 16), seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _np_reference(G: np.ndarray, alpha: float, damping: float) -> np.ndarray:
    U, s, Vt = np.linalg.svd(G, full_matrices=False)
    lam = damping * s[..., :1] ** alpha
    T = s / (s**alpha + lam)
    return (U * T[..., None, :]) @ Vt


@pytest.mark.parametrize("shape", [(3, 24, 16), (2, 16, 24), (1, 20, 20)])
def test_closed_forms_alpha_0_1_2(shape):
    G = _batch(shape)
    Gn = G.numpy()
    # alpha = 0: damped SGD, D = G / (1 + damping)
    np.testing.assert_allclose(
        spectral_direction(G, 0.0, 1e-3).numpy(), Gn / (1 + 1e-3), rtol=1e-12, atol=1e-12
    )
    # alpha = 1, no damping: the polar factor G (G^T G)^(-1/2)
    w, Q = np.linalg.eigh(np.swapaxes(Gn, -1, -2) @ Gn) if shape[1] >= shape[2] else (None, None)
    if w is not None:
        polar = Gn @ (Q * (w[..., None, :] ** -0.5)) @ np.swapaxes(Q, -1, -2)
        np.testing.assert_allclose(spectral_direction(G, 1.0, 0.0).numpy(), polar, atol=1e-10)
    # alpha = 2, no damping: the transposed pseudo-inverse (G^+)^T
    pinvT = np.swapaxes(np.linalg.pinv(Gn), -1, -2)
    np.testing.assert_allclose(spectral_direction(G, 2.0, 0.0).numpy(), pinvT, atol=1e-10)
    # any alpha with damping: the defining formula
    for alpha in (0.5, 1.0, 1.5, 2.0):
        np.testing.assert_allclose(
            spectral_direction(G, alpha, 1e-2).numpy(), _np_reference(Gn, alpha, 1e-2), atol=1e-12
        )


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(3, 24, 16), (2, 16, 24)])
def test_methods_match_svd(alpha, shape):
    G = _batch(shape, seed=1)
    ref = spectral_direction(G, alpha, 1e-4, "svd")

    def rel(D):
        return ((D.double() - ref).norm() / ref.norm()).item()

    assert rel(spectral_direction(G, alpha, 1e-4, "gram")) < 1e-10  # float64
    assert rel(spectral_direction(G.float(), alpha, 1e-4, "gram")) < 1e-4  # float32: ~2e-6 measured
    assert rel(spectral_direction(G, alpha, 1e-4, "tracked")) < 1e-10  # full rank, fresh state = svd


def test_newton_schulz_error_bounds():
    G = _batch((2, 64, 32), seed=2)
    polar = spectral_direction(G, 1.0, 0.0, "svd")
    cubic = spectral_direction(G, 1.0, method="newton_schulz", ns_steps=30, ns_coefficients="cubic")
    assert ((cubic - polar).norm() / polar.norm()).item() < 1e-4
    quintic = spectral_direction(G, 1.0, method="newton_schulz")  # Muon's 5 quintic steps
    s = torch.linalg.svdvals(quintic)
    assert s.min() > 0.6 and s.max() < 1.2  # the documented ~[0.68, 1.13] band
    # the subspace is right even where the magnitudes are not
    U = torch.linalg.svd(polar)[0]
    assert torch.allclose(U @ U.mT @ quintic, quintic, atol=1e-6)
    with pytest.raises(ValueError, match="alpha=1"):
        spectral_direction(G, 2.0, method="newton_schulz")
    with pytest.raises(ValueError, match="coefficients"):
        newton_schulz(G, coefficients="septic")


def test_tracked_low_rank_and_residual_modes():
    G = _batch((40, 30), seed=3)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    r = 5
    D = spectral_direction(G, 2.0, 1e-4, "tracked", rank=r, state={})
    # Fresh state: the basis is exact, so within the tracked subspace D equals the svd direction
    P = Vh[:r].mT @ Vh[:r]
    ref = spectral_direction(G, 2.0, 1e-4, "svd")
    assert torch.allclose(D @ P, ref @ P, atol=1e-10)
    # outside it: the residual scaled by the weakest tracked factor 1 / (s_r^2 + lambda)
    lam = 1e-4 * S[0] ** 2
    tail = (G - G @ P) / (S[r - 1] ** 2 + lam)
    assert torch.allclose(D - D @ P, tail, atol=1e-10)
    from spectral_dist.spectral import tracked_direction

    Dd = tracked_direction(G, 2.0, 1e-4, {}, rank=r, residual="drop")
    assert torch.allclose(Dd, ref @ P, atol=1e-10)


def test_tracked_warm_start_follows_drifting_gradients():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(48, 6, generator=g, dtype=torch.float64)
    Bm = torch.randn(6, 32, generator=g, dtype=torch.float64)
    state, counter = {}, {}
    for t in range(25):
        G = A @ (Bm + 0.02 * t * torch.randn(6, 32, generator=g, dtype=torch.float64))
        G = G + 1e-3 * torch.randn(48, 32, generator=g, dtype=torch.float64)
        D = spectral_direction(
            G, 1.0, 1e-4, "tracked", state=state, rank=6, refresh_every=10, counter=counter
        )
        ref = spectral_direction(G, 1.0, 1e-4, "svd")
        _, _, Vh = torch.linalg.svd(G)
        P = Vh[:6].mT @ Vh[:6]
        assert ((D @ P - ref @ P).norm() / (ref @ P).norm()) < 1e-3, t
    assert counter["refreshes"] == 3  # steps 0, 10, 20


@pytest.mark.parametrize("method", ["svd", "gram", "newton_schulz", "tracked"])
def test_zero_and_rank_deficient(method):
    Z = torch.zeros(2, 12, 7)
    D = spectral_direction(Z, 1.0, method=method)
    assert torch.equal(D, torch.zeros_like(Z))
    if method == "newton_schulz":
        return
    g = torch.Generator().manual_seed(5)
    G = torch.randn(30, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 20, generator=g, dtype=torch.float64
    )
    D = spectral_direction(G, 2.0, 1e-6, method)
    assert torch.isfinite(D).all()
    assert torch.linalg.matrix_rank(D).item() == 2
    ref = torch.tensor(_np_reference(G.numpy(), 2.0, 1e-6))
    # the reference includes ~1e-15 "singular values" that numpy maps through T; our floor zeroes them
    assert torch.allclose(D, ref, atol=1e-6)


def test_half_precision_and_transform():
    G = _batch((16, 8), dtype=torch.bfloat16)
    assert spectral_direction(G, 1.0).dtype == torch.bfloat16
    s = torch.tensor([4.0, 2.0, 1.0, 0.0])
    T = spectral_transform(s, 2.0, 0.01)
    lam = 0.01 * 16.0
    assert torch.allclose(T, torch.tensor([4 / (16 + lam), 2 / (4 + lam), 1 / (1 + lam), 0.0]))
    assert torch.equal(spectral_transform(torch.zeros(3), 1.0), torch.zeros(3))


def test_bad_input():
    G = _batch((4, 3))
    with pytest.raises(ValueError, match="alpha"):
        spectral_direction(G, -1.0)
    with pytest.raises(ValueError, match="damping"):
        spectral_direction(G, 1.0, -1.0)
    with pytest.raises(ValueError, match="method"):
        spectral_direction(G, 1.0, method="qr")
    with pytest.raises(ValueError, match="rank"):
        spectral_direction(G, 1.0, method="tracked", rank=0)
    with pytest.raises(ValueError, match="shape"):
        spectral_direction(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        spectral_direction(torch.full((3, 3), float("nan")), 1.0)


def test_decomposition_failure_retries_then_raises(monkeypatch):
    real = torch.linalg.svd
    calls = {"n": 0}

    def flaky(A, *a, **k):
        calls["n"] += 1
        if A.dtype != torch.float64:
            raise torch.linalg.LinAlgError("forced")
        return real(A, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    G = _batch((6, 4), dtype=torch.float32)
    counter = {}
    D = spectral_direction(G, 1.0, counter=counter)
    assert counter["retries"] == 1 and D.dtype == torch.float32
    monkeypatch.setattr(
        torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(torch.linalg.LinAlgError("x"))
    )
    with pytest.raises(DecompositionError):
        spectral_direction(G, 1.0)


def test_each_method_runs_its_own_routine_with_the_documented_defaults():
    """The dispatch of spectral_direction and its defaults. The exact methods agree to rounding, so they are told
    apart by what they leave behind: a basis in ``state`` and counted refreshes for the stateful ones, nothing
    for the stateless ones."""
    from spectral_dist.spectral import polar_express

    G = _batch((12, 8), seed=3, dtype=torch.float32)
    # damping defaults to 1e-4 (the float64 reference at alpha 0.5)
    want = torch.from_numpy(_np_reference(G.double().numpy(), 0.5, 1e-4)).float()
    assert torch.allclose(spectral_direction(G, 0.5), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    # alpha 1: the polynomial methods give exactly their routine's 5-step result, and "auto" is Polar Express
    ns = spectral_direction(G, 1.0, method="newton_schulz")
    assert torch.equal(ns, newton_schulz(G, steps=5)) and not torch.equal(ns, newton_schulz(G, steps=6))
    pe = spectral_direction(G, 1.0, method="polar_express")
    assert torch.equal(pe, polar_express(G, steps=5)) and not torch.equal(pe, polar_express(G, steps=6))
    assert torch.equal(spectral_direction(G, 1.0, method="auto"), pe)
    # stateless methods touch neither the state nor the counter
    for method in ("svd", "gram"):
        state, counter = {}, {}
        D = spectral_direction(G, 0.5, method=method, state=state, counter=counter)
        assert state == {} and counter == {} and torch.allclose(D, want, atol=1e-5 * float(want.abs().max()))
    # alpha 0.5 under "auto" is the eigenbasis: it keeps a basis and counts its first SVD as a refresh
    state, counter = {}, {}
    D = spectral_direction(G, 0.5, method="auto", state=state, counter=counter)
    assert state["step"] == 1 and state["basis"].shape == (8, 8) and counter == {"refreshes": 1}
    assert torch.allclose(D, want, atol=1e-4 * float(want.abs().max()))
    # tracked: refresh_every defaults to 10 (a fresh SVD at calls 1 and 11, not at call 12)
    state, counter = {}, {}
    for _ in range(11):
        spectral_direction(G, 0.5, method="tracked", state=state, counter=counter)
    assert counter["refreshes"] == 2
    spectral_direction(G, 0.5, method="tracked", state=state, counter=counter)
    assert counter["refreshes"] == 2


def _stale_basis_reference(G: np.ndarray, Q: np.ndarray, alpha: float, damping: float) -> np.ndarray:
    """The eigenbasis direction of G in a fixed basis Q (n x r), float64, from its definition: B = G Q,
    sigma_i = |B e_i|, D = B diag(1 / (sigma^alpha + damping sigma_max^alpha)) Q^T, plus the part of G outside
    span(Q) with the factor of the weakest direction."""
    B = G @ Q
    s = np.linalg.norm(B, axis=0)
    w = 1.0 / (s**alpha + damping * s.max() ** alpha)
    D = (B * w) @ Q.T
    if Q.shape[1] < min(G.shape):
        D = D + w[np.argmin(s)] * (G - B @ Q.T)
    return D


@pytest.mark.parametrize("rank", [None, 3])
def test_eigenbasis_keeps_its_basis_between_refreshes(rank):
    """eigenbasis_direction: the first call takes G's right singular vectors (exact), later calls reuse that
    basis (so a rotated G is *not* exact: the stale-basis reference is), and every ``refresh_every`` calls the
    basis takes one subspace-iteration step Q <- qr(G^T G Q)."""
    from spectral_dist.spectral import eigenbasis_direction

    gen = torch.Generator().manual_seed(5)
    G1 = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    G2 = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    r = 6 if rank is None else rank
    state, counter = {}, {}
    D1 = eigenbasis_direction(G1, 0.5, 1e-3, state, rank, refresh_every=2, counter=counter)
    V1 = np.linalg.svd(G1.numpy())[2][:r].T
    assert state["step"] == 1 and state["basis"].shape == (6, r) and counter == {"refreshes": 1}
    assert np.allclose(D1.numpy(), _stale_basis_reference(G1.numpy(), V1, 0.5, 1e-3), atol=1e-12)
    if rank is None:  # a full basis of G's own singular vectors: the exact direction
        assert np.allclose(D1.numpy(), _np_reference(G1.numpy(), 0.5, 1e-3), atol=1e-12)
    D2 = eigenbasis_direction(G2, 0.5, 1e-3, state, rank, refresh_every=2, counter=counter)
    want = _stale_basis_reference(G2.numpy(), V1, 0.5, 1e-3)
    assert np.allclose(D2.numpy(), want, atol=1e-12) and counter == {"refreshes": 1} and state["step"] == 2
    assert not np.allclose(D2.numpy(), _np_reference(G2.numpy(), 0.5, 1e-3), atol=1e-3)
    Q_before = state["basis"].clone()
    D3 = eigenbasis_direction(G2, 0.5, 1e-3, state, rank, refresh_every=2, counter=counter)  # step 2: refine
    Q3 = torch.linalg.qr(G2.mT @ (G2 @ Q_before))[0]
    assert torch.allclose(state["basis"], Q3, atol=1e-12) and state["step"] == 3
    assert np.allclose(D3.numpy(), _stale_basis_reference(G2.numpy(), Q3.numpy(), 0.5, 1e-3), atol=1e-12)
    # another shape: a fresh SVD
    eigenbasis_direction(G2[:, :4], 0.5, 1e-3, state, rank, refresh_every=2, counter=counter)
    assert counter == {"refreshes": 2} and state["basis"].shape == (4, min(r, 4))
    with pytest.raises(ValueError, match="one matrix"):
        eigenbasis_direction(G1.unsqueeze(0), 0.5, 1e-3, {})


def test_batched_polynomials_and_cholesky_treat_each_matrix_on_its_own():
    """A batch of matrices with very different scales: every batched routine gives each matrix what it gives
    that matrix alone (a normalisation or power iteration over the whole batch would not), with its defaults."""
    from spectral_dist.spectral import cholesky_direction, direction_unchecked, polar_express

    G = _batch((3, 10, 7), seed=11, dtype=torch.float64)
    G = G * torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64).view(3, 1, 1)
    for Gs in (G, G.mT):  # wide and tall
        for fn in (newton_schulz, polar_express):
            out = fn(Gs)
            assert torch.equal(out, fn(Gs, steps=5))
            for i in range(3):
                assert torch.allclose(out[i], fn(Gs[i]), rtol=0, atol=1e-10), (fn.__name__, i)
        # the polar factor itself: within the polynomials' stated error of the SVD's U V^T
        polar = torch.from_numpy(_np_reference(Gs.numpy(), 1.0, 0.0))
        assert (polar_express(Gs) - polar).norm(dim=(-2, -1)).max() < 0.3 * polar.norm(dim=(-2, -1)).min()
        for alpha, damping in ((0.0, 0.1), (2.0, 1e-3)):
            D, ok = cholesky_direction(Gs, alpha, damping)
            want = torch.from_numpy(_np_reference(Gs.numpy(), alpha, damping))
            assert ok.shape == (3,) and bool(ok.all())
            assert torch.allclose(D, want, rtol=1e-6, atol=1e-9 * float(want.abs().max())), (alpha, damping)
    # direction_unchecked: the stateless methods on a batch, one finite flag per matrix
    X = G.float()
    X[1, 2, 3] = float("inf")
    for method, ref in (
        ("newton_schulz", lambda x: newton_schulz(x, steps=5)),
        ("polar_express", lambda x: polar_express(x, steps=5)),
    ):
        D, ok = direction_unchecked(X, 1.0, 0.0, method)
        assert ok.tolist() == [True, False, True], method
        assert all(torch.allclose(D[i], ref(X[i]), atol=1e-5) for i in (0, 2)), method
    D64, _ = direction_unchecked(X[[0]], 1.0, 0.0, "polar_express", matmul_dtype=torch.float64)
    assert torch.equal(D64, polar_express(X[[0]], steps=5, matmul_dtype=torch.float64))
    assert not torch.equal(D64, polar_express(X[[0]], steps=5))  # the matmul dtype reaches the iteration
    with pytest.raises(ValueError, match="stateless"):
        direction_unchecked(X, 1.0, 0.0, "tracked")


@pytest.mark.parametrize("qr", ["householder", "cholesky", "cholesky_fp64"])
@pytest.mark.parametrize("shape", [(9, 6), (6, 9)])
@pytest.mark.parametrize("rank", [None, 3])
def test_eigenbasis_batched_equals_the_one_matrix_eigenbasis(rank, shape, qr):
    """eigenbasis_batched on a batch = eigenbasis_direction on each matrix, step by step: the first step takes
    an SVD, the next ones reuse the basis and refine it every ``refresh_every`` steps (default 1). Tall and
    wide: the basis is on the smaller side either way (6 x r). Both QRs (the CholeskyQR's shift is ~1e-14 of
    the trace in float64, nothing at this tolerance)."""
    from spectral_dist.spectral import eigenbasis_batched, eigenbasis_direction

    gen = torch.Generator().manual_seed(2)
    Xs = [torch.randn(3, *shape, generator=gen, dtype=torch.float64) for _ in range(4)]
    Xs[1] = Xs[1] * torch.tensor([1e-2, 1.0, 1e2], dtype=torch.float64).view(3, 1, 1)
    for every, jac in ((None, 0), (2, 0), (None, 1), (2, 2)):
        kw = {} if every is None else {"refresh_every": every}
        states = [{} for _ in range(3)]
        Q = None
        for step, X in enumerate(Xs):
            D, Q, ok = eigenbasis_batched(X, 0.5, 1e-3, Q, step, rank, qr=qr, jacobi_steps=jac, **kw)
            assert ok.tolist() == [True, True, True]
            for i in range(3):
                # the one-matrix version refines with a Householder QR; with qr="cholesky" the bases agree up
                # to column signs, the directions (and so Q Q^T) agree
                want = eigenbasis_direction(
                    X[i], 0.5, 1e-3, states[i], rank, refresh_every=every or 1, jacobi_steps=jac
                )
                assert torch.allclose(D[i], want, atol=1e-9 * float(want.abs().max())), (every, jac, step, i)
                P, Pw = Q[i] @ Q[i].mT, states[i]["basis"] @ states[i]["basis"].mT
                assert torch.allclose(P, Pw, atol=1e-9), (every, jac, step, i)
            assert Q.shape == (3, 6, 6 if rank is None else rank)
    with pytest.raises(ValueError, match="qr must be one of"):
        eigenbasis_batched(Xs[0], 0.5, 1e-3, Q, 1, qr="givens")


def test_cholesky_method_retries_in_float64_then_raises(monkeypatch):
    """method='cholesky' through spectral_direction: the exact closed forms; a failed float32 factorisation is
    redone in float64 (counted as a retry), a second failure raises."""
    from spectral_dist.spectral import direction as dr

    G = _batch((2, 9, 6), seed=4, dtype=torch.float32)
    for alpha, damping in ((0.0, 0.1), (2.0, 1e-3)):
        want = torch.from_numpy(_np_reference(G.double().numpy(), alpha, damping)).float()
        counter = {}
        D = spectral_direction(G, alpha, damping, method="cholesky", counter=counter)
        assert D.dtype == torch.float32 and counter == {}
        assert torch.allclose(D, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), alpha
    real = dr.cholesky_direction
    calls = []

    def flaky(X, alpha, damping):  # fails in float32, works in float64
        calls.append(X.dtype)
        D, ok = real(X, alpha, damping)
        return D, ok & (X.dtype == torch.float64)

    monkeypatch.setattr(dr, "cholesky_direction", flaky)
    counter = {"retries": 2}
    D = spectral_direction(G, 2.0, 1e-3, method="cholesky", counter=counter)
    want = torch.from_numpy(_np_reference(G.double().numpy(), 2.0, 1e-3)).float()
    assert calls == [torch.float32, torch.float64] and counter == {"retries": 3} and D.dtype == torch.float32
    assert torch.allclose(D, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    monkeypatch.setattr(
        dr, "cholesky_direction", lambda X, a, d: (torch.zeros_like(X), torch.zeros(2, dtype=torch.bool))
    )
    with pytest.raises(DecompositionError, match="Cholesky failed in torch.float32 and float64"):
        spectral_direction(G, 2.0, 1e-3, method="cholesky")


@pytest.mark.parametrize("method", ["tracked", "eigenbasis"])
def test_stateful_methods_on_a_batch_keep_one_state_per_matrix(method):
    """A batch (b, m, n) through spectral_direction: one state per matrix under state['batch'], each exactly the
    state of that matrix run alone with the same rank / refresh_every / counter; rank 1 is valid, 0 is not."""
    G = _batch((3, 5, 8), seed=9, dtype=torch.float64)
    kw = dict(rank=6, refresh_every=3)  # rank above min(m, n) = 5: capped at 5
    state, counter = {}, {}
    alone = [({}, {}) for _ in range(3)]
    for step in range(4):
        Gs = G + 0.3 * step * _batch((3, 5, 8), seed=20 + step, dtype=torch.float64)
        D = spectral_direction(Gs, 0.5, method=method, state=state, counter=counter, **kw)
        for i, (st, c) in enumerate(alone):
            want = spectral_direction(Gs[i], 0.5, method=method, state=st, counter=c, **kw)
            assert torch.equal(D[i], want), (step, i)
    assert len(state["batch"]) == 3 and all(s["step"] == 4 for s in state["batch"])
    # tracked keeps right singular vectors (n x r); eigenbasis the smaller side's (min(m, n) x r)
    assert all(s["basis"].shape == ((8, 5) if method == "tracked" else (5, 5)) for s in state["batch"])
    assert counter["refreshes"] == sum(c["refreshes"] for _, c in alone) >= 3
    with pytest.raises(ValueError, match="different batch size"):
        spectral_direction(G[:2], 0.5, method=method, state=state)
    D1 = spectral_direction(G[0], 0.5, method=method, state={}, rank=1)
    assert torch.isfinite(D1).all()
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        spectral_direction(G[0], 0.5, method=method, state={}, rank=0)


def test_eigenbasis_of_a_wide_matrix_is_the_transposed_problem_on_the_smaller_side():
    """A wide G (m < n) keeps its basis on the m side: every call equals the call on G^T (tall, right basis)
    transposed, with the same m x r basis; the Gram matrix, power iteration and QR are m x m, not n x n."""
    from spectral_dist.spectral import eigenbasis_direction

    gen = torch.Generator().manual_seed(7)
    Gs = [torch.randn(5, 12, generator=gen, dtype=torch.float64) for _ in range(4)]
    wide, tall = {}, {}
    for step, G in enumerate(Gs):
        D = eigenbasis_direction(G, 1.5, 1e-3, wide, refresh_every=1)
        Dt = eigenbasis_direction(G.mT.contiguous(), 1.5, 1e-3, tall, refresh_every=1)
        assert wide["basis"].shape == (5, 5), step
        assert torch.allclose(wide["basis"], tall["basis"], atol=1e-12), step
        assert torch.allclose(D, Dt.mT, atol=1e-12 * float(D.abs().max())), step
    # its first step is exact (an SVD basis), in both orientations
    D0 = eigenbasis_direction(Gs[0], 1.5, 1e-3, {})
    assert np.allclose(D0.numpy(), _np_reference(Gs[0].numpy(), 1.5, 1e-3), atol=1e-12)


def test_eigenbasis_shift_keeps_cholesky_qr_working_on_rank_deficient_gradients(monkeypatch):
    """float32, rank-8 gradients of 64 x 48 matrices drifting between steps (real gradients are often of low
    rank): with the shift mu I (eigenbasis_shift) the batched CholeskyQR succeeds at every step; without it the
    columns of A Q for the zero eigenvalues are rounding noise, nearly parallel, and it fails (the optimizer
    would redo those matrices one by one with Householder QR)."""
    from spectral_dist.spectral import direction as dr

    def run():
        gen = torch.Generator().manual_seed(3)
        U = torch.randn(4, 64, 8, generator=gen)
        V = torch.randn(4, 48, 8, generator=gen)
        Q, oks = None, []
        for step in range(4):
            V = V + 0.05 * torch.randn(4, 48, 8, generator=gen)
            X = U @ V.mT
            D, Q, ok = dr.eigenbasis_batched(X, 1.5, 1e-4, Q, step, qr="cholesky")
            assert torch.isfinite(D).all()
            if step:
                oks += ok.tolist()
        return oks

    assert all(run())
    monkeypatch.setattr(dr, "eigenbasis_shift", lambda A: torch.zeros_like(A[..., :1, :1]))
    assert not any(run())


def test_cholesky_qr_orthonormalises_or_says_it_could_not():
    """Shifted CholeskyQR2: round-off orthonormal with the nested spans of Y's columns (R upper triangular)
    up to condition ~1e4; a condition of 1e6, two equal columns or a NaN come back with ok False."""
    from spectral_dist.spectral import direction as dr

    gen = torch.Generator().manual_seed(0)
    k = 64
    U, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))

    def with_cond(c):
        return ((U * torch.logspace(0, -math.log10(c), k, dtype=torch.float64)) @ V.T).float()

    Y = torch.stack([with_cond(1e2), with_cond(1e4)])
    Q, ok = dr._cholesky_qr(Y)
    assert ok.tolist() == [True, True]
    assert (Q.mT @ Q - torch.eye(k)).abs().max() < 5e-5
    R = Q.mT @ Y  # upper triangular with a positive diagonal: the same nested spans as Y
    assert (R.tril(-1).abs().amax(dim=(-2, -1)) < 1e-3 * R.abs().amax(dim=(-2, -1))).all()
    assert (R.diagonal(dim1=-2, dim2=-1) > 0).all()
    bad = torch.stack([with_cond(1e6), torch.randn(k, k, generator=gen), torch.randn(k, k, generator=gen)])
    bad[1, :, 1] = bad[1, :, 0]
    bad[2, 3, 4] = float("nan")
    _, ok = dr._cholesky_qr(bad)
    assert ok.tolist() == [False, False, False]


def test_float64_cholesky_qr_accepts_what_float64_resolves():
    """In float64 the same CholeskyQR2 is round-off orthonormal up to condition ~1e10 (pass 1's shift is 1e-10,
    its acceptance bound CHOLQR_MIN_DIAG_RATIO_FP64): a condition of 1e6, refused in float32, passes; equal
    columns and a NaN still come back with ok False."""
    from spectral_dist.spectral import direction as dr

    gen = torch.Generator().manual_seed(0)
    k = 64
    U, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    Y = torch.stack([(U * torch.logspace(0, -c, k, dtype=torch.float64)) @ V.T for c in (6, 9)])
    Q, ok = dr._cholesky_qr(Y)
    assert ok.tolist() == [True, True]
    assert (Q.mT @ Q - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-9
    R = Q.mT @ Y
    assert (R.tril(-1).abs().amax(dim=(-2, -1)) < 1e-6 * R.abs().amax(dim=(-2, -1))).all()
    _, ok32 = dr._cholesky_qr(Y[:1].float())
    assert ok32.tolist() == [False]
    bad = torch.randn(2, k, k, generator=gen, dtype=torch.float64)
    bad[0, :, 1] = bad[0, :, 0]
    bad[1, 3, 4] = float("nan")
    _, ok = dr._cholesky_qr(bad)
    assert ok.tolist() == [False, False]


def test_finite_matrices_flags_each_matrix_with_a_nan_or_inf():
    from spectral_dist.spectral.direction import finite_matrices

    X = torch.ones(4, 3, 5)
    X[1, 2, 4] = float("nan")
    X[2, 0, 0] = float("inf")
    X[3, 1, 1], X[3, 1, 2] = float("inf"), float("-inf")  # their sum is NaN, not 0
    assert finite_matrices(X).tolist() == [True, False, False, False]
    assert finite_matrices(torch.ones(3, 5)).shape == () and bool(finite_matrices(torch.ones(3, 5)))


def _drifting_sequence(m, n, steps, seed=0, angle=0.05):
    """G_t = U diag(1/i) V_t^T + noise with V_t rotating by ~``angle`` rad per step (float64)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -1.0
    out = []
    for _ in range(steps):
        K = torch.randn(k, k, generator=g, dtype=torch.float64)
        V = V @ torch.linalg.matrix_exp(angle * (K - K.T) / (2 * math.sqrt(k)))
        out.append((U * s) @ V.T + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n))
    return out


def _top_error(D, G, alpha, damping=1e-4, energy=0.9):
    """|| P(D/||D||) - P(R/||R||) || / || P(R/||R||) || on the float64 SVD directions of G that hold 90% of the
    reference direction R's energy (the directions that carry the update)."""
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    T = S / (S**alpha + damping * S[0] ** alpha)
    R = (U * T) @ Vh
    order = torch.argsort(T, descending=True)
    k = int((torch.cumsum(T[order] ** 2, 0) / (T**2).sum() < energy).sum()) + 1
    idx = order[:k]
    Dn, Rn = D.double() / D.double().norm(), R / R.norm()
    proj = lambda X: U[:, idx].T @ X @ Vh[idx].T  # noqa: E731
    return float((proj(Dn) - proj(Rn)).norm() / proj(Rn).norm())


@pytest.mark.parametrize("qr", ["householder", "cholesky", "cholesky_fp64"])
def test_jacobi_steps_sharpen_the_eigenbasis_along_a_drifting_sequence(qr):
    """A power step barely moves the bulk of a 1/k spectrum (neighbouring eigenvalue ratios near 1), where an
    alpha = 1.65 update lies; each parallel Jacobi step after it cuts the top-direction error against the
    float64 SVD (measured 2.4% -> 0.8% -> 0.1% here; on a real run's inputs 24% -> 14% -> 9%)."""
    from spectral_dist.spectral import eigenbasis_batched

    seq = _drifting_sequence(64, 48, 10)
    med = {}
    for jac in (0, 1, 2):
        Q, errs = None, []
        for t, G in enumerate(seq):
            D, Q, ok = eigenbasis_batched(G[None].float(), 1.65, 1e-4, Q, t, qr=qr, jacobi_steps=jac)
            assert bool(ok.all())
            assert torch.allclose(Q[0].mT @ Q[0], torch.eye(48), atol=1e-5)
            if t:
                errs.append(_top_error(D[0], G, 1.65))
        med[jac] = sorted(errs)[len(errs) // 2]
    assert med[1] < 0.5 * med[0] and med[2] < 0.5 * med[1], med


def test_jacobi_rotate_fixes_an_eigenbasis_and_rotates_towards_one():
    """At an exact eigenbasis C = B^T B is diagonal: the step leaves the basis (and B) as they are. From a basis
    rotated away from it, one step leaves Q orthonormal, B = X Q, and C's off-diagonal part smaller; the
    rotation is the first-order eigenvector correction, so it shrinks quadratically when the gaps are large."""
    from spectral_dist.spectral import jacobi_rotate

    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(30, 12, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    X = (U * torch.linspace(3.0, 0.5, 12, dtype=torch.float64)) @ V.T
    Q2, B2, ok = jacobi_rotate(X, V, X @ V)
    assert ok is None
    assert torch.allclose(Q2.abs(), V.abs(), atol=1e-12) and torch.allclose(B2, X @ Q2)

    def off(Q):
        C = (X @ Q).mT @ (X @ Q)
        return float((C - torch.diag_embed(C.diagonal())).norm())

    K = torch.randn(12, 12, generator=g, dtype=torch.float64)
    Q = V @ torch.linalg.matrix_exp(0.01 * (K - K.T))
    Q1, B1, _ = jacobi_rotate(X, Q, X @ Q)
    assert torch.allclose(Q1.mT @ Q1, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(B1, X @ Q1, atol=1e-12)
    assert off(Q1) < 0.1 * off(Q), (off(Q), off(Q1))
    Q1c, _, okc = jacobi_rotate(X[None], Q[None], (X @ Q)[None], qr="cholesky")
    assert okc.tolist() == [True] and torch.allclose((Q1c[0] @ Q1c[0].mT), Q1 @ Q1.mT, atol=1e-10)


def test_auto_matmul_dtype_per_device_dtype_and_override(monkeypatch):
    """basis="auto" runs Polar Express (and the eigenbasis's last product) in bf16 on CUDA; on CPUs in float32
    unless the environment asks (1: bf16; auto: where the CPU has native bf16); never for float64 inputs or
    other methods; a bad override names the variable and its values."""
    from spectral_dist.spectral import direction as dm

    monkeypatch.delenv(dm.CPU_BF16_ENV, raising=False)
    assert isinstance(dm.cpu_has_native_bf16(), bool)
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(dm, "cpu_has_native_bf16", lambda native=native: native)
        assert dm.auto_matmul_dtype("polar_express", cpu) is None  # the CPU default: float32
        monkeypatch.setenv(dm.CPU_BF16_ENV, "auto")
        assert dm.auto_matmul_dtype("polar_express", cpu) == (torch.bfloat16 if native else None)
        assert dm.auto_matmul_dtype("polar_express", "cpu", torch.bfloat16) == (
            torch.bfloat16 if native else None
        )
        assert dm.auto_matmul_dtype("polar_express", cpu, torch.float64) is None
        for flag, want in (("1", torch.bfloat16), ("0", None)):
            monkeypatch.setenv(dm.CPU_BF16_ENV, flag)
            assert dm.auto_matmul_dtype("polar_express", cpu) == want, (native, flag)
        monkeypatch.delenv(dm.CPU_BF16_ENV)
    assert dm.auto_matmul_dtype("polar_express", "cuda:1") == torch.bfloat16
    assert dm.auto_matmul_dtype("polar_express", torch.device("cuda", 0), torch.float64) is None
    monkeypatch.setenv(dm.CPU_BF16_ENV, "1")
    for method in dm.METHODS:
        want = torch.bfloat16 if method in ("polar_express", "eigenbasis") else None
        assert dm.auto_matmul_dtype(method, "cuda") == want and dm.auto_matmul_dtype(method, cpu) == want, (
            method
        )
    monkeypatch.setenv(dm.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="SPECTRAL_DIST_CPU_BF16 must be 0 or unset .*, 1 .* or auto"):
        dm.auto_matmul_dtype("polar_express", cpu)


def test_householder_q_is_torch_qr_without_r():
    from spectral_dist.spectral.direction import householder_q

    g = torch.Generator().manual_seed(0)
    for shape in ((3, 40, 40), (2, 50, 20), (30, 7)):
        Y = torch.randn(*shape, generator=g)
        assert torch.equal(householder_q(Y), torch.linalg.qr(Y)[0]), shape


def test_eigenbasis_apply_dtype_rounds_only_the_last_product():
    """apply_dtype=bf16 changes D by bf16's rounding of (B w) and Q (~2^-8 of D), not the basis; and it is
    really applied (D differs from float32's)."""
    from spectral_dist.spectral import eigenbasis_batched

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(2, 96, 48, generator=g))
    V, _ = torch.linalg.qr(torch.randn(2, 48, 48, generator=g))
    X = (U * torch.logspace(0, -3, 48)) @ V.mT  # a 1/k-like spectrum over three decades
    D0, Q0, _ = eigenbasis_batched(X, 1.65, 1e-4, None, 0)
    Xn = X + 1e-3 * torch.randn(X.shape, generator=g)
    D32, Q32, ok32 = eigenbasis_batched(Xn, 1.65, 1e-4, Q0, 1)
    D16, Q16, ok16 = eigenbasis_batched(Xn, 1.65, 1e-4, Q0, 1, apply_dtype=torch.bfloat16)
    assert torch.equal(Q16, Q32) and bool(ok16.all()) and D16.dtype == torch.float32
    rel = ((D16 - D32).norm(dim=(-2, -1)) / D32.norm(dim=(-2, -1))).max().item()
    assert 1e-5 < rel < 1e-2, rel
