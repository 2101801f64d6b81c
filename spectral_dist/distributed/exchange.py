"""Coalesced exchange of matrix slices between the ranks that hold them and the rank that owns them.

``gather_to_owners`` assembles each matrix's full gradient on its owner; ``scatter_from_owners`` sends each
rank its slices of the owner's direction. Each call is at most one ``all_to_all_single`` over flat buffers
whose split sizes every rank derives from the :class:`~spectral_dist.distributed.layout.Plan` alone, so no
sizes are exchanged and no collective is issued per matrix. Data a rank already holds is copied locally:
with replicated layouts (DDP) the gather needs no communication at all.

Both calls are collective: every rank must call them with the same plan and the same ``keys``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import Plan

__all__ = ["gather_to_owners", "scatter_from_owners", "comm_device", "ExchangeError"]


class ExchangeError(RuntimeError):
    """A collective of the exchange failed (timeout, peer died); the message names the matrices involved."""


def comm_device(group=None) -> torch.device:
    """CUDA for NCCL process groups, CPU otherwise (gloo)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _names(keys, limit=8) -> str:
    keys = list(keys)
    s = ", ".join(repr(k) for k in keys[:limit])
    return s + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_world(plan: Plan, group) -> tuple[int, int]:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world != plan.world_size:
        raise ValueError(f"plan is for {plan.world_size} ranks, process group has {world}")
    return rank, world


def _check_local(plan: Plan, local: dict, keys, rank: int) -> None:
    for k in keys:
        lay = plan.layout(k)
        if k not in local:
            raise KeyError(f"rank {rank} has no local slices for matrix {k!r}")
        pieces = local[k]
        want = lay.slices[rank]
        if len(pieces) != len(want) or any(p.numel() != n for p, (_, n) in zip(pieces, want)):
            raise ValueError(
                f"matrix {k!r}: rank {rank} passed pieces of sizes {[p.numel() for p in pieces]}, "
                f"its layout says {[n for _, n in want]}"
            )


def _collective(inp, out, in_splits, out_splits, group, keys, what):
    try:
        dist.all_to_all_single(
            out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group
        )
    except Exception as e:  # timeouts and dead peers surface here; say which matrices were in flight
        raise ExchangeError(f"{what} of matrices {_names(keys)} failed: {e}") from e


