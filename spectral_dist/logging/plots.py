"""Matplotlib (Agg) figures for curvature diagnostics: log-log h_k against sigma_k with the fitted line."""

from __future__ import annotations

import math

from .._extras import require

require("matplotlib", extra=("recipes", "report"), feature="spectral_dist.logging.plots")

import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["loglog_curvature", "curvature_grid"]


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float).ravel()


def _draw(ax, sigma, h, alpha, title):
    sigma, h = _as_array(sigma), _as_array(h)
    n = min(len(sigma), len(h))
    sigma, h = sigma[:n], h[:n]
    pos = (sigma > 0) & (h > 0) & np.isfinite(sigma) & np.isfinite(h)
    neg = (sigma > 0) & (h <= 0) & np.isfinite(h)
    ax.loglog(sigma[pos], h[pos], "o", ms=4, label="h_k > 0")
    if neg.any():
        ax.loglog(sigma[neg], np.abs(h[neg]), "x", ms=4, color="tab:red", label="|h_k|, h_k <= 0")
    if alpha is not None and math.isfinite(float(alpha)) and pos.sum() >= 1:
        a = float(alpha)
        logc = float(np.mean(np.log(h[pos]) - a * np.log(sigma[pos])))  # intercept given the fitted slope
        xs = np.geomspace(sigma[pos].min(), sigma[pos].max(), 50)
        ax.loglog(xs, np.exp(logc) * xs**a, "-", color="k", lw=1, label=f"alpha = {a:.2f}")
    # compact sigma labels at 1, 2 and 5 per decade (matplotlib's 2x10^-3 style overlapped on short decades)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.set_xlabel("sigma_k")
    ax.set_ylabel("h_k")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def loglog_curvature(sigma, h, alpha=None, title: str = ""):
    """One layer: h_k against sigma_k on log-log axes, the line c * sigma^alpha (c fitted given alpha)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    _draw(ax, sigma, h, alpha, title)
    fig.tight_layout()
    return fig


def curvature_grid(layers: dict, max_panels: int = 12, title: str = ""):
    """Several layers ({name: obj with .sigma, .h, .alpha}) in one figure, one panel each."""
    names = list(layers)[:max_panels]
    if not names:
        raise ValueError("curvature_grid needs at least one layer")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        lay = layers[name]
        _draw(ax, lay.sigma, lay.h, getattr(lay, "alpha", None), name)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
