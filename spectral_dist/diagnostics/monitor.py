"""TrajectoryMonitor: prediction-based path length and predictable rank of the gradient trajectory.

Every ``every`` calls of :meth:`TrajectoryMonitor.update`, the gradient of each tracked parameter is
sketched (:mod:`.sketch`), the per-layer sketches are summed over ranks (:mod:`.reduce`) and the global
sketch is their sum. Each predictor (:mod:`.predictors`) forecasts the new sketch from the window of
previous ones before it is appended; squared errors accumulate into the path length. The predictable
rank (:mod:`.ranks`) is computed on demand from the window of increments. The trajectory is the
subsampled one: with ``every=k`` the predictors forecast ``g_{t+k}`` from ``g_t, g_{t-k}, ...``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .predictors import PREDICTORS, check_predictors, min_history, predict_next
from .ranks import effective_rank, increment_spectrum, predictable_rank
from .reduce import all_reduce_sum, owner_plan, world
from .sketch import GradientSketch, is_sharded

__all__ = ["TrajectoryMonitor", "DEFAULT_EVERY", "DEFAULT_KIND"]

# Defaults measured to cost < 2% of a training step on ~0.8M-parameter ViT and GPT models on CPU
# (benchmarks/trajectory_overhead.py, benchmarks/RESULTS.md): a countsketch costs O(N) per sketch, about
# 13% of a step, so every 20 steps is ~0.6%. The dense kinds cost O(N * dim) and need every >= 500.
DEFAULT_EVERY = 20
DEFAULT_KIND = "countsketch"


def _named_params(model_or_named_params: Any) -> list[tuple[str, Any]]:
    if isinstance(model_or_named_params, nn.Module):
        return [(n, p) for n, p in model_or_named_params.named_parameters() if p.requires_grad]
    items = (
        model_or_named_params.items() if isinstance(model_or_named_params, Mapping) else model_or_named_params
    )
    try:
        out = [(str(n), p) for n, p in items]
    except (TypeError, ValueError) as e:
        raise ValueError(
            "model_or_named_params must be an nn.Module, a mapping name -> tensor or (name, tensor) pairs"
        ) from e
    if not out:
        raise ValueError("model_or_named_params has no parameters to track")
    if len({n for n, _ in out}) != len(out):
        raise ValueError("model_or_named_params has duplicate names")
    return out


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class TrajectoryMonitor:
    """Streaming gradient-trajectory diagnostics for a model, globally and per parameter.

    Call :meth:`update` after ``backward()`` and before ``zero_grad()`` on every step and on every rank
    (under torch.distributed it all-reduces on the steps it sketches); it returns at once on the steps
    it skips. Engines: DDP and plain training need nothing (replicated ``.grad`` is sketched once, split
    across ranks by size); FSDP2 needs nothing (DTensor ``.grad`` shards are sketched where they live);
    ZeRO passes ``update({name: SketchSlice(flat_partition_slice, global_offset)})`` on every rank.

    Example::

        mon = TrajectoryMonitor(model)
        for step in ...:
            loss.backward()
            mon.update()
            optimizer.step(); optimizer.zero_grad()
            if step % log_every == 0:
                wandb.log(mon.to_log_dict(), step=step)  # or json.dumps(mon.to_log_dict())

    Args:
        model_or_named_params: An ``nn.Module`` (its trainable parameters), a mapping name -> tensor or
            ``(name, tensor)`` pairs. Names key the projection, so they must match on all ranks.
        sketch_dim: Sketch dimension.
        window: Number of recent sketches kept for the predictors and the ranks (>= 2).
        predictors: Subset of ``("last", "ema", "linear", "lstsq")``.
        every: Sketch every this many calls of :meth:`update`; the default keeps the cost under 2% of a
            step (see ``DEFAULT_EVERY``). ``every=1`` gives the step-to-step trajectory.
        seed: Projection seed.
        kind: Sketch kind (``"gaussian"``, ``"rademacher"``, ``"countsketch"``). The default countsketch
            is O(N) per sketch; the dense kinds are O(N * sketch_dim).
        per_layer: Also track each parameter (a few floats of state per parameter and window entry).
        ema_beta: Decay of the ``"ema"`` predictor.
        ar_order: Order of the ``"lstsq"`` autoregressive predictor.
        distributed: ``"auto"`` reduces over the default (or given) group when torch.distributed is
            initialized; ``False`` never communicates (sharded inputs then give this rank's part only).
        group: Process group for the reduction.
        block_size: Seeded block size of the dense sketches (see :class:`GradientSketch`).
    """

    def __init__(
        self,
        model_or_named_params: Any,
        sketch_dim: int = 256,
        window: int = 32,
        predictors: Iterable[str] = PREDICTORS,
        every: int = DEFAULT_EVERY,
        seed: int = 0,
        kind: str = DEFAULT_KIND,
        per_layer: bool = True,
        ema_beta: float = 0.9,
        ar_order: int = 2,
        distributed: bool | str = "auto",
        group=None,
        block_size: int = 256,
    ):
        self.params = _named_params(model_or_named_params)
        self.names = [n for n, _ in self.params]
        self.sketcher = GradientSketch(dim=sketch_dim, seed=seed, kind=kind, block_size=block_size)
        self.window = _check_int("window", window, 2)
        self.every = _check_int("every", every, 1)
        self.ar_order = _check_int("ar_order", ar_order, 1)
        self.predictors = check_predictors(predictors)
        if not isinstance(ema_beta, (int, float)) or isinstance(ema_beta, bool) or not 0.0 <= ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta!r}")
        if distributed not in ("auto", True, False):
            raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
        self.ema_beta, self.per_layer = float(ema_beta), bool(per_layer)
        self.distributed, self.group = distributed, group
        self._sizes = [p.numel() if isinstance(p, torch.Tensor) else 1 for _, p in self.params]
        self._owners: tuple[int, list[int]] | None = None
        self.reset()

    @property
    def scopes(self) -> list[str]:
        """Row labels of the tracked sketches: ``"global"`` then each parameter name when per_layer."""
        return ["global"] + (self.names if self.per_layer else [])

    def reset(self) -> None:
        """Forget the trajectory (history, path-length sums, counters)."""
        rows = len(self.scopes)
        self.history: deque[torch.Tensor] = deque(maxlen=self.window)
        self.err = {p: torch.zeros(rows, dtype=torch.float64) for p in self.predictors}
        self.norm = {p: torch.zeros(rows, dtype=torch.float64) for p in self.predictors}
        self.count = dict.fromkeys(self.predictors, 0)
        self.calls = self.num_sketches = self.skipped_nonfinite = 0
        self.seconds = 0.0

    def _values(self, grads: Mapping[str, Any] | None) -> list[Any]:
        if grads is None:
            return [getattr(p, "grad", None) for _, p in self.params]
        if not isinstance(grads, Mapping):
            raise ValueError(f"grads must be None or a mapping name -> tensor, got {type(grads)}")
        unknown = set(grads) - set(self.names)
        if unknown:
            raise ValueError(f"grads has names the monitor does not track: {sorted(unknown)[:5]}")
        return [grads.get(n) for n in self.names]

    def _local_sketches(self, values: list[Any], rank: int, world_size: int) -> torch.Tensor:
        """``(L, dim)`` of this rank's contributions; replicated tensors are sketched by their owner only."""
        if self._owners is None or self._owners[0] != world_size:
            self._owners = (world_size, owner_plan(self._sizes, world_size))
        owners = self._owners[1]
        rows, device = [], None
        for name, v, owner in zip(self.names, values, owners):
            if v is None or (world_size > 1 and not is_sharded(v) and owner != rank):
                rows.append(None)
                continue
            s = self.sketcher.sketch_tensor(name, v)
            device = device or s.device
            rows.append(s)
        device = device or torch.device("cpu")
        zeros = torch.zeros(self.sketcher.dim, dtype=torch.float64, device=device)
        return torch.stack([zeros if s is None else s.to(device) for s in rows])

    def update(self, grads: Mapping[str, Any] | None = None) -> bool:
        """Record the current gradient on scheduled steps; returns whether it was sketched.

        Args:
            grads: ``None`` reads ``.grad`` of the tracked parameters; otherwise a mapping name ->
                Tensor, DTensor or SketchSlice (missing names count as zero gradients).
        """
        self.calls += 1
        if (self.calls - 1) % self.every:
            return False
        t0 = time.perf_counter()
        values = self._values(grads)
        rank, world_size = world(self.distributed, self.group)
        layers = self._local_sketches(values, rank, world_size)
        if not self.per_layer:  # only the global sketch is kept: reduce one row, not one per parameter
            layers = layers.sum(0, keepdim=True)
        if world_size > 1:
            if layers.device.type == "cpu" and _backend_needs_cuda(self.group):
                layers = layers.cuda()
            all_reduce_sum(layers, self.group)  # one collective for all sketches, concatenated
        layers = layers.cpu()
        z = torch.cat([layers.sum(0, keepdim=True), layers if self.per_layer else layers[:0]])
        if not bool(torch.isfinite(z).all()):
            self.skipped_nonfinite += 1
            self.seconds += time.perf_counter() - t0
            return False
        self._record(z)
        self.seconds += time.perf_counter() - t0
        return True

    def _record(self, z: torch.Tensor) -> None:
        if self.history:
            past = torch.stack(list(self.history), dim=-2)  # (rows, T, dim)
            energy = (z**2).sum(-1)
            for p in self.predictors:
                if past.shape[-2] >= min_history(p, self.ar_order):
                    zhat = predict_next(past, p, ema_beta=self.ema_beta, ar_order=self.ar_order)
                    self.err[p] += ((z - zhat) ** 2).sum(-1)
                    self.norm[p] += energy
                    self.count[p] += 1
        self.history.append(z)
        self.num_sketches += 1

    def summary(self) -> dict[str, Any]:
        """Diagnostics as ``{"global": {...}, "layers": {name: {...}}, "num_sketches": int, ...}``.

        Each scope holds ``path_length`` and ``path_length_ratio`` (dicts by predictor; the ratio divides
        by the summed squared sketch norms over the same steps, so 1 means "no better than predicting
        zero"), and, once the window holds two sketches, ``predictable_rank_90``/``_99`` and
        ``effective_rank`` of the window of increments. Path lengths accumulate since the last reset.
        """
        rows = self.scopes
        ranks = {}
        if len(self.history) >= 2:
            sv = increment_spectrum(torch.stack(list(self.history), dim=-2))
            ranks = {
                "predictable_rank_90": predictable_rank(sv, 0.9).tolist(),
                "predictable_rank_99": predictable_rank(sv, 0.99).tolist(),
                "effective_rank": effective_rank(sv).tolist(),
            }
        scopes = []
        for i in range(len(rows)):
            entry: dict[str, Any] = {
                "path_length": {p: float(self.err[p][i]) for p in self.predictors},
                "path_length_ratio": {
                    p: float(self.err[p][i] / self.norm[p][i]) for p in self.predictors if self.norm[p][i] > 0
                },
            }
            entry.update({k: v[i] for k, v in ranks.items()})
            scopes.append(entry)
        return {
            "global": scopes[0],
            "layers": dict(zip(rows[1:], scopes[1:])),
            "num_sketches": self.num_sketches,
            "num_predictions": dict(self.count),
            "skipped_nonfinite": self.skipped_nonfinite,
            "seconds": self.seconds,
        }

    def to_log_dict(self, prefix: str = "traj/") -> dict[str, float]:
        """Flat ``{prefix}{scope}/{metric}[/{predictor}]`` keys for W&B or JSONL (plain Python numbers)."""
        s = self.summary()
        out: dict[str, float] = {
            f"{prefix}global/num_sketches": s["num_sketches"],
            f"{prefix}global/skipped_nonfinite": s["skipped_nonfinite"],
        }
        for scope, entry in [("global", s["global"]), *s["layers"].items()]:
            for key, value in entry.items():
                if isinstance(value, dict):
                    out.update({f"{prefix}{scope}/{key}/{p}": v for p, v in value.items()})
                else:
                    out[f"{prefix}{scope}/{key}"] = value
        return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}

    def state_dict(self) -> dict[str, Any]:
        """Trajectory state for checkpointing (identical on all ranks after the reduction)."""
        return {
            "history": [z.clone() for z in self.history],
            "err": {p: t.clone() for p, t in self.err.items()},
            "norm": {p: t.clone() for p, t in self.norm.items()},
            "count": dict(self.count),
            "calls": self.calls,
            "num_sketches": self.num_sketches,
            "skipped_nonfinite": self.skipped_nonfinite,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ValueError if it was written for other scopes or predictors."""
        rows = len(self.scopes)
        if set(state["err"]) != set(self.predictors) or any(
            t.shape[0] != rows for t in state["err"].values()
        ):
            raise ValueError("state was saved with different predictors or tracked parameters")
        self.reset()
        self.history.extend(z.clone() for z in state["history"])
        self.err = {p: t.clone() for p, t in state["err"].items()}
        self.norm = {p: t.clone() for p, t in state["norm"].items()}
        self.count = dict(state["count"])
        self.calls, self.num_sketches = state["calls"], state["num_sketches"]
        self.skipped_nonfinite = state["skipped_nonfinite"]


def _backend_needs_cuda(group) -> bool:
    import torch.distributed as dist

    return dist.get_backend(group) == "nccl"
