"""HessianSpectrum under DDP (2 gloo processes) equals one process on the same global batch."""

import pytest
import torch
from dist_helpers import run_workers
from torch.nn.parallel import DistributedDataParallel

from spectral_dist.models import classification_loss, tiny_mlp
from spectral_dist.probes.spectrum import HessianSpectrum

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem():
    torch.manual_seed(0)
    model = tiny_mlp(in_dim=5, hidden=6, out_dim=3).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, (x, y)


def _measure(model, batch, backend):
    spec = HessianSpectrum(model, classification_loss, hvp=backend, tol=1e-6, layers=["4"])
    res = spec.measure(batch, top_k=3, trace=True, trace_matvecs=6)
    # Plain floats: tensors sent through a multiprocessing queue die with the worker that shared them.
    blocks = {**res.layers, "model": res.model}
    return {name: (b.eigenvalues.tolist(), b.trace, b.eig_hvps) for name, b in blocks.items()}


def _worker(rank, world_size):
    model, (x, y) = _problem()
    ddp = DistributedDataParallel(model)
    local = (x.chunk(world_size)[rank], y.chunk(world_size)[rank])
    # fd: the backend that works through every engine (double backward does not through FSDP2 or ZeRO-3).
    return {"fd": _measure(ddp, local, "fd")}


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_global_batch():
    per_rank = run_workers(_worker, 2)
    model, batch = _problem()
    for backend in ("fd",):
        ref = _measure(model, batch, backend)
        for out in per_rank:
            for name, (ev, trace, hvps) in ref.items():
                got_ev, got_trace, got_hvps = out[backend][name]
                scale = max(abs(e) for e in ev)
                assert max(abs(a - b) for a, b in zip(got_ev, ev)) <= 1e-9 * scale, (backend, name)
                assert abs(got_trace - trace) <= 1e-9 * scale * 10, (backend, name)
                assert got_hvps == hvps
    # Both ranks computed exactly the same thing (replicated Krylov vectors, all-reduced products).
    for name in per_rank[0]["fd"]:
        assert per_rank[0]["fd"][name] == per_rank[1]["fd"][name]
