"""Math of the Spectral Newton step, free of torch.distributed."""

from .decompose import DecompositionError, robust_eigh, robust_svd
from .direction import (
    BASES,
    METHODS,
    STATEFUL,
    auto_method,
    cholesky_direction,
    direction_unchecked,
    eigenbasis_batched,
    eigenbasis_direction,
    jacobi_rotate,
    newton_schulz,
    polar_express,
    spectral_direction,
    tracked_direction,
)
from .transform import inverse_transform, spectral_transform

__all__ = [
    "BASES",
    "DecompositionError",
    "METHODS",
    "STATEFUL",
    "auto_method",
    "cholesky_direction",
    "direction_unchecked",
    "eigenbasis_batched",
    "eigenbasis_direction",
    "inverse_transform",
    "jacobi_rotate",
    "newton_schulz",
    "polar_express",
    "robust_eigh",
    "robust_svd",
    "spectral_direction",
    "spectral_transform",
    "tracked_direction",
]
