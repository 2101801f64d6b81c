"""Count the tensor -> Python reads in a block of code: on a GPU each one is a host sync that waits for the stream.

``with HostReads() as reads: opt.step()`` then ``reads.count``. The profiler sees no event for ``tolist`` on
CPU, but on a GPU it is a device-to-host copy like ``item``, so this counter (a ``TorchFunctionMode``) is what
the sync-count tests and ``benchmarks/gpu/run.sh``'s CPU dry run use; on CUDA the script also counts with
``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

from torch.overrides import TorchFunctionMode

__all__ = ["HostReads"]


class HostReads(TorchFunctionMode):
    """Counts calls of ``tolist``, ``item``, ``bool``, ``float``, ``int``, ``index``, ``cpu`` and ``numpy`` on
    tensors inside the ``with`` block."""

    NAMES = ("tolist", "item", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))
