"""DeepSpeed ZeRO 1/2/3 with ``"optimizer": {"type": "spectral_newton", "params": {...}}`` in the config.

``initialize`` takes the arguments of ``deepspeed.initialize`` and returns the same tuple. When the config
names ``spectral_newton`` it builds a :class:`ZeroSpectralNewton` (every :class:`SpectralNewton` option is
accepted in ``params``; ``alpha`` may also be ``"by_layer"`` or ``{layer_type: alpha}``, and ``head_names``
lists AdamW heads), hands it to DeepSpeed as a client optimizer and then attaches it to the ZeRO optimizer.
Any other config goes to ``deepspeed.initialize`` unchanged.

How it stays exact: ZeRO gives a client optimizer flat fp32 partitions (stage 1/2: a range of each param
group's flat buffer; stage 3: every parameter's own partition, concatenated per sub-group). At attach time
each flat partition is mapped back to ``(parameter, offset, length)`` pieces on every rank
(:mod:`.deepspeed_compat`, the one reader of DeepSpeed's private attributes), which gives one
:class:`~spectral_dist.distributed.layout.MatrixLayout` per parameter. The step is the same engine every other
setting uses (:class:`~spectral_dist.distributed.engine.OwnerEngine`): momentum is updated elementwise on each
rank's own elements, the momentum-blended matrix goes to its owner, the owner's direction comes back in
slices. State is keyed by partition like DeepSpeed's own optimizers (``exp_avg`` holds the matrices' momentum
and the vectors' first moment, ``exp_avg_sq`` the vectors' second moment; per-parameter counters and tracked
bases are identical on every rank), so ``engine.save_checkpoint`` / ``load_checkpoint`` resume exactly at the
same world size and refuse another one with a message.

Precision: bf16 and fp16 configs keep fp32 master partitions (``*_master_weights_and_gradients`` are refused).
DeepSpeed checks for overflow and skips the step before the client optimizer is called, and it unscales (and
clips) the gradients before calling it, so the loss scale and overflow steps never reach the momentum; a
non-finite gradient that still arrives (bf16 without overflow checks) skips that matrix or vector on every
rank. The matrix step (momentum, decomposition, direction) runs in fp32; only the parameter copy DeepSpeed
all-gathers afterwards is bf16/fp16. fp16 goes through the same code path as bf16 but needs an accelerator
with fp16 support (not this project's CPU test machine).

Supported: ZeRO stages 1, 2, 3 (also bf16 with fp32 gradient accumulation, DeepSpeed's ``BF16_Optimizer``),
gradient accumulation, clipping, DeepSpeed LR schedulers (they set each group's ``lr``; ``adamw_lr`` follows
as ``adamw_lr * lr / base_lr``), ``save_checkpoint``/``load_checkpoint`` at the same world size. Refused at initialize with the key and the fix: stage 0, optimizer/parameter offload, ZeRO++ quantized
gradients, hpZ, MiCS, elastic checkpoints, low-precision master weights, models built under ``zero.Init``.
ZeRO cannot tell an unused parameter from a zero gradient: such a matrix steps on its decaying momentum,
where a single-process SpectralNewton would skip it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .._extras import require

require("deepspeed", extra="deepspeed", feature="spectral_dist.deepspeed (the DeepSpeed ZeRO integration)")

from .._warnings import filter_dependency_warnings  # noqa: E402

filter_dependency_warnings()  # DeepSpeed's calls of deprecated torch.distributed functions (see there)

from ..distributed.engine import OwnerEngine  # noqa: E402
from ..distributed.layout import MatrixLayout, build_plan  # noqa: E402
from ..optim import matrix_step as ms  # noqa: E402
from ..optim.spectral_newton import SpectralNewton, validate_group  # noqa: E402
from .deepspeed_compat import partition_entries  # noqa: E402

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
    "register",
    "resolve_auto",
    "strip_optimizer",
    "unregister",
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


# SpectralNewton options whose "auto" is the option's own value (basis="auto" is the default basis,
# alpha="auto" the online estimate), not a placeholder for accelerate or the HF Trainer to fill in
OWN_AUTO_OPTIONS = ("alpha", "basis")


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
    for key in ("cpu_offload", "cpu_offload_params", "cpu_offload_use_pin_memory"):
        if zero.get(key):
            raise SpectralConfigError(
                f"zero_optimization.{key}=true (DeepSpeed's legacy form of offload_optimizer/offload_param) is not "
                "supported with spectral_newton (offload swaps the fp32 partitions the matrix exchange reads): "
                f"remove zero_optimization.{key}"
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
        if v == "auto" and k not in OWN_AUTO_OPTIONS:
            raise SpectralConfigError(
                f'optimizer.params.{k}="auto" is not resolved for spectral_newton: give a number '
                f"(with accelerate, pass it to prepare_spectral_newton(..., {k}=...))"
            )
    return params


OWN_AUTO = frozenset(f"optimizer.params.{k}" for k in OWN_AUTO_OPTIONS)


def _autos(cfg, prefix=""):
    for key, value in cfg.items():
        if isinstance(value, Mapping):
            yield from _autos(value, f"{prefix}{key}.")
        elif value == "auto" and f"{prefix}{key}" not in OWN_AUTO:
            yield f"{prefix}{key}"


def resolve_auto(cfg: Mapping, world_size: int | None = None) -> dict:
    """A copy of ``cfg`` with its ``"auto"`` values resolved as accelerate resolves them when it is told
    nothing else: ``gradient_accumulation_steps`` 1, ``gradient_clipping`` 1.0, ``fp16``/``bf16.enabled``
    false (mixed precision "no"), ``zero_optimization.stage3_gather_16bit_weights_on_model_save`` false,
    ``train_batch_size`` computed (micro-batch x accumulation x ``world_size``) or left to DeepSpeed.

    ``train_micro_batch_size_per_gpu`` comes from the data loader under accelerate and the HF Trainer; without
    one, an ``"auto"`` there is refused (as accelerate does) unless ``train_batch_size`` is a number, and so is
    every other ``"auto"``: :class:`SpectralConfigError` names the key and the value to set."""
    out = copy.deepcopy(dict(cfg))
    if out.get("gradient_accumulation_steps") == "auto":
        out["gradient_accumulation_steps"] = 1
    if out.get("gradient_clipping") == "auto":
        out["gradient_clipping"] = 1.0
    for key in ("fp16", "bf16"):
        if isinstance(out.get(key), Mapping) and out[key].get("enabled") == "auto":
            out[key] = {**out[key], "enabled": False}
    zero = out.get("zero_optimization")
    if isinstance(zero, Mapping) and zero.get("stage3_gather_16bit_weights_on_model_save") == "auto":
        out["zero_optimization"] = {**zero, "stage3_gather_16bit_weights_on_model_save": False}
    micro, total = out.get("train_micro_batch_size_per_gpu"), out.get("train_batch_size")
    if micro == "auto":
        if total in (None, "auto"):
            raise SpectralConfigError(
                'train_micro_batch_size_per_gpu="auto" is filled in from the data loader by accelerate and the HF '
                "Trainer; spectral_dist.deepspeed.initialize has none: set it to the per-process micro-batch "
                'size, e.g. config["train_micro_batch_size_per_gpu"] = 8 (or give train_batch_size)'
            )
        del out["train_micro_batch_size_per_gpu"]  # DeepSpeed derives it from train_batch_size
    if out.get("train_batch_size") == "auto":
        del out["train_batch_size"]
        if world_size is not None and isinstance(out.get("train_micro_batch_size_per_gpu"), int):
            gas = int(out.get("gradient_accumulation_steps") or 1)
            out["train_batch_size"] = out["train_micro_batch_size_per_gpu"] * gas * world_size
    left = list(_autos(out))
    if left:
        raise SpectralConfigError(
            f'{", ".join(left)}: "auto" is filled in by accelerate or the HF Trainer (from the model, the data '
            "loader or the training arguments); spectral_dist.deepspeed.initialize cannot: set "
            f"{'it' if len(left) == 1 else 'them'} to a value"
        )
    return out


def strip_optimizer(cfg: Mapping) -> dict:
    """The config DeepSpeed gets: no ``optimizer`` section (the client optimizer replaces it)."""
    out = copy.deepcopy(dict(cfg))
    out.pop("optimizer", None)
    out["zero_allow_untested_optimizer"] = True
    return out


# ---------------------------------------------------------------------------------------------- optimizer
class ZeroSlot:
    """A parameter's elements inside this rank's flat fp32 ZeRO partition, for the one engine
    (:class:`~spectral_dist.distributed.engine.OwnerEngine`). Elementwise state lives in whole-partition
    buffers (``exp_avg``: a matrix's momentum or a vector's first moment, ``exp_avg_sq``), keyed by the
    partition like DeepSpeed's own optimizers; per-parameter state (counters, tracked basis) in
    ``state[partition]["params"][name]``, identical on every rank."""

    __slots__ = ("opt", "key", "gi", "flat", "fo", "n", "param", "kind", "mshape", "layout", "shape")
    _BUFFER = {"momentum_buffer": "exp_avg", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}

    def __init__(self, opt, key, gi, flat, fo, n, param, kind, mshape, layout, shape):
        self.opt, self.key, self.gi, self.flat, self.fo, self.n = opt, key, gi, flat, fo, n
        self.param, self.kind, self.mshape, self.layout = param, kind, mshape, layout
        self.shape = shape  # the parameter's own shape (ZeRO-3 leaves ``param`` empty)

    @property
    def group(self) -> dict:
        return self.opt.param_groups[self.gi]

    def meta(self) -> dict:
        return self.opt.state[self.flat].setdefault("params", {}).setdefault(self.key, {})

    def local(self) -> torch.Tensor:
        return self.flat.data.narrow(0, self.fo, self.n)

    def grad(self) -> torch.Tensor | None:
        g = self.flat.grad
        return None if g is None else g.narrow(0, self.fo, self.n)

    def buffer(self, name: str, dtype: torch.dtype, init=None) -> torch.Tensor:
        if name not in self._BUFFER:
            raise KeyError(f"ZeRO partitions keep no {name!r} buffer (they are fp32 master weights already)")
        st = self.opt.state[self.flat]
        key = self._BUFFER[name]
        if key not in st:
            st[key] = torch.zeros_like(self.flat, dtype=dtype)
        return st[key].narrow(0, self.fo, self.n)

    def apply(self, fn) -> None:
        fn(self.local())


class _ZeroEngine(OwnerEngine):
    """The one engine, with slots from ZeRO's flat partitions and one plan over all matrices (stage 3 steps
    one sub-group at a time; every call exchanges that sub-group's matrices)."""

    def __init__(self, zl, group, opt=None):
        super().__init__(group=group)
        self.zl = zl
        layouts = [e["layout"] for e in zl.entries if e["kind"] == "matrix"]
        costs = None
        if opt is not None:  # every matrix weighted by its method's flops, from the groups at attach time
            costs = {}
            # from the layout's entries, not the groups' params: under ZeRO-3 the groups hold no params
            # between steps (DeepSpeed passes each sub-group at its step), which left that plan shape-weighted
            for e in zl.entries:
                if e["kind"] == "matrix":
                    meta = (
                        opt.state.get(e["flat"], {}).get("params", {}).get(e["key"], {})
                    )  # read, never create
                    costs[e["key"]] = ms.slot_cost(opt, _zero_slot(opt, e, e["gi"]), meta)
        self.plan = build_plan(layouts, self.world_size, costs)

    @functools.cached_property
    def legacy_plan_hash(self) -> str:
        """The hash of the plan before method-weighted costs (m n min(m, n)): checkpoints written before
        2026-12-01 carry it, and they resume as they did. Built only when a checkpoint's hash is not the
        current plan's (a second plan means a second cover check of every matrix)."""
        return build_plan(list(self.plan.layouts), self.world_size).hash

    def slots(self, opt) -> list:
        sig = tuple(id(t) for g in opt.param_groups for t in g["params"])
        if sig != self._signature:
            self._slots, self._signature = self._build(opt), sig
        return self._slots

    def _build(self, opt) -> list:
        out = []  # DeepSpeed steps one group at a time (a one-group list): index the list it passes
        for gi, g in enumerate(opt.param_groups):
            for t in g["params"]:
                ents = self.zl.by_flat.get(id(t))
                if ents is None or ents[0]["flat"] is not t:
                    raise RuntimeError(
                        "ZeroSpectralNewton got a parameter that is not one of the ZeRO partitions it was "
                        "attached to; re-run attach() after rebuilding the ZeRO optimizer"
                    )
                out.extend(_zero_slot(opt, e, gi) for e in ents)
        return out


