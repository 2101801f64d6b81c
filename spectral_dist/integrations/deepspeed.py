"""DeepSpeed ZeRO 1/2/3 with ``"optimizer": {"type": "spectral_newton", "params": {...}}`` in the config.

``initialize`` takes the arguments of ``deepspeed.initialize`` and returns the same tuple. When the config
names ``spectral_newton`` it builds a :class:`ZeroSpectralNewton` (every :class:`SpectralNewton` option is
accepted in ``params``; ``alpha`` may also be ``"by_layer"`` or ``{layer_type: alpha}``, and ``head_names``
lists AdamW heads), hands it to DeepSpeed as a client optimizer and then attaches it to the ZeRO optimizer.
Any other config goes to ``deepspeed.initialize`` unchanged.

How it stays exact: ZeRO gives a client optimizer flat fp32 partitions (stage 1/2: a range of each param
group's flat buffer; stage 3: every parameter's own partition, concatenated per sub-group). At attach time
each flat partition is mapped back to ``(parameter, offset, length)`` pieces on every rank, which gives one
:class:`~spectral_dist.distributed.layout.MatrixLayout` per matrix and an LPT owner plan. At each step the
fully reduced, unscaled (and clipped) fp32 gradient pieces are gathered to each matrix's owner, the owner runs
:meth:`SpectralNewton.matrix_direction` in fp32 (momentum and basis live only there), and the direction's
slices go back to every rank, which applies them to its fp32 master partition. Non-matrix pieces get AdamW
elementwise on the partition, with a cross-rank non-finite check so all ranks skip together.

Precision: bf16 and fp16 configs keep fp32 master partitions (``*_master_weights_and_gradients`` are refused).
DeepSpeed checks for overflow and skips the step before the client optimizer is called, and it unscales (and
clips) the gradients before calling it, so the loss scale and overflow steps never reach the momentum; a
non-finite gradient that still arrives (bf16 without overflow checks) skips that matrix or vector on every
rank. The matrix step (momentum, decomposition, direction) runs in fp32; only the parameter copy DeepSpeed
all-gathers afterwards is bf16/fp16. fp16 goes through the same code path as bf16 but needs an accelerator
with fp16 support (not this project's CPU test machine).

Supported: ZeRO stages 1, 2, 3 (also bf16 with fp32 gradient accumulation, DeepSpeed's ``BF16_Optimizer``),
gradient accumulation, clipping, DeepSpeed LR schedulers (they set each group's ``lr``; a fixed ``adamw_lr``
stays fixed, leave it unset to follow the schedule), ``save_checkpoint``/``load_checkpoint`` at the same world
size. Refused at initialize with the key and the fix: stage 0, optimizer/parameter offload, ZeRO++ quantized
gradients, hpZ, MiCS, elastic checkpoints, low-precision master weights, models built under ``zero.Init``.
ZeRO cannot tell an unused parameter from a zero gradient: such a matrix steps on its decaying momentum,
where a single-process SpectralNewton would skip it.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.exchange import gather_to_owners, scatter_from_owners
from ..distributed.layout import MatrixLayout, build_plan
from ..optim.engine import LocalEngine
from ..optim.spectral_newton import SpectralNewton

__all__ = [
    "SPECTRAL_TYPE",
    "SpectralConfigError",
    "ZeroSpectralNewton",
    "attach",
    "build_optimizer",
    "check_config",
    "initialize",
    "is_spectral_config",
    "load_config",
    "strip_optimizer",
]

SPECTRAL_TYPE = "spectral_newton"
_EXTRA_KEYS = ("head_names",)


class SpectralConfigError(ValueError):
    """A DeepSpeed config setting that the spectral_newton integration cannot honour."""


# ---------------------------------------------------------------------------------------------- config
def load_config(config) -> dict:
    """A deep copy of a DeepSpeed config given as a dict or a path to a JSON file."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    raise TypeError(f"DeepSpeed config must be a dict or a path to a JSON file, got {type(config).__name__}")


def _optimizer_type(cfg: Mapping) -> str | None:
    opt = cfg.get("optimizer")
    if not isinstance(opt, Mapping) or not isinstance(opt.get("type"), str):
        return None
    return opt["type"].lower().replace("-", "_")


def is_spectral_config(config) -> bool:
    """Whether ``config`` (dict or JSON path) has ``"optimizer": {"type": "spectral_newton"}``."""
    if config is None:
        return False
    return _optimizer_type(load_config(config)) in (SPECTRAL_TYPE, "spectralnewton")


