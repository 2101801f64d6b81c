"""Curvature probes: HVP backends, per-layer curvature along gradient singular directions, K-FAC alignment."""

from .curvature import ESTIMATORS, MODES, CurvatureProbe, LayerCurvature, ProbeReport
from .fits import DEFAULT_REL_FLOOR, loglog_slope, participation_ratio, pr_bound, spectrum_fits
from .hvp import BACKENDS, HVP, NOMINAL_COST, make_hvp, math_attention
from .kfac import KFACCollector
from .state import preserve_training_state

__all__ = [
    "BACKENDS",
    "DEFAULT_REL_FLOOR",
    "ESTIMATORS",
    "HVP",
    "MODES",
    "NOMINAL_COST",
    "CurvatureProbe",
    "KFACCollector",
    "LayerCurvature",
    "ProbeReport",
    "loglog_slope",
    "make_hvp",
    "math_attention",
    "participation_ratio",
    "pr_bound",
    "preserve_training_state",
    "spectrum_fits",
]

# Issue 9: Hessian spectrum (Lanczos, Hutch++, SLQ density). The ``lanczos`` function stays in its module
# (``from spectral_dist.probes.lanczos import lanczos``): a package attribute would shadow the submodule.
from .lanczos import (  # noqa: E402
    EigenResult,
    SpectralDensity,
    TraceEstimate,
    hutchinson,
    hutchpp,
    power_iteration,
    slq_density,
)
from .spectrum import BlockSpectrum, HessianSpectrum, SpectrumResult  # noqa: E402

__all__ += [
    "BlockSpectrum",
    "EigenResult",
    "HessianSpectrum",
    "SpectralDensity",
    "SpectrumResult",
    "TraceEstimate",
    "hutchinson",
    "hutchpp",
    "power_iteration",
    "slq_density",
]
