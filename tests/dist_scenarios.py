"""Worker functions for the multi-process tests (imported by spawned processes, so kept at module level).

The model has every awkward case at once: a conv kernel with 3 output channels (an empty row shard at 4
ranks), a 7 x 48 matrix (rows not divisible by the world size), a 1 x 5 matrix (one non-empty shard), a
layer that gets no gradient, a frozen layer, and LayerNorm/bias vectors that go to AdamW.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from spectral_dist.optim import LocalEngine, SpectralNewton

GLOBAL_BATCH = 8
STEPS = 10


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1 = nn.Linear(48, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 5)
        self.frozen = nn.Linear(5, 5)
        self.one = nn.Linear(5, 1, bias=False)
        self.unused = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        h = self.norm(torch.tanh(self.fc1(h)))
        h = torch.tanh(self.frozen(torch.tanh(self.fc2(h))))
        return self.one(h)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net()


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 2, 4, 4, generator=g)
    y = torch.randn(GLOBAL_BATCH, 1, generator=g)
    return x, y


def make_opt(model, engine=None, **opts) -> SpectralNewton:
    """SpectralNewton over named parameters (every matrix spectral), or ``from_model`` with ``from_model=True``
    (by-layer alpha; the 1 x 5 output layer becomes an AdamW head)."""
    base = dict(lr=0.02, weight_decay=0.01, adamw_lr=0.01, adamw_weight_decay=0.01, momentum=0.9)
    base["basis"] = "svd"  # compared with one process at 1e-5: the exact basis (tests pass others explicitly)
    base.update(opts)
    if base.pop("from_model", False):
        return SpectralNewton.from_model(model, engine=engine, **base)
    return SpectralNewton(model.named_parameters(), engine=engine, **base)


def train_steps(model, opt, steps, rank=0, world=1, start=0, around_step=contextlib.nullcontext):
    """``steps`` steps on this rank's share of the global batch; ``around_step``: a context for each opt.step().
    Returns the losses (0-d tensors, not read: no host sync added)."""
    losses = []
    for t in range(start, start + steps):
        x, y = batch(t)
        per = GLOBAL_BATCH // world
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        loss = nn.functional.mse_loss(model(x).float(), y)  # .float(): a bf16 forward (mixed precision)
        opt.zero_grad()
        loss.backward()
        with around_step():
            opt.step()
        losses.append(loss.detach())
    return losses


def reference_params(steps=STEPS, **opts) -> dict[str, torch.Tensor]:
    """Single-process run on the global batch, LocalEngine."""
    model = make_model()
    opt = make_opt(model, engine=LocalEngine(), **opts)
    train_steps(model, opt, steps)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def wrap(model, mode: str, **fsdp_kw):
    """DDP, or FSDP2 on the root module (``fsdp_kw``: fully_shard's options, e.g. ``mp_policy``)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, find_unused_parameters=True), model
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(model, mesh=mesh, **fsdp_kw)
        return model, model
    raise ValueError(mode)


def full_params(model) -> dict[str, torch.Tensor]:
    """Full parameters (collective for DTensors), names without wrapper prefixes."""
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n.removeprefix("module.")] = t.detach().clone()
    return out


