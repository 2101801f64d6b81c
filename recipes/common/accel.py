"""The recipes' ``Accelerator``: CPU-only machines run the same launcher configs as GPU clusters.

* DDP: ``accelerate launch --multi_gpu`` (or a MULTI_GPU config) on a machine without CUDA trains on CPU
  processes with gloo (``cpu=True`` makes accelerate pick MULTI_CPU instead of giving up on distribution).
* FSDP: accelerate only enables FSDP for accelerator devices. On a machine without CUDA, with
  ``ACCELERATE_USE_FSDP=true`` (an FSDP config), :func:`make_accelerator` declares the processes a
  gloo "multi-device" group whose device is the CPU, with a named 1-D ``dp_shard`` device mesh, so the FSDP2
  code path runs on CPU unchanged. This is
  for testing the FSDP configs on CPU; on GPUs nothing is changed.
* DeepSpeed: on a machine without CUDA the process group is gloo (with ``DS_ACCELERATOR=cpu``).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType

__all__ = ["make_accelerator"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _cpu_fsdp_backend():
    """Make accelerate's PartialState treat CPU processes launched by torchrun as a gloo device group."""
    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_GPU
        return original(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = prepare_backend
    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")


def make_accelerator(cfg) -> Accelerator:
    no_cuda = not torch.cuda.is_available()
    deepspeed = _flag("ACCELERATE_USE_DEEPSPEED")
    fsdp = _flag("ACCELERATE_USE_FSDP")
    extra = {}
    if no_cuda and fsdp and not deepspeed:
        from accelerate.parallelism_config import ParallelismConfig

        _cpu_fsdp_backend()
        extra["parallelism_config"] = ParallelismConfig(dp_shard_size=int(os.environ.get("WORLD_SIZE", "1")))
    if no_cuda and deepspeed:
        from accelerate.utils import InitProcessGroupKwargs

        extra["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(
        cpu=no_cuda and not deepspeed and not fsdp,
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=cfg.mixed_precision,
        step_scheduler_with_optimizer=False,
        **extra,
    )
