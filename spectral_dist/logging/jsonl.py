"""Append-only JSONL metric log: one JSON object per ``log`` call, so reports work without W&B."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

__all__ = ["JsonlLogger", "read_jsonl"]


def _clean(v):
    """JSON-safe scalar: tensors and numpy numbers become floats, non-finite floats become strings."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return str(v)


class JsonlLogger:
    """Write ``{"step": step, "time": unix_time, **metrics}`` lines to ``path`` (appending on resume)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: dict, step: int | None = None) -> None:
        rec = {"step": step, "time": round(time.time(), 3)}
        rec.update({str(k): _clean(v) for k, v in metrics.items()})
        self._fh.write(json.dumps(rec, sort_keys=False) + "\n")
        self._fh.flush()

    def sync(self) -> None:
        """Flush and fsync: the rows written so far survive a killed process or a lost node."""
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def truncate_after(self, step: int) -> int:
        """Drop the rows of steps after ``step`` (and summary rows): what a run killed after its checkpoint at
        ``step`` logged before it died, which the resumed run logs again. Returns the number of rows dropped."""
        self._fh.close()
        rows = read_jsonl(self.path) if self.path.exists() else []
        keep = [r for r in rows if r.get("step") is not None and r["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        return len(rows) - len(keep)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSONL log; a truncated last line (a run killed mid-write) is ignored."""
    out = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return out
