"""Weights & Biases logging that works with no network: offline when ``WANDB_API_KEY`` is not set.

:class:`RunLogger` writes every metric to both W&B and a JSONL file (``output_dir/metrics.jsonl``), so
reports need neither W&B nor its API. :func:`read_offline_run` parses an offline ``run-*.wandb`` file
(W&B's LevelDB-style record log) back into history rows, config and summary.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
import zlib
from pathlib import Path

from .jsonl import JsonlLogger

__all__ = [
    "git_sha",
    "wandb_mode",
    "RunLogger",
    "read_offline_run",
    "read_wandb_run",
    "find_offline_runs",
    "wait_for_offline_run",
]


def git_sha(path: str | Path | None = None) -> str | None:
    """The commit checked out at ``path`` (default: this package's repository), with ``-dirty`` appended
    when tracked files changed; None outside a git checkout."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


def wandb_mode(requested: str | None = None) -> str:
    """``requested`` if given, else ``$WANDB_MODE`` if set, else ``online`` with an API key, ``offline`` without."""
    if requested:
        if requested not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb mode must be online, offline or disabled, got {requested!r}")
        return requested
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RunLogger:
    """Scalars, images and config to W&B and JSONL. Create it on the main process only.

    Args:
        output_dir: the run folder; W&B writes ``output_dir/wandb/``, JSONL goes to ``output_dir/metrics.jsonl``.
        project, name, group, tags: W&B run metadata.
        config: the full run config (logged to W&B, and to ``output_dir/config.json``).
        mode: ``online``/``offline``/``disabled``; default from :func:`wandb_mode`.
        resume_id: W&B run id to continue (a resumed recipe passes the id it saved).
        resume_step: the step of the checkpoint a resumed run starts from: rows a killed run logged after it
            are dropped from the JSONL, and its unfinished W&B segments are set aside (``*.abandoned``), so
            the resumed run's logs have no gap and no duplicate rows.
        segments: the W&B segments (offline-run folder names) finished at that checkpoint.

    Surviving a kill: :meth:`checkpoint` (call it when the run saves a checkpoint) fsyncs the JSONL and
    finishes the current W&B run segment, waiting for W&B's writer, then continues the same run id in a new
    segment; a kill loses nothing logged up to the last checkpoint. Offline, :func:`read_wandb_run` reads the
    finished segments of a run in order.
    """

    def __init__(
        self,
        output_dir: str | Path,
        project: str = "spectral-dist",
        name: str | None = None,
        config: dict | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
        resume_id: str | None = None,
        resume_step: int | None = None,
        segments: list[str] | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config or {})
        self.config.setdefault("git_sha", git_sha())
        (self.output_dir / "config.json").write_text(json.dumps(self.config, indent=2, default=str) + "\n")
        self.jsonl = JsonlLogger(self.output_dir / "metrics.jsonl")
        if resume_step is not None:
            self.jsonl.truncate_after(resume_step)
        self.mode = wandb_mode(mode)
        self.segments = list(segments or [])
        self.run = None
        self._init_args = dict(project=project, name=name, group=group, tags=tags)
        if self.mode != "disabled":
            if resume_id is not None and self.mode == "offline":
                for d in find_offline_runs(self.output_dir):
                    if d.name.endswith(f"-{resume_id}") and d.name not in self.segments:
                        d.rename(d.with_name(d.name + ".abandoned"))  # a killed segment: rows after the ckpt
            self._start(resume_id)
        self.run_id = self.run.id if self.run is not None else None

    def _start(self, run_id: str | None) -> None:
        import wandb

        # W&B names offline segments by the second they start in: never start two in the same second
        while int(time.time()) == int(getattr(self, "_started_at", 0)):
            time.sleep(0.05)
        self._started_at = time.time()
        self.run = wandb.init(
            **self._init_args,
            config=self.config,
            dir=str(self.output_dir),
            mode=self.mode,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def _finish_segment(self, timeout: float) -> None:
        run_dir = Path(self.run.dir).parent  # .../offline-run-*/files -> .../offline-run-*
        self.run.finish()
        self.run = None
        if self.mode == "offline":
            if not wait_for_offline_run(run_dir, timeout):
                raise TimeoutError(
                    f"W&B's writer did not finish {run_dir} within {timeout:.0f} s; its rows may be incomplete"
                )
            self.segments.append(run_dir.name)

    def checkpoint(self, timeout: float = 60.0) -> list[str]:
        """Make everything logged so far durable (see the class docstring); returns the finished segments
        (store them with the checkpoint and pass them back as ``segments`` on resume)."""
        self.jsonl.sync()
        if self.run is not None:
            self._finish_segment(timeout)
            self._start(self.run_id)
        return list(self.segments)

    def log(self, metrics: dict, step: int) -> None:
        """Log scalars at ``step`` (to JSONL and W&B)."""
        if not metrics:
            return
        self.jsonl.log(metrics, step=step)
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def log_images(self, images: dict, step: int) -> None:
        """Log images ({key: matplotlib figure or PNG path}) to W&B; the JSONL line records the PNG paths."""
        if not images:
            return
        paths = {}
        img_dir = self.output_dir / "plots"
        img_dir.mkdir(exist_ok=True)
        payload = {}
        for key, img in images.items():
            if hasattr(img, "savefig"):
                path = img_dir / f"{key.replace('/', '_')}_step{step}.png"
                img.savefig(path, dpi=80)
                import matplotlib.pyplot as plt

                plt.close(img)
            else:
                path = Path(img)
            paths[key] = str(path)
            if self.run is not None:
                import wandb

                payload[key] = wandb.Image(str(path))
        self.jsonl.log({"images": paths}, step=step)
        if payload:
            self.run.log(payload, step=step)

    def summary(self, values: dict) -> None:
        """Final values (W&B summary; a JSONL line with ``"summary": true``)."""
        self.jsonl.log({"summary": True, **values}, step=None)
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self, timeout: float = 60.0) -> None:
        """Close the JSONL log and the W&B run; offline, wait until the run file holds its exit record
        (``wandb.finish`` can return before W&B's writer process has flushed the file) and raise if it does
        not within ``timeout``."""
        self.jsonl.close()
        if self.run is not None:
            self._finish_segment(timeout)


# ---------------------------------------------------------------------------------------------- reading
_BLOCK = 32768
_HEADER = 7  # record header: crc32 (uint32), length (uint16), type (uint8)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path):
    """Raw record payloads of a ``.wandb`` file (file header ``:W&B`` + magic + version, then 32 KiB blocks
    of records split FULL / FIRST-MIDDLE-LAST as in LevelDB's log format)."""
    data = path.read_bytes()
    if len(data) < 7 or data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (missing ':W&B' header)")
    pos, pending = 7, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        crc, length, rtype = struct.unpack_from("<IHB", data, pos)
        if rtype == 0 and length == 0:
            pos += left_in_block  # zero padding to the end of the block
            continue
        payload = data[pos + _HEADER : pos + _HEADER + length]
        if len(payload) < length:
            break  # truncated tail (run still writing)
        if zlib.crc32(payload, zlib.crc32(bytes([rtype]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos += _HEADER + length
        if rtype == _FULL:
            yield payload
        elif rtype == _FIRST:
            pending = payload
        elif rtype == _MIDDLE:
            pending += payload
        elif rtype == _LAST:
            yield pending + payload
            pending = b""
        else:
            raise ValueError(f"{path}: unknown record type {rtype} at byte {pos}")


def _item_key(item) -> str:
    return "/".join(item.nested_key) if len(item.nested_key) else item.key


def read_offline_run(path: str | Path, require_exit: bool = True) -> dict:
    """Parse an offline run (a ``run-*.wandb`` file or the ``offline-run-*`` folder holding one).

    Returns ``{"history": [row, ...], "config": {...}, "summary": {...}, "run_id": str}``; each history row
    maps metric keys to decoded values (``_step`` included). A file without its exit record (W&B's writer
    still running, or killed) raises ValueError unless ``require_exit=False``: a read must not silently stop
    at a half-written tail.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"no run-*.wandb file in {path}")
        path = files[0]
    history, config, summary, run_id, exited = [], {}, {}, None, False
    for raw in _records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "exit":
            exited = True
        elif kind == "history":
            history.append({_item_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "config":
            for i in rec.config.update:
                config[_item_key(i)] = json.loads(i.value_json)
        elif kind == "summary":
            for i in rec.summary.update:
                summary[_item_key(i)] = json.loads(i.value_json)
        elif kind == "run":
            run_id = rec.run.run_id
            for i in rec.run.config.update:
                config[_item_key(i)] = json.loads(i.value_json)
    if require_exit and not exited:
        raise ValueError(
            f"{path} has no exit record: W&B's writer has not finished it (call RunLogger.finish or "
            "wait_for_offline_run first) or the run was killed; pass require_exit=False to read what is there"
        )
    return {"history": history, "config": config, "summary": summary, "run_id": run_id}


def read_wandb_run(output_dir: str | Path, run_id: str | None = None) -> dict:
    """All finished offline segments of one run under ``output_dir`` (see :meth:`RunLogger.checkpoint`), in
    order: the history rows concatenated, config and summary of the last segment. Segments set aside as
    ``*.abandoned`` (a killed run's rows after its last checkpoint) are ignored."""
    runs = [d for d in find_offline_runs(output_dir) if run_id is None or d.name.endswith(f"-{run_id}")]
    if not runs:
        raise FileNotFoundError(f"no finished W&B offline run under {output_dir}")
    ids = {d.name.rsplit("-", 1)[-1] for d in runs}
    if len(ids) > 1:
        raise ValueError(f"{output_dir} holds several W&B runs {sorted(ids)}: pass run_id")
    merged = {"history": [], "config": {}, "summary": {}, "run_id": ids.pop(), "segments": len(runs)}
    for d in runs:
        part = read_offline_run(d)
        merged["history"].extend(part["history"])
        merged["config"].update(part["config"])
        merged["summary"].update(part["summary"])
    return merged


def _has_exit(path: Path) -> bool:
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        for raw in _records(path):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "exit":
                return True
    except (ValueError, OSError):
        return False
    return False


def wait_for_offline_run(run_dir: str | Path, timeout: float = 30.0) -> bool:
    """Wait (up to ``timeout`` s) until the offline run's ``.wandb`` file holds its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(Path(run_dir).glob("run-*.wandb"))
        if files and _has_exit(files[0]):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def find_offline_runs(root: str | Path) -> list[Path]:
    """All ``offline-run-*`` folders under ``root`` (sorted: by start time), without abandoned segments."""
    return sorted(
        p for p in Path(root).rglob("offline-run-*") if p.is_dir() and not p.name.endswith(".abandoned")
    )
