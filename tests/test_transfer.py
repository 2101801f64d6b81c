"""The transfer test s = alpha * gamma on synthetic layers with known truth (same-point and independent).

A synthetic layer is one weight matrix W (12 x 10) at W = 0 with a quadratic loss per batch,

    loss(W) = <G, W> + 1/2 sum_j lam_j <Q_j, W>^2,

so the batch gradient is G and the Hessian is sum_j lam_j vec(Q_j) vec(Q_j)^T: both are chosen exactly. Batches
A, B, C are three such (G, Q, lam) with their own random singular vectors and small independent noise, and go
through the same :func:`spectral_dist.reproduce.transfer_probe` as the real models (CurvatureProbe on A, the
gradient SVD of B, Lanczos on C's Hessian block).
"""

import math

import pytest
import torch
from torch import nn

from spectral_dist.probes.fits import fit_mask, loglog_fit, transfer_fit
from spectral_dist.reproduce import transfer_probe

M, N = 12, 10
R = min(M, N)
K = torch.arange(1, R + 1, dtype=torch.float64)


class QuadraticLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(M, N, dtype=torch.float64))


def quadratic_loss(model, batch):
    G, Q, lam = batch
    W = model.weight
    return (G * W).sum() + 0.5 * (lam * (Q * W).flatten(1).sum(1) ** 2).sum()


def _orth(n, g):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def make_batch(seed, gamma=1.2, alpha=1.5, c=2.0, noise=0.02, order=None, aligned=True, lam=None):
    """(G, Q, lam): G = U diag(sigma) V^T with sigma_k = k^-gamma; Hessian along u_k v_k^T with eigenvalue
    c * sigma_{order[k]}^alpha (order=None: h_k = c sigma_k^alpha). ``aligned=False``: Q_j are random
    orthonormal matrices, unrelated to G, with eigenvalues ``lam``. ``noise``: relative scatter of sigma and lam."""
    g = torch.Generator().manual_seed(seed)
    U, V = _orth(M, g), _orth(N, g)
    sigma = K ** (-gamma) * torch.exp(noise * torch.randn(R, generator=g, dtype=torch.float64))
    sigma = sigma.sort(descending=True).values
    G = U[:, :R] @ torch.diag(sigma) @ V[:, :R].T
    if aligned:
        idx = torch.arange(R) if order is None else torch.as_tensor(order)
        lam = c * sigma[idx] ** alpha * torch.exp(noise * torch.randn(R, generator=g, dtype=torch.float64))
        Q = torch.stack([torch.outer(U[:, k], V[:, k]) for k in range(R)])
    else:
        flat, _ = torch.linalg.qr(torch.randn(M * N, len(lam), generator=g, dtype=torch.float64))
        Q = flat.T.reshape(len(lam), M, N)
    return G, Q, lam


def probe(batches, top_k=R, k_range=None):
    rows, _ = transfer_probe(QuadraticLayer(), quadratic_loss, batches, top_k, k_range)
    return rows["weight"]


# ------------------------------------------------------------------------------------------ fits
def test_transfer_fit_exact_power_law():
    gamma, alpha, c = 0.9, 1.7, 3.0
    sigma = K ** (-gamma)
    h = c * sigma**alpha
    mask = fit_mask(R, sigmas=[sigma], curvatures=[h])
    f = transfer_fit(sigma, h, sigma, h, mask)
    assert f["alpha"] == pytest.approx(alpha) and f["gamma"] == pytest.approx(gamma)
    assert (
        f["s"] == pytest.approx(alpha * gamma) and f["rel_err"] < 1e-10 and f["alpha_r2"] == pytest.approx(1)
    )
    assert f["n_fit"] == R


