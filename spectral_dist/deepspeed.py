"""``spectral_dist.deepspeed.initialize``: ``deepspeed.initialize`` with ``optimizer.type = spectral_newton``.

See :mod:`spectral_dist.integrations.deepspeed`.
"""

from .integrations.deepspeed import (
    SPECTRAL_TYPE,
    SpectralConfigError,
    ZeroSpectralNewton,
    attach,
    build_optimizer,
    check_config,
    initialize,
    is_spectral_config,
    load_config,
    strip_optimizer,
)

__all__ = [
    "SPECTRAL_TYPE",
    "SpectralConfigError",
    "ZeroSpectralNewton",
    "attach",
    "build_optimizer",
    "check_config",
    "initialize",
    "is_spectral_config",
    "load_config",
    "strip_optimizer",
]
