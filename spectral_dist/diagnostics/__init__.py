"""Gradient-trajectory diagnostics: seeded sketches of (sharded) gradients, path length, predictable rank.

* :mod:`.sketch`: :class:`GradientSketch`, a JL projection generated blockwise from (seed, name, index).
* :mod:`.predictors` and :mod:`.ranks`: the math, pure functions on sketch histories.
* :mod:`.reduce`: the one place that talks to torch.distributed.
* :mod:`.monitor`: :class:`TrajectoryMonitor`, tying them together for a training loop.
"""

from .monitor import DEFAULT_EVERY, DEFAULT_KIND, TrajectoryMonitor
from .predictors import PREDICTORS, predict_next
from .ranks import effective_rank, increment_spectrum, predictable_rank
from .sketch import KINDS, GradientSketch, SketchSlice

__all__ = [
    "DEFAULT_EVERY",
    "DEFAULT_KIND",
    "KINDS",
    "PREDICTORS",
    "GradientSketch",
    "SketchSlice",
    "TrajectoryMonitor",
    "effective_rank",
    "increment_spectrum",
    "predict_next",
    "predictable_rank",
]
