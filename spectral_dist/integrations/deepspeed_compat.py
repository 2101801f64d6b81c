"""The one module that reads DeepSpeed's private ZeRO attributes.

Everything spectral_newton needs from a ZeRO optimizer is *where each parameter's elements sit in the flat fp32
partition this rank steps*: :func:`partition_entries`. The attribute names differ between ZeRO stage 1/2
(``DeepSpeedZeroOptimizer``), stage 3 (``DeepSpeedZeroOptimizer_Stage3``) and the bf16 optimizer
(``BF16_Optimizer``), and they are private, so they are read here only and checked against the DeepSpeed
versions this project tests (:data:`TESTED_VERSIONS`).
"""

from __future__ import annotations

import os

import torch.distributed as dist

__all__ = [
    "TESTED_VERSIONS",
    "UnsupportedDeepSpeedError",
    "check_version",
    "partition_entries",
    "rank_pieces",
    "stage3_rank_pieces",
    "zero_kind",
]

# minor version -> the releases the test suite ran on (tests/test_deepspeed.py, the recipes' ZeRO tests)
TESTED_VERSIONS = {"0.19": ("0.19.8",)}
ALLOW_ENV = "SPECTRAL_DIST_ALLOW_UNTESTED_DEEPSPEED"


class UnsupportedDeepSpeedError(RuntimeError):
    """The installed DeepSpeed is not one whose ZeRO internals spectral_newton was tested against."""


def check_version(version: str | None = None) -> str:
    """Raise unless DeepSpeed's minor version is in :data:`TESTED_VERSIONS` (or the user opted in)."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    minor = ".".join(version.split("+")[0].split(".")[:2])
    if minor not in TESTED_VERSIONS and os.environ.get(ALLOW_ENV) != "1":
        tested = ", ".join(v for vs in TESTED_VERSIONS.values() for v in vs)
        raise UnsupportedDeepSpeedError(
            f"DeepSpeed {version} is not a version spectral_newton's ZeRO integration was tested with ({tested}); "
            "it reads ZeRO's partition layout from private attributes that change between releases. Install a "
            f"tested version (pip install 'spectral-dist[deepspeed]'), or set {ALLOW_ENV}=1 to try anyway "
            "(tests/test_deepspeed.py then tells whether results still equal one process)"
        )
    return version


def zero_kind(zopt) -> str:
    """ "stage12", "stage3" or "bf16" for the ZeRO optimizer DeepSpeed wrapped the client optimizer in."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(zopt, DeepSpeedZeroOptimizer_Stage3):
        return "stage3"
    if isinstance(zopt, DeepSpeedZeroOptimizer):
        return "stage12"
    if isinstance(zopt, BF16_Optimizer):
        return "bf16"
    from .deepspeed import SpectralConfigError

    raise SpectralConfigError(
        f"DeepSpeed wrapped the optimizer in {type(zopt).__name__}, which spectral_newton does not support: "
        "set zero_optimization.stage to 1, 2 or 3 with offload disabled"
    )


def rank_pieces(off: int, n: int, ps: int, world: int) -> list[list[tuple[int, int, int]]]:
    """For a parameter at flat offset ``off`` with ``n`` elements in a buffer cut into ``world`` partitions of
    ``ps``: per rank, [(offset in the partition, offset in the parameter, length)] or [] if it holds none."""
    per_rank = []
    for r in range(world):
        lo, hi = max(off, r * ps), min(off + n, (r + 1) * ps)
        per_rank.append([(lo - r * ps, lo - off, hi - lo)] if hi > lo else [])
    return per_rank


def stage3_rank_pieces(n: int, ps: int, q: int, world: int) -> list[list[tuple[int, int, int]]]:
    """ZeRO-3: a parameter of ``n`` elements split into ``world`` partitions of ``ps`` (the last padded), whose
    partition starts at offset ``q`` of every rank's flat sub-group buffer: per rank, [(offset in the buffer,
    offset in the parameter, length)] or []."""
    per_rank = []
    for r in range(world):
        lo, hi = r * ps, min(n, (r + 1) * ps)
        per_rank.append([(q, lo, hi - lo)] if hi > lo else [])
    return per_rank


def _stage12(zopt):
    out = []
    for i, params in enumerate(zopt.round_robin_bit16_groups):
        pg = zopt.real_dp_process_group[i]
        world = dist.get_world_size(group=pg)
        ps = int(zopt.partition_size[i])
        entries = [
            (p, rank_pieces(int(off), meta.numel(), ps, world))
            for p, off, meta in zip(params, zopt.round_robin_bit16_offsets[i], zopt.round_robin_bit16_meta[i])
        ]
        out.append((zopt.single_partition_of_fp32_groups[i], i, entries, pg))
    return out


def _bf16(zopt):
    out = []
    for i, params in enumerate(zopt.bf16_groups):
        pg = zopt.real_dp_process_group[i]
        world = dist.get_world_size(group=pg)
        ps = zopt.bf16_groups_flat[i].numel() // world
        entries, off = [], 0
        for p in params:
            entries.append((p, rank_pieces(off, p.numel(), ps, world)))
            off += p.numel()
        out.append((zopt.fp32_groups_flat_partition[i], i, entries, pg))
    return out


def _stage3(zopt):
    out = []
    for sg, params in enumerate(zopt.fp16_groups):
        pg = (
            zopt.sub_group_process_groups[sg]
            if hasattr(zopt, "sub_group_process_groups")
            else zopt.dp_process_group
        )
        world = dist.get_world_size(group=pg)
        entries, q = [], 0
        for p in params:
            ps = p.partition_numel()
            entries.append((p, stage3_rank_pieces(p.ds_numel, ps, q, world)))
            q += ps
        out.append((zopt.fp32_partitioned_groups_flat[sg], zopt.sub_group_to_group_id[sg], entries, pg))
    return out


def partition_entries(zopt) -> tuple[str, list]:
    """(kind, entries): per flat fp32 partition this rank steps, ``(partition tensor, param group index,
    [(model parameter, per-rank pieces)], process group)``; pieces as in :func:`rank_pieces`."""
    check_version()
    kind = zero_kind(zopt)
    return kind, {"stage12": _stage12, "stage3": _stage3, "bf16": _bf16}[kind](zopt)
