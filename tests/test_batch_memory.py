"""Issue 16: the batched step's transient memory. Same-shape matrices are stacked into batches of at most
``max_batch_mb`` of inputs (a batch's workspace is ~7 stacks of its inputs), and Nesterov's M is formed in the
masked copy of the gradient (one allocation per matrix, not two)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectral_dist import SpectralNewton
from spectral_dist.distributed import ShardLocalEngine
from spectral_dist.optim import matrix_step as ms

ROOT = Path(__file__).resolve().parents[1]


class _Job:  # batch_chunks reads only .M
    def __init__(self, M):
        self.M = M


@pytest.mark.parametrize("n, per_chunk_cap, want", [(10, 4, [4, 3, 3]), (8, 4, [4, 4]), (5, 1, [1] * 5)])
def test_batch_chunks_are_balanced_and_under_the_cap(n, per_chunk_cap, want):
    jobs = [_Job(torch.zeros(8, 4)) for _ in range(n)]  # 128 bytes each
    chunks = ms.batch_chunks(jobs, per_chunk_cap * 128 + 127)
    assert [len(c) for c in chunks] == want
    assert [j for c in chunks for j in c] == jobs  # order kept, nothing lost
    assert ms.batch_chunks(jobs, None) == [jobs]
    assert [len(c) for c in ms.batch_chunks(jobs, 1)] == [1] * n  # a matrix larger than the cap: alone


def _model(n: int, shape=(48, 32)) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape) * 0.1) for _ in range(n)] + [
        torch.nn.Parameter(torch.randn(32, 48) * 0.1),
        torch.nn.Parameter(torch.zeros(32)),
    ]


@pytest.mark.parametrize("alpha", [1.0, 2.0, 1.65])  # Polar Express, Cholesky, eigenbasis
def test_capped_batches_match_one_batch(alpha, monkeypatch):
    """With a cap of 3 matrices per batch the step computes in chunks of at most 3 (and the odd-shaped matrix
    alone) and ends where one batch per shape ends (3 steps, parameters and eigenbases)."""
    sizes: list[int] = []
    for name in ("direction_unchecked", "eigenbasis_batched"):
        real = getattr(ms, name)

        def spy(X, *a, _real=real, **k):
            sizes.append(X.shape[0])
            return _real(X, *a, **k)

        monkeypatch.setattr(ms, name, spy)
    per = 48 * 32 * 4
    runs = {}
    for cap_mb in (None, 3 * per / 2**20):
        ps = _model(10)
        opt = SpectralNewton(ps, lr=0.05, alpha=alpha, max_batch_mb=cap_mb)
        sizes.clear()
        for t in range(3):
            g = torch.Generator().manual_seed(t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[cap_mb] = ([p.detach().clone() for p in ps], opt, list(sizes))
    (ref, opt_ref, sizes_ref), (got, opt_got, sizes_got) = runs.values()
    assert max(sizes_ref) == 10 and max(sizes_got) == 3, (sizes_ref, sizes_got)
    assert sorted(sizes_ref) == sorted([10, 1] * 3)
    assert sorted(sizes_got) == sorted([3, 3, 2, 2, 1] * 3)  # balanced chunks, every matrix once
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if alpha == 1.65:
        for p_ref, p_got in zip(ps_of(opt_ref), ps_of(opt_got)):
            Qa = opt_ref.state[p_ref]["tracked"]["basis"]
            Qb = opt_got.state[p_got]["tracked"]["basis"]
            torch.testing.assert_close(Qb, Qa, rtol=1e-4, atol=1e-5)


def ps_of(opt):
    return [p for g in opt.param_groups for p in g["params"] if p.ndim == 2]


@pytest.mark.parametrize("bad", [0, -1, float("nan"), True, "64"])
def test_max_batch_mb_is_checked(bad):
    with pytest.raises(ValueError, match="max_batch_mb must be a positive number of MiB or None"):
        SpectralNewton(_model(1), max_batch_mb=bad)


@pytest.mark.parametrize("engine", ["local", "shard_local"])  # gradients masked on the device / read first
def test_gradients_are_not_written_by_the_step(engine):
    """M is formed in place only in the optimizer's own copy of the gradient, never in the gradient."""
    ps = _model(3)
    kw = {"engine": ShardLocalEngine()} if engine == "shard_local" else {}
    opt = SpectralNewton(ps, lr=0.05, alpha=1.0, **kw)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        before = [p.grad.clone() for p in ps]
        opt.step()
        for p, g in zip(ps, before):
            assert torch.equal(p.grad, g)


PEAK = r"""
import ctypes, json, sys, torch
from spectral_dist import SpectralNewton
torch.set_num_threads(1)
def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
alpha, cap = float(sys.argv[1]), json.loads(sys.argv[2])
torch.manual_seed(0)
ps = [torch.nn.Parameter(torch.randn(512, 512) * 0.02) for _ in range(24)]
opt = SpectralNewton(ps, lr=0.01, alpha=alpha, max_batch_mb=cap)
for p in ps:
    p.grad = torch.randn_like(p)
opt.step(); opt.step()
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak resident size
opt.step()
print(json.dumps((kib("VmHWM") - base) / 1024))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("alpha", [1.0, 2.0, 1.65])
def test_capped_batches_bound_the_step_peak_memory(alpha):
    """Peak resident memory of one step over what was resident before it, 24 matrices 512^2 (24 MiB): one
    batch of them against batches of 2 MiB. Large allocations are mmapped (MALLOC_MMAP_THRESHOLD_) so that freed
    memory leaves the resident size and the peak measures what was live."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    peak = {}
    for cap in (None, 2):
        r = subprocess.run(
            [sys.executable, "-c", PEAK, str(alpha), json.dumps(cap)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        peak[cap] = json.loads(r.stdout.strip().splitlines()[-1])
    params = 24 * 512 * 512 * 4 / 2**20
    assert peak[None] > 4.5 * params, peak  # unbounded: the whole stack's workspace at once
    assert peak[2] < 4.0 * params and peak[2] < 0.6 * peak[None], peak