def test_same_point_identity_holds_for_any_h():
    """Why the same-point error says little: with sigma_k an exact power of k, s = alpha * gamma for any h."""
    sigma = K ** (-1.3)
    h = torch.rand(R, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1  # no power law
    f = transfer_fit(sigma, h, sigma, h, fit_mask(R, curvatures=[h]))
    assert f["rel_err"] < 1e-10 and f["alpha_r2"] < 0.5  # the R^2 of the alpha fit does see it


def test_fit_mask_range_and_signs():
    sigma = torch.tensor([1.0, 0.5, 0.3, 0.2, 1e-9, 0.1], dtype=torch.float64)
    h = torch.tensor([1.0, -0.1, 0.2, 0.1, 0.1, math.nan], dtype=torch.float64)
    h2 = torch.tensor([1.0, 0.5, 0.2, -1.0], dtype=torch.float64)  # shorter: k = 5, 6 left out
    assert fit_mask(6, sigmas=[sigma], curvatures=[h]).tolist() == [True, False, True, True, False, False]
    assert fit_mask(6, (2, 4), sigmas=[sigma]).tolist() == [False, True, True, True, False, False]
    assert fit_mask(6, curvatures=[h, h2]).tolist() == [True, False, True, False, False, False]
    with pytest.raises(ValueError, match="k_range"):
        fit_mask(6, (3, 2))
    slope, r2 = loglog_fit(K, 5 * K**2)
    assert slope == pytest.approx(2) and r2 == pytest.approx(1)


# ------------------------------------------------------------------------------------------ synthetic layers
def test_power_law_layer_recovered_in_every_mode():
    gamma, alpha = 1.2, 1.5
    batches = {
        name: make_batch(seed, gamma, alpha, c)
        for name, seed, c in (("A", 1, 2.0), ("B", 2, 1.0), ("C", 3, 5.0))
    }
    r = probe(batches)
    assert r["n_fit"] == R and r["k_fit"] == f"1-{R}"
    assert r["alpha"] == pytest.approx(alpha, abs=0.1)
    for mode in ("same", "indep", "indep_rayleigh"):
        assert r[f"gamma_{mode}"] == pytest.approx(gamma, abs=0.06), mode
        assert r[f"s_{mode}"] == pytest.approx(alpha * gamma, abs=0.15), mode
        assert r[f"rel_err_{mode}"] < 0.08, mode
    assert r["overlap_median"] > 0.99  # the gradient's singular directions are the Hessian's eigenvectors


def test_independent_mode_takes_gamma_from_b_and_s_from_c():
    """B and C with other exponents than A: gamma must follow B, s must follow C (and the error shows it)."""
    batches = {"A": make_batch(1, 1.2, 1.5), "B": make_batch(2, 0.7, 1.5), "C": make_batch(3, 1.0, 2.5)}
    r = probe(batches)
    assert r["gamma_same"] == pytest.approx(1.2, abs=0.06) and r["gamma_indep"] == pytest.approx(
        0.7, abs=0.06
    )
    assert r["s_same"] == pytest.approx(1.8, abs=0.15) and r["s_indep"] == pytest.approx(2.5, abs=0.15)
    assert r["rel_err_same"] < 0.08 and r["rel_err_indep"] > 0.4  # 1.5 * 0.7 = 1.05 against 2.5


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_h_not_a_power_of_sigma_fails_the_independent_test(order):
    """h_k along the gradient directions is a permutation of c sigma^alpha, so h is not a power of sigma: the
    same-point error stays ~0 (the identity is algebraic there), the independent error must be large."""
    perm = (
        list(range(R))[::-1]
        if order == "reversed"
        else torch.randperm(R, generator=torch.Generator().manual_seed(5)).tolist()
    )
    batches = {name: make_batch(seed, order=perm) for name, seed in (("A", 1), ("B", 2), ("C", 3))}
    r = probe(batches)
    assert r["rel_err_same"] < 0.05
    assert r["rel_err_indep"] > 0.5
    assert r["alpha_r2"] < 0.9 or r["alpha"] < 0


def test_unaligned_hessian_fails_the_independent_test():
    """A Hessian unrelated to the gradient (random eigenvectors, eigenvalues j^-1.8): h_k along the gradient's
    directions does not follow sigma_k, so alpha * gamma cannot predict the eigenvalue decay."""
    lam = torch.arange(1, 31, dtype=torch.float64) ** -1.8
    batches = {
        name: make_batch(seed, aligned=False, lam=lam) for name, seed in (("A", 1), ("B", 2), ("C", 3))
    }
    r = probe(batches)
    assert r["s_indep"] == pytest.approx(1.8, rel=0.1)  # the top eigenvalues are lam_1..lam_10
    assert r["rel_err_indep"] > 0.5
    assert r["overlap_median"] < 0.5


def test_fit_range_is_applied_in_every_mode():
    batches = {name: make_batch(seed) for name, seed in (("A", 1), ("B", 2), ("C", 3))}
    r = probe(batches, k_range=(2, 8))
    assert r["k_fit"] == "2-8" and r["n_fit"] == 7
    assert r["rel_err_indep"] < 0.1


def test_gradient_singular_values_match_the_probe_and_leave_the_model_alone():
    from spectral_dist.models import classification_loss, tiny_mlp
    from spectral_dist.probes import CurvatureProbe

    torch.manual_seed(0)
    model = tiny_mlp(in_dim=6, hidden=8, out_dim=3, depth=2).double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = CurvatureProbe(model, classification_loss, top_k=4, kfac=False)
    sig = probe.gradient_singular_values(batch)
    report = probe.measure(batch)
    assert set(sig) == set(report.layers)
    for name, lc in report.layers.items():
        assert torch.allclose(sig[name], lc.sigma.cpu(), rtol=1e-10, atol=0)
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in model.named_parameters())
