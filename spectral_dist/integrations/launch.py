"""Launches that ask for more processes than they get stop with an error saying why and what to change.

``accelerate launch --num_processes 2 script`` on a machine without GPUs starts one process: accelerate picks
its multi-process launcher only for ``--multi_gpu``, a multi-process config or GPUs, and says nothing. The
process cannot see the request in its environment, so :func:`requested_processes` reads it where accelerate
got it: the launching ``accelerate launch`` command line (``/proc/<parent>/cmdline``, parsed with accelerate's
own launch parser) and, when that names no ``--num_processes``, the accelerate config file it uses.
``SPECTRAL_DIST_EXPECTED_PROCESSES`` sets the number directly (for other launchers).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV", "LaunchError", "check_process_count", "requested_processes"]

ENV = "SPECTRAL_DIST_EXPECTED_PROCESSES"


class LaunchError(RuntimeError):
    """The run has fewer processes than its launch asked for."""


def _parent_argv() -> list[str] | None:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:  # not Linux, or the parent is gone
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _launch_words(argv: list[str]) -> list[str] | None:
    """The words after ``accelerate launch`` (or ``accelerate-launch``, ``-m accelerate.commands.launch``)."""
    for i, word in enumerate(argv):
        name = Path(word).name
        if name == "accelerate" and argv[i + 1 : i + 2] == ["launch"]:
            return argv[i + 2 :]
        if name == "accelerate-launch" or (
            word == "accelerate.commands.launch" and argv[i - 1 : i] == ["-m"]
        ):
            return argv[i + 1 :]
    return None


def requested_processes(argv: list[str] | None = None) -> tuple[int, str] | None:
    """``(processes, where they were asked for)`` when this process was started by ``accelerate launch`` (or
    :data:`ENV` is set), else None. ``argv``: the launching command line (default: this process's parent's)."""
    if os.environ.get(ENV):
        return int(os.environ[ENV]), ENV
    argv = _parent_argv() if argv is None else argv
    words = _launch_words(argv) if argv else None
    if words is None:
        return None
    from accelerate.commands.config import default_config_file
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(words)
    except SystemExit:
        return None
    if args.num_processes is not None:
        return int(args.num_processes), f"--num_processes {args.num_processes}"
    path = args.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    if path is None:
        return None
    n = getattr(load_config_from_file(path), "num_processes", None)
    return (int(n), f"num_processes: {n} in {path}") if n else None


def check_process_count(counted: int, who: str = "the run", argv: list[str] | None = None) -> None:
    """Raise :class:`LaunchError` when ``counted`` (the processes the accelerator counts) is less than the launch
    started (``WORLD_SIZE``) or asked for (:func:`requested_processes`)."""
    launched = int(os.environ.get("WORLD_SIZE", counted))
    if launched > counted:
        raise LaunchError(
            f"{launched} processes were launched (WORLD_SIZE) but {who} counts {counted}, so each process would "
            "train alone on the same batches. On a machine without GPUs: DDP needs the CPU/gloo backend "
            "(accelerate launch --multi_gpu, or Accelerator(cpu=True)); DeepSpeed needs DS_ACCELERATOR=cpu and "
            'Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])'
        )
    asked = requested_processes(argv)
    if asked is None or asked[0] <= counted:
        return
    want, where = asked
    import torch

    if torch.cuda.is_available():
        why = (
            f"only {torch.cuda.device_count()} GPU(s) are visible, or the launcher was not told to start more"
        )
    else:
        why = (
            "on a machine without GPUs, accelerate starts one process unless told to use its multi-process "
            "launcher"
        )
    raise LaunchError(
        f"accelerate launch asked for {want} processes ({where}) but started {counted}: {why}. To run {want} "
        f"processes add --multi_gpu (on CPUs it starts {want} gloo processes), or use a multi-process config: "
        f"--config_file configs/accelerate/multi_gpu.yaml --num_processes {want} (fsdp2.yaml, "
        f"deepspeed_zero2.yaml, ... likewise). To run {counted}, pass --num_processes {counted}."
    )
