"""Robust wrappers around LAPACK/cuSOLVER decompositions: retry in float64, then raise a typed error."""

from __future__ import annotations

import torch

__all__ = ["DecompositionError", "robust_svd", "robust_eigh", "compute_dtype"]


class DecompositionError(RuntimeError):
    """An SVD or eigendecomposition failed in the working precision and in float64."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are decomposed in float32; float32/float64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _retry(fn, A: torch.Tensor, what: str, counter: dict | None):
    try:
        out = fn(A)
        if all(torch.isfinite(t).all() for t in out):
            return out
    except (torch.linalg.LinAlgError, RuntimeError):
        pass
    if counter is not None:
        counter["retries"] = counter.get("retries", 0) + 1
    try:
        out = fn(A.double())
        if all(torch.isfinite(t).all() for t in out):
            return tuple(t.to(A.dtype) for t in out)
    except (torch.linalg.LinAlgError, RuntimeError) as e:
        raise DecompositionError(f"{what} failed in {A.dtype} and float64 for shape {tuple(A.shape)}") from e
    raise DecompositionError(
        f"{what} returned non-finite values in {A.dtype} and float64 for shape {tuple(A.shape)}"
    )


def robust_svd(A: torch.Tensor, counter: dict | None = None):
    """Thin SVD (U, S, Vh) with a float64 retry. `counter['retries']` is incremented on a retry."""
    return _retry(lambda X: torch.linalg.svd(X, full_matrices=False), A, "SVD", counter)


def robust_eigh(A: torch.Tensor, counter: dict | None = None):
    """Symmetric eigendecomposition (ascending eigenvalues) with a float64 retry."""
    return _retry(torch.linalg.eigh, A, "eigh", counter)
