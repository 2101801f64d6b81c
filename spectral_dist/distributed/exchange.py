"""Coalesced exchange of matrix pieces between the ranks that hold them and the rank that owns them.

``gather_to_owners`` assembles each matrix on its owner from every distinct piece once; ``scatter_from_owners``
sends every rank, for every matrix, a small header (the owner's status and counters), its pieces of the
owner's result and an optional extra payload (a tracked basis). Each call is at most one
``all_to_all_single`` over flat buffers whose split sizes every rank derives from the
:class:`~spectral_dist.distributed.layout.Plan` alone, so no sizes are exchanged and no collective is issued
per matrix. Data a rank already holds is copied locally: with replicated layouts (DDP) the gather needs no
communication at all.

Both calls are collective: every rank must call them with the same plan and the same ``keys``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import Piece, Plan

__all__ = [
    "ExchangeError",
    "comm_device",
    "exchange_bytes",
    "gather_to_owners",
    "piece_view",
    "scatter_from_owners",
]


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


def piece_view(flat: torch.Tensor, p: Piece) -> torch.Tensor:
    """The (count, length) strided view of a contiguous 1-D ``flat`` (the full matrix) that ``p`` covers."""
    return flat.as_strided((p.count, p.length), (p.stride, 1), flat.storage_offset() + p.offset)


def _rank_world(plan: Plan, group) -> tuple[int, int]:
    if group is False:  # no process group: one process
        rank, world = 0, 1
    else:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world != plan.world_size:
        raise ValueError(f"plan is for {plan.world_size} ranks, process group has {world}")
    return rank, world


def _collective(inp, out, in_splits, out_splits, group, keys, what):
    try:
        dist.all_to_all_single(
            out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group
        )
    except Exception as e:  # timeouts and dead peers surface here; say which matrices were in flight
        raise ExchangeError(f"{what} of matrices {_names(keys)} failed: {e}") from e


def _local_flat(local: dict, k: str, want: int, rank: int) -> torch.Tensor:
    t = local.get(k)
    if t is None:
        if want:
            raise KeyError(f"rank {rank} holds {want} elements of matrix {k!r} but passed no local data")
        return torch.empty(0, device="cpu")
    t = t.reshape(-1)
    if t.numel() != want:
        raise ValueError(
            f"matrix {k!r}: rank {rank} passed {t.numel()} local elements, its layout says {want}"
        )
    return t


def gather_to_owners(
    plan: Plan,
    local: dict[str, torch.Tensor],
    group=None,
    *,
    keys: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Assemble each matrix on its owner.

    Args:
        plan: the owner plan (identical on every rank).
        local: ``{key: this rank's local data}`` (1-D or any shape with ``layout.local_numel(rank)`` elements,
            in the order of the layout's pieces); keys where this rank holds nothing may be omitted.
        group: process group (None: default; False: no process group, one process).
        keys: the matrices to exchange (default: all of the plan), the same list on every rank.
        dtype: dtype of the wire buffers and of the result.

    Returns:
        ``{key: full tensor of layout.shape}`` for the keys this rank owns.
    """
    rank, world = _rank_world(plan, group)
    keys = [lay.key for lay in plan.layouts] if keys is None else list(keys)
    flats = {k: _local_flat(local, k, plan.layout(k).local_numel(rank), rank) for k in keys}
    routes = plan.routes
    crossing = world > 1 and any(rt.src != plan.owner(k) for k in keys for rt in routes[k])
    recv_chunks: dict[tuple[str, int, int], torch.Tensor] = {}
    if crossing:
        device = comm_device(group)
        send_splits, recv_splits = [0] * world, [0] * world
        send: list[torch.Tensor] = []
        for d in range(world):
            if d == rank:
                continue
            for k in keys:
                if plan.owner(k) != d:
                    continue
                for rt in routes[k]:
                    if rt.src == rank:
                        send.append(flats[k][rt.src_offset : rt.src_offset + rt.length].to(device, dtype))
                        send_splits[d] += rt.length
        for k in keys:
            if plan.owner(k) == rank:
                for rt in routes[k]:
                    if rt.src != rank:
                        recv_splits[rt.src] += rt.length
        inp = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
        out = torch.empty(sum(recv_splits), dtype=dtype, device=device)
        _collective(inp, out, send_splits, recv_splits, group, keys, "gather_to_owners")
        cursor = [sum(recv_splits[:s]) for s in range(world)]
        for k in keys:  # same order as the senders packed: keys, then routes sorted by (src, src_offset)
            if plan.owner(k) != rank:
                continue
            for rt in routes[k]:
                if rt.src != rank:
                    c = cursor[rt.src]
                    recv_chunks[(k, rt.src, rt.src_offset)] = out[c : c + rt.length]
                    cursor[rt.src] = c + rt.length
    result = {}
    for k in keys:
        if plan.owner(k) != rank:
            continue
        lay = plan.layout(k)
        mine = flats[k]
        if lay.holds_all(rank):
            result[k] = mine.to(dtype=dtype).view(lay.shape)
            continue
        device = mine.device if mine.numel() else (comm_device(group) if world > 1 else mine.device)
        full = torch.empty(lay.numel, dtype=dtype, device=device)
        for rt in routes[k]:
            if rt.src == rank:
                chunk = mine[rt.src_offset : rt.src_offset + rt.length]
            else:
                chunk = recv_chunks[(k, rt.src, rt.src_offset)]
            piece_view(full, rt.piece).copy_(chunk.view(rt.piece.count, rt.piece.length))
        result[k] = full.view(lay.shape)
    return result


