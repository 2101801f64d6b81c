"""Mutation score per file from ``mutmut results --all true`` (run from the checkout root after ``mutmut run``).

Prints, per mutated file and in total: mutants, killed (incl. timeouts), survived, no tests, not checked, and
killed / mutants. Usage: ``python tests/mutation/score.py [--md] [--list] [--results FILE]`` (``--md``: a
Markdown table; ``--list``: every mutant not killed; ``--results``: read a saved ``mutmut results --all true``
listing, e.g. one written by ``tests/mutation/merge.py``, instead of asking mutmut).
"""

from __future__ import annotations

import collections
import subprocess
import sys

KILLED = {"killed", "timeout"}


def results_text(argv: list[str]) -> str:
    """``mutmut results --all true``, or the file after ``--results`` in argv."""
    if "--results" in argv:
        with open(argv[argv.index("--results") + 1], encoding="utf-8") as f:
            return f.read()
    return subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def main(argv: list[str]) -> int:
    out = results_text(argv)
    rows = [line.strip().rsplit(": ", 1) for line in out.splitlines() if "__mutmut_" in line]
    per_file: dict = collections.defaultdict(collections.Counter)
    for name, status in rows:
        parts = name.split(".")
        i = next(k for k, p in enumerate(parts) if p.startswith(("x_", "xǁ")))
        per_file["/".join(parts[:i]) + ".py"][status] += 1
    total: collections.Counter = collections.Counter()
    md = "--md" in argv
    if md:
        print("| file | mutants | killed | survived | no tests | not checked | killed / mutants |")
        print("|---|---:|---:|---:|---:|---:|---:|")
    else:
        print(f"{'file':52} {'mutants':>7} {'killed':>6} {'surv.':>6} {'no t.':>6} {'n.c.':>6} {'score':>6}")
    for f in sorted(per_file):
        c = per_file[f]
        total.update(c)
        _row(f, c, md)
    _row("total", total, md)
    if "--list" in argv:
        for name, status in rows:
            if status not in KILLED:
                print(f"{status:12} {name}")
    return 0


def _row(label: str, c: collections.Counter, md: bool = False) -> None:
    n = sum(c.values())
    k = sum(c[s] for s in KILLED)
    if md:
        cells = [n, k, c["survived"], c["no tests"], c["not checked"]]
        print(f"| {label} | " + " | ".join(map(str, cells)) + f" | {100 * k / max(1, n):.1f}% |")
        return
    print(
        f"{label:52} {n:7} {k:6} {c['survived']:6} {c['no tests']:6} {c['not checked']:6} {100 * k / max(1, n):5.1f}%"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