def _option_names() -> set[str]:
    sig = inspect.signature(SpectralNewton.__init__)
    return {n for n in sig.parameters if n not in ("self", "params", "engine")}


def _enabled(cfg: Mapping, key: str) -> bool:
    sec = cfg.get(key)
    return isinstance(sec, Mapping) and sec.get("enabled", False) is True  # "auto" is decided later


def check_config(cfg: Mapping) -> dict:
    """Validate a spectral_newton DeepSpeed config; return ``optimizer.params``.

    Raises:
        SpectralConfigError: naming the config key and the fix for settings the integration cannot honour.
    """
    zero = cfg.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0
    if stage not in (1, 2, 3):
        raise SpectralConfigError(
            f'zero_optimization.stage={stage} is not supported with "optimizer": {{"type": "spectral_newton"}}: '
            'set "zero_optimization": {"stage": 1} (or 2, 3); without ZeRO use SpectralNewton directly '
            "(it shards the matrix step over a process group by itself)"
        )
    for key in ("offload_optimizer", "offload_param"):
        dev = (zero.get(key) or {}).get("device", "none")
        if dev not in (None, "none"):
            raise SpectralConfigError(
                f'zero_optimization.{key}.device="{dev}" is not supported with spectral_newton (offload swaps '
                f"the fp32 partitions the matrix exchange reads): remove zero_optimization.{key} or set its "
                'device to "none"'
            )
    if zero.get("zero_quantized_gradients", False):
        raise SpectralConfigError(
            "zero_optimization.zero_quantized_gradients=true reduces gradients through quantized all-to-all, so "
            "the matrix step would not see the exact reduced gradient: set it to false"
        )
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        raise SpectralConfigError(
            "zero_optimization.zero_hpz_partition_size>1 (hpZ) is not supported with spectral_newton: set it to 1"
        )
    if int(zero.get("mics_shard_size", -1) or -1) > 0:
        raise SpectralConfigError(
            "zero_optimization.mics_shard_size>0 (MiCS) partitions gradients within shard groups only and is "
            "not supported with spectral_newton: remove zero_optimization.mics_shard_size"
        )
    if zero.get("elastic_checkpoint", False):
        raise SpectralConfigError(
            "zero_optimization.elastic_checkpoint=true assumes elementwise optimizer state and cannot hold the "
            "owners' matrix momentum: set it to false"
        )
    if cfg.get("zenflow") or zero.get("zenflow"):
        raise SpectralConfigError(
            "zero_optimization.zenflow is not supported with spectral_newton: remove it"
        )
    if zero.get("super_offload", False):
        raise SpectralConfigError(
            "zero_optimization.super_offload is not supported with spectral_newton: remove it"
        )
    for key in ("fp16_master_weights_and_gradients", "bf16_master_weights_and_gradients"):
        if cfg.get(key, False) or zero.get(key, False):
            raise SpectralConfigError(
                f"{key}=true keeps low-precision master weights, but the matrix step must run on fp32 "
                f"partitions: set {key} to false"
            )
    if _enabled(cfg, "fp16") and _enabled(cfg, "bf16"):
        raise SpectralConfigError("fp16.enabled and bf16.enabled are both true: enable at most one")
    params = dict((cfg.get("optimizer") or {}).get("params") or {})
    allowed = _option_names() | set(_EXTRA_KEYS)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise SpectralConfigError(
            f"optimizer.params has unknown spectral_newton option(s) {unknown}: use only {sorted(allowed)}"
        )
    for k, v in params.items():
        if v == "auto" and k != "alpha":
            raise SpectralConfigError(
                f'optimizer.params.{k}="auto" is not resolved for spectral_newton: give a number '
                "(with accelerate, pass it to prepare_spectral_newton(..., {k}=...))"
            )
    return params


def strip_optimizer(cfg: Mapping) -> dict:
    """The config DeepSpeed gets: no ``optimizer`` section (the client optimizer replaces it)."""
    out = copy.deepcopy(dict(cfg))
    out.pop("optimizer", None)
    out["zero_allow_untested_optimizer"] = True
    return out


