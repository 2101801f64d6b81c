"""Matrix-free eigensolvers, trace estimators and SLQ density against explicit symmetric matrices."""

import math

import numpy as np
import pytest
import torch

from spectral_dist.probes.lanczos import (
    exact_residuals,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
    slq_density,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _matrix(n=120, seed=0, decay=1.5, neg_frac=0.3):
    """Symmetric indefinite matrix with power-law eigenvalue decay (the Hessian regime)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    mag = 10.0 * torch.arange(1, n + 1, dtype=torch.float64) ** -decay
    sign = torch.where(torch.rand(n, generator=g) < neg_frac, -1.0, 1.0).double()
    sign[0] = 1.0
    ev = mag * sign
    return (U * ev) @ U.T, ev


def _wanted(ev, which, k):
    if which == "LA":
        return ev.sort(descending=True).values[:k]
    if which == "SA":
        return ev.sort().values[:k]
    return ev[ev.abs().argsort(descending=True)][:k]


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_matches_eigvalsh(which):
    A, ev = _matrix()
    res = lanczos(lambda v: A @ v, A.shape[0], 10, which=which, tol=1e-9)
    want = _wanted(ev, which, 10)
    assert res.converged and res.method == "lanczos"
    assert torch.allclose(res.eigenvalues, want, rtol=0, atol=1e-12 * ev.abs().max())
    # The Ritz residual identity |beta_m s_mi| is the true residual under full reorthogonalization.
    true = exact_residuals(lambda v: A @ v, res.eigenvalues, res.eigenvectors)
    assert torch.allclose(res.residuals, true, atol=1e-12)
    assert (true <= 1e-9 * ev.abs().max()).all()
    # Far fewer products than the dimension for a decaying spectrum.
    assert res.num_matvecs < A.shape[0] // 2


def test_lanczos_template_dtype_and_start_vector():
    A, ev = _matrix(n=40)
    tmpl = torch.zeros(40, dtype=torch.float32)
    res = lanczos(lambda v: A.float() @ v, tmpl, 3, tol=1e-4)
    assert res.eigenvectors.dtype == torch.float32
    assert torch.allclose(res.eigenvalues, _wanted(ev, "LA", 3), atol=1e-4)
    res2 = lanczos(lambda v: A @ v, 40, 3, v0=torch.ones(40), tol=1e-10)
    assert torch.allclose(res2.eigenvalues, _wanted(ev, "LA", 3), atol=1e-12)


def test_lanczos_finds_repeated_and_low_rank_spectra():
    # Single-vector Krylov sees one copy per eigenvalue; restarts after breakdown recover the multiplicity.
    D = torch.diag(torch.tensor([5.0, 5.0, 5.0, 3.0, 3.0] + [1.0] * 45, dtype=torch.float64))
    res = lanczos(lambda v: D @ v, 50, 6, tol=1e-10)
    assert torch.allclose(res.eigenvalues, torch.tensor([5.0, 5.0, 5.0, 3.0, 3.0, 1.0]).double())
    assert res.num_matvecs < 20
    # Rank-3 PSD matrix: the Krylov space closes after 4 steps; the zero eigenvalues follow.
    g = torch.Generator().manual_seed(3)
    B = torch.randn(30, 3, generator=g, dtype=torch.float64)
    L = B @ B.T
    res = lanczos(lambda v: L @ v, 30, 5, tol=1e-10)
    ev = torch.linalg.eigvalsh(L).flip(0)[:5]
    assert torch.allclose(res.eigenvalues, ev, atol=1e-10)
    assert res.converged


def test_lanczos_whole_space_is_exact():
    A, ev = _matrix(n=25, decay=0.2)
    res = lanczos(lambda v: A @ v, 25, 25, tol=1e-14)
    assert res.num_matvecs <= 26
    assert torch.allclose(res.eigenvalues, ev.sort(descending=True).values, atol=1e-12)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_power_iteration_fallback(which):
    # Dominant eigenvalue negative: "LA" needs the shift, "SA" takes the dominant one first.
    ev = torch.tensor([-9.0, 4.0, 2.0, -1.0, 0.5] + [0.01] * 15, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0]
    A = (U * ev) @ U.T
    res = power_iteration(lambda v: A @ v, 20, 3, which=which, tol=1e-9, max_iter=3000)
    assert res.method == "power" and res.converged
    assert torch.allclose(res.eigenvalues, _wanted(ev, which, 3), atol=1e-8)
    true = exact_residuals(lambda v: A @ v, res.eigenvalues, res.eigenvectors)
    assert torch.allclose(res.residuals, true, atol=1e-12)


def test_hutchinson_is_unbiased_with_honest_stderr():
    A, _ = _matrix(n=60, decay=0.5)
    exact = float(A.trace())
    # Rademacher variance per sample: 2 (||A||_F^2 - sum_i A_ii^2).
    sd = math.sqrt(2 * (float((A**2).sum()) - float((A.diag() ** 2).sum())))
    z = []
    for seed in range(20):
        est = hutchinson(lambda v: A @ v, 60, 32, seed=seed)
        assert est.num_matvecs == 32
        assert 0.5 < est.stderr / (sd / math.sqrt(32)) < 1.6
        z.append((est.value - exact) / (sd / math.sqrt(32)))
    z = torch.tensor(z)
    # 20 standardized errors: mean within 4 standard errors of 0, spread close to 1.
    assert abs(float(z.mean())) < 4 / math.sqrt(20)
    assert 0.5 < float(z.std()) < 1.6
    gauss = hutchinson(lambda v: A @ v, 60, 64, seed=0, distribution="gaussian")
    assert abs(gauss.value - exact) < 4 * gauss.stderr


def test_hutchpp_beats_hutchinson_on_decaying_spectra_and_is_exact_when_it_spans():
    A, _ = _matrix(n=100, decay=1.5)
    exact = float(A.trace())
    err_h, err_pp = [], []
    for seed in range(5):
        h = hutchinson(lambda v: A @ v, 100, 45, seed=seed)
        pp = hutchpp(lambda v: A @ v, 100, 45, seed=seed)
        assert pp.num_matvecs == 45
        assert abs(pp.value - exact) <= 4 * pp.stderr + 1e-12
        err_h.append(abs(h.value - exact))
        err_pp.append(abs(pp.value - exact))
    assert sum(err_pp) < 0.4 * sum(err_h)
    full = hutchpp(lambda v: A @ v, 100, 300)
    assert full.stderr == 0.0 and abs(full.value - exact) < 1e-10


def test_slq_density_integrates_to_one_and_matches_the_histogram():
    A, ev = _matrix(n=80, decay=0.3)
    dens = slq_density(lambda v: A @ v, 80, num_probes=30, num_steps=80, sigma=0.05)
    assert abs(dens.integral() - 1.0) < 1e-6
    assert torch.allclose(dens.weights.sum(1), torch.ones(30, dtype=torch.float64))
    # Mass per bin against the exact eigenvalue histogram (bins 20x wider than the broadening).
    edges = torch.linspace(float(ev.min()) - 0.5, float(ev.max()) + 0.5, 12, dtype=torch.float64)
    hist = torch.histogram(ev, bins=edges).hist / ev.numel()
    cdf = torch.cumulative_trapezoid(dens.values, dens.grid)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf])
    at = torch.from_numpy(np.interp(edges.numpy(), dens.grid.numpy(), cdf.numpy()))
    mass = at.diff()
    assert (mass - hist).abs().max() < 0.05
    assert (mass - hist).abs().sum() < 0.15
    # Fewer steps than the dimension still integrates to 1 and keeps the spectral edges.
    short = slq_density(lambda v: A @ v, 80, num_probes=4, num_steps=16)
    assert abs(short.integral() - 1.0) < 1e-4
    nodes = short.nodes[torch.isfinite(short.nodes)]
    assert abs(float(nodes.max()) - float(ev.max())) < 1e-3 * float(ev.abs().max())


def test_errors_are_value_errors():
    A, _ = _matrix(n=10)
    with pytest.raises(ValueError, match="k must be"):
        lanczos(lambda v: A @ v, 10, 11)
    with pytest.raises(ValueError, match="which"):
        lanczos(lambda v: A @ v, 10, 2, which="BE")
    with pytest.raises(ValueError, match="matvec must return"):
        lanczos(lambda v: v[:5], 10, 2)
    with pytest.raises(ValueError, match="dimension"):
        hutchinson(lambda v: v, 0)
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson(lambda v: v, 10, 1)
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchpp(lambda v: v, 10, 3)
    with pytest.raises(ValueError, match="sigma"):
        slq_density(lambda v: v, 10, sigma=-1.0)
    with pytest.raises(FloatingPointError):
        lanczos(lambda v: v * float("nan"), 10, 2)
