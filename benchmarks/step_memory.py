"""Issue 16: the transient memory of one optimizer step, SpectralNewton against torch AdamW (foreach) and a batched
fp32 Muon, and the effect of ``max_batch_mb`` (the most MiB of same-shape inputs stacked into one batch).

Each optimizer runs in its own process on ``--matrices`` matrices of ``--width``^2 (fp32, random gradients):
two steps build its state, then the peak resident memory of the third step over what was resident before it is
read from Linux's VmHWM (reset through /proc/self/clear_refs). Large allocations are mmapped
(MALLOC_MMAP_THRESHOLD_=65536), so freed memory leaves the resident size and the peak measures what was live.
``--device cuda``: the CUDA caching allocator's peak (torch.cuda.max_memory_allocated) instead, in one process
(benchmarks/gpu/run.sh's ``memory`` stage).

Usage: ``python benchmarks/step_memory.py [--matrices 32 --width 1024 --caps none 256 16 --write]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("adamw", "muon", "sn_alpha1", "sn_alpha2", "sn_alpha1.65")
METHOD = {"sn_alpha1": "polar_express", "sn_alpha2": "cholesky", "sn_alpha1.65": "eigenbasis"}


def _setup(name: str, matrices: int, width: int, cap, device="cpu"):
    """(parameters with gradients, optimizer after the two steps that build its state)."""
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_cost import BatchedMuon

    from spectral_dist import SpectralNewton

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(width, width, device=device) * 0.02) for _ in range(matrices)]
    if name == "adamw":
        opt = torch.optim.AdamW(ps, lr=1e-3, foreach=True)
    elif name == "muon":
        opt = BatchedMuon(ps, lr=0.02)
    else:
        opt = SpectralNewton(ps, lr=1e-3, alpha=float(name.removeprefix("sn_alpha")), max_batch_mb=cap)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    return ps, opt


def child(name: str, matrices: int, width: int, cap) -> dict:
    """One optimizer's step peak on CPU, in this (fresh) process."""
    import ctypes
    import time

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    def kib(key: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {key}")

    _, opt = _setup(name, matrices, width, cap)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM
    t0 = time.perf_counter()
    opt.step()
    seconds = time.perf_counter() - t0
    return {"peak_mib": (kib("VmHWM") - base) / 1024, "seconds": seconds}


def cuda_peak(name: str, matrices: int, width: int, cap, device) -> dict:
    """One optimizer's step peak on a CUDA device: torch.cuda.max_memory_allocated over the allocated bytes
    before the step (in this process; the caching allocator's own peak, not the driver's)."""
    import time

    import torch

    ps, opt = _setup(name, matrices, width, cap, device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    opt.step()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    del ps, opt
    torch.cuda.empty_cache()
    return {"peak_mib": peak, "seconds": seconds}


def measure(name: str, matrices: int, width: int, cap, threads: int, device: str = "cpu") -> dict:
    if device != "cpu":
        return cuda_peak(name, matrices, width, cap, device)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--child", name, "--matrices", str(matrices), "--width", str(width)]
    cmd += ["--cap", json.dumps(cap)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{name} (cap {cap}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def eigenbasis_qr(device: str) -> str:
    """The eigenbasis QR the children use on ``device`` (by device, or SPECTRAL_DIST_EIGENBASIS_QR)."""
    sys.path.insert(0, str(ROOT))
    from spectral_dist.spectral.direction import auto_eigenbasis_qr

    return auto_eigenbasis_qr(device)


def table(rows: list[dict], params_mib: float, qr: str = "householder") -> str:
    adamw = next((r["peak_mib"] for r in rows if r["optimizer"] == "adamw"), None)
    lines = [
        "| optimizer | basis | max_batch_mb | step peak (MiB) | / matrices' size | / adamw | step (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cap = (
            "-" if r["optimizer"] in ("adamw", "muon") else ("none" if r["cap"] is None else f"{r['cap']:g}")
        )
        basis = METHOD.get(r["optimizer"], "-")
        if basis == "eigenbasis":  # its QR depends on the device (and SPECTRAL_DIST_EIGENBASIS_QR)
            basis += f" ({qr} QR)"
        vs_adamw = "-" if adamw is None else f"{r['peak_mib'] / max(adamw, 1e-9):.2f}x"
        lines.append(
            f"| {r['optimizer']} | {basis} | {cap} | {r['peak_mib']:.0f} | "
            f"{r['peak_mib'] / params_mib:.2f}x | {vs_adamw} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrices", type=int, default=32)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--caps", nargs="*", default=["none", "256", "16"], help="max_batch_mb values ('none')")
    ap.add_argument("--only", nargs="*", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (peak resident size) or cuda (the allocator's peak)")
    ap.add_argument("--quick", action="store_true", help="16 matrices of 256^2, caps none and 1: seconds")
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cap", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.matrices, a.width, json.loads(a.cap))))
        return {}
    if a.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise SystemExit(
            "step_memory.py reads Linux's /proc/self/status and /proc/self/clear_refs; run it on Linux"
        )
    if a.quick:
        a.matrices, a.width, a.caps = 16, 256, ["none", "1"]
    caps = [None if c == "none" else float(c) for c in a.caps]
    params_mib = a.matrices * a.width**2 * 4 / 2**20
    rows = []
    for name in a.only:
        for cap in caps if name.startswith("sn_") else [None]:
            r = measure(name, a.matrices, a.width, cap, a.threads, a.device)
            rows.append({"optimizer": name, "cap": cap, **r})
            print(f"{name:14s} cap {cap}: peak {r['peak_mib']:.0f} MiB, {r['seconds']:.2f} s", flush=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/step_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.device == "cpu":
        where, how = f"{platform.machine()}, {a.threads} threads, CPU", "peak resident size"
    else:
        import torch

        where, how = f"GPU {torch.cuda.get_device_name(a.device)}", "the CUDA allocator's peak"
    text = (
        f"`{cmd.strip()}` ({when}, {where}): transient memory of one optimizer step on {a.matrices} matrices "
        f"of {a.width}^2 fp32 ({params_mib:.0f} MiB), {how} over what was allocated before the step\n\n"
        + table(rows, params_mib, eigenbasis_qr(a.device))
    )
    print("\n" + text)
    if a.write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + text + "\n")
    out = {"matrices": a.matrices, "width": a.width, "params_mib": params_mib, "rows": rows, "markdown": text}
    out["device"] = a.device
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