# ---------------------------------------------------------------------------------------------- optimizer
class ZeroSpectralNewton(SpectralNewton):
    """SpectralNewton that steps ZeRO's flat fp32 partitions (see the module docstring).

    Build it like SpectralNewton (or with :meth:`from_model`), pass it to DeepSpeed as the client optimizer,
    then call :func:`attach` with the ZeRO optimizer. Stepping before ``attach`` raises.
    """

    def __init__(self, params, *args, **kwargs):
        params = list(params)
        names = kwargs.pop("param_name_map", None) or {}
        kwargs.setdefault("engine", LocalEngine())
        super().__init__(params, *args, **kwargs)
        self._name_of: dict[int, str] = {}
        self._params: list[torch.Tensor] = []
        for name, p, _ in self.named_params():
            self._params.append(p)  # keeps ids alive for the name map
            self._name_of[id(p)] = names.get(id(p)) or name
        self._zero = None

    # -- layout -------------------------------------------------------------------------------------------
    def shape_of(self, p: torch.Tensor) -> tuple[int, ...]:
        """The full shape, also for ZeRO-3 (``zero.Init``) parameters whose data is partitioned."""
        return tuple(getattr(p, "ds_shape", p.shape))

    def is_matrix(self, p: torch.Tensor, group: Mapping) -> bool:
        if group["spectral"] is False:
            return False
        return len(self.shape_of(p)) >= 2

    def attach(self, zero_optimizer) -> None:
        """Map ZeRO's flat partitions back to parameters and build the owner plan (collective-free)."""
        self._zero = _build_zero_layout(self, zero_optimizer)

    # -- step ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if self._zero is None:
            raise RuntimeError(
                "ZeroSpectralNewton was stepped before attach(): build the engine with "
                "spectral_dist.deepspeed.initialize (or prepare_spectral_newton with accelerate)"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        z = self._zero
        flats = []
        for g in self.param_groups:
            for t in g["params"]:
                fl = z.flats.get(id(t))
                if fl is None or fl.tensor is not t:
                    raise RuntimeError(
                        "ZeroSpectralNewton got a parameter that is not one of the ZeRO partitions it was "
                        "attached to; re-run attach() after rebuilding the ZeRO optimizer"
                    )
                if t.grad is None:
                    raise RuntimeError("a ZeRO partition has no gradient at step(); this is a DeepSpeed bug")
                flats.append(fl)
        if flats:
            self._step_flats(flats)
        return loss

    def _step_flats(self, flats: list[_Flat]) -> None:
        z = self._zero
        pg, rank = z.group, z.rank
        mats = [m for fl in flats for m in fl.matrices]
        vecs = [v for fl in flats for v in fl.vectors]
        keys = [m.key for m in mats]
        local = {m.key: [m.flat.tensor.grad.narrow(0, fo, n) for fo, _, n in m.local] for m in mats}
        full = gather_to_owners(z.plan, local, pg, keys=keys) if keys else {}
        dirs = {}
        for m in mats:
            if z.plan.owner(m.key) == rank:
                G = full[m.key].view(m.mshape)
                D = self.matrix_direction(m.param, G, m.group, m.key)
                dirs[m.key] = D
        bad = torch.tensor(
            [
                float(
                    any(not torch.isfinite(v.flat.tensor.grad.narrow(0, fo, n)).all() for fo, _, n in v.local)
                )
                for v in vecs
            ],
            dtype=torch.float32,
        )
        if z.world > 1 and len(vecs):
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=pg)
        pieces = scatter_from_owners(z.plan, dirs, pg, keys=keys) if keys else {}
        for m in mats:
            got = pieces[m.key]
            if got is None:
                continue
            part = m.flat.tensor.data
            for (fo, _, n), d in zip(m.local, got):
                self.apply_matrix_update(part.narrow(0, fo, n), d, m.group)
        for v, b in zip(vecs, bad.tolist()):
            self._vector_step(v, skip=b > 0)

    def _vector_step(self, v: _Vector, skip: bool) -> None:
        part = v.flat.tensor.data
        grad = v.flat.tensor.grad
        if skip:
            for fo, _, n in v.local:
                self._borrow(v, fo, part.narrow(0, fo, n), lambda p, v=v: self._note_skip(p, v.key))
            return
        for fo, _, n in v.local:
            view = part.narrow(0, fo, n)
            g = grad.narrow(0, fo, n)
            self._borrow(v, fo, view, lambda p, g=g, v=v: self.adamw_step(p, g, v.group, v.key))

    def _borrow(self, v: _Vector, fo: int, view: torch.Tensor, fn) -> None:
        """Run an elementwise step on a partition view with the persistent state of that piece."""
        key = f"{v.key}@{fo}"
        self.state[view] = self._zero.vector_state.setdefault(key, {})
        try:
            fn(view)
        finally:
            del self.state[view]

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self):
        """This rank's state: owned matrices' momentum/basis by name, AdamW pieces by name@offset."""
        if self._zero is None:
            raise RuntimeError("state_dict() of ZeroSpectralNewton needs attach() first")
        z = self._zero
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in self.param_groups]
        owned = {m.key: self.state[m.param] for m in z.all_matrices if z.plan.owner(m.key) == z.rank}
        return {
            "state": {},
            "param_groups": groups,
            "spectral_zero": {
                "world_size": z.world,
                "rank": z.rank,
                "plan_hash": z.plan.hash,
                "matrices": owned,
                "vectors": z.vector_state,
            },
        }

    def load_state_dict(self, state_dict):
        if self._zero is None:
            raise RuntimeError("load_state_dict() of ZeroSpectralNewton needs attach() first")
        sz = state_dict.get("spectral_zero")
        if sz is None:
            raise ValueError(
                "this optimizer state was not written by ZeroSpectralNewton (no 'spectral_zero' entry): load "
                "the model weights only (engine.load_checkpoint(..., load_optimizer_states=False))"
            )
        z = self._zero
        if sz["world_size"] != z.world or sz["plan_hash"] != z.plan.hash:
            raise ValueError(
                f"checkpoint was written with data-parallel world size {sz['world_size']} and a different "
                f"ZeRO layout (now world size {z.world}); resume with the same world size, ZeRO stage and "
                "model, or load with load_optimizer_states=False"
            )
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError("checkpoint has a different number of param groups")
        for g, sg in zip(self.param_groups, state_dict["param_groups"]):
            for k, v in sg.items():
                if k != "params":
                    g[k] = v
        clone = _clone_tree
        for m in z.all_matrices:
            if z.plan.owner(m.key) == z.rank:
                self.state.pop(m.param, None)
                if m.key in sz["matrices"]:
                    self.state[m.param] = clone(sz["matrices"][m.key])
        z.vector_state.clear()
        z.vector_state.update(clone(sz["vectors"]))

    def stats(self) -> dict[str, dict]:
        """Counters of the matrices this rank owns and of its AdamW pieces (name@offset)."""
        if self._zero is None:
            return {}
        z = self._zero
        out = {}
        for m in z.all_matrices:
            if z.plan.owner(m.key) == z.rank:
                c = dict(self.state[m.param].get("counters", {})) if m.param in self.state else {}
                out[m.key] = {
                    "kind": "spectral",
                    **{k: v for k, v in c.items() if not k.startswith("consec")},
                }
        for key, st in z.vector_state.items():
            c = st.get("counters", {})
            out[key] = {"kind": "adamw", **{k: v for k, v in c.items() if not k.startswith("consec")}}
        return out


