"""Merge saved ``mutmut results --all true`` listings: a full run, then re-runs of some of its mutants.

mutmut 3 forgets earlier results when it is re-run on selected mutants after the tests changed (the others come
back as "not checked"), so a partial re-run is recorded as its own listing and merged here. Later files win for
every mutant they report as checked (any status but "not checked"); the first file fixes the set of mutants.

Usage (checkout root): ``python tests/mutation/merge.py FULL RERUN [RERUN ...] > merged.txt``, then
``python tests/mutation/score.py --results merged.txt``.
"""

from __future__ import annotations

import sys


def _read(path: str) -> dict[str, str]:
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if "__mutmut_" in line:
                name, status = line.strip().rsplit(": ", 1)
                rows[name] = status
    return rows


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        print(__doc__, file=sys.stderr)
        return 2
    merged = _read(argv[0])
    for path in argv[1:]:
        for name, status in _read(path).items():
            if name in merged and status != "not checked":
                merged[name] = status
    for name, status in merged.items():
        print(f"    {name}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