def max_rel_err(got: dict, ref: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for n, r in ref.items():
        e = float((got[n] - r).abs().max() / r.abs().max().clamp_min(1e-12))
        if e > worst:
            worst, where = e, n
    return worst, where


def equality_worker(rank, world, scenarios):
    """Per scenario (mode, opts): train 10 steps distributed, compare with the single-process run on rank 0.

    Returns per scenario: (max relative error, worst parameter, state bytes on this rank, ownership check).
    """
    from torch.distributed.tensor import DTensor

    from spectral_dist.distributed.engine import DistributedEngine, state_bytes

    results = []
    for mode, opts in scenarios:
        model = make_model()
        wrapped, inner = wrap(model, mode)
        opt = make_opt(inner, **opts)
        train_steps(wrapped, opt, STEPS, rank, world)
        assert isinstance(opt._engine, DistributedEngine), type(opt._engine)
        got = full_params(inner)
        # every rank holds the state of every stepped parameter, in the parameter's own layout
        layout_ok = True
        for _name, p, g in opt.named_params():
            st = opt.state.get(p, {})
            stepped = p.requires_grad  # every trainable parameter, gradient or not (same keys everywhere)
            key = "momentum_buffer" if opt.is_matrix(p, g) else "exp_avg"
            if (key in st) != stepped:
                layout_ok = False
            if key in st:
                buf = st[key]
                if isinstance(p, DTensor) != isinstance(buf, DTensor) or tuple(buf.shape) != tuple(p.shape):
                    layout_ok = False
                if isinstance(p, DTensor) and buf.to_local().shape != p.to_local().shape:
                    layout_ok = False
            if opts.get("basis") == "tracked" and opt.is_matrix(p, g) and stepped:
                layout_ok &= "basis" in st.get("tracked", {})
        err = (None, None)
        if rank == 0:
            err = max_rel_err(got, reference_params(**opts))
        results.append((err[0], err[1], state_bytes(opt), layout_ok))
        dist.barrier()
    return results


def save_worker(rank, world, path, mode, steps, opts):
    """Train ``steps`` steps and write a DCP checkpoint of model and optimizer."""
    from spectral_dist.distributed.checkpoint import save_checkpoint

    model = make_model()
    wrapped, inner = wrap(model, mode)
    opt = make_opt(inner, **opts)
    train_steps(wrapped, opt, steps, rank, world)
    save_checkpoint(path, inner, opt)


def resume_worker(rank, world, path, mode, start, steps, opts):
    """Load the checkpoint into a differently initialised model, train on; rank 0 returns the error against an
    uninterrupted single-process run of ``start + steps`` steps."""
    from spectral_dist.distributed.checkpoint import load_checkpoint

    model = make_model(seed=123)
    wrapped, inner = wrap(model, mode)
    opt = make_opt(inner, lr=0.5, **opts)  # hyperparameters come back from the checkpoint
    load_checkpoint(path, inner, opt)
    train_steps(wrapped, opt, steps, rank, world, start=start)
    got = full_params(inner)
    if rank == 0:
        return max_rel_err(got, reference_params(steps=start + steps, **opts))
    return None


def errors_worker(rank, world):
    """Faults that must raise on every rank, naming the parameter, instead of hanging.

    Returns the messages per case: a matrix missing on rank 1, a gradient present on rank 0 only, and (last,
    since it leaves the group unusable) rank 1 never calling step() so rank 0's collective times out.
    """
    import time

    out = {}
    model = make_model()
    named = [(n, p) for n, p in model.named_parameters() if not (rank == 1 and n == "fc2.weight")]
    x, y = batch(0)
    try:
        opt = SpectralNewton(named, lr=0.01)  # construction is never collective: the check runs at step()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        out["missing"] = None
    except Exception as e:
        out["missing"] = f"{type(e).__name__}: {e}"
    model.zero_grad()

    # rank 1 computes another owner plan (as a nondeterministic planner would): the hash check catches it
    import spectral_dist.distributed.engine as engine_mod

    real_build_plan = engine_mod.build_plan

    def skewed(layouts, world_size, costs=None):
        plan = real_build_plan(layouts, world_size, costs)
        owners = {k: (o + 1) % world_size for k, o in plan.owners.items()}
        return type(plan)(plan.layouts, owners, world_size, plan.costs)

    if rank == 1:
        engine_mod.build_plan = skewed
    try:
        opt = make_opt(model)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        out["plan_hash"] = None
    except Exception as e:
        out["plan_hash"] = f"{type(e).__name__}: {e}"
    finally:
        engine_mod.build_plan = real_build_plan
    model.zero_grad()

    opt = make_opt(model)
    nn.functional.mse_loss(model(x), y).backward()
    if rank == 1:
        model.fc2.weight.grad = None
    try:
        opt.step()
        out["partial_grad"] = None
    except Exception as e:
        out["partial_grad"] = f"{type(e).__name__}: {e}"

    # a subgroup with a short timeout, so the hang case costs seconds rather than the default group's 60 s
    import datetime

    from spectral_dist.distributed.engine import DistributedEngine

    sub = dist.new_group(timeout=datetime.timedelta(seconds=4))
    opt = make_opt(model)
    opt._engine = DistributedEngine(group=sub)
    nn.functional.mse_loss(model(x), y).backward()
    if rank == 0:
        t = time.time()
        try:
            opt.step()
            out["timeout"] = None
        except Exception as e:
            out["timeout"] = f"{type(e).__name__}: {e}"
        out["timeout_s"] = time.time() - t
    else:
        time.sleep(8)
    return out


EQ_SCENARIOS = [
    ("ddp", {}),
    ("ddp", {"basis": "tracked", "rank": 2, "refresh_every": 3}),
    ("fsdp2", {}),
    ("fsdp2", {"basis": "tracked", "rank": 2, "refresh_every": 3}),
    ("fsdp2", {"from_model": True}),  # by-layer alpha: conv 2, fc1 (mlp_up) 2, fc2 (mlp_down) 1
    # the default basis by layer: cholesky (conv, fc1), polar express (fc2)
    ("fsdp2", {"from_model": True, "basis": "auto"}),
    # the eigenbasis (a basis kept on every rank) at an alpha where it is well conditioned
    ("fsdp2", {"alpha": 0.5, "basis": "eigenbasis"}),
]
CKPT_OPTS = {"basis": "tracked", "rank": 2, "refresh_every": 3}
CKPT_AT = 5


def phase_worker(rank, world, ckpt_dir, resume_from, save, errors):
    """One process group runs several scenarios, to pay the spawn cost once:

    equality against the single-process run for every entry of EQ_SCENARIOS; resuming each mode from
    ``resume_from`` (a checkpoint written by another world size) and from a checkpoint written in this group
    (same world size); writing ``<ckpt_dir>/<mode>_w<world>`` for the next phase; the fault cases last.
    """
    out = {"equality": equality_worker(rank, world, EQ_SCENARIOS), "resume": {}}
    for mode in ("ddp", "fsdp2"):
        if save:
            path = f"{ckpt_dir}/{mode}_w{world}"
            save_worker(rank, world, path, mode, CKPT_AT, CKPT_OPTS)
            out["resume"][(mode, world, world)] = resume_worker(
                rank, world, path, mode, CKPT_AT, STEPS - CKPT_AT, CKPT_OPTS
            )
        if resume_from is not None:
            src = f"{ckpt_dir}/{mode}_w{resume_from}"
            out["resume"][(mode, resume_from, world)] = resume_worker(
                rank, world, src, mode, CKPT_AT, STEPS - CKPT_AT, CKPT_OPTS
            )
        dist.barrier()
    if save and resume_from is None:
        out["shard_local"] = shard_local_worker(rank, world)
        out["trajectory"] = trajectory_worker(rank, world)
    if errors:
        out["errors"] = errors_worker(rank, world)
    return out


def shard_local_worker(rank, world):
    """The opt-in approximate mode: runs, keeps shard-shaped state, and differs from the exact result."""
    from spectral_dist.distributed.engine import ShardLocalEngine

    model = make_model()
    wrapped, inner = wrap(model, "fsdp2")
    opt = make_opt(inner, engine=ShardLocalEngine())
    train_steps(wrapped, opt, STEPS, rank, world)
    got = full_params(inner)
    shapes = {
        n: tuple(opt.state[p]["momentum_buffer"].to_local().shape)
        for n, p, _ in opt.named_params()
        if "momentum_buffer" in opt.state.get(p, {})
    }
    finite = all(bool(torch.isfinite(t).all()) for t in got.values())
    err = max_rel_err(got, reference_params())[0] if rank == 0 else None
    return dict(shapes=shapes, finite=finite, err=err)


def _traj_run(model, wrapped, opt, rank, world, steps=6):
    from spectral_dist.diagnostics import TrajectoryMonitor

    mon = TrajectoryMonitor(
        model,
        sketch_dim=16,
        window=4,
        every=1,
        seed=3,
        kind="gaussian",
        distributed="auto" if world > 1 else False,
    )
    for t in range(steps):
        x, y = batch(t)
        per = GLOBAL_BATCH // world
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        opt.zero_grad()
        nn.functional.mse_loss(wrapped(x), y).backward()
        mon.update()
        opt.step()
    return mon.to_log_dict()


def trajectory_worker(rank, world):
    """TrajectoryMonitor next to the sharded optimizer under DDP and FSDP2: its log equals the single-process
    run's on the global batch (rank 0 returns the worst relative difference per mode)."""
    out = {}
    for mode in ("ddp", "fsdp2"):
        model = make_model()
        wrapped, inner = wrap(model, mode)
        got = _traj_run(inner, wrapped, make_opt(inner), rank, world)
        if rank == 0:
            ref_model = make_model()
            ref = _traj_run(ref_model, ref_model, make_opt(ref_model, engine=LocalEngine()), 0, 1)
            assert set(ref) == set(got), sorted(set(ref) ^ set(got))
            worst = max(abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-6) for k in ref)
            out[mode] = (worst, len(ref))
        dist.barrier()
    return out
