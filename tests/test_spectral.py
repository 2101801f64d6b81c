"""spectral_direction against float64 NumPy references, per method, with stated tolerances."""

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