def _clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_clone_tree(v) for v in x)
    return copy.deepcopy(x)


# ---------------------------------------------------------------------------------------------- ZeRO layout
@dataclass
class _Flat:
    tensor: torch.Tensor  # the fp32 partition ZeRO hands the client optimizer
    matrices: list = field(default_factory=list)
    vectors: list = field(default_factory=list)


@dataclass
class _Piece:
    key: str
    param: torch.Tensor
    group: dict
    flat: _Flat
    mshape: tuple  # (out, in * k...) matrix view
    local: list  # this rank's (flat offset, param offset, length)


_Matrix = _Vector = _Piece


@dataclass
class _ZeroLayout:
    flats: dict  # id(partition tensor) -> _Flat
    plan: object
    group: object
    rank: int
    world: int
    all_matrices: list
    vector_state: dict = field(default_factory=dict)


def _stage12_entries(zopt):
    """Per param group: (partition tensor, group index, [(param, flat offset of rank r -> pieces)])."""
    out = []
    for i, params in enumerate(zopt.round_robin_bit16_groups):
        world = dist.get_world_size(group=zopt.real_dp_process_group[i])
        ps = int(zopt.partition_size[i])
        offsets = zopt.round_robin_bit16_offsets[i]
        metas = zopt.round_robin_bit16_meta[i]
        entries = []
        for p, off, meta in zip(params, offsets, metas):
            entries.append((p, _rank_pieces(off, meta.numel(), ps, world)))
        out.append((zopt.single_partition_of_fp32_groups[i], i, entries, zopt.real_dp_process_group[i]))
    return out


