"""Wall time of the curvature probe in one process against the same probe distributed over ranks.

Distributed, each rank runs the probe's passes on its share of the probe batch (the products are averaged
over ranks), so the probe's cost per rank falls like the batch share while the numbers stay those of one
process on the whole batch (tests/test_probes_dist.py checks equality). This script times
``CurvatureProbe(hvp="fd", top_k, all matrices).measure`` on a small ViT of ``spectral_dist.models`` at 1
rank (plain module), 2 ranks under DDP and 2 ranks under FSDP2 (gloo, one thread per rank). It also times a
training step (forward and backward) at each world size, so the probe is reported in training steps too.
Every timing is the median of ``--repeats`` runs, taken as the max over ranks.

Usage: ``python benchmarks/distributed_probe.py [--batch 64 --top_k 4 --repeats 3]``. On a 2-core machine
only world sizes up to 2 have a core per rank.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dist_helpers import run_workers  # noqa: E402

from spectral_dist import models  # noqa: E402
from spectral_dist.probes import CurvatureProbe  # noqa: E402
from spectral_dist.probes.sharding import split_batch  # noqa: E402

SIZE = dict(image_size=32, patch_size=4, hidden=128, layers=4, heads=4)


def _model():
    torch.manual_seed(0)
    return models.tiny_vit(**SIZE)


def _max_over_ranks(t: float) -> float:
    if not dist.is_initialized():
        return t
    x = torch.tensor([t], dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x[0])


def bench(rank, world, mode, batch_size, top_k, repeats, size=None):
    torch.set_num_threads(1)
    if size:
        SIZE.update(size)
    model = _model()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    batch = models.image_batch(batch_size, channels=3, size=SIZE["image_size"], num_classes=10)
    local = split_batch(batch, rank, world)
    probe = CurvatureProbe(model, models.classification_loss, top_k=top_k, hvp="fd", kfac=False)
    step_t, probe_t = [], []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        models.classification_loss(model, local).backward()
        step_t.append(_max_over_ranks(time.perf_counter() - t0))
        t0 = time.perf_counter()
        rep = probe.measure(local)
        probe_t.append(_max_over_ranks(time.perf_counter() - t0))
    return dict(
        step=statistics.median(step_t),
        probe=statistics.median(probe_t),
        hvps=rep.cost["hvps"],
        layers=len(rep.layers),
        h0=next(iter(rep.layers.values())).h[0].item(),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--top_k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny ViT, batch 8, top_k 2, 1 repeat: a smoke run")
    a = ap.parse_args(argv)
    if a.quick:
        SIZE.update(image_size=8, patch_size=4, hidden=16, layers=1, heads=2)
        a.batch, a.top_k, a.repeats = 8, 2, 1
    args = (a.batch, a.top_k, a.repeats, dict(SIZE))
    rows = [("local", 1, bench(0, 1, "local", *args))]
    for mode in ("ddp", "fsdp2"):
        rows.append((mode, a.world, run_workers(bench, a.world, mode, *args)[0]))
    base = rows[0][2]
    lines = [
        f"ViT {SIZE}, batch {a.batch}, fd HVPs, top_k {a.top_k}, "
        f"{base['layers']} matrices, {base['hvps']} HVPs per probe; {os.cpu_count()} CPU cores "
        f"({platform.machine()}), gloo, 1 thread per rank, torch {torch.__version__}",
        "",
        "| engine | ranks | probe wall (s) | vs 1 rank | train step wall (ms) | probe / train step | h_1 of the first layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, world, r in rows:
        lines.append(
            f"| {mode} | {world} | {r['probe']:.2f} | {r['probe'] / base['probe']:.2f}x | {1e3 * r['step']:.1f} | "
            f"{r['probe'] / r['step']:.0f} | {r['h0']:.6g} |"
        )
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
