"""CurvatureProbe and HessianSpectrum under DDP, FSDP2 and DeepSpeed ZeRO-2 (2 gloo processes) equal one
process on the same global batch; the sharded model is left exactly as it was; ZeRO-3 is refused clearly.

The model has a conv kernel (3 rows over 2 ranks: uneven shards), a linear layer (5 rows) and a head with
one row, so under FSDP2 rank 1 holds an empty shard of it.
"""

import math

import pytest
import torch
import torch.distributed as dist
from dist_helpers import run_workers
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spectral_dist.probes import CurvatureProbe
from spectral_dist.probes.sharding import ProbeLayout
from spectral_dist.probes.spectrum import HessianSpectrum

WORLD = 2
TOP_K = 3
REL = 1e-7  # fd HVPs of the same loss summed in another order: rounding / fd step, float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(12, 5),
        nn.Tanh(),
        nn.Linear(5, 1),
    ).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(8, 1, generator=g, dtype=torch.float64)
    return x, y


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _probe(model, batch):
    """Plain floats per probe variant (tensors do not survive the worker's queue)."""
    out = {}
    for label, kw in {
        "per_layer": dict(),
        "all_layers": dict(estimator="all_layers", samples=2),
        "eigen": dict(h="eigen"),
    }.items():
        rep = CurvatureProbe(model, _loss, top_k=TOP_K, hvp="fd", seed=3, **kw).measure(batch)
        out[label] = {
            n: dict(
                sigma=lc.sigma.tolist(),
                h=lc.h.tolist(),
                h_kfac=None if lc.h_kfac is None else lc.h_kfac.tolist(),
                overlap=None if lc.overlap is None else lc.overlap.tolist(),
                alpha=lc.alpha,
                loss=rep.loss,
                hvps=rep.cost["hvps"],
            )
            for n, lc in rep.layers.items()
        }
    spec = HessianSpectrum(model, _loss, hvp="fd", tol=1e-6, seed=5)
    res = spec.measure(batch, top_k=TOP_K, trace=True, trace_matvecs=9, density=True, density_steps=8)
    out["spectrum"] = {
        n: dict(ev=b.eigenvalues.tolist(), trace=b.trace, dens=b.density.values.tolist(), hvps=b.num_hvps)
        for n, b in {**res.layers, "model": res.model}.items()
    }
    return out


