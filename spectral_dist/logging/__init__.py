"""Run logging: W&B (offline when no API key), a JSONL log of every metric, and diagnostic plots.

Import the submodules directly (``spectral_dist.logging.wandb_logger``, ``.jsonl``, ``.plots``); plots pull
in matplotlib and the W&B logger imports wandb lazily.
"""

from .jsonl import JsonlLogger, read_jsonl
from .wandb_logger import RunLogger, find_offline_runs, git_sha, wandb_mode

__all__ = [
    "JsonlLogger",
    "read_jsonl",
    "RunLogger",
    "find_offline_runs",
    "git_sha",
    "wandb_mode",
]
