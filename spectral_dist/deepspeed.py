"""``spectral_dist.deepspeed.initialize``: ``deepspeed.initialize`` with ``optimizer.type = spectral_newton``.

``register()`` makes DeepSpeed's own ``deepspeed.initialize`` accept that type too (an explicit opt-in). See
:mod:`spectral_dist.integrations.deepspeed`.
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
    register,
    resolve_auto,
    strip_optimizer,
    unregister,
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
    "register",
    "resolve_auto",
    "strip_optimizer",
    "unregister",
]
