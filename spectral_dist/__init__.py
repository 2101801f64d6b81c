"""spectral-dist: Spectral Newton optimisation, sharded across ranks, with curvature and trajectory probes."""

from .optim import DEFAULT_ALPHA, SpectralNewton, classify_parameters
from .spectral import spectral_direction, spectral_transform

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ALPHA",
    "SpectralNewton",
    "classify_parameters",
    "spectral_direction",
    "spectral_transform",
    "__version__",
]
