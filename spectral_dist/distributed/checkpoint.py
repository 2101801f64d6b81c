"""Resumable, FQN-keyed checkpoints of a sharded SpectralNewton with torch.distributed.checkpoint (DCP).

DCP hangs or silently drops data when ranks disagree on the keys of the state dict, and it de-duplicates
plain tensors and objects by keeping *one arbitrary* rank's copy. Owner-sharded state (a matrix's momentum
and basis exist on its owner only) hits both traps, so the state dict is built to be identical in keys on
every rank:

* ``spectral.<fqn>.<path>`` (momentum, tracked basis): a ``ShardedTensor`` whose only shard is the whole
  tensor, placed on the owner; the other ranks hold no shard of it. Keys and metadata are the same on every
  rank because one ``all_gather_object`` (the manifest) tells every rank what every owner holds.
* ``spectral_extra``: the owners' non-tensor state (counters, tracked step, alpha estimate), gathered in the
  same call, so it is the same object on every rank.
* ``adamw.<fqn>.<name>``: AdamW moments as they are (DTensor shards under FSDP2, replicated tensors under
  DDP), ``adamw_extra``: AdamW steps and counters (identical on all ranks), ``param_groups``: hyperparameters.

Loading re-plans owners for the current world size: the new owner of each matrix reads the whole tensor
(DCP reshards the ShardedTensor and the DTensors), so resuming 2 -> 4 or 4 -> 2 ranks is exact.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .engine import DistributedEngine, local_tensor

__all__ = ["optimizer_state_dict", "load_optimizer_state_dict", "save_checkpoint", "load_checkpoint"]

_GROUP_SKIP = ("params", "param_names")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set_path(d: dict, path: str, value) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def _pack(obj) -> bytes:
    """Pickled bytes: one leaf for DCP, which would otherwise flatten nested dicts into many keys."""
    return pickle.dumps(obj)


def _engine(opt) -> DistributedEngine:
    eng = opt._engine
    if not isinstance(eng, DistributedEngine):
        raise TypeError(
            "sharded optimizer checkpoints need the distributed engine (an initialised process group with "
            f"more than one rank); this optimizer uses {type(eng).__name__}: use opt.state_dict() instead"
        )
    if eng.plan is None:
        eng.build(opt)
    return eng


def _owner_sharded(tensor: torch.Tensor | None, size, dtype, owner: int):
    """A ShardedTensor of ``size`` whose one shard (the whole tensor) lives on ``owner``, in CPU memory (so
    remote placements need no device index; the loader moves it to the parameter's device)."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    size = list(size)
    smeta = ShardMetadata([0] * len(size), size, f"rank:{owner}/cpu")
    meta = ShardedTensorMetadata([smeta], torch.Size(size), TensorProperties(dtype=dtype))
    local = [Shard(tensor.detach().cpu(), smeta)] if dist.get_rank() == owner else []
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, meta)


def optimizer_state_dict(opt) -> dict:
    """A flat state dict for ``dcp.save``, keyed by parameter FQN, with the same keys on every rank.

    Collective (one ``all_gather_object`` of the owners' manifests).
    """
    eng = _engine(opt)
    rank = dist.get_rank()
    names = {p: n for n, p, _ in opt.named_params()}
    matrices = {n for n, p, g in opt.named_params() if opt.is_matrix(p, g)}
    manifest: dict[str, dict] = {}
    mine_tensors = {}
    for n, p, _ in opt.named_params():
        if n not in matrices or eng.owner_of(n) != rank or p not in opt.state:
            continue
        flat = _flatten(opt.state[p])
        tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
        extra = {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}
        manifest[n] = {
            "tensors": {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()},
            "extra": extra,
        }
        mine_tensors[n] = tensors
    everyone: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, manifest)
    sd: dict = {}
    spectral_extra = {}
    for r, man in enumerate(everyone):
        for n, entry in sorted(man.items()):
            spectral_extra[n] = entry["extra"]
            for path, (shape, dtype) in sorted(entry["tensors"].items()):
                t = mine_tensors[n][path] if r == rank else None
                sd[f"spectral.{n}.{path}"] = _owner_sharded(t, shape, getattr(torch, dtype), r)
    sd["spectral_extra"] = _pack(spectral_extra)
    adamw_extra = {}
    for p, st in opt.state.items():
        n = names.get(p)
        if n is None or n in matrices:
            continue
        for k, v in _flatten(st).items():
            if isinstance(v, torch.Tensor):
                sd[f"adamw.{n}.{k}"] = v
            else:
                adamw_extra.setdefault(n, {})[k] = v
    sd["adamw_extra"] = _pack(adamw_extra)
    sd["param_groups"] = _pack(
        [{k: v for k, v in g.items() if k not in _GROUP_SKIP} for g in opt.param_groups]
    )
    sd["world_size"] = _pack(dist.get_world_size())
    return sd


