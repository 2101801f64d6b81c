"""Run a function on N gloo CPU processes and collect what each returns, never hanging.

``run_workers(fn, world_size, *args)`` spawns N processes (torch.multiprocessing, a free port picked by the
OS, OMP_NUM_THREADS=1, process-group timeout 60 s), calls ``fn(rank, world_size, *args)`` in each and
returns the list of results (per rank). A worker's exception is re-raised in the parent with its traceback;
a worker that does not finish within ``timeout`` seconds fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PG_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue, pg_timeout):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout)
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_workers(fn, world_size: int, *args, timeout: float = 240, pg_timeout: float = PG_TIMEOUT_S):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, pg_timeout), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
        if errors:  # the first report is often a peer's timeout; give the rank that failed first a moment
            try:
                while True:
                    rank, status, payload = queue.get(timeout=3)
                    if status != "ok":
                        errors.append(f"rank {rank}:\n{payload}")
            except Exception:  # queue.Empty: nothing more to report
                pass
    except Exception as e:  # queue.Empty: some worker is stuck
        errors.append(
            f"workers did not finish within {timeout} s ({type(e).__name__}); got ranks {sorted(results)}"
        )
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def spectral_ds_config(micro: int, stage: int, **zero) -> dict:
    """A DeepSpeed config for the CPU tests that compare with one process: SpectralNewton from the config (alpha
    by layer, lr 1e-2), ZeRO ``stage`` (``zero``: more zero_optimization keys), no gradient clipping (DeepSpeed's
    default is 1.0; the one-process references do not clip)."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage, **zero},
        "optimizer": {"type": "spectral_newton", "params": {"lr": 1e-2, "alpha": "by_layer"}},
    }