def _zero_slot(opt, e: dict, gi: int) -> ZeroSlot:
    """The slot of a ZeRO layout entry, in param group ``gi`` of the list the optimizer holds now."""
    return ZeroSlot(
        opt,
        e["key"],
        gi,
        e["flat"],
        e["fo"],
        e["n"],
        e["param"],
        e["kind"],
        e["mshape"],
        e["layout"],
        e["shape"],
    )


class ZeroSpectralNewton(SpectralNewton):
    """SpectralNewton that steps ZeRO's flat fp32 partitions (see the module docstring).

    Build it like SpectralNewton (or with :meth:`from_model`), pass it to DeepSpeed as the client optimizer,
    then call :func:`attach` with the ZeRO optimizer. Stepping before ``attach`` raises.
    """

    def __init__(self, params, *args, **kwargs):
        params = list(params)
        names = kwargs.pop("param_name_map", None) or {}
        kwargs.setdefault("distributed", False)  # the engine is set by attach()
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
        self._engine = _ZeroEngine(self._zero, self._zero.group, self)

    # -- step ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if self._zero is None:
            raise RuntimeError(
                "ZeroSpectralNewton was stepped before attach(): build the engine with "
                "spectral_dist.deepspeed.initialize (or prepare_spectral_newton with accelerate)"
            )
        for g in self.param_groups:
            for t in g["params"]:
                if t.grad is None:
                    raise RuntimeError("a ZeRO partition has no gradient at step(); this is a DeepSpeed bug")
        return super().step(closure)

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self):
        """This rank's state, keyed by partition in DeepSpeed's order, with the layout it was written with."""
        if self._zero is None:
            raise RuntimeError("state_dict() of ZeroSpectralNewton needs attach() first")
        z = self._zero
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in self.param_groups]
        return {
            "state": {i: self.state[f] for i, f in enumerate(z.flat_list) if f in self.state},
            "param_groups": groups,
            "spectral_zero": {"world_size": z.world, "rank": z.rank, "plan_hash": self._engine.plan.hash},
        }

    def load_state_dict(self, state_dict):
        if self._zero is None:
            raise RuntimeError("load_state_dict() of ZeroSpectralNewton needs attach() first")
        sz = state_dict.get("spectral_zero") if isinstance(state_dict, Mapping) else None
        if sz is None:
            raise ValueError(
                "this optimizer state was not written by ZeroSpectralNewton (no 'spectral_zero' entry): load "
                "the model weights only (engine.load_checkpoint(..., load_optimizer_states=False))"
            )
        z = self._zero
        if sz["world_size"] != z.world or (
            sz["plan_hash"] != self._engine.plan.hash and sz["plan_hash"] != self._engine.legacy_plan_hash
        ):
            raise ValueError(
                f"checkpoint was written with data-parallel world size {sz['world_size']} and another ZeRO "
                f"layout (now world size {z.world}); ZeRO optimizer state is partitioned by world size: resume "
                "with the same world size, ZeRO stage and model, or load the model weights only "
                "(load_optimizer_states=False)"
            )
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(
                f"checkpoint has {len(state_dict['param_groups'])} param groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        merged = []
        for gi, (g, sg) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            m = {**g, **{k: v for k, v in sg.items() if k not in ("params", "param_names")}}
            if isinstance(m.get("adamw_betas"), list):
                m["adamw_betas"] = tuple(m["adamw_betas"])
            try:
                validate_group(m)
            except ValueError as e:
                raise ValueError(f"param group {gi} in the checkpoint: {e}") from None
            merged.append(m)
        new_state = {}
        for i, f in enumerate(z.flat_list):
            st = state_dict["state"].get(i)
            if st is None:
                continue
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(f.shape):
                    raise ValueError(
                        f"checkpoint state {k!r} of partition {i} has shape {tuple(v.shape)}, "
                        f"the partition {tuple(f.shape)}"
                    )
            new_state[f] = _clone_tree(st, f.device)
        for g, m in zip(self.param_groups, merged):
            params = g["params"]
            g.update(m)
            g["params"] = params
        self.state.clear()
        self.state.update(new_state)

    def stats(self) -> dict[str, dict]:
        """Counters per parameter name (identical on every rank)."""
        if self._zero is None:
            return {}
        out = {}
        for e in self._zero.entries:
            meta = (
                self.state[e["flat"]].get("params", {}).get(e["key"], {}) if e["flat"] in self.state else {}
            )
            c = meta.get("counters", {})
            out[e["key"]] = {
                "kind": "spectral" if e["kind"] == "matrix" else "adamw",
                **{k: v for k, v in c.items() if not k.startswith("consec")},
            }
        return out


def _clone_tree(x, device=None):
    if isinstance(x, torch.Tensor):
        return x.detach().to(device).clone() if device is not None else x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v, device) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone_tree(v, device) for v in x]
    if isinstance(x, tuple):
        return tuple(_clone_tree(v, device) for v in x)
    return copy.deepcopy(x)


