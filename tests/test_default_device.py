"""A caller's default device does not reach the optimizer's own tensors.

Some training scripts call ``torch.set_default_device("cuda")``; every tensor the step builds on the host (its
tables, the Cholesky's power-iteration start drawn from a CPU generator) must say so, or it lands on the default
device (there: a CPU generator for a CUDA tensor raises). Here the default device is ``meta`` during
``opt.step()``, where a tensor without data fails as soon as it meets the real ones: every host-built tensor
that does not name its device is caught, on one process and on 2 gloo ranks (DDP, FSDP2)."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import run_workers
from torch import nn

from spectral_dist import SpectralNewton

METHODS = {
    "polar_express": dict(alpha=1.0),
    "cholesky": dict(alpha=2.0),
    "eigenbasis": dict(alpha=1.65),
    "svd": dict(alpha=1.5, basis="svd"),
    "gram": dict(alpha=1.5, basis="gram"),
    "tracked": dict(alpha=1.5, basis="tracked", rank=4),
}


def _run(opts, default_device=None, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.LayerNorm(16))
    opt = SpectralNewton(model.parameters(), lr=0.02, distributed=False, **opts)
    for t in range(steps):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if default_device is None:
            opt.step()
        else:
            with torch.device(default_device):
                opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", list(METHODS))
def test_the_step_ignores_the_default_device(method):
    ref = _run(METHODS[method])
    got = _run(METHODS[method], "meta")
    for p, q in zip(got, ref):
        assert p.device.type == "cpu"
        assert torch.equal(p, q), (method, (p - q).abs().max())


def default_device_worker(rank, world) -> dict:
    from dist_scenarios import (
        full_params,
        make_model,
        make_opt,
        max_rel_err,
        reference_params,
        train_steps,
        wrap,
    )

    out = {}
    opts = dict(from_model=True, basis="auto")
    ref = reference_params(steps=3, **opts)
    for mode in ("ddp", "fsdp2"):
        model = make_model()
        wrapped, inner = wrap(model, mode)
        opt = make_opt(inner, **opts)
        train_steps(wrapped, opt, 3, rank, world, around_step=lambda: torch.device("meta"))
        out[mode] = max_rel_err(full_params(inner), ref)
    return out


def test_two_ranks_step_under_another_default_device():
    """DDP and FSDP2 on 2 ranks, by-layer defaults (Cholesky, eigenbasis, Polar Express), the default device
    meta during every step: the engine's tables and headers name their device, and the result is one
    process's."""
    for rank, res in enumerate(run_workers(default_device_worker, 2, timeout=300)):
        for mode, (err, where) in res.items():
            assert err < 5e-5, (rank, mode, where, err)
