"""Workers for tests/test_2d.py: SpectralNewton on 2-D device meshes (4 gloo processes, a 2 x 2 mesh).

* ``tp_fsdp``: torchtitan's layout. Tensor parallel over the "tp" dimension (``ColwiseParallel`` q/k/v and MLP
  up, ``RowwiseParallel`` attention out and MLP down: Shard(0) and Shard(1) weights), then ``fully_shard`` over
  the "dp" dimension, which shards the TP weights again (``_StridedShard`` for the colwise ones).
* ``hsdp``: ``fully_shard`` on a (replicate, shard) mesh.

The batch is split over the data-parallel dimension; the reference is one process on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from spectral_dist.optim import LocalEngine, SpectralNewton

D, HEADS, T, B = 8, 2, 3, 4  # model width, heads, sequence length, global batch
STEPS, SAVE_AT = 4, 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        # no key bias: softmax ignores it, so its gradient is round-off and AdamW would amplify that noise
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.o = nn.Linear(D, D)
        self.up = nn.Linear(D, 3 * D)
        self.down = nn.Linear(3 * D, D)

    def forward(self, x):
        h = self.norm(x)
        b, t, _ = h.shape
        q, k, v = (f(h).view(b, t, -1, D // HEADS).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5, dim=-1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(D, D)  # full width: a narrow head makes the block gradients rank-deficient

    def forward(self, x):
        return self.head(self.block(x))


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net().to(DTYPE)


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(B, T, D, generator=g, dtype=DTYPE), torch.randn(B, T, D, generator=g, dtype=DTYPE)


OPTS = dict(lr=0.02, momentum=0.9, weight_decay=0.01, adamw_lr=0.01, basis="tracked", rank=3, refresh_every=2)
DTYPE = torch.float64  # a tracked rank-3 basis amplifies float32 round-off of the reduction order to ~1e-2


def make_opt(model, engine=None):
    return SpectralNewton(model.named_parameters(), engine=engine, **OPTS)


def shard(model, layout: str):
    """Apply a 2-D layout; returns (data-parallel index, data-parallel size)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if layout == "tp_fsdp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        plan = {
            "q": ColwiseParallel(),
            "k": ColwiseParallel(),
            "v": ColwiseParallel(),
            "o": RowwiseParallel(),
            "up": ColwiseParallel(),
            "down": RowwiseParallel(),
        }
        parallelize_module(model.block, mesh["tp"], plan)
        fully_shard(model.block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        return mesh["dp"].get_local_rank(), 2
    if layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(model.block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return dist.get_rank(), 4
    if layout == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh as idm

        fully_shard(model, mesh=idm("cpu", (dist.get_world_size(),)))
        return dist.get_rank(), dist.get_world_size()
    raise ValueError(layout)


def train(model, opt, steps, dp_index, dp_size):
    for t in steps:
        x, y = batch(t)
        per = B // dp_size
        x, y = x[dp_index * per : (dp_index + 1) * per], y[dp_index * per : (dp_index + 1) * per]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def full(model):
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def reference(steps=STEPS):
    model = make_model()
    train(model, make_opt(model, LocalEngine()), range(steps), 0, 1)
    return full(model)


def rel_err(got, ref):
    worst, where = 0.0, ""
    for n, r in ref.items():
        e = float((got[n] - r).abs().max() / r.abs().max().clamp_min(1e-12))
        if e > worst:
            worst, where = e, n
    return worst, where


def _bytes_worker(model, opt, dp_index, dp_size):
    """Bytes this rank puts into the exchange's all_to_all calls in one step, next to the ideal."""
    from spectral_dist.distributed import exchange

    sent = []
    real = dist.all_to_all_single

    def counting(out, inp, *a, **k):
        sent.append(inp.numel() * inp.element_size())
        return real(out, inp, *a, **k)

    exchange.dist.all_to_all_single = counting
    try:
        train(model, opt, [STEPS], dp_index, dp_size)
    finally:
        exchange.dist.all_to_all_single = real
    plan, rank = opt._engine.plan, dist.get_rank()
    ideal_gather = ideal_scatter = 0
    for lay in plan.layouts:
        owner = plan.owner(lay.key)
        if owner != rank:  # every distinct piece reaches the owner once; count what this rank must send
            ideal_gather += sum(r.length for r in plan.routes[lay.key] if r.src == rank)
        else:
            ideal_scatter += sum(lay.local_numel(d) for d in range(plan.world_size) if d != rank)
    owned_here = len(plan.owned(rank))
    headers = 3 * owned_here * (plan.world_size - 1)
    rank_r = OPTS["rank"] if OPTS["basis"] == "tracked" else 0
    extras = sum(
        lay.shape[1] * min(rank_r, *lay.shape) for lay in plan.layouts if plan.owner(lay.key) == rank
    )
    extras *= plan.world_size - 1
    size = torch.finfo(DTYPE).bits // 8
    return dict(
        sent=sent,
        ideal=(ideal_gather + ideal_scatter) * size,
        headers=headers * size,
        bases=extras * size,
        distinct_sources=all(
            len({(r.piece.offset, r.piece.count) for r in plan.routes[k]}) == len(plan.routes[k])
            for k in plan.by_key
        ),
    )


def worker(rank, world, ckpt_dir):
    from spectral_dist.distributed.checkpoint import load_checkpoint, save_checkpoint

    out = {}
    ref = reference() if rank == 0 else None
    for layout in ("tp_fsdp", "hsdp"):
        model = make_model()
        dp_index, dp_size = shard(model, layout)
        opt = make_opt(model)
        placements = {n: str(p.placements) for n, p in model.named_parameters()}
        train(model, opt, range(STEPS), dp_index, dp_size)
        got = full(model)
        res = dict(placements=placements, err=rel_err(got, ref) if rank == 0 else None)
        # kill/resume through DCP on the same mesh
        model = make_model()
        dp_index, dp_size = shard(model, layout)
        opt = make_opt(model)
        train(model, opt, range(SAVE_AT), dp_index, dp_size)
        path = f"{ckpt_dir}/{layout}"
        save_checkpoint(path, model, opt)
        model2 = make_model(seed=7)
        dp_index, dp_size = shard(model2, layout)
        opt2 = make_opt(model2)
        load_checkpoint(path, model2, opt2)
        train(model2, opt2, range(SAVE_AT, STEPS), dp_index, dp_size)
        resumed = full(model2)
        res["resume_err"] = rel_err(resumed, got) if rank == 0 else None
        # another mesh: DCP reshards the model's and the optimizer's DTensors onto 1-D FSDP over 4 ranks
        model3 = make_model(seed=9)
        dp_index, dp_size = shard(model3, "fsdp")
        opt3 = make_opt(model3)
        load_checkpoint(path, model3, opt3)
        train(model3, opt3, range(SAVE_AT, STEPS), dp_index, dp_size)
        resharded = full(model3)  # collective: every rank
        res["reshard_err"] = rel_err(resharded, got) if rank == 0 else None
        res["sketch_err"] = _sketch_check(model2, *shard_dp(layout))
        try:  # the curvature probes need row blocks on a 1-D mesh: a clear refusal, not a wrong answer
            from spectral_dist.probes.sharding import ProbeLayout

            ProbeLayout.detect(model2)
            res["probe_error"] = None
        except ValueError as e:
            res["probe_error"] = str(e)
        res["bytes"] = _bytes_worker(model2, opt2, *shard_dp(layout))
        out[layout] = res
        dist.barrier()
    return out


def _sketch_check(model, dp_index, dp_size):
    """Seeded sketches of the sharded gradients, summed over ranks, equal the sketch of the full gradients."""
    from spectral_dist.diagnostics import GradientSketch

    x, y = batch(0)
    per = B // dp_size
    model.zero_grad()
    nn.functional.mse_loss(
        model(x[dp_index * per : (dp_index + 1) * per]), y[dp_index * per : (dp_index + 1) * per]
    ).backward()
    sk = GradientSketch(dim=16, seed=1, kind="gaussian")
    named = [(n, p.grad) for n, p in model.named_parameters()]
    mine = sk.sketch(named)
    dist.all_reduce(mine)
    full_grads = [(n, g.full_tensor()) for n, g in named]  # collective
    want = sk.sketch(full_grads)
    return float((mine - want).abs().max() / want.abs().max())


def shard_dp(layout):
    if layout == "tp_fsdp":
        return dist.get_rank() // 2, 2
    return dist.get_rank(), 4