def _pieces_of(flat: torch.Tensor, lay, r: int) -> list[torch.Tensor]:
    if lay.holds_all(r):
        return [flat]
    return [piece_view(flat, p).reshape(-1) for p in lay.slices[r]]


def scatter_from_owners(
    plan: Plan,
    results: dict[str, tuple],
    group=None,
    *,
    keys: list[str] | None = None,
    header_size: int = 1,
    extra_sizes: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """Send every rank the owner's header, its pieces of the owner's result, and the extra payload.

    Args:
        results: ``{key: (header, full, extra)}`` for the keys this rank owns: ``header`` a 1-D tensor of
            ``header_size`` numbers (status and counters: every rank gets them, also ranks holding nothing of
            the matrix), ``full`` the full result (numel = layout.numel) or None (nothing to apply: zeros are
            sent), ``extra`` a 1-D tensor of ``extra_sizes[key]`` numbers or None.
        keys: the matrices to exchange (default: all of the plan), the same list on every rank.

    Returns:
        ``{key: (header, local, extra)}`` for every key: ``local`` is this rank's part of the result in the
        order of its layout pieces (None where the owner sent None and this rank is the owner), ``extra``
        None when ``extra_sizes`` gives no size for the key.
    """
    rank, world = _rank_world(plan, group)
    keys = [lay.key for lay in plan.layouts] if keys is None else list(keys)
    extra_sizes = extra_sizes or {}
    owned = [k for k in keys if plan.owner(k) == rank]
    for k in owned:
        if k not in results:
            raise KeyError(f"rank {rank} owns matrix {k!r} but passed no result for it")
        h, full, _ = results[k]
        if h.numel() != header_size:
            raise ValueError(f"matrix {k!r}: header has {h.numel()} numbers, expected {header_size}")
        if full is not None and full.numel() != plan.layout(k).numel:
            raise ValueError(
                f"matrix {k!r}: result has {full.numel()} elements, layout has {plan.layout(k).numel}"
            )
    out_map: dict[str, tuple] = {}
    for k in owned:
        h, full, extra = results[k]
        lay = plan.layout(k)
        local = None
        if full is not None:
            flat = full.detach().reshape(-1)
            parts = _pieces_of(flat, lay, rank)
            local = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else flat[:0]
        out_map[k] = (h, local, extra if k in extra_sizes else None)
    if world == 1:
        return out_map
    device = comm_device(group)
    send: list[torch.Tensor] = []
    send_splits = [0] * world
    for d in range(world):
        if d == rank:
            continue
        for k in owned:
            lay = plan.layout(k)
            h, full, extra = results[k]
            send.append(h.reshape(-1).to(device, dtype))
            n = lay.local_numel(d)
            if full is None:
                send.append(torch.zeros(n, dtype=dtype, device=device))
            else:
                send.extend(t.to(device, dtype) for t in _pieces_of(full.detach().reshape(-1), lay, d))
            e = extra_sizes.get(k, 0)
            if e:
                send.append(
                    torch.zeros(e, dtype=dtype, device=device)
                    if extra is None
                    else extra.detach().reshape(-1).to(device, dtype)
                )
            send_splits[d] += header_size + n + e
    recv_splits = [0] * world
    for k in keys:
        s = plan.owner(k)
        if s != rank:
            recv_splits[s] += header_size + plan.layout(k).local_numel(rank) + extra_sizes.get(k, 0)
    inp = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
    out = torch.empty(sum(recv_splits), dtype=dtype, device=device)
    _collective(inp, out, send_splits, recv_splits, group, keys, "scatter_from_owners")
    cursor = [sum(recv_splits[:s]) for s in range(world)]
    for k in keys:
        s = plan.owner(k)
        if s == rank:
            continue
        c = cursor[s]
        h = out[c : c + header_size]
        c += header_size
        n = plan.layout(k).local_numel(rank)
        local = out[c : c + n]
        c += n
        e = extra_sizes.get(k, 0)
        extra = out[c : c + e] if k in extra_sizes else None
        c += e
        cursor[s] = c
        out_map[k] = (h, local, extra)
    return out_map


def exchange_bytes(
    plan: Plan,
    rank: int,
    *,
    keys=None,
    itemsize: int = 4,
    header_size: int = 0,
    extra_sizes: dict | None = None,
) -> dict[str, int]:
    """Bytes ``rank`` sends per step in the gather and the scatter, and the ideal: each distinct piece
    travels once to its owner (gather) and each holder receives its pieces once (scatter)."""
    keys = [lay.key for lay in plan.layouts] if keys is None else list(keys)
    extra_sizes = extra_sizes or {}
    gather = scatter = 0
    for k in keys:
        lay = plan.layout(k)
        owner = plan.owner(k)
        gather += sum(rt.length for rt in plan.routes[k] if rt.src == rank and owner != rank)
        if owner == rank:
            for d in range(plan.world_size):
                if d != rank:
                    scatter += header_size + lay.local_numel(d) + extra_sizes.get(k, 0)
    return {"gather": gather * itemsize, "scatter": scatter * itemsize}