def _worker(rank, world_size):
    x, y = _batch()
    local = (x.chunk(world_size)[rank], y.chunk(world_size)[rank])
    out = {}

    ddp = DistributedDataParallel(_model())
    assert ProbeLayout.detect(ddp).kind == "replicated"
    out["ddp"] = _probe(ddp, local)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    model = _model()
    for layer in (model[0], model[3]):  # the head stays in the root's group
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    lay = ProbeLayout.detect(model)
    assert lay.kind == "sharded"
    out["rows"] = {n: lay.rows(p) for n, p in model.named_parameters()}
    # a training-like state the probe must leave alone: gradients present
    _loss(model, local).backward()
    sharded = dict(model.named_parameters())  # the DTensors, captured while registered
    before = {n: p.detach().to_local().clone() for n, p in sharded.items()}
    grads = {n: p.grad.to_local().clone() for n, p in sharded.items()}
    with torch.no_grad():  # an eval pass: FSDP2's root keeps its (head's) parameters unsharded after forward
        model(local[0])
    assert not all(hasattr(p, "to_local") for p in model.parameters())
    out["fsdp2"] = _probe(model, local)
    out["restored"] = all(torch.equal(before[n], p.detach().to_local()) for n, p in sharded.items()) and all(
        torch.equal(grads[n], p.grad.to_local()) for n, p in sharded.items()
    )
    with pytest.raises(ValueError, match="hvp='fd'"):
        CurvatureProbe(model, _loss, hvp="autograd")
    dist.barrier()

    # DeepSpeed ZeRO-2: parameters replicated, the engine's module probed with all-reduced products
    import deepspeed

    cfg = {
        "train_micro_batch_size_per_gpu": len(local[0]),
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    m = _model()
    engine, *_ = deepspeed.initialize(model=m, config=cfg, model_parameters=m.parameters())
    assert ProbeLayout.detect(engine).kind == "replicated"
    out["zero2"] = _probe(engine, local)
    engine.destroy()
    cfg["zero_optimization"]["stage"] = 3
    engine, *_ = deepspeed.initialize(model=_model(), config=cfg)
    with pytest.raises(ValueError, match="ZeRO-3"):
        HessianSpectrum(engine, _loss, hvp="fd")
    engine.destroy()
    return out


def _close(a, b, rel, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    if isinstance(a, float):
        a, b = [a], [b]
    scale = max([abs(v) for v in b if math.isfinite(v)] + [1e-30])
    for u, v in zip(a, b):
        if math.isnan(v):
            assert math.isnan(u), what
        else:
            assert abs(u - v) <= rel * scale, (what, a, b)


@pytest.mark.slow
def test_probes_ddp_and_fsdp2_equal_one_process_on_the_global_batch():
    per_rank = run_workers(_worker, WORLD)
    ref = _probe(_model(), _batch())
    # shards really are uneven, and rank 1 holds nothing of the 1-row head
    assert per_rank[0]["rows"]["0.weight"] == (0, 2) and per_rank[1]["rows"]["0.weight"] == (2, 1)
    assert per_rank[1]["rows"]["5.weight"][1] == 0
    for rank, out in enumerate(per_rank):
        assert out["restored"], f"rank {rank}: FSDP2 parameters or gradients changed by the probe"
        for engine in ("ddp", "fsdp2", "zero2"):
            for label in ("per_layer", "all_layers", "eigen"):
                for name, r in ref[label].items():
                    got = out[engine][label][name]
                    what = (rank, engine, label, name)
                    assert got["hvps"] == r["hvps"], what
                    _close(got["loss"], r["loss"], 1e-12, what + ("loss",))
                    _close(got["sigma"], r["sigma"], 1e-10, what + ("sigma",))
                    _close(got["h"], r["h"], REL, what + ("h",))
                    _close(got["h_kfac"], r["h_kfac"], 1e-10, what + ("h_kfac",))
                    _close(got["overlap"], r["overlap"], 1e-5, what + ("overlap",))
                    if math.isfinite(r["alpha"]):
                        assert abs(got["alpha"] - r["alpha"]) <= 1e-5, what + ("alpha",)
            for name, r in ref["spectrum"].items():
                got = out[engine]["spectrum"][name]
                what = (rank, engine, "spectrum", name)
                _close(got["ev"], r["ev"], REL, what + ("eigenvalues",))
                _close(got["trace"], r["trace"], 1e-6, what + ("trace",))
                _close(got["dens"], r["dens"], 1e-4, what + ("density",))
                assert got["hvps"] == r["hvps"], what
    # every rank reports the same numbers (repr: NaN fits compare equal)
    for engine in ("ddp", "fsdp2", "zero2"):
        assert repr(per_rank[0][engine]) == repr(per_rank[1][engine]), engine


def test_split_batch_gives_equal_shares_that_cover_the_kept_batch():
    from spectral_dist.probes.sharding import split_batch

    x, y = torch.arange(10).view(5, 2), torch.arange(5)
    shares = [split_batch((x, y), r, 2) for r in range(2)]
    assert [s[0].shape[0] for s in shares] == [2, 2]  # the 5th sample is dropped: equal shares
    assert torch.equal(torch.cat([s[1] for s in shares]), y[:4])
    d = split_batch({"input_ids": x, "labels": y, "flag": True}, 1, 2)
    assert torch.equal(d["input_ids"], x[2:4]) and d["flag"] is True
    with pytest.raises(ValueError, match="larger probe batch"):
        split_batch(y, 0, 8)
