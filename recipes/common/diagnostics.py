"""Every diagnostics call site of the recipes: curvature exponents (CurvatureProbe) and the gradient
trajectory (TrajectoryMonitor), logged as ``curv/<layer>/<metric>`` and ``traj/...`` plus log-log plots.

* Trajectory: :meth:`RecipeDiagnostics.after_backward` sketches the gradient of the matrix parameters every
  ``traj_every`` steps on every process (the monitor all-reduces the sketches); a summary is logged every
  ``traj_log_every`` steps and at the last step. Its state is checkpointed with the run.
* Curvature: every ``diag_every`` steps and at the last step, :class:`~spectral_dist.probes.CurvatureProbe`
  measures h_k along the gradient's top singular directions of up to ``probe_layers`` matrices on a fixed
  training batch, and the fitted alpha, gamma, s, s_pred, rel_err and participation ratio are logged,
  with a log-log figure of h_k against sigma_k. One process probes the unwrapped model. With several
  processes the probe runs in place, distributed (:mod:`spectral_dist.probes.sharding`): each process takes
  its share of the probe batch; under DDP and DeepSpeed ZeRO-1/2 products are all-reduced, under FSDP2 the
  directions stay sharded and the HVPs are finite differences through FSDP2's backward; the numbers equal
  one process's on the whole probe batch. Only FSDP v1 and ZeRO-3, whose flat partitions the probe cannot
  perturb, fall back to gathering the full weights into a fresh copy of the model on the main process (one
  model's memory there while the probe runs).
"""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType

from spectral_dist.logging.metrics import CURVATURE_KEYS, curvature_metrics
from spectral_dist.optim.classify import classify_parameters
from spectral_dist.optim.classify import matrix_names as classify_matrix_names

__all__ = ["RecipeDiagnostics", "CURVATURE_KEYS", "matrix_names"]

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def matrix_names(model) -> list[str]:
    """Names of the trainable weight matrices (conv, attention, MLP, other matrices) of an unwrapped model; a
    stack of matrices (fused MoE experts) is not one matrix and is left out."""
    return classify_matrix_names(classify_parameters(model))


class RecipeDiagnostics:
    """Curvature and trajectory diagnostics for one training run (see the module docstring)."""

    def __init__(self, cfg, accelerator, model, task, matrix_names, logger=None):
        """``matrix_names``: :func:`matrix_names` of the model before ``accelerator.prepare`` (ZeRO-3
        partitions parameters into empty placeholders, which no longer look like matrices)."""
        self.cfg, self.accelerator, self.model, self.task, self.logger = cfg, accelerator, model, task, logger
        self.sharded = accelerator.distributed_type in SHARDED
        base = accelerator.unwrap_model(model)
        self.matrix_names = list(matrix_names)
        self.monitor = None
        if cfg.traj_every and not (accelerator.distributed_type == DistributedType.DEEPSPEED):
            from spectral_dist.diagnostics import TrajectoryMonitor

            named = dict(base.named_parameters()) if not self.sharded else dict(model.named_parameters())
            tracked = [(n, named[n]) for n in self._tracked_names(named)]
            self.monitor = TrajectoryMonitor(
                tracked,
                sketch_dim=cfg.traj_sketch_dim,
                window=cfg.traj_window,
                every=cfg.traj_every,
                seed=cfg.seed,
            )
            accelerator.register_for_checkpointing(self.monitor)
        self._probe_batch = None

    def _tracked_names(self, named):
        """Matrix parameter names as the (possibly wrapped) model spells them."""
        out = []
        for n in self.matrix_names:
            match = next((k for k in named if k == n or k.endswith("." + n)), None)
            if match is None:
                raise KeyError(f"parameter {n!r} not found in the prepared model")
            out.append(match)
        return out

    # ------------------------------------------------------------------ trajectory
    def after_backward(self, step: int) -> None:
        """Call after backward (and clipping), before ``optimizer.step``, on every process."""
        if self.monitor is not None:
            self.monitor.update()

    # ------------------------------------------------------------------ curvature
    def _batch(self):
        if self._probe_batch is None:
            n = min(self.cfg.probe_batch_size, len(self.task.train_data))
            g = torch.Generator().manual_seed(self.cfg.seed + 12345)
            idx = torch.randperm(len(self.task.train_data), generator=g)[:n].tolist()
            self._probe_batch = self.task.collate([self.task.train_data[i] for i in idx])
        b = self._probe_batch
        dev = self.accelerator.device
        return type(b)(t.to(dev) for t in b) if isinstance(b, (tuple, list)) else b.to(dev)

    def probe(self):
        """Run the curvature probe; returns its report on the main process (None elsewhere).

        Collective with several processes: every process probes its share of the batch (or, for FSDP v1 and
        ZeRO-3, takes part in gathering the full weights)."""
        from spectral_dist.probes import CurvatureProbe
        from spectral_dist.probes.sharding import in_place_layout, split_batch

        cfg, acc = self.cfg, self.accelerator
        layers = self.matrix_names[: cfg.probe_layers] if cfg.probe_layers else self.matrix_names
        hvp = cfg.probe_hvp if cfg.probe_hvp != "auto" else "autograd"
        layout = in_place_layout(self.model)
        if layout is not None:  # every process probes its share of the batch
            if layout.kind == "sharded":
                hvp = "fd"  # FSDP2: gradients through its own backward; no double backward
            layers = self._tracked_names(dict(layout.module.named_parameters()))
            layers = layers[: cfg.probe_layers] if cfg.probe_layers else layers
            target, batch = self.model, split_batch(self._batch(), acc.process_index, acc.num_processes)
        elif self.sharded:  # FSDP v1, ZeRO-3: a full copy on the main process
            full = acc.get_state_dict(self.model)  # collective; full weights on the main process
            target, batch = None, self._batch()
            if acc.is_main_process:
                target = self.task.build_model(cfg).to(acc.device)
                target.load_state_dict(full)
        else:
            target, batch = acc.unwrap_model(self.model), self._batch()
        report = None
        if layout is not None or acc.is_main_process:
            probe = CurvatureProbe(
                target,
                self.task.loss_fn,
                top_k=cfg.probe_top_k,
                hvp=hvp,
                layers=layers,
                mode="eval",
                seed=cfg.seed,
            )
            report = probe.measure(batch)
        if layout is None:
            acc.wait_for_everyone()
        return report if acc.is_main_process else None

    def curvature_metrics(self, report) -> dict:
        return curvature_metrics(report, keep_nan=True)  # NaN fits logged: every layer has every key

    # ------------------------------------------------------------------ logging
    def maybe_log(self, step: int, last: bool) -> None:
        """Log trajectory and curvature diagnostics when they are due (collective: call on every process)."""
        cfg = self.cfg
        if self.monitor is not None and (last or (cfg.traj_log_every and step % cfg.traj_log_every == 0)):
            traj = self.monitor.to_log_dict(prefix="traj/")
            if self.logger is not None:
                self.logger.log(traj, step=step)
        if cfg.diag_every and (last or step % cfg.diag_every == 0):
            report = self.probe()
            if self.logger is not None and report is not None:
                from spectral_dist.logging.plots import curvature_grid

                self.logger.log(self.curvature_metrics(report), step=step)
                fig = curvature_grid(report.layers, title=f"h_k vs sigma_k, step {step}")
                self.logger.log_images({"curv/loglog": fig}, step=step)