def gather_to_owners(
    plan: Plan,
    local: dict[str, list[torch.Tensor]],
    group=None,
    *,
    keys: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Assemble each matrix on its owner.

    Args:
        plan: the owner plan (identical on every rank).
        local: ``{key: [piece, ...]}``, this rank's pieces of each matrix in the order of
            ``layout.slices[rank]`` (any shapes; their numel must match the ranges).
        keys: the matrices to exchange (default: all of the plan), the same list on every rank.
        dtype: the dtype of the exchange and of the result (the matrix math runs in float32).

    Returns:
        ``{key: full tensor of layout.shape}`` for the keys this rank owns.
    """
    rank, world = _check_world(plan, group)
    keys = [lay.key for lay in plan.layouts] if keys is None else list(keys)
    _check_local(plan, local, keys, rank)
    device = comm_device(group)
    routes = plan.routes
    crossing = any(rt.src != plan.owner(k) for k in keys for rt in routes[k])

    send_splits = [0] * world
    send: list[torch.Tensor] = []
    recv_splits = [0] * world
    if crossing:
        for d in range(world):
            if d == rank:
                continue
            for k in keys:
                if plan.owner(k) != d:
                    continue
                for rt in routes[k]:
                    if rt.src == rank:
                        piece = local[k][rt.src_piece].reshape(-1)
                        send.append(piece[rt.src_offset : rt.src_offset + rt.length].to(device, dtype))
                        send_splits[d] += rt.length
        for s in range(world):
            if s == rank:
                continue
            for k in keys:
                if plan.owner(k) == rank:
                    recv_splits[s] += sum(rt.length for rt in routes[k] if rt.src == s)
        inp = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
        out = torch.empty(sum(recv_splits), dtype=dtype, device=device)
        _collective(inp, out, send_splits, recv_splits, group, keys, "gather_to_owners")
        starts = [sum(recv_splits[:s]) for s in range(world)]
    result = {}
    cursor = list(starts) if crossing else [0] * world
    for k in keys:
        if plan.owner(k) != rank:
            continue
        lay = plan.layout(k)
        if (
            all(rt.src == rank for rt in routes[k])
            and len(routes[k]) == 1
            and routes[k][0].length == lay.numel
        ):
            rt = routes[k][0]
            piece = local[k][rt.src_piece].reshape(-1)
            result[k] = piece[rt.src_offset : rt.src_offset + rt.length].to(device, dtype).view(lay.shape)
            continue
        full = torch.empty(lay.numel, dtype=dtype, device=device)
        for rt in routes[k]:  # routes are sorted by offset, senders packed them in the same order
            if rt.src == rank:
                piece = local[k][rt.src_piece].reshape(-1)
                full[rt.offset : rt.offset + rt.length] = piece[rt.src_offset : rt.src_offset + rt.length]
            else:
                c = cursor[rt.src]
                full[rt.offset : rt.offset + rt.length] = out[c : c + rt.length]
                cursor[rt.src] = c + rt.length
        result[k] = full.view(lay.shape)
    return result


def scatter_from_owners(
    plan: Plan,
    full_dirs: dict[str, torch.Tensor | None],
    group=None,
    *,
    keys: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, list[torch.Tensor] | None]:
    """Send each rank its slices of every owned matrix's direction.

    Args:
        full_dirs: ``{key: full direction (numel = layout.numel) or None}`` for the keys this rank owns; None
            means the owner skipped the step (non-finite gradient, failed decomposition).
        keys: the matrices to exchange (default: all of the plan), the same list on every rank.

    Returns:
        ``{key: [piece, ...] or None}`` for every key: this rank's 1-D pieces in the order of
        ``layout.slices[rank]``, or None where the owner skipped (then no rank applies anything, not even
        weight decay). With replicated layouts every rank receives the whole direction.
    """
    rank, world = _check_world(plan, group)
    keys = [lay.key for lay in plan.layouts] if keys is None else list(keys)
    device = comm_device(group)
    for k in keys:
        if plan.owner(k) == rank:
            if k not in full_dirs:
                raise KeyError(f"rank {rank} owns matrix {k!r} but passed no direction for it")
            d = full_dirs[k]
            if d is not None and d.numel() != plan.layout(k).numel:
                raise ValueError(
                    f"matrix {k!r}: direction has {d.numel()} elements, layout has {plan.layout(k).numel}"
                )

    def pieces_of(flat: torch.Tensor, r: int, k: str) -> list[torch.Tensor]:
        return [flat[o : o + n] for o, n in plan.layout(k).slices[r]]

    send: list[torch.Tensor] = []
    send_splits = [0] * world
    one = torch.ones(1, dtype=dtype, device=device)
    zero = torch.zeros(1, dtype=dtype, device=device)
    owned = [k for k in keys if plan.owner(k) == rank]
    flats = {}
    for k in owned:
        d = full_dirs[k]
        flats[k] = None if d is None else d.detach().reshape(-1).to(device, dtype)
    for d in range(world):
        if d == rank:
            continue
        for k in owned:
            lay = plan.layout(k)
            flat = flats[k]
            send.append(zero if flat is None else one)
            n = lay.local_numel(d)
            if flat is None:
                send.append(torch.zeros(n, dtype=dtype, device=device))
            else:
                send.extend(pieces_of(flat, d, k))
            send_splits[d] += 1 + n
    recv_splits = [0] * world
    for s in range(world):
        if s == rank:
            continue
        recv_splits[s] = sum(1 + plan.layout(k).local_numel(rank) for k in keys if plan.owner(k) == s)
    out = torch.empty(sum(recv_splits), dtype=dtype, device=device)
    if world > 1 and keys:
        inp = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
        _collective(inp, out, send_splits, recv_splits, group, keys, "scatter_from_owners")
    cursor = [sum(recv_splits[:s]) for s in range(world)]
    result: dict[str, list[torch.Tensor] | None] = {}
    for k in keys:
        o = plan.owner(k)
        lay = plan.layout(k)
        if o == rank:
            flat = flats[k]
            result[k] = None if flat is None else pieces_of(flat, rank, k)
            continue
        c = cursor[o]
        ok = bool(out[c].item() != 0)
        c += 1
        pieces = []
        for _, n in lay.slices[rank]:
            pieces.append(out[c : c + n])
            c += n
        cursor[o] = c
        result[k] = pieces if ok else None
    return result