# ---------------------------------------------------------------------------------------------- ZeRO layout
@dataclass
class _ZeroLayout:
    entries: list  # one dict per (partition, parameter): key, gi, flat, fo, n, param, kind, mshape, layout
    by_flat: dict  # id(partition) -> its entries
    flat_list: list  # partitions in DeepSpeed's order
    group: object
    rank: int
    world: int


def _build_zero_layout(opt: ZeroSpectralNewton, zopt) -> _ZeroLayout:
    _, parts = partition_entries(zopt)
    groups_pg = {id(e[3]) for e in parts}
    if len(groups_pg) > 1:
        raise SpectralConfigError(
            "param groups are partitioned over different process groups (MoE / expert parallelism), which "
            "spectral_newton does not support: use one data-parallel group"
        )
    pg = parts[0][3] if parts else None
    rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
    entries, by_flat, flat_list = [], {}, []
    for tensor, gid, ents, _ in parts:
        group = opt.param_groups[gid]
        flat_list.append(tensor)
        mine = by_flat.setdefault(id(tensor), [])
        for p, per_rank in ents:
            name = opt._name_of.get(id(p))
            if name is None:
                raise RuntimeError(
                    "ZeRO holds a parameter the optimizer was not built with; build the optimizer from the "
                    "same model you pass to initialize"
                )
            shape = opt.shape_of(p)
            numel = int(torch.Size(shape).numel())
            mshape = (shape[0], max(1, numel // max(1, shape[0]))) if len(shape) >= 2 else (numel,)
            layout = MatrixLayout(name, mshape, [[(po, n) for _, po, n in pr] for pr in per_rank])
            fo, n = (per_rank[rank][0][0], per_rank[rank][0][2]) if per_rank[rank] else (0, 0)
            e = dict(
                key=name,
                gi=gid,
                flat=tensor,
                fo=fo,
                n=n,
                param=p,
                kind="matrix" if opt.is_matrix(p, group) else "vector",
                mshape=mshape,
                layout=layout,
                shape=tuple(int(d) for d in shape),
            )
            entries.append(e)
            mine.append(e)
    return _ZeroLayout(entries, by_flat, flat_list, pg, rank, world)


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
    """``deepspeed.initialize`` with ``"optimizer": {"type": "spectral_newton"}`` support (same returns).

    Any config (spectral_newton or not) has its ``"auto"`` values resolved first (:func:`resolve_auto`), so the
    shipped ``configs/deepspeed/*.json`` work here as they do under accelerate once
    ``train_micro_batch_size_per_gpu`` is set. ``model_parameters`` with the default ``alpha: by_layer`` is
    refused: the layer types come from the model, so leave ``model_parameters`` out (every trainable parameter
    is optimised, grouped by layer type), or give ``alpha`` a number."""
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

    ds_initialize = _deepspeed_initialize()
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
        args = copy.copy(args)
        args.deepspeed_config = None  # DeepSpeed takes the config from one place: config= below
    if source is None:
        return ds_initialize(**kwargs)
    cfg = load_config(source)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if not is_spectral_config(cfg):
        if isinstance(optimizer, SpectralNewton) and not isinstance(optimizer, ZeroSpectralNewton):
            stage = int((cfg.get("zero_optimization") or {}).get("stage", 0))
            if stage > 0:
                raise SpectralConfigError(
                    f"a SpectralNewton passed as optimizer= to ZeRO stage {stage} would only see flat 1-D "
                    'partitions and silently run as SGD/AdamW: put "optimizer": {"type": "spectral_newton", '
                    '"params": {...}} in the config instead of passing the optimizer'
                )
        kwargs.update(args=args, config=resolve_auto(cfg, world), config_params=None)
        return ds_initialize(**kwargs)
    if optimizer is not None:
        raise SpectralConfigError(
            'the config says "optimizer": {"type": "spectral_newton"} and an optimizer was passed too: remove '
            "the optimizer argument or the config's optimizer section"
        )
    if model is None:
        raise ValueError("initialize requires a model")
    params = check_config(cfg)
    cfg = resolve_auto(cfg, world)
    opt = build_optimizer(model, params, model_parameters)
    kwargs.update(args=args, optimizer=opt, config=strip_optimizer(cfg), config_params=None)
    engine, zopt, loader, sched = ds_initialize(**kwargs)
    attach(opt, engine)
    return engine, zopt, loader, sched


# ---------------------------------------------------------------------------------------------- register
_ORIGINAL_INITIALIZE = None


def _deepspeed_initialize():
    """DeepSpeed's own ``deepspeed.initialize`` (also after :func:`register` replaced the module attribute)."""
    import deepspeed

    return _ORIGINAL_INITIALIZE or deepspeed.initialize


def register() -> None:
    """Opt in: make DeepSpeed's own ``deepspeed.initialize`` accept ``"type": "spectral_newton"``.

    DeepSpeed has no public registry of optimizer types, and its engine refuses unknown ones ("spectral_newton
    is not a supported DeepSpeed Optimizer"). ``register()`` replaces the module attribute
    ``deepspeed.initialize`` with a function that sends a config naming spectral_newton to :func:`initialize`
    and every other call to DeepSpeed's function unchanged. It relies only on that public function's
    keyword arguments, not on DeepSpeed's internals, so it holds across DeepSpeed versions. Call it before
    ``deepspeed.initialize``, and call that as ``deepspeed.initialize`` (a name bound earlier with ``from
    deepspeed import initialize`` keeps DeepSpeed's own). Idempotent; :func:`unregister` undoes it.
    """
    global _ORIGINAL_INITIALIZE
    import deepspeed

    if _ORIGINAL_INITIALIZE is not None:
        return
    original = deepspeed.initialize
    ours = set(inspect.signature(initialize).parameters)

    @functools.wraps(original)
    def routed(*args, **kwargs):
        bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
        source = bound.get("config") if bound.get("config") is not None else bound.get("config_params")
        if source is None:
            source = getattr(bound.get("args"), "deepspeed_config", None)
        if source is None or not is_spectral_config(source):
            return original(*args, **kwargs)
        unknown = sorted(set(bound) - ours)
        if unknown:
            raise SpectralConfigError(
                f"deepspeed.initialize was given {unknown}, which spectral_dist.deepspeed.initialize does not take "
                f"(DeepSpeed {deepspeed.__version__}): call spectral_dist.deepspeed.initialize without them"
            )
        return initialize(**bound)

    routed.spectral_dist_original = original
    _ORIGINAL_INITIALIZE = original
    deepspeed.initialize = routed


def unregister() -> None:
    """Undo :func:`register`: ``deepspeed.initialize`` is DeepSpeed's own again."""
    global _ORIGINAL_INITIALIZE
    import deepspeed

    if _ORIGINAL_INITIALIZE is not None:
        deepspeed.initialize = _ORIGINAL_INITIALIZE
        _ORIGINAL_INITIALIZE = None
