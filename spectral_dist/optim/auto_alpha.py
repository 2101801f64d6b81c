"""AutoAlpha: estimate each matrix's curvature exponent online and feed it to SpectralNewton(alpha="auto").

Every ``every`` steps a :class:`~spectral_dist.probes.CurvatureProbe` measures h_k along the top ``top_k``
gradient singular directions of every ``alpha="auto"`` matrix, fits alpha (slope of log h_k on log sigma_k),
and writes ``clamp(ema * previous + (1 - ema) * alpha)`` into ``optimizer.state[p]["alpha_estimate"]``, which
:meth:`SpectralNewton.resolve_alpha` reads. A layer whose fit fails (too few positive h_k) keeps its previous
estimate (or the by-layer default).

Cost per probe, in gradient-equivalents: 1 (the probe's gradient) + top_k * samples HVPs, each HVP costing
2 gradients with ``hvp="fd"`` (exactly) or about 2 with ``"autograd"``. With the defaults (top_k=8, samples=2,
fd, all layers at once) a probe costs 1 + 2 * 8 * 2 = 33 gradient-equivalents; at ``every=1000`` that is at
most 3.3% of the gradient computations of training (a training step is at least one gradient), and less of
its time (the optimizer step adds to it). Measured: ``benchmarks/RESULTS.md``, section "Probe cost (issue 3)".
``mode="per_layer"`` is exact but costs top_k HVPs per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..probes import ProbeReport

__all__ = ["AutoAlpha"]

_MODES = {"all_layers": "all_layers", "per_layer": "per_layer"}


class AutoAlpha:
    """Online alpha for the ``alpha="auto"`` matrices of a :class:`SpectralNewton` optimizer.

    Args:
        optimizer: a SpectralNewton with at least one ``alpha="auto"`` matrix parameter (stacks of matrices,
            ``batch_dims`` > 0, are not probed and keep their layer type's default alpha).
        model: the module the optimizer trains (parameter names come from ``model.named_parameters``).
        loss_fn: ``loss_fn(model, batch) -> scalar`` (mean over the batch).
        every: probe every ``every`` steps (step 0 included).
        ema: weight of the previous estimate; 0 uses the newest probe only.
        clamp: (low, high) bounds of the estimate written to the optimizer.
        top_k: singular directions per layer.
        hvp: HVP backend (``"fd"`` works with any engine and fused attention kernels).
        mode: ``"all_layers"`` (random signs, top_k * samples HVPs) or ``"per_layer"`` (exact).
        samples: random-sign samples per k.
        probe_mode: train/eval flags during the probe (``"eval"``: BatchNorm running stats, no dropout).
        seed: seed of the random signs (advanced per probe; the global RNG is untouched).
    """

    def __init__(
        self,
        optimizer,
        model: nn.Module,
        loss_fn: Callable,
        every: int = 1000,
        ema: float = 0.5,
        clamp: tuple[float, float] = (0.0, 2.5),
        top_k: int = 8,
        hvp: str = "fd",
        mode: str = "all_layers",
        *,
        samples: int = 2,
        probe_mode: str = "eval",
        seed: int = 0,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not (isinstance(ema, (int, float)) and 0.0 <= ema < 1.0):
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        lo, hi = clamp
        if not (0.0 <= lo <= hi and math.isfinite(hi)):
            raise ValueError(f"clamp must be (low, high) with 0 <= low <= high < inf, got {clamp!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {tuple(_MODES)}, got {mode!r}")
        if not hasattr(optimizer, "resolve_alpha"):
            raise ValueError("optimizer must be a SpectralNewton (it reads state[p]['alpha_estimate'])")
        self.optimizer, self.model = optimizer, model
        self.every, self.ema, self.clamp = every, float(ema), (float(lo), float(hi))
        names = {id(p): n for n, p in model.named_parameters()}
        self.targets: dict[str, torch.Tensor] = {}
        for g in optimizer.param_groups:
            # stacks of matrices (fused MoE experts, batch_dims > 0) are not probed: they keep the by-layer alpha
            if g["alpha"] != "auto" or g.get("batch_dims", 0):
                continue
            for p in g["params"]:
                if optimizer.is_matrix(p, g):
                    if id(p) not in names:
                        raise ValueError("optimizer has a parameter that is not in model.named_parameters()")
                    self.targets[names[id(p)]] = p
        if not self.targets:
            raise ValueError("optimizer has no matrix parameter with alpha='auto'")
        from ..probes import CurvatureProbe  # local import: probes imports optim.classify

        self.probe = CurvatureProbe(
            model,
            loss_fn,
            top_k=top_k,
            hvp=hvp,
            layers=list(self.targets),
            mode=probe_mode,
            estimator=_MODES[mode],
            samples=samples,
            kfac=False,
            seed=seed,
            optimizer=optimizer,
        )
        self.seed = seed
        self.probes = 0
        self.last_report: ProbeReport | None = None
        self.gradient_equivalents = 0.0

    def maybe_update(self, step: int, batch) -> ProbeReport | None:
        """Probe and update the estimates if ``step % every == 0``; returns the report when it probed."""
        if step % self.every != 0:
            return None
        return self.update(batch)

    def update(self, batch) -> ProbeReport:
        """Probe ``batch`` now and write the EMA'd, clamped alpha of each target into the optimizer state."""
        self.probe.seed = self.seed + self.probes  # fresh random signs for every probe
        report = self.probe.measure(batch)
        lo, hi = self.clamp
        for name, p in self.targets.items():
            a = report.layers[name].alpha
            if not math.isfinite(a):
                continue
            prev = self.optimizer.state[p].get("alpha_estimate")
            new = a if prev is None else self.ema * prev + (1.0 - self.ema) * a
            self.optimizer.state[p]["alpha_estimate"] = min(hi, max(lo, new))
        self.probes += 1
        self.gradient_equivalents += report.cost["gradient_equivalents"]
        self.last_report = report
        return report

    def estimates(self) -> dict[str, float | None]:
        """{parameter name: current alpha estimate (None before the first successful probe)}."""
        return {n: self.optimizer.state[p].get("alpha_estimate") for n, p in self.targets.items()}
