"""Workers for tests/test_contracts_dist.py (module level: spawned processes import them).

Every case runs the distributed optimizer as a user would and compares with one process on the global batch:
LR schedules after a load_state_dict round trip, non-finite gradients in one shard or on one rank, an error
raised on the owner rank only, an optimizer built (and stepped) on one rank only.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from dist_scenarios import GLOBAL_BATCH, batch, full_params, make_model, max_rel_err, wrap
from torch import nn

from spectral_dist.distributed import local_tensor
from spectral_dist.optim import LocalEngine, SpectralNewton

STEPS = 6
INF_AT = 2  # the step whose gradient gets an Inf


def _opt(model, engine=None):
    return SpectralNewton(
        model.named_parameters(),
        basis="svd",  # compared with one process at 1e-5: the exact basis, not an iteration's round-off
        lr=0.02,
        momentum=0.9,
        weight_decay=0.01,
        adamw_lr=0.01,
        adamw_weight_decay=0.01,
        engine=engine,
    )


def _sched(opt):
    # warmup then cosine, as the recipes do
    def f(s):
        return (s + 1) / 3 if s < 3 else 0.5 * (1 + math.cos(math.pi * (s - 3) / STEPS))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _run(model, wrapped, opt, rank, world, *, inject=None, roundtrip=False, steps=STEPS):
    sched = _sched(opt)
    if roundtrip:  # what accelerator.prepare does to every optimizer
        opt.load_state_dict(opt.state_dict())
    per = GLOBAL_BATCH // world
    for t in range(steps):
        x, y = batch(t)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        opt.zero_grad()
        nn.functional.mse_loss(wrapped(x), y).backward()
        if inject is not None and t == INF_AT:
            inject(model, rank)
        opt.step()
        sched.step()


def _reference(inject=None):
    model = make_model()
    _run(model, model, _opt(model, LocalEngine()), 0, 1, inject=inject)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _inf_in(name, on_rank):
    """Put an Inf into the first local element of ``name``'s gradient on ``on_rank`` (global: rank 0)."""

    def inject(model, rank):
        if rank != on_rank:
            return
        g = local_tensor(dict(model.named_parameters())[name].grad)
        if g.numel():
            g.view(-1)[0] = float("inf")

    return inject


def contracts_worker(rank, world):
    out = {}
    # 1. LR schedule after load_state_dict, DDP and FSDP2
    for mode in ("ddp", "fsdp2"):
        model = make_model()
        wrapped, inner = wrap(model, mode)
        opt = _opt(inner)
        _run(inner, wrapped, opt, rank, world, roundtrip=True)
        got = full_params(inner)
        out[f"schedule_{mode}"] = max_rel_err(got, _reference()) if rank == 0 else None
        dist.barrier()
    # 2. an Inf in one shard / on one rank: the parameter skips that step on every rank
    for mode, name in (
        ("fsdp2", "norm.weight"),
        ("fsdp2", "fc1.weight"),
        ("ddp", "fc2.weight"),
        ("ddp", "norm.bias"),
    ):
        model = make_model()
        wrapped, inner = wrap(model, mode)
        opt = _opt(inner)
        _run(inner, wrapped, opt, rank, world, inject=_inf_in(name, on_rank=1))
        got = full_params(inner)
        stats = opt.stats()
        everyone: list = [None] * world
        dist.all_gather_object(everyone, stats)
        ref = _reference(_inf_in(name, on_rank=0)) if rank == 0 else None
        out[f"inf_{mode}_{name}"] = dict(
            err=max_rel_err(got, ref) if rank == 0 else None,
            skipped=[s[name]["skipped"] for s in everyone],
            same_stats=all(s == everyone[0] for s in everyone),
        )
        dist.barrier()
    # 3. an error on the owner rank only is raised on every rank, and the group stays usable
    out["owner_error"] = _owner_error(rank, world)
    # 4. an optimizer built and stepped on one rank only (an EMA copy): no collective, no hang
    if rank == 0:
        helper = make_model()
        h = SpectralNewton(helper.parameters(), lr=0.01, distributed=False)
        x, y = batch(0)
        nn.functional.mse_loss(helper(x), y).backward()
        h.step()
        SpectralNewton(helper.parameters(), lr=0.01)  # built on one rank with the default: never collective
        out["one_rank"] = type(h._engine).__name__
    dist.barrier()
    t = torch.ones(1)
    dist.all_reduce(t)
    out["group_ok"] = t.item() == world
    return out


def _owner_error(rank, world):
    import spectral_dist.optim.matrix_step as ms
    from spectral_dist.spectral import DecompositionError

    model = make_model()
    wrapped, inner = wrap(model, "ddp")
    opt = _opt(inner)
    x, y = batch(0)
    per = GLOBAL_BATCH // world
    nn.functional.mse_loss(
        wrapped(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]
    ).backward()
    opt.step()  # builds the plan
    target = "fc1.weight"
    owner = opt._engine.plan.owner(target)
    real, real_batched = ms.spectral_direction, ms.direction_unchecked

    def failing(M, *a, **k):
        if M.shape == (7, 48):
            raise DecompositionError("injected failure on the owner")
        return real(M, *a, **k)

    def failing_batched(X, *a, **k):  # the batched, sync-free path the owner tries first
        if tuple(X.shape[-2:]) == (7, 48):
            raise DecompositionError("injected failure on the owner")
        return real_batched(X, *a, **k)

    if rank == owner:
        ms.spectral_direction = failing
        ms.direction_unchecked = failing_batched
    errors = []
    try:
        for _ in range(ms.MAX_DECOMPOSITION_FAILURES):
            nn.functional.mse_loss(
                wrapped(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]
            ).backward()
            try:
                opt.step()
                errors.append(None)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")
            opt.zero_grad()
    finally:
        ms.spectral_direction, ms.direction_unchecked = real, real_batched
    return dict(owner=owner, errors=errors, counters=opt.stats()[target])
