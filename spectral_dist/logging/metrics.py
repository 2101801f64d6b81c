"""Flat metric names for curvature-probe reports, shared by the recipes and the Trainer callback."""

from __future__ import annotations

import math

import torch

from ..probes.curvature import SCALARS

__all__ = ["CURVATURE_KEYS", "curvature_metrics"]

# The probe report's per-layer scalars, less the bookkeeping count of fitted points.
CURVATURE_KEYS = tuple(k for k in SCALARS if k != "n_fit")


def _number(v) -> float | None:
    if v is None:
        return None
    if torch.is_tensor(v):
        if v.numel() != 1:
            return None
        v = v.item()
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def curvature_metrics(report, keep_nan: bool = True) -> dict[str, float]:
    """``curv/<layer>/<metric>`` for every probed layer plus ``curv/median_rel_err`` over finite errors.

    ``keep_nan=True`` logs NaN where a fit had too few positive h_k, so every layer always has every key
    (the recipes); ``False`` drops non-finite values (reporters that reject NaN).
    """
    out = {}
    for name, lay in report.layers.items():
        for key in CURVATURE_KEYS:
            v = _number(getattr(lay, key, None))
            if v is not None and (keep_nan or math.isfinite(v)):
                out[f"curv/{name}/{key}"] = v
    errs = [v for k, v in out.items() if k.endswith("/rel_err") and math.isfinite(v)]
    if errs:
        out["curv/median_rel_err"] = float(torch.tensor(errs).median())
    return out
