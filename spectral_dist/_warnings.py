"""The one place where warnings this project cannot fix are filtered.

DeepSpeed 0.19's communication layer (``deepspeed/comm/torch.py``) calls
``torch.distributed.all_gather_into_tensor`` and ``reduce_scatter_tensor``, which torch 2.13 deprecates with a
FutureWarning. Python prints a warning once per location, but every ``warnings.catch_warnings()`` in
DeepSpeed, accelerate or transformers resets that memory, so a ZeRO run printed the same two messages over
and over (about 120 in a recipe run). They come from DeepSpeed's calls, not ours (this project calls neither
function), so they are filtered here, by their exact message, and nothing else is.
:func:`filter_dependency_warnings` is called when the DeepSpeed integration is imported.
"""

from __future__ import annotations

import warnings

__all__ = ["DEEPSPEED_TORCH_DEPRECATIONS", "filter_dependency_warnings"]

DEEPSPEED_TORCH_DEPRECATIONS = (
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
)


def filter_dependency_warnings() -> None:
    """Ignore the dependency warnings described in this module (idempotent)."""
    warnings.filterwarnings("ignore", message=DEEPSPEED_TORCH_DEPRECATIONS, category=FutureWarning)