def _rank_pieces(off: int, n: int, ps: int, world: int) -> list[list[tuple[int, int, int]]]:
    """For a parameter at flat offset ``off`` with ``n`` elements in a buffer cut into ``world`` partitions of
    ``ps``: per rank, [(offset in the partition, offset in the parameter, length)] or [] if it holds none."""
    per_rank = []
    for r in range(world):
        lo, hi = max(off, r * ps), min(off + n, (r + 1) * ps)
        per_rank.append([(lo - r * ps, lo - off, hi - lo)] if hi > lo else [])
    return per_rank


def _bf16_entries(zopt):
    out = []
    for i, params in enumerate(zopt.bf16_groups):
        pg = zopt.real_dp_process_group[i]
        world = dist.get_world_size(group=pg)
        ps = zopt.bf16_groups_flat[i].numel() // world
        entries, off = [], 0
        for p in params:
            entries.append((p, _rank_pieces(off, p.numel(), ps, world)))
            off += p.numel()
        out.append((zopt.fp32_groups_flat_partition[i], i, entries, pg))
    return out


def _stage3_entries(zopt):
    out = []
    for sg, params in enumerate(zopt.fp16_groups):
        pg = (
            zopt.sub_group_process_groups[sg]
            if hasattr(zopt, "sub_group_process_groups")
            else zopt.dp_process_group
        )
        world = dist.get_world_size(group=pg)
        entries, q = [], 0
        for p in params:
            n = p.ds_numel
            ps = p.partition_numel()
            per_rank = []
            for r in range(world):
                lo, hi = r * ps, min(n, (r + 1) * ps)
                per_rank.append([(q, lo, hi - lo)] if hi > lo else [])
            entries.append((p, per_rank))
            q += ps
        out.append((zopt.fp32_partitioned_groups_flat[sg], zopt.sub_group_to_group_id[sg], entries, pg))
    return out


def _zero_kind(zopt) -> str:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(zopt, DeepSpeedZeroOptimizer_Stage3):
        return "stage3"
    if isinstance(zopt, DeepSpeedZeroOptimizer):
        return "stage12"
    if isinstance(zopt, BF16_Optimizer):
        return "bf16"
    raise SpectralConfigError(
        f"DeepSpeed wrapped the optimizer in {type(zopt).__name__}, which spectral_newton does not support: "
        "set zero_optimization.stage to 1, 2 or 3 with offload disabled"
    )


