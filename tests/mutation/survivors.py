"""The mutants that a ``mutmut run`` left alive, as Markdown: one row per mutant with its diff and a category.

Usage (checkout root, after ``mutmut run``): ``python tests/mutation/survivors.py [--results FILE] > survivors.md``
(``--results``: a saved ``mutmut results --all true`` listing, e.g. from ``tests/mutation/merge.py``; the diffs
still come from ``mutants/``).

The category is a *heuristic* from the diff's text, for triage, not a proof of equivalence:

* ``message``: only the text of an error / warning message changes;
* ``default``: a default argument changes (callers in the package pass it explicitly, or it only picks a
  starting value);
* ``device``: a ``device=`` / ``.to(device, ...)`` argument becomes None or disappears: on the CPU-only tier
  every tensor is on the CPU already;
* ``dtype``: a ``dtype=`` argument becomes None or disappears where the default dtype is the one passed;
* ``open``: none of these: a gap in the tests, or an equivalence to argue by hand.
"""

from __future__ import annotations

import ast
import difflib
import re
import subprocess
import sys
from pathlib import Path

KILLED = {"killed", "timeout"}


def _rows(argv: list[str] | None = None):
    argv = argv or []
    if "--results" in argv:
        out = Path(argv[argv.index("--results") + 1]).read_text(encoding="utf-8")
    else:
        out = subprocess.run(
            [sys.executable, "-m", "mutmut", "results", "--all", "true"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return [line.strip().rsplit(": ", 1) for line in out.splitlines() if "__mutmut_" in line]


def _functions(path: Path) -> dict[str, str]:
    src = path.read_text()
    lines = src.splitlines()
    return {
        node.name: "\n".join(lines[node.lineno - 1 : node.end_lineno])
        for node in ast.walk(ast.parse(src))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name
    }


def _diff(orig: str, mutant: str) -> tuple[list[str], list[str]]:
    a, b = orig.splitlines()[1:], mutant.splitlines()[1:]  # skip the def line (the names differ)
    minus, plus = [], []
    for line in difflib.unified_diff(a, b, lineterm="", n=0):
        if line.startswith("-") and not line.startswith("---"):
            minus.append(line[1:].strip())
        elif line.startswith("+") and not line.startswith("+++"):
            plus.append(line[1:].strip())
    return minus, plus


def _strings_only(m: str, p: str) -> bool:
    """True if m and p differ only inside string literals."""
    strip = re.compile(r"(?:[rbfu]{0,2})(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')")
    return strip.sub('""', m) == strip.sub('""', p) and m != p


def category(minus: list[str], plus: list[str], sig: bool) -> str:
    m, p = " ".join(minus), " ".join(plus)
    if sig:
        return "default"
    if _strings_only(m, p) and re.search(r"raise|Error|warn|f\"|f'|\"[^\"]* [^\"]*\"", m):
        return "message"
    if re.search(r"\braise \w+\(None\)", p) or (
        ("Error(" in m or "warn" in m) and "None" in p and "raise" in m
    ):
        return "message"
    if ("device" in m or ".to(" in m) and (
        "device=None" in p or ".to(None" in p or "device=" in m and "device=" not in p or "device = None" in p
    ):
        return "device"
    if "dtype=" in m and ("dtype=None" in p or "dtype=" not in p):
        return "dtype"
    return "open"


def main(argv: list[str] | None = None) -> int:
    rows = [(n, s) for n, s in _rows(argv) if s not in KILLED]
    cache: dict[str, dict[str, str]] = {}
    print("| file | mutant | status | category | original | mutant |")
    print("|---|---|---|---|---|---|")
    for name, status in rows:
        parts = name.split(".")
        i = next(k for k, p in enumerate(parts) if p.startswith(("x_", "xǁ")))
        rel = "/".join(parts[:i]) + ".py"
        fn = ".".join(parts[i:])
        if rel not in cache:
            cache[rel] = _functions(Path("mutants") / rel)
        funcs = cache[rel]
        orig = funcs.get(re.sub(r"__mutmut_\d+$", "__mutmut_orig", fn), "")
        mut = funcs.get(fn, "")
        minus, plus = _diff(orig, mut)
        header = orig.split(")", 1)[0] if orig else ""
        sig = bool(minus) and all(line in header for line in minus)
        cat = category(minus, plus, sig)
        short = re.sub(r"^x_", "", fn.replace("xǁ", "").replace("ǁ", "."))
        print(f"| {rel.split('/')[-1]} | {short} | {status} | {cat} | {_cell(minus)} | {_cell(plus)} |")
    return 0


def _cell(lines: list[str]) -> str:
    return "<br>".join(f"`{line[:110]}`".replace("|", "\\|") for line in lines) or "(removed)"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
