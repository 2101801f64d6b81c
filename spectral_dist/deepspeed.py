"""``spectral_dist.deepspeed.initialize``: ``deepspeed.initialize`` with ``optimizer.type = spectral_newton``.

``register()`` makes DeepSpeed's own ``deepspeed.initialize`` accept that type too (an explicit opt-in). See
:mod:`spectral_dist.integrations.deepspeed`, whose public names this module re-exports.
"""

from .integrations import deepspeed as _impl
from .integrations.deepspeed import *  # noqa: F403

__all__ = list(_impl.__all__)
