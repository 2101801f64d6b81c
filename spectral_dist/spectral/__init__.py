"""Math of the Spectral Newton step, free of torch.distributed."""

from .decompose import DecompositionError, robust_eigh, robust_svd
from .direction import METHODS, newton_schulz, spectral_direction, tracked_direction
from .transform import inverse_transform, spectral_transform

__all__ = [
    "DecompositionError",
    "METHODS",
    "inverse_transform",
    "newton_schulz",
    "robust_eigh",
    "robust_svd",
    "spectral_direction",
    "spectral_transform",
    "tracked_direction",
]
