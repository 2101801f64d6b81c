"""SpectralNewton and the parameter classification it uses."""

from .auto_alpha import AutoAlpha
from .classify import DEFAULT_ALPHA, ParamInfo, classification_table, classify_parameters
from .engine import LocalEngine
from .spectral_newton import SCALES, NonFiniteGradientError, SpectralNewton

__all__ = [
    "AutoAlpha",
    "DEFAULT_ALPHA",
    "LocalEngine",
    "NonFiniteGradientError",
    "ParamInfo",
    "SCALES",
    "SpectralNewton",
    "classification_table",
    "classify_parameters",
]
