"""CurvatureProbe(h="eigen"): h_k = k-th eigenvalue of the layer's Hessian block, overlap with u_k v_k^T."""

import pytest
import torch

from spectral_dist.models import classification_loss, tiny_mlp
from spectral_dist.probes.curvature import CurvatureProbe
from spectral_dist.probes.spectrum import unflatten

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup():
    torch.manual_seed(0)
    model = tiny_mlp(in_dim=5, hidden=6, out_dim=3).double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
    return model, batch


def _exact(model, batch, name):
    p = dict(model.named_parameters())[name]

    def loss(flat):
        (w,) = unflatten(flat, [tuple(p.shape)])
        return classification_loss(lambda *a, **k: torch.func.functional_call(model, {name: w}, a, k), batch)

    H = torch.func.hessian(loss)(p.detach().reshape(-1)).detach()
    G = torch.autograd.grad(classification_loss(model, batch), p)[0].detach()
    return H, G


def test_eigen_definition_pairs_block_eigenvalues_with_sigma_and_reports_overlap():
    model, batch = _setup()
    name = "2.weight"
    eig = CurvatureProbe(model, classification_loss, top_k=4, layers=[name], h="eigen", kfac=True).measure(
        batch
    )
    ray = CurvatureProbe(model, classification_loss, top_k=4, layers=[name]).measure(batch)
    H, G = _exact(model, batch, name)
    evals, evecs = torch.linalg.eigh(H)
    evals, evecs = evals.flip(0), evecs.flip(1)
    U, S, Vh = torch.linalg.svd(G)
    lc = eig.layers[name]
    scale = float(evals.abs().max())
    # h_k: the k-th largest eigenvalue of the block, paired by rank with sigma_k.
    assert torch.allclose(lc.h, evals[:4], rtol=0, atol=1e-8 * scale)
    assert torch.allclose(lc.sigma, S[:4], rtol=1e-10)
    # Rayleigh definition unchanged: <E_k, H E_k>; never above the top eigenvalue.
    E = torch.stack([torch.outer(U[:, k], Vh[k]).reshape(-1) for k in range(4)])
    rq = torch.einsum("ki,ij,kj->k", E, H, E)
    assert torch.allclose(ray.layers[name].h, rq, rtol=0, atol=1e-10 * scale)
    assert ray.layers[name].overlap is None
    assert (rq <= evals[0] + 1e-12).all()
    # overlap_k = |<q_k, u_k v_k^T>| in [0, 1], from the exact eigenvectors (distinct eigenvalues here).
    assert (evals[:5].diff().abs() > 1e-6 * scale).all()
    want = (evecs[:, :4].T * E).sum(1).abs()
    assert torch.allclose(lc.overlap, want, atol=1e-6)
    assert ((lc.overlap >= 0) & (lc.overlap <= 1 + 1e-12)).all()
    # K-FAC Phi_k is still reported next to it, and the overlap reaches the dict/CSV outputs.
    assert torch.allclose(lc.phi, lc.h_kfac / lc.sigma**2, rtol=1e-12, atol=0)  # Phi_k = h_kfac / sigma^2
    d = eig.to_dict()["layers"][name]
    assert d["overlap"] == pytest.approx(lc.overlap.tolist())


def test_eigen_definition_errors():
    model, _ = _setup()
    with pytest.raises(ValueError, match="h must be"):
        CurvatureProbe(model, classification_loss, h="trace")
    with pytest.raises(ValueError, match="all_layers"):
        CurvatureProbe(model, classification_loss, h="eigen", estimator="all_layers")
