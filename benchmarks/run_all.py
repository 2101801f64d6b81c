"""Run every benchmark of issue 8 with one command (each in its own process, one after another).

1. ``step_overhead.py``: full training step of SpectralNewton (each basis) against AdamW and Muon, ViT and GPT;
2. ``sample_efficiency.py``: steps to target accuracy / loss, SpectralNewton against AdamW and Muon;
3. ``distributed_scaling.py``: the sharded optimizer step at 1, 2, 4 ranks and state bytes per rank.

    python benchmarks/run_all.py              # full budgets (15 min on an idle 2-core CPU, reproduce included)
    python benchmarks/run_all.py --write      # ... and append the results to benchmarks/RESULTS.md
    python benchmarks/run_all.py --quick      # smoke run of every script (about a minute)

``--reproduce`` also runs ``spectral-dist reproduce --quick``. Exit status is non-zero if any script failed.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHMARKS = ("step_overhead", "sample_efficiency", "distributed_scaling")


def commands(quick: bool, write: bool, out_dir: Path, reproduce: bool) -> list[tuple[str, list[str]]]:
    """(name, argv) of each script to run."""
    py = sys.executable
    flags = (["--quick"] if quick else []) + (["--write"] if write else [])
    dist = [py, str(HERE / "distributed_scaling.py"), "--out", str(out_dir / "distributed_scaling.md")]
    if quick:
        dist += ["--width", "32", "--depth", "2", "--steps", "2", "--warmup", "1", "--worlds", "1", "2"]
    se = [py, str(HERE / "sample_efficiency.py"), *flags, "--json", str(out_dir / "sample_efficiency.json")]
    cmds = [
        ("step_overhead", [py, str(HERE / "step_overhead.py"), *flags]),
        ("sample_efficiency", se),
        ("distributed_scaling", dist),
    ]
    if reproduce:
        rq = [
            py,
            "-m",
            "spectral_dist.cli",
            "reproduce",
            "--quick",
            "--output_dir",
            str(out_dir / "reproduce"),
        ]
        cmds.append(("reproduce", rq + (["--steps", "20", "--top_k", "4"] if quick else [])))
    return cmds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-run every script on tiny settings")
    ap.add_argument("--write", action="store_true", help="append every result to benchmarks/RESULTS.md")
    ap.add_argument("--only", nargs="*", default=None, choices=[*BENCHMARKS, "reproduce"])
    ap.add_argument("--reproduce", action="store_true", help="also run `spectral-dist reproduce --quick`")
    ap.add_argument("--out_dir", default="outputs/benchmarks")
    a = ap.parse_args(argv)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    t_all = time.perf_counter()
    for name, cmd in commands(a.quick, a.write, out_dir, a.reproduce or a.only == ["reproduce"]):
        if a.only and name not in a.only:
            continue
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
        elif name == "distributed_scaling" and a.write:
            table = (out_dir / "distributed_scaling.md").read_text()
            stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
            with (HERE / "RESULTS.md").open("a") as f:
                f.write(f"\n### Distributed scaling (via run_all.py) — {stamp}\n\n{table}\n")
    total = time.perf_counter() - t_all
    print(f"run_all: {total:.0f} s in all", flush=True)
    if a.write and not failed:
        stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        with (HERE / "RESULTS.md").open("a") as f:
            f.write(
                f"\n`python benchmarks/run_all.py {' '.join(sys.argv[1:])}` finished in {total:.0f} s ({stamp}).\n"
            )
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
