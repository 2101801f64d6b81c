"""Issue 16 over a process group: one host sync per step on 2 gloo ranks, whatever the number of matrices,
and the rare paths that read more (a batch whose finite flag fails, a matrix that gets a gradient again)
equal to one process.

One ``run_workers`` call (2 ranks) runs every case; the workers live here (spawn imports this module).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from dist_helpers import run_workers
from test_step_syncs import SYNC_EVENTS, _model, _syncs
from torch import nn
from torch.profiler import ProfilerActivity, profile

from spectral_dist.host_reads import HostReads
from spectral_dist.optim import matrix_step as ms
from spectral_dist.spectral.direction import EIGENBASIS_QR_ENV

COUNT_OPTS = {
    "polar_express": dict(alpha=1.0),
    "cholesky": dict(alpha=2.0),
    "eigenbasis": dict(alpha=0.5),
}


# ------------------------------------------------------------------ the rare paths, against one process
FAIL_AT, LATE_AT, STEPS = 2, 4, 6
_state = {"step": -1}


def _failing_direction_unchecked(real):
    """At step FAIL_AT every batch reports not finite and returns NaN: only the owner's redo can step it."""

    def wrapped(X, *args, **kwargs):
        D, ok = real(X, *args, **kwargs)
        if _state["step"] == FAIL_AT:
            return torch.full_like(D, float("nan")), torch.zeros_like(ok)
        return D, ok

    return wrapped


def _failing_eigenbasis_batched(real):
    def wrapped(X, *args, **kwargs):
        D, Q, ok = real(X, *args, **kwargs)
        if _state["step"] == FAIL_AT:
            return torch.full_like(D, float("nan")), Q, torch.zeros_like(ok)
        return D, Q, ok

    return wrapped


def _run(model, opt, rank, world):
    """STEPS steps of the dist_scenarios Net on its global batch: at FAIL_AT every batched direction fails
    its finite flag; from LATE_AT the unused layer (absent since step 0) gets a gradient again."""
    from dist_scenarios import GLOBAL_BATCH, batch

    per = GLOBAL_BATCH // world
    real, real_eb = ms.direction_unchecked, ms.eigenbasis_batched
    ms.direction_unchecked = _failing_direction_unchecked(real)
    ms.eigenbasis_batched = _failing_eigenbasis_batched(real_eb)
    try:
        for t in range(STEPS):
            _state["step"] = t
            x, y = batch(t)
            x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if t >= LATE_AT:
                g = torch.Generator().manual_seed(t)
                inner = getattr(model, "module", model)
                inner.unused.weight.grad = torch.randn(inner.unused.weight.shape, generator=g)
            opt.step()
    finally:
        ms.direction_unchecked, ms.eigenbasis_batched = real, real_eb
        _state["step"] = -1


def _rare_paths(rank, world, opts) -> dict:
    from dist_scenarios import full_params, make_model, make_opt, max_rel_err, wrap

    from spectral_dist.optim import LocalEngine

    ref_model = make_model()
    ref_opt = make_opt(ref_model, engine=LocalEngine(), **opts)
    _run(ref_model, ref_opt, 0, 1)
    model = make_model()
    wrapped, inner = wrap(model, "ddp")
    opt = make_opt(inner, **opts)
    _run(wrapped, opt, rank, world)
    err, where = max_rel_err(full_params(inner), full_params(ref_model))
    stats = {k: v for k, v in opt.stats().items() if k in ("unused.weight", "fc1.weight")}
    ref_stats = {k: v for k, v in ref_opt.stats().items() if k in ("unused.weight", "fc1.weight")}
    return {"err": err, "where": where, "stats": stats, "ref_stats": ref_stats}