def _strip(key: str, prefix: str, names: list[str]) -> tuple[str, str] | None:
    """Split ``prefix + fqn + '.' + path`` into (fqn, path), the longest matching fqn winning."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    best = None
    for n in names:
        if rest.startswith(n + ".") and (best is None or len(n) > len(best)):
            best = n
    return None if best is None else (best, rest[len(best) + 1 :])


def load_optimizer_state_dict(opt, checkpoint_id, *, prefix: str = "") -> None:
    """Load what :func:`optimizer_state_dict` saved (under ``prefix``) into ``opt``, for any world size.

    Owners are re-planned for the current process group; each matrix's new owner reads its whole momentum
    and basis. Parameters are matched by FQN. Collective.
    """
    eng = _engine(opt)
    rank = dist.get_rank()
    reader = dcp.FileSystemReader(str(checkpoint_id))
    meta = reader.read_metadata().state_dict_metadata
    params = {n: (p, g) for n, p, g in opt.named_params()}
    names = sorted(params)
    target: dict = {}
    spectral_keys, adamw_keys = {}, {}
    for key, md in meta.items():
        hit = _strip(key, prefix + "spectral.", names)
        if hit is not None:
            n, path = hit
            owner = eng.owner_of(n)
            dtype = md.properties.dtype
            t = torch.empty(tuple(md.size), dtype=dtype) if owner == rank else None
            target[key] = _owner_sharded(t, md.size, dtype, owner)
            spectral_keys[key] = (n, path)
            continue
        hit = _strip(key, prefix + "adamw.", names)
        if hit is not None:
            n, path = hit
            p, _ = params[n]
            if tuple(md.size) != tuple(p.shape):
                raise ValueError(
                    f"checkpoint {key!r} has shape {tuple(md.size)}, parameter {n!r} {tuple(p.shape)}"
                )
            target[key] = torch.zeros_like(p, dtype=md.properties.dtype)
            adamw_keys[key] = (n, path)
    for k in ("spectral_extra", "adamw_extra", "param_groups"):
        if prefix + k not in meta:
            raise KeyError(f"{checkpoint_id}: no {prefix + k!r}; not a SpectralNewton sharded checkpoint")
        target[prefix + k] = b""
    dcp.load(target, checkpoint_id=str(checkpoint_id))
    extras = {k: pickle.loads(target[prefix + k]) for k in ("spectral_extra", "adamw_extra", "param_groups")}
    saved_groups = extras["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"checkpoint has {len(saved_groups)} param groups, optimizer {len(opt.param_groups)}"
        )
    for g, sg in zip(opt.param_groups, saved_groups):
        g.update({k: v for k, v in sg.items() if k not in _GROUP_SKIP})
    opt.state.clear()
    for n, extra in extras["spectral_extra"].items():
        if n in params and eng.owner_of(n) == rank:
            st = opt.state[params[n][0]]
            for path, v in extra.items():
                _set_path(st, path, v)
    for key, (n, path) in spectral_keys.items():
        if eng.owner_of(n) != rank:
            continue
        p = params[n][0]
        shard = target[key].local_shards()[0].tensor
        _set_path(opt.state[p], path, shard.to(local_tensor(p).device))
    for key, (n, path) in adamw_keys.items():
        _set_path(opt.state[params[n][0]], path, target[key])
    for n, extra in extras["adamw_extra"].items():
        if n in params:
            for path, v in extra.items():
                _set_path(opt.state[params[n][0]], path, v)


def save_checkpoint(checkpoint_id, model, opt) -> None:
    """Model (``get_model_state_dict``: FSDP2 DTensors stay sharded) and optimizer in one ``dcp.save``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    sd.update({f"optim.{k}": v for k, v in optimizer_state_dict(opt).items()})
    dcp.save(sd, checkpoint_id=str(checkpoint_id))


def load_checkpoint(checkpoint_id, model, opt) -> None:
    """Inverse of :func:`save_checkpoint` for any world size (build ``opt`` on the wrapped model first)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    msd = get_model_state_dict(model)
    target = {f"model.{k}": v for k, v in msd.items()}
    dcp.load(target, checkpoint_id=str(checkpoint_id))
    set_model_state_dict(model, {k: target[f"model.{k}"] for k in msd})
    load_optimizer_state_dict(opt, checkpoint_id, prefix="optim.")
