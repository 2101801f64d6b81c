"""The numerics the optimizer's matrix math was measured in, whatever the caller's global settings.

Training scripts often turn on TF32 (``torch.backends.cuda.matmul.allow_tf32 = True`` in nanoGPT, ``--tf32``
in the HF Trainer, ``torch.set_float32_matmul_precision("high")``) or wrap the whole training step, optimizer
included, in ``torch.autocast``. Both silently lower the precision of every float32 matmul: TF32 keeps 10
mantissa bits (bf16: 7), so a Gram matrix G^T G formed that way loses the directions with sigma_i^2 below
~1e-3 sigma_1^2, which carry most of an alpha > 1 update. :func:`exact_matmuls` runs the step's matrix math
with IEEE float32 matmuls and without autocast, and puts the caller's settings back afterwards (it changes host
flags only: no device work, no sync). Where the math wants bf16 (Polar Express and the eigenbasis's last product
on CUDA) it casts explicitly, which neither setting affects.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["exact_matmuls", "with_exact_matmuls"]

# the per-backend float32 matmul settings of torch's newer API ("ieee", "tf32", "bf16", or "none": inherit)
_BACKENDS = ("cuda", "mkldnn")


def _backend_precisions() -> list:
    return [getattr(getattr(torch.backends, b).matmul, "fp32_precision", None) for b in _BACKENDS]


def _set_backend_precisions(values) -> None:
    for b, v in zip(_BACKENDS, values):
        m = getattr(torch.backends, b).matmul
        if v is not None and getattr(m, "fp32_precision", None) != v:
            m.fp32_precision = v


@contextlib.contextmanager
def _ieee_float32():
    # torch has two APIs for the same flags and refuses to read the legacy one once the newer per-backend one
    # was set; each branch restores the flags through the API the caller used, so nothing mixes them.
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the per-backend API is in use
        legacy = None
    if legacy == "highest":  # torch's default: nothing to change
        yield
        return
    before = _backend_precisions()
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
    else:
        _set_backend_precisions(["ieee"] * len(_BACKENDS))
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        # the legacy setter writes every backend; put back the ones the caller had left alone
        _set_backend_precisions(before)


@contextlib.contextmanager
def exact_matmuls():
    """Run the block with IEEE float32 matmuls (no TF32 or bf16 passes) and with autocast off on every device
    type where it is on; the caller's settings are restored on exit, also after an exception."""
    with contextlib.ExitStack() as stack:
        for dev in ("cpu", "cuda"):
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        stack.enter_context(_ieee_float32())
        yield


def with_exact_matmuls(fn):
    """Decorator: ``fn`` runs under :func:`exact_matmuls`."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with exact_matmuls():
            return fn(*args, **kwargs)

    return wrapped