def _count_fsdp2(rank, world) -> tuple[int, int]:
    """(profiler sync events, host reads) in the second step of the dist_scenarios Net under FSDP2 (row shards,
    an empty shard, a frozen and an unused layer), through its real backward, default basis by layer."""
    from dist_scenarios import GLOBAL_BATCH, batch, make_model, make_opt, wrap

    model = make_model()
    wrapped, inner = wrap(model, "fsdp2")
    opt = make_opt(inner, from_model=True, basis="auto")
    per = GLOBAL_BATCH // world
    for t in range(2):
        x, y = batch(t)
        opt.zero_grad()
        nn.functional.mse_loss(
            wrapped(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]
        ).backward()
        if t == 0:
            opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof, HostReads() as reads:
        opt.step()
    return sum(e.name in SYNC_EVENTS for e in prof.events()), reads.count


def sync_worker(rank, world) -> dict:
    out: dict = {"counts": {}, "rare": {}}
    for name, opts in COUNT_OPTS.items():
        # 5 against 17 matrices, the same gradients on every rank (the model's seed fixes the draws)
        out["counts"][name] = [_syncs(_model(n), engine="OwnerEngine", **opts) for n in (2, 8)]
    out["fsdp2"] = _count_fsdp2(rank, world)
    for name, opts in {
        "auto_by_layer": dict(from_model=True, basis="auto"),
        "eigenbasis": dict(alpha=0.5, basis="auto"),
    }.items():
        out["rare"][name] = _rare_paths(rank, world, opts)
    # the eigenbasis with a GPU's QR (float64 CholeskyQR, H100's default), its flags through the exchange
    os.environ[EIGENBASIS_QR_ENV] = "cholesky_fp64"
    try:
        out["rare"]["eigenbasis_cholesky_fp64"] = _rare_paths(rank, world, dict(alpha=0.5, basis="auto"))
        out["rare"]["eigenbasis_cholesky_fp64"]["qr"] = ms.auto_eigenbasis_qr("cpu")
    finally:
        del os.environ[EIGENBASIS_QR_ENV]
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def results():
    return run_workers(sync_worker, 2, timeout=400)


@pytest.mark.parametrize("method", list(COUNT_OPTS))
def test_one_host_sync_per_step_over_a_process_group(results, method):
    """2 ranks, replicated parameters (DDP's layout): the agreement table and every owner's headers are read
    together, one host read per step on every rank, the same for 5 and 17 matrices and no profiler sync event
    (the engine read 3 times per step before: the agreement, the owner's finite flags, the headers)."""
    for rank, res in enumerate(results):
        small, large = res["counts"][method]
        assert small == large, (rank, method, small, large)
        events, reads = large
        assert events == 0, (rank, method, events)
        assert reads <= 1, (rank, method, reads)


def test_one_host_sync_per_step_under_fsdp2(results):
    """FSDP2 row shards through a real backward: the same single read per step."""
    for rank, res in enumerate(results):
        events, reads = res["fsdp2"]
        assert events == 0 and reads <= 1, (rank, events, reads)


@pytest.mark.parametrize("case", ["auto_by_layer", "eigenbasis", "eigenbasis_cholesky_fp64"])
def test_redo_and_late_gradient_paths_equal_one_process(results, case):
    """DDP on 2 ranks against one process, 6 steps: at step 2 every batched direction reports non-finite (NaN
    directions: only the owner's float64 redo can step the matrix, and every rank must apply the redo, not the
    NaN); from step 4 a layer without gradient since step 0 (left out of the exchange) has one again."""
    for rank, res in enumerate(results):
        r = res["rare"][case]
        assert r.get("qr", "cholesky_fp64") == "cholesky_fp64", r["qr"]
        assert r["err"] < 5e-5, (rank, case, r["where"], r["err"])
        assert r["stats"] == r["ref_stats"], (rank, case, r["stats"], r["ref_stats"])
        assert r["stats"]["unused.weight"]["steps"] == STEPS - LATE_AT, r["stats"]
        assert r["stats"]["fc1.weight"]["steps"] == STEPS, r["stats"]
