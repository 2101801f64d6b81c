"""Hugging Face ``Trainer``: SpectralNewton as the optimizer, curvature and trajectory diagnostics as a callback.

* :func:`spectral_newton_optimizers` builds SpectralNewton (alpha by layer type) and the scheduler the Trainer
  would build, from a model and ``TrainingArguments``, for ``Trainer(optimizers=(optimizer, scheduler))``.
  Plain, DDP and ``accelerate launch`` runs.
* :class:`SpectralNewtonTrainer` creates the same pair inside the Trainer (``create_optimizer`` /
  ``create_scheduler``). Use it under FSDP2 (the Trainer refuses ``optimizers=`` with FSDP) and under DeepSpeed,
  where a DeepSpeed config naming ``"optimizer": {"type": "spectral_newton"}`` is turned into a
  :class:`~spectral_dist.integrations.deepspeed.ZeroSpectralNewton` attached to the ZeRO engine.
* :class:`SpectralDiagnosticsCallback` sketches the training gradient for the
  :class:`~spectral_dist.diagnostics.TrajectoryMonitor` in ``on_pre_optimizer_step`` (the last event that
  sees ``.grad``: the Trainer zeroes gradients right after ``optimizer.step()``), and every ``every`` steps runs
  the :class:`~spectral_dist.probes.CurvatureProbe` on a fixed batch and logs ``curv/<layer>/<metric>`` and
  ``traj/...`` (the recipes' key names) through the Trainer's reporters.
* :func:`repair_deepspeed_cpu_state` makes accelerate count every process of a multi-process DeepSpeed run on
  CPU (``SpectralNewtonTrainer`` calls it; without it every rank trains on the same batches).

See docs/hf_trainer.md for an example and the launch commands.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .._extras import require

require(
    "transformers",
    "accelerate",
    extra="hf",
    feature="spectral_dist.integrations.hf (the Trainer integration)",
)

from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler  # noqa: E402

from ..logging.metrics import CURVATURE_KEYS  # noqa: E402
from ..logging.metrics import curvature_metrics as _curvature_metrics  # noqa: E402
from ..optim.classify import classify_parameters, matrix_names  # noqa: E402
from ..optim.spectral_newton import SpectralNewton  # noqa: E402

__all__ = [
    "CURVATURE_KEYS",
    "SpectralDiagnosticsCallback",
    "SpectralNewtonTrainer",
    "build_spectral_newton",
    "build_scheduler",
    "curvature_metrics",
    "optimizer_options",
    "repair_deepspeed_cpu_state",
    "spectral_newton_optimizers",
    "training_steps",
]

_NO_DECAY_TYPES = ("norm", "bias")  # as the Trainer: no weight decay for LayerNorm weights and biases


# ---------------------------------------------------------------------------------------------- optimizer
def optimizer_options(args: TrainingArguments, **overrides) -> dict:
    """SpectralNewton options from ``TrainingArguments``: ``learning_rate`` is the lr of every group (matrices
    and AdamW parameters, so the scheduler scales both), ``weight_decay`` the decoupled decay of matrices and
    of the AdamW parameters that the Trainer decays, ``adam_beta1/2`` and ``adam_epsilon`` the AdamW options.
    ``overrides`` (any SpectralNewton option) win."""
    opts = dict(
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        adamw_betas=(args.adam_beta1, args.adam_beta2),
        adamw_eps=args.adam_epsilon,
        adamw_weight_decay=args.weight_decay,
    )
    opts.update(overrides)
    if "adamw_betas" in opts:
        opts["adamw_betas"] = tuple(opts["adamw_betas"])
    return opts


def _schedule_adamw_lr(opt: SpectralNewton) -> SpectralNewton:
    """Move ``adamw_lr`` into the lr of AdamW-only groups, so that LR schedulers scale it too."""
    for g in opt.param_groups:
        if g["spectral"] is False and g["adamw_lr"] is not None:
            g["lr"], g["adamw_lr"] = g["adamw_lr"], None
    return opt


def _no_decay(opt: SpectralNewton) -> SpectralNewton:
    for g in opt.param_groups:
        if g.get("layer_type") in _NO_DECAY_TYPES:
            g["adamw_weight_decay"] = 0.0
    return opt


def _check_engine(args: TrainingArguments, what: str) -> None:
    if getattr(args, "deepspeed", None):
        raise ValueError(
            f"{what} builds a plain SpectralNewton, which would step DeepSpeed's flat ZeRO partitions as AdamW: "
            "under DeepSpeed use spectral_dist.integrations.hf.SpectralNewtonTrainer with a DeepSpeed config "
            'whose optimizer is {"type": "spectral_newton"} (configs/deepspeed/zero*_spectral_newton.json)'
        )
    if getattr(args, "fsdp", None):
        raise ValueError(
            f"the Trainer does not accept optimizers=(...) under FSDP, so {what} cannot be used there: use "
            "spectral_dist.integrations.hf.SpectralNewtonTrainer (FSDP2, fsdp_version=2)"
        )


def build_spectral_newton(
    model: nn.Module,
    args: TrainingArguments,
    alpha="by_layer",
    head_names: tuple[str, ...] = (),
    **options,
) -> SpectralNewton:
    """SpectralNewton with one param group per layer type (``SpectralNewton.from_model``) and the options of
    :func:`optimizer_options`. Call it after ``args`` exists, so a launched process group is initialised and
    the optimizer distributes the matrix step over it."""
    _ = args.device  # initialises the process group under `accelerate launch` / torchrun
    opt = SpectralNewton.from_model(
        model, alpha=alpha, head_names=head_names, **optimizer_options(args, **options)
    )
    return _schedule_adamw_lr(_no_decay(opt))


def training_steps(args: TrainingArguments, train_dataset=None) -> int:
    """Optimizer steps of ``Trainer.train()``: ``args.max_steps`` if > 0, else computed as the Trainer does
    from ``len(train_dataset)``, the per-device batch size, the world size and gradient accumulation."""
    if args.max_steps > 0:
        return args.max_steps
    if train_dataset is None or not hasattr(train_dataset, "__len__"):
        raise ValueError(
            "args.max_steps is not set: pass train_dataset (with a length) or num_training_steps"
        )
    batches = math.ceil(len(train_dataset) / (args.per_device_train_batch_size * args.world_size))
    if args.dataloader_drop_last:
        batches = len(train_dataset) // (args.per_device_train_batch_size * args.world_size)
    acc = args.gradient_accumulation_steps
    per_epoch = max(batches // acc + int(batches % acc > 0), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def build_scheduler(optimizer, args: TrainingArguments, num_training_steps: int):
    """The Trainer's scheduler: ``get_scheduler(args.lr_scheduler_type, ...)`` with its warmup and kwargs."""
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )


