"""Weights & Biases logging that works with no network: offline when ``WANDB_API_KEY`` is not set.

:class:`RunLogger` writes every metric to both W&B and a JSONL file (``output_dir/metrics.jsonl``). The JSONL
file is this project's record of a run: reports and tests read metrics from it. W&B's offline run files are
W&B's private format and are never parsed here; upload them with ``wandb sync`` and read them back through
W&B's public API (``wandb.Api().run(...).scan_history()``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from .jsonl import JsonlLogger

__all__ = [
    "git_sha",
    "wandb_mode",
    "RunLogger",
    "find_offline_runs",
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
    finishes the current W&B run segment (``run.finish()`` then ``wandb.teardown()``, which returns once W&B
    has written everything), then continues the same run id in a new segment; a kill loses nothing logged
    up to the last checkpoint. Offline, each segment is one ``offline-run-*`` folder (``wandb sync`` uploads
    them in order; :func:`find_offline_runs` lists the finished ones).
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
            from .._extras import require

            require("wandb", extra="recipes", feature="RunLogger (W&B logging; or mode='disabled')")
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

    def _finish_segment(self) -> None:
        import wandb

        run_dir = Path(self.run.dir).parent  # .../offline-run-*/files -> .../offline-run-*
        self.run.finish()
        # run.finish() can return before W&B's writer has flushed the offline run (measured with wandb 0.31: 293
        # of 300 rows on disk right after it); wandb.teardown(), W&B's public shutdown, returns once its service
        # has written everything. The next segment starts a new service (about 0.2 s).
        wandb.teardown()
        self.run = None
        if self.mode == "offline":
            self.segments.append(run_dir.name)

    def checkpoint(self) -> list[str]:
        """Make everything logged so far durable (see the class docstring); returns the finished segments
        (store them with the checkpoint and pass them back as ``segments`` on resume)."""
        self.jsonl.sync()
        if self.run is not None:
            self._finish_segment()
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
                img.savefig(path, dpi=100)
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

    def finish(self) -> None:
        """Close the JSONL log and the W&B run (waiting until W&B has written it)."""
        self.jsonl.close()
        if self.run is not None:
            self._finish_segment()


def find_offline_runs(root: str | Path) -> list[Path]:
    """All ``offline-run-*`` folders under ``root`` (sorted: by start time), without abandoned segments."""
    return sorted(
        p for p in Path(root).rglob("offline-run-*") if p.is_dir() and not p.name.endswith(".abandoned")
    )