def _build_zero_layout(opt: ZeroSpectralNewton, zopt) -> _ZeroLayout:
    kind = _zero_kind(zopt)
    entries = {"stage3": _stage3_entries, "stage12": _stage12_entries, "bf16": _bf16_entries}[kind](zopt)
    groups_pg = {id(e[3]) for e in entries}
    if len(groups_pg) > 1:
        raise SpectralConfigError(
            "param groups are partitioned over different process groups (MoE / expert parallelism), which "
            "spectral_newton does not support: use one data-parallel group"
        )
    pg = entries[0][3] if entries else None
    rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
    flats, matrices, layouts = {}, [], []
    for tensor, gid, ents, _ in entries:
        group = opt.param_groups[gid]
        fl = _Flat(tensor)
        flats[id(tensor)] = fl
        for p, per_rank in ents:
            name = opt._name_of.get(id(p))
            if name is None:
                raise RuntimeError(
                    "ZeRO holds a parameter the optimizer was not built with; build the optimizer from the "
                    "same model you pass to initialize"
                )
            shape = opt.shape_of(p)
            mshape = (
                (shape[0], max(1, int(torch.Size(shape).numel()) // max(1, shape[0]))) if shape else (1, 1)
            )
            piece = _Piece(name, p, group, fl, mshape, per_rank[rank])
            if opt.is_matrix(p, group):
                fl.matrices.append(piece)
                matrices.append(piece)
                layouts.append(MatrixLayout(name, mshape, [[(po, n) for _, po, n in pr] for pr in per_rank]))
            else:  # every rank lists every vector (same order), so the non-finite flags line up
                fl.vectors.append(piece)
    plan = build_plan(layouts, world)
    return _ZeroLayout(flats, plan, pg, rank, world, matrices)


def attach(optimizer: ZeroSpectralNewton, engine_or_zero) -> ZeroSpectralNewton:
    """Attach ``optimizer`` to a DeepSpeed engine (or its ZeRO optimizer). Returns the optimizer."""
    zopt = engine_or_zero
    for _ in range(4):  # engine -> (accelerate wrapper) -> ZeRO optimizer -> ours
        if getattr(zopt, "optimizer", None) is optimizer:
            optimizer.attach(zopt)
            return optimizer
        zopt = getattr(zopt, "optimizer", None)
    raise RuntimeError(
        "the engine's ZeRO optimizer does not wrap this ZeroSpectralNewton (was it passed to deepspeed.initialize?)"
    )


# ---------------------------------------------------------------------------------------------- build
def build_optimizer(model: nn.Module, params: Mapping, model_parameters=None) -> ZeroSpectralNewton:
    """ZeroSpectralNewton from ``optimizer.params``. Without ``model_parameters``: one group per layer type
    (:meth:`SpectralNewton.from_model`, alpha by layer unless ``alpha`` says otherwise)."""
    if any(hasattr(p, "ds_shape") for p in model.parameters()):
        raise SpectralConfigError(
            "the model was built under deepspeed.zero.Init (accelerate: zero3_init_flag), so its parameters are "
            "already partitioned and cannot be classified into matrices: build it outside zero.Init (accelerate: "
            "set zero3_init_flag: false); ZeRO-3 still partitions it at initialize"
        )
    opts = dict(params)
    head_names = tuple(opts.pop("head_names", ()) or ())
    if "adamw_betas" in opts:
        opts["adamw_betas"] = tuple(opts["adamw_betas"])
    names = {id(p): n for n, p in model.named_parameters()}
    if model_parameters is None:
        alpha = opts.pop("alpha", "by_layer")
        opt = ZeroSpectralNewton.from_model(model, alpha=alpha, head_names=head_names, **opts)
    else:
        mp = list(model_parameters)
        if mp and isinstance(mp[0], tuple):
            names.update({id(p): n for n, p in mp})
            mp = [p for _, p in mp]
        if isinstance(opts.get("alpha"), (str, Mapping)) and opts.get("alpha") != "auto":
            raise SpectralConfigError(
                f"optimizer.params.alpha={opts['alpha']!r} (by layer) needs the model's layer types: do not pass "
                "model_parameters, or give a number"
            )
        opt = ZeroSpectralNewton(mp, param_name_map=names, **opts)
    return opt


def initialize(
    args=None,
    model: nn.Module | None = None,
    optimizer=None,
    model_parameters=None,
    training_data=None,
    lr_scheduler=None,
    distributed_port: int | None = None,
    mpu=None,
    dist_init_required: bool | None = None,
    collate_fn=None,
    config=None,
    mesh_param=None,
    config_params=None,
):
    """``deepspeed.initialize`` with ``"optimizer": {"type": "spectral_newton"}`` support (same returns)."""
    import deepspeed
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

    if distributed_port is None:
        distributed_port = TORCH_DISTRIBUTED_DEFAULT_PORT
    kwargs = dict(
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        training_data=training_data,
        lr_scheduler=lr_scheduler,
        distributed_port=distributed_port,
        mpu=mpu,
        dist_init_required=dist_init_required,
        collate_fn=collate_fn,
        config=config,
        mesh_param=mesh_param,
        config_params=config_params,
    )
    source = config if config is not None else config_params
    from_args = source is None and getattr(args, "deepspeed_config", None) is not None
    if from_args:
        source = args.deepspeed_config
    if source is None or not is_spectral_config(source):
        if isinstance(optimizer, SpectralNewton) and not isinstance(optimizer, ZeroSpectralNewton) and source:
            stage = int((load_config(source).get("zero_optimization") or {}).get("stage", 0))
            if stage > 0:
                raise SpectralConfigError(
                    f"a SpectralNewton passed as optimizer= to ZeRO stage {stage} would only see flat 1-D "
                    'partitions and silently run as SGD/AdamW: put "optimizer": {"type": "spectral_newton", '
                    '"params": {...}} in the config instead of passing the optimizer'
                )
        return deepspeed.initialize(**kwargs)
    if optimizer is not None:
        raise SpectralConfigError(
            'the config says "optimizer": {"type": "spectral_newton"} and an optimizer was passed too: remove '
            "the optimizer argument or the config's optimizer section"
        )
    if model is None:
        raise ValueError("initialize requires a model")
    cfg = load_config(source)
    params = check_config(cfg)
    opt = build_optimizer(model, params, model_parameters)
    if from_args:
        args = copy.copy(args)
        args.deepspeed_config = None
    kwargs.update(args=args, optimizer=opt, config=strip_optimizer(cfg), config_params=None)
    engine, zopt, loader, sched = deepspeed.initialize(**kwargs)
    attach(opt, engine)
    return engine, zopt, loader, sched