def spectral_newton_optimizers(
    model: nn.Module,
    args: TrainingArguments,
    train_dataset=None,
    num_training_steps: int | None = None,
    alpha="by_layer",
    head_names: tuple[str, ...] = (),
    **options,
):
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``: see :func:`build_spectral_newton` and
    :func:`build_scheduler`; the step count comes from :func:`training_steps` unless given.

    Raises:
        ValueError: under DeepSpeed or FSDP (use :class:`SpectralNewtonTrainer` there).
    """
    _check_engine(args, "spectral_newton_optimizers")
    opt = build_spectral_newton(model, args, alpha=alpha, head_names=head_names, **options)
    n = num_training_steps if num_training_steps is not None else training_steps(args, train_dataset)
    return opt, build_scheduler(opt, args, n)


def repair_deepspeed_cpu_state(args: TrainingArguments) -> bool:
    """Make accelerate count every process of a multi-process DeepSpeed run on CPU. Returns True if it did.

    Without GPUs, ``TrainingArguments`` builds accelerate's ``PartialState`` for DeepSpeed without a backend
    (transformers' ``_setup_devices`` passes none on that path, and accelerate's ``_prepare_backend`` finds no
    GPU, so it stays ``None``). ``deepspeed.init_distributed`` still forms the process group (the CPU
    accelerator's ``communication_backend_name()`` is ``gloo`` without oneCCL), but accelerate then sets
    ``num_processes = 1`` and ``process_index = 0`` on every rank: the Trainer does not shard the data (every
    rank trains on the same batches), every rank logs and saves as the main process, and the DeepSpeed config's
    ``train_batch_size`` is computed for one process. This rebuilds the state with the process group's backend
    (the group itself is kept) and, for ``TrainingArguments(deepspeed=...)``, redoes the DeepSpeed config
    processing with the right world size. A no-op in every other case (GPUs, one process, no DeepSpeed).
    :class:`SpectralNewtonTrainer` calls it before the Trainer creates its ``Accelerator``.
    """
    import os

    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if not args.deepspeed and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return False
    _ = args.device  # builds the state (and DeepSpeed's process group) if not yet done
    state = args.distributed_state
    if state is None or state.distributed_type != DistributedType.DEEPSPEED or state.backend is not None:
        return False
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return False
    world = dist.get_world_size()
    if state.num_processes == world:
        return False
    if AcceleratorState._shared_state:
        raise RuntimeError(
            "an Accelerator already exists with a one-process state in this multi-process DeepSpeed CPU run: call "
            "repair_deepspeed_cpu_state(args) before creating the Trainer / Accelerator"
        )
    timeout = getattr(args, "ddp_timeout_delta", None)
    flag = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # as transformers does while it builds the state
    try:
        AcceleratorState._reset_state(reset_partial_state=True)
        kwargs = {"timeout": timeout} if timeout is not None else {}
        args.distributed_state = PartialState(backend=dist.get_backend(), **kwargs)
    finally:
        if flag is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = flag
    if args.distributed_state.num_processes != world:  # pragma: no cover - accelerate changed
        raise RuntimeError(
            f"accelerate counts {args.distributed_state.num_processes} processes in a DeepSpeed process group "
            f"of {world}: every rank would train alone"
        )
    if args.deepspeed and getattr(args, "hf_deepspeed_config", None) is not None:
        from accelerate.utils import DeepSpeedPlugin
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        # as TrainingArguments.__post_init__, now with the right world size (train_batch_size)
        args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
        args.hf_deepspeed_config.trainer_config_process(args)
        args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)
    return True


def _check_launch(trainer: Trainer) -> None:
    """Refuse runs in which accelerate quietly ignored the launch: each launched process training alone, or
    FSDP asked for but not enabled (accelerate enables it only on GPUs)."""
    import os

    from .launch import check_process_count

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    counted = trainer.accelerator.num_processes
    if launched > 1 and counted != launched:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE) but the Trainer's accelerator counts {counted}, so "
            "each process would train alone on the same batches. Without GPUs: DDP needs use_cpu=True or "
            "ACCELERATE_USE_CPU=true (gloo); DeepSpeed needs use_cpu=False and DS_ACCELERATOR=cpu "
            "(see docs/hf_trainer.md)"
        )
    check_process_count(counted, "the Trainer's accelerator")  # accelerate launch asked for more
    if (
        getattr(trainer.args, "fsdp", None)
        and not trainer.is_fsdp_enabled
        and not trainer.is_fsdp_xla_enabled
    ):
        raise ValueError(
            "TrainingArguments ask for FSDP but accelerate did not enable it "
            f"(distributed type {trainer.accelerator.distributed_type}): accelerate installs the FSDP plugin only "
            "for GPU-like distributed types, not for MULTI_CPU, so this run would be plain DDP. Launch on GPUs, "
            "or drop fsdp/fsdp_config to run DDP on CPU (see docs/hf_trainer.md)"
        )


def _zero_spectral(optimizer):
    """The ZeroSpectralNewton inside accelerate/DeepSpeed wrappers, or None."""
    from .deepspeed import ZeroSpectralNewton

    o = optimizer
    for _ in range(5):
        if isinstance(o, ZeroSpectralNewton):
            return o
        o = getattr(o, "optimizer", None)
    return None


class SpectralNewtonTrainer(Trainer):
    """A ``Trainer`` whose default optimizer is SpectralNewton (by-layer alpha) with the Trainer's scheduler.

    Args:
        spectral_alpha: ``alpha`` of :meth:`SpectralNewton.from_model` (``"by_layer"``, a number, ``"auto"``
            or ``{layer_type: alpha}``).
        spectral_options: further SpectralNewton options (``momentum``, ``scale``, ``basis``, ...); they override
            the ones taken from ``TrainingArguments`` (:func:`optimizer_options`).
        head_names: parameter-name patterns of heads that get AdamW.
        *args, **kwargs: ``Trainer`` arguments. :class:`SpectralDiagnosticsCallback` instances among the
            callbacks are bound to this trainer.

    Engines: plain, DDP and FSDP2 (``fsdp_version=2``): SpectralNewton is created before the model is wrapped
    and distributes the matrix step by itself (FSDP v1's flat parameters are refused). DeepSpeed ZeRO 1/2/3:
    the config must say ``"optimizer": {"type": "spectral_newton", "params": {...}}``; its params win over the
    ``TrainingArguments`` values, which fill the missing ones; the optimizer section is removed before
    DeepSpeed sees it, and the ZeroSpectralNewton is attached to the ZeRO optimizer after
    ``accelerator.prepare``. A DeepSpeed config naming another optimizer is an error.

    Multi-process DeepSpeed on CPU: accelerate would count one process per rank (see
    :func:`repair_deepspeed_cpu_state`, called before the Trainer creates its ``Accelerator``). A launch that
    accelerate still does not count in full, or FSDP asked for where accelerate does not enable it (CPU), is
    an error rather than a run in which every process trains alone or FSDP is silently replaced by DDP.
    """

    def __init__(
        self,
        *args,
        spectral_alpha="by_layer",
        spectral_options: Mapping | None = None,
        head_names: tuple[str, ...] = (),
        **kwargs,
    ):
        self.spectral_alpha = spectral_alpha
        self.spectral_options = dict(spectral_options or {})
        self.head_names = tuple(head_names)
        self._ds_params = None
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is not None:
            repair_deepspeed_cpu_state(targs)
        super().__init__(*args, **kwargs)
        _check_launch(self)
        if self.is_deepspeed_enabled:
            self._take_deepspeed_optimizer()
        elif self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "SpectralNewtonTrainer needs FSDP2 (FSDP v1 hands the optimizer flat parameters, on which "
                "matrices cannot be recognised): set fsdp_config={'fsdp_version': 2} / fsdp_version: 2"
            )
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, SpectralDiagnosticsCallback) and cb.trainer is None:
                cb.bind(self)

    def _take_deepspeed_optimizer(self) -> None:
        from .deepspeed import SpectralConfigError, check_config, is_spectral_config

        hf_cfg = self.accelerator.state.deepspeed_plugin.hf_ds_config
        cfg = hf_cfg.config
        if not is_spectral_config(cfg) and "optimizer" in cfg:
            raise SpectralConfigError(
                f"the DeepSpeed config names optimizer {cfg['optimizer'].get('type')!r}, so DeepSpeed would "
                "build it instead of SpectralNewton: set its type to spectral_newton, remove the optimizer "
                "section (SpectralNewton from TrainingArguments), or use transformers.Trainer"
            )
        self._ds_params = check_config(
            cfg
        )  # ZeRO stage, offload, precision: what ZeroSpectralNewton supports
        if "optimizer" not in cfg:
            return
        del cfg["optimizer"]  # the Trainer then asks create_optimizer() for a client optimizer
        # the config's optimizer params are the ones used: drop the Trainer's lr / weight_decay comparison
        hf_cfg.mismatches = [m for m in hf_cfg.mismatches if not m.startswith("- ds optimizer.")]

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if self._ds_params is not None:
            from .deepspeed import build_optimizer

            params = dict(self._ds_params)
            params.setdefault("alpha", self.spectral_alpha)
            if self.head_names:
                params.setdefault("head_names", list(self.head_names))
            opts = optimizer_options(self.args, **{**self.spectral_options, **params})
            self.optimizer = _schedule_adamw_lr(_no_decay(build_optimizer(opt_model, opts)))
        else:
            self.optimizer = build_spectral_newton(
                opt_model,
                self.args,
                alpha=self.spectral_alpha,
                head_names=self.head_names,
                **self.spectral_options,
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        sched = super().create_scheduler(num_training_steps, optimizer)
        zs = _zero_spectral(self.optimizer)
        if zs is not None and zs is not self.optimizer and zs._zero is None:
            from .deepspeed import attach

            attach(zs, self.optimizer)  # after accelerator.prepare: ZeRO now holds the flat partitions
        return sched

    def spectral_optimizer(self) -> SpectralNewton:
        """The SpectralNewton (or ZeroSpectralNewton) inside the Trainer's optimizer wrappers."""
        o = self.optimizer
        for _ in range(5):
            if isinstance(o, SpectralNewton):
                return o
            o = getattr(o, "optimizer", None)
        raise RuntimeError("the Trainer's optimizer is not a SpectralNewton")


# ---------------------------------------------------------------------------------------------- diagnostics
def curvature_metrics(report) -> dict[str, float]:
    """The recipes' ``curv/...`` keys, without non-finite values (see spectral_dist.logging.metrics)."""
    return _curvature_metrics(report, keep_nan=False)


def hf_loss(model: nn.Module, batch) -> torch.Tensor:
    """``model(**batch).loss``: the loss of a transformers model on a collated batch with labels."""
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else out[0]
    if loss is None:
        raise ValueError("the model returned no loss: the probe batch needs labels (or pass loss_fn)")
    return loss


def _plain_class(model: nn.Module) -> type:
    """The model's class without FSDP2's dynamic ``FSDP<Class>`` wrapper."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return type(model)
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


class SpectralDiagnosticsCallback(TrainerCallback):
    """Curvature exponents and gradient-trajectory diagnostics inside ``Trainer.train()``.

    Every ``every`` optimizer steps (and at the last step) it logs, through the Trainer's reporters
    (W&B, TensorBoard, ...; also ``trainer.state.log_history``):

    * ``traj/...``: :meth:`TrajectoryMonitor.to_log_dict` of the training gradients of the matrices,
      sketched in ``on_pre_optimizer_step`` every ``traj_every`` steps (after clipping, before the step);
    * ``curv/<layer>/<metric>``: :class:`CurvatureProbe` on a fixed batch (``batch``, or the first
      ``batch_size`` training examples collated by the Trainer) for ``layers`` (default: the first
      ``max_layers`` matrices).

    W&B gets the keys exactly as above (the Trainer's own ``trainer.log`` would prefix them with ``train/``),
    with ``train/global_step`` as the Trainer's W&B step metric; other reporters get them via ``on_log``.

    Bind it to the trainer: ``SpectralNewtonTrainer`` does that for callbacks passed to it; with a plain
    ``Trainer`` use ``trainer.add_callback(SpectralDiagnosticsCallback(trainer=trainer))`` or ``cb.bind(trainer)``.

    Engines: DDP and FSDP2 sketch on every process (the monitor all-reduces); the probe runs on the main
    process, on the unwrapped model, or, under FSDP2 and ZeRO-3, on a full copy gathered there (collective).
    Under DeepSpeed the gradients live in ZeRO's partitions, so only the probe runs (``traj_every`` ignored).
    """

    def __init__(
        self,
        trainer: Trainer | None = None,
        *,
        every: int = 50,
        batch=None,
        batch_size: int = 8,
        loss_fn: Callable | None = None,
        layers: Sequence[str] | None = None,
        max_layers: int | None = 4,
        top_k: int = 8,
        hvp: str = "autograd",
        probe: bool = True,
        traj_every: int | None = 1,
        traj_sketch_dim: int = 64,
        traj_window: int = 16,
        seed: int = 0,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if traj_every is not None and (
            isinstance(traj_every, bool) or not isinstance(traj_every, int) or traj_every < 1
        ):
            raise ValueError(f"traj_every must be a positive integer or None, got {traj_every!r}")
        self.trainer = None
        self.every, self.batch, self.batch_size = every, batch, batch_size
        self.loss_fn = loss_fn or hf_loss
        self.layers, self.max_layers, self.top_k, self.hvp = layers, max_layers, top_k, hvp
        self.probe_enabled, self.traj_every = probe, traj_every
        self.traj_sketch_dim, self.traj_window, self.seed = traj_sketch_dim, traj_window, seed
        self.monitor = None
        self.last_metrics: dict[str, float] = {}
        self._logged_step = -1
        if trainer is not None:
            self.bind(trainer)

    def bind(self, trainer: Trainer) -> SpectralDiagnosticsCallback:
        """Log through ``trainer``'s reporters and probe its model."""
        self.trainer = trainer
        return self

    # ------------------------------------------------------------------ setup
    def _base_model(self) -> nn.Module:
        t = self.trainer
        return t.accelerator.unwrap_model(t.model)

    def _is_deepspeed(self) -> bool:
        return bool(getattr(self.trainer, "is_deepspeed_enabled", False))

    def _sharded(self) -> bool:
        t = self.trainer
        if getattr(t, "is_fsdp_enabled", False):
            return True
        if self._is_deepspeed():
            cfg = t.accelerator.state.deepspeed_plugin.deepspeed_config
            return int((cfg.get("zero_optimization") or {}).get("stage", 0)) == 3
        return False

    def _matrix_names(self, model: nn.Module) -> list[str]:
        if self.layers is not None:
            return list(self.layers)
        names = matrix_names(classify_parameters(model))  # the probe's layers: expert stacks left out
        return names[: self.max_layers] if self.max_layers else names

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError(
                "SpectralDiagnosticsCallback is not bound to a trainer: use SpectralNewtonTrainer, or "
                "trainer.add_callback(SpectralDiagnosticsCallback(trainer=trainer, ...)) / callback.bind(trainer)"
            )
        model = self._base_model()
        # ZeRO-3 partitions hold no shapes (every parameter looks empty): name the layers on the gathered copy
        zero3 = self._is_deepspeed() and self._sharded()
        self.probe_layers = None if zero3 else self._matrix_names(model)
        if self.traj_every is not None and not self._is_deepspeed() and self.monitor is None:
            from ..diagnostics import TrajectoryMonitor

            named = dict(model.named_parameters())
            all_matrices = matrix_names(classify_parameters(model), stacks=True)
            self.monitor = TrajectoryMonitor(
                [(n, named[n]) for n in all_matrices],
                sketch_dim=self.traj_sketch_dim,
                window=self.traj_window,
                every=self.traj_every,
                seed=self.seed,
            )
        if self.probe_enabled and self.batch is None:
            self.batch = self._first_examples()

    def _first_examples(self):
        """The first ``batch_size`` training examples, collated as the Trainer's dataloader does."""
        t = self.trainer
        ds = t.train_dataset
        if ds is None or not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
            raise ValueError(
                "SpectralDiagnosticsCallback needs batch=... when the train dataset is not indexable "
                f"(got {type(ds).__name__})"
            )
        try:
            import datasets

            if isinstance(ds, datasets.Dataset) and t.args.remove_unused_columns:
                ds = t._remove_unused_columns(ds, description="probe")
        except ImportError:  # pragma: no cover - datasets is a dependency
            pass
        n = min(self.batch_size, len(ds))
        return t.data_collator([ds[i] for i in range(n)])

    # ------------------------------------------------------------------ events
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.update()  # collective on sketch steps: every process gets here

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every == 0 or step >= state.max_steps:
            self.log_now(step)

    def on_train_end(self, args, state, control, **kwargs):
        if self._logged_step != state.global_step:
            self.log_now(state.global_step)

    # ------------------------------------------------------------------ measurement and logging
    def _to_device(self, batch, device):
        if isinstance(batch, Mapping):
            return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if isinstance(batch, (tuple, list)):
            return type(batch)(v.to(device) if torch.is_tensor(v) else v for v in batch)
        return batch.to(device)

    def probe(self):
        """The curvature report on the main process (None elsewhere); collective with several processes.

        DDP, FSDP2 and ZeRO-1/2: every process probes its share of the batch in place (the numbers are one
        process's on the whole batch; FSDP2 uses finite-difference HVPs). FSDP v1 and ZeRO-3: the full weights
        are gathered into a copy on the main process and probed there."""
        from ..probes import CurvatureProbe
        from ..probes.sharding import in_place_layout, split_batch

        t = self.trainer
        acc = t.accelerator
        batch, hvp = self._to_device(self.batch, acc.device), self.hvp
        layout = in_place_layout(t.model_wrapped)
        if layout is not None:  # every process probes its share of the batch
            named = dict(layout.module.named_parameters())
            layers = []
            for n in self.probe_layers or self._matrix_names(layout.module):
                layers.append(next((k for k in named if k == n or k.endswith("." + n)), n))
            hvp = "fd" if layout.kind == "sharded" else hvp
            target, batch = t.model_wrapped, split_batch(batch, acc.process_index, acc.num_processes)
        elif self._sharded():
            full = acc.get_state_dict(t.model_wrapped)  # collective; full weights on the main process
            target = None
            if acc.is_main_process:
                base = self._base_model()
                cls = _plain_class(base)
                # under ZeRO-3 `_from_config` builds inside deepspeed.zero.Init, a collective that would
                # hang here on the main process alone: build the plain model directly then
                plain = self._is_deepspeed() or not hasattr(cls, "_from_config")
                target = cls(base.config) if plain else cls._from_config(base.config)
                target.load_state_dict(full)
                target.to(acc.device)
        else:
            target = self._base_model()
        report = None
        if layout is not None or acc.is_main_process:
            if layout is None and self.probe_layers is None:
                self.probe_layers = self._matrix_names(target)
            probe = CurvatureProbe(
                target,
                self.loss_fn,
                top_k=self.top_k,
                hvp=hvp,
                layers=layers if layout is not None else self.probe_layers,
                seed=self.seed,
            )
            report = probe.measure(batch)
        return report if acc.is_main_process else None

    def log_now(self, step: int) -> dict[str, float]:
        """Measure and log now (collective: call on every process). Returns the metrics of this process."""
        metrics: dict[str, float] = {}
        if self.monitor is not None:
            metrics.update(self.monitor.to_log_dict(prefix="traj/"))
        if self.probe_enabled:
            report = self.probe()
            if report is not None:
                metrics.update(curvature_metrics(report))
        self._logged_step = step
        self.last_metrics = metrics
        if metrics:
            self._dispatch(metrics)
        return metrics

    def _dispatch(self, metrics: dict[str, float]) -> None:
        """``trainer.log`` without its ``train/`` prefix for W&B: log history, W&B, then the other reporters."""
        from transformers.integrations import WandbCallback
        from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

        t = self.trainer
        state, args = t.state, t.args
        state.log_history.append({**metrics, "step": state.global_step})
        for cb in t.callback_handler.callbacks:
            if cb is self or isinstance(cb, (DefaultFlowCallback, PrinterCallback, ProgressCallback)):
                continue
            if isinstance(cb, WandbCallback):
                if not state.is_world_process_zero:
                    continue
                if not cb._initialized:
                    cb.setup(args, state, t.model)
                import wandb

                if wandb.run is None:
                    raise RuntimeError(
                        "the Trainer's WandbCallback has no active W&B run to log diagnostics to"
                    )
                wandb.run.log({**metrics, "train/global_step": state.global_step})
            else:
                cb.on_log(args, state, t.control, logs=dict(metrics), model=t.model)
