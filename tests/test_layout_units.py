"""Fast checks of the index bookkeeping against brute force: ZeRO partition maps, DTensor pieces, owner plans
and routes, and the exchange itself (W ranks simulated by threads, no process group)."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from spectral_dist.distributed import exchange
from spectral_dist.distributed.describe import box_pieces, dtensor_index_sets
from spectral_dist.distributed.layout import MatrixLayout, Piece, build_plan, compress_runs
from spectral_dist.integrations.deepspeed_compat import rank_pieces, stage3_rank_pieces


def _flat_indices(pieces) -> list[int]:
    out = []
    for p in pieces:
        p = p if isinstance(p, Piece) else Piece(p[0], p[1], 1, p[1])
        for o, n in p.runs():
            out.extend(range(o, o + n))
    return out


# ---------------------------------------------------------------------------------------------- ZeRO maps
@pytest.mark.parametrize("seed", range(20))
def test_stage12_partition_map_matches_brute_force(seed):
    rng = random.Random(seed)
    world = rng.randint(1, 5)
    sizes = [rng.randint(1, 30) for _ in range(rng.randint(1, 6))]
    total = sum(sizes)
    ps = -(-total // world) + rng.randint(0, 3)  # partitions may be padded
    off = 0
    for n in sizes:
        got = rank_pieces(off, n, ps, world)
        for r in range(world):
            want = [(i - r * ps, i - off) for i in range(off, off + n) if r * ps <= i < (r + 1) * ps]
            mine = [(fo + k, po + k) for fo, po, ln in got[r] for k in range(ln)]
            assert mine == want, (seed, r, off, n)
            assert got[r] == [] if not want else all(ln > 0 for _, _, ln in got[r])  # no empty pieces
        off += n


@pytest.mark.parametrize("seed", range(20))
def test_stage3_partition_map_matches_brute_force(seed):
    rng = random.Random(seed)
    world = rng.randint(1, 5)
    n = rng.randint(1, 40)
    ps = -(-n // world)
    q = rng.randint(0, 50)
    got = stage3_rank_pieces(n, ps, q, world)
    held = []
    for r in range(world):
        elems = [i for i in range(n) if r * ps <= i < (r + 1) * ps]
        mine = [(fo + k, po + k) for fo, po, ln in got[r] for k in range(ln)]
        assert mine == [(q + k, e) for k, e in enumerate(elems)], (seed, r)
        assert got[r] == [] if not elems else all(ln > 0 for _, _, ln in got[r])  # no empty pieces
        held += [po for _, po in mine]
    assert sorted(held) == list(range(n))


# ---------------------------------------------------------------------------------------------- DTensor
def _chunk_truth(shape, mesh_shape, coord, placements):
    """Global flat indices (local order) from torch.chunk on an index tensor, mesh dim by mesh dim."""
    from torch.distributed.tensor import Shard

    t = torch.arange(int(torch.Size(shape).numel())).view(shape)
    for md, pl in enumerate(placements):
        if isinstance(pl, Shard):
            parts = list(torch.chunk(t, mesh_shape[md], dim=pl.dim))
            parts += [t.narrow(pl.dim, 0, 0)] * (mesh_shape[md] - len(parts))
            t = parts[coord[md]]
    return t.reshape(-1).tolist()


@pytest.mark.parametrize("seed", range(30))
def test_dtensor_pieces_match_chunked_index_tensors(seed):
    from torch.distributed.tensor import Replicate, Shard

    rng = random.Random(seed)
    nd = rng.randint(1, 3)
    shape = tuple(rng.randint(1, 7) for _ in range(nd))
    mdims = rng.randint(1, 2)
    mesh_shape = tuple(rng.randint(1, 4) for _ in range(mdims))
    placements = [Replicate() if rng.random() < 0.3 else Shard(rng.randrange(nd)) for _ in range(mdims)]
    for coord in torch.cartesian_prod(*[torch.arange(s) for s in mesh_shape]).view(-1, mdims).tolist():
        idx = dtensor_index_sets(shape, mesh_shape, coord, placements)
        got = _flat_indices(box_pieces(shape, idx))
        assert got == _chunk_truth(shape, mesh_shape, coord, placements), (
            shape,
            mesh_shape,
            placements,
            coord,
        )


def test_compress_runs_merges_and_strides():
    assert compress_runs([(0, 3), (3, 2)]) == [Piece(0, 5, 1, 5)]
    assert compress_runs([(1, 2), (6, 2), (11, 2), (20, 1)]) == [Piece(1, 2, 3, 5), Piece(20, 1, 1, 1)]
    assert _flat_indices(compress_runs([(4, 2), (0, 2)])) == [4, 5, 0, 1]  # local order kept


# ---------------------------------------------------------------------------------------------- plans, routes
def _random_layout(rng, key, world):
    """A matrix split into disjoint row/column blocks, each held by 1-3 ranks (replicas), some ranks empty."""
    m, n = rng.randint(1, 6), rng.randint(1, 6)
    rows = sorted(rng.sample(range(1, m), min(m - 1, rng.randint(0, 2)))) if m > 1 else []
    cols = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 2)))) if n > 1 else []
    rb = list(zip([0, *rows], [*rows, m]))
    cb = list(zip([0, *cols], [*cols, n]))
    slices = [[] for _ in range(world)]
    for r0, r1 in rb:
        for c0, c1 in cb:
            runs = [(r * n + c0, c1 - c0) for r in range(r0, r1)]
            piece = compress_runs(runs)
            for h in rng.sample(range(world), rng.randint(1, min(3, world))):
                slices[h].extend(piece)
    return MatrixLayout(key, (m, n), slices)


@pytest.mark.parametrize("seed", range(25))
def test_routes_cover_every_element_once_owner_first(seed):
    rng = random.Random(seed)
    world = rng.randint(1, 4)
    lays = [_random_layout(rng, f"w{i}", world) for i in range(rng.randint(1, 5))]
    plan = build_plan(lays, world)
    for lay in lays:
        owner = plan.owner(lay.key)
        covered = []
        for rt in plan.routes[lay.key]:
            covered += _flat_indices([rt.piece])
            mine = _flat_indices(lay.slices[rt.src])
            start = mine.index(_flat_indices([rt.piece])[0])
            assert start == rt.src_offset  # the offset into the sender's local data is right
            if rt.src != owner:
                assert rt.piece not in lay.slices[owner]  # the owner's own copy is used when it has one
        assert sorted(covered) == list(range(lay.numel)), (seed, lay.key)


# ---------------------------------------------------------------------------------------------- exchange
class _FakeDist:
    """torch.distributed for W threads: ranks are thread-local, all_to_all_single meets at a barrier."""

    def __init__(self, world):
        self.world, self.local = world, threading.local()
        self.barrier = threading.Barrier(world)
        self.box: dict = {}
        self.sent: dict = {}  # rank -> bytes it sent, per collective

    def get_rank(self, group=None):
        return self.local.rank

    def get_world_size(self, group=None):
        return self.world

    def get_backend(self, group=None):
        return "gloo"

    def all_to_all_single(self, out, inp, output_split_sizes=None, input_split_sizes=None, group=None):
        r = self.local.rank
        assert sum(input_split_sizes) == inp.numel() and sum(output_split_sizes) == out.numel()
        assert input_split_sizes[r] == 0 and output_split_sizes[r] == 0  # a rank's own data never travels
        self.sent.setdefault(r, []).append(inp.numel() * inp.element_size())
        self.box[r] = list(torch.split(inp, input_split_sizes))
        self.barrier.wait()
        got = [self.box[s][r] for s in range(self.world)]
        self.barrier.wait()
        out.copy_(torch.cat(got) if got else out)
        self.barrier.wait()


@pytest.mark.parametrize("seed", range(12))
def test_exchange_gathers_and_scatters_exactly(seed, monkeypatch):
    rng = random.Random(seed)
    world = rng.randint(2, 4)
    lays = [_random_layout(rng, f"w{i}", world) for i in range(rng.randint(1, 4))]
    plan = build_plan(lays, world)
    truth = {
        lay.key: torch.randn(
            lay.shape, generator=torch.Generator().manual_seed(seed * 10 + i), dtype=torch.float64
        )
        for i, lay in enumerate(lays)
    }
    fake = _FakeDist(world)
    monkeypatch.setattr(exchange, "dist", fake)
    results, errors = [None] * world, []
    defaults, subsets = [None] * world, [None] * world

    def run(rank):
        fake.local.rank = rank
        try:
            local = {
                k: torch.cat([truth[k].reshape(-1)[_flat_indices([p])] for p in plan.layout(k).slices[rank]])
                if plan.layout(k).slices[rank]
                else torch.empty(0, dtype=torch.float64)
                for k in truth
            }
            full = exchange.gather_to_owners(plan, local, None, dtype=torch.float64)
            payload = {
                k: (
                    torch.tensor([float(rank), 1.0, 2.0], dtype=torch.float64),
                    2 * v.reshape(-1),
                    torch.full((3,), float(rank), dtype=torch.float64),
                )
                for k, v in full.items()
            }
            back = exchange.scatter_from_owners(
                plan, payload, None, header_size=3, extra_sizes={k: 3 for k in truth}, dtype=torch.float64
            )
            results[rank] = (full, back, local)
            # the same exchange with the default arguments (every key, float32, a 1-number header, no extra)
            fake.sent[rank] = []
            full32 = exchange.gather_to_owners(plan, {k: v.float() for k, v in local.items()}, None)
            back32 = exchange.scatter_from_owners(
                plan, {k: (torch.tensor([float(rank)]), v, None) for k, v in full32.items()}, None
            )
            defaults[rank] = (full32, back32, list(fake.sent[rank]))
            # a subset of the keys: only those are exchanged
            sub = [lays[-1].key]
            part = exchange.gather_to_owners(plan, local, None, keys=sub, dtype=torch.float64)
            back_sub = exchange.scatter_from_owners(
                plan,
                {k: (torch.zeros(1, dtype=torch.float64), v, None) for k, v in part.items()},
                None,
                keys=sub,
                dtype=torch.float64,
            )
            subsets[rank] = (part, back_sub)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            fake.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    for rank, (full, back, local) in enumerate(results):
        for k, v in full.items():
            assert plan.owner(k) == rank and torch.equal(v.reshape(truth[k].shape), truth[k]), (seed, k)
        for k in truth:
            h, pieces, extra = back[k]
            owner = plan.owner(k)
            assert h.tolist() == [float(owner), 1.0, 2.0] and extra.tolist() == [float(owner)] * 3
            assert torch.equal(pieces, 2 * local[k]), (seed, rank, k)
        full32, back32, sent = defaults[rank]
        assert set(full32) == set(plan.owned(rank))
        for k, v in full32.items():
            assert v.dtype == torch.float32 and torch.equal(v, truth[k].float()), (seed, k)
        assert set(back32) == set(truth), (seed, rank)
        for k, (h, pieces, extra) in back32.items():
            assert h.tolist() == [float(plan.owner(k))] and extra is None
            assert pieces.dtype == torch.float32 and torch.equal(pieces, local[k].float()), (seed, rank, k)
        # exchange_bytes predicts the traffic: gather (if any piece crosses ranks), then scatter
        want = exchange.exchange_bytes(plan, rank, header_size=1)
        gathered = sent[0] if len(sent) == 2 else 0
        assert want == {"gather": gathered, "scatter": sent[-1]}, (seed, rank, want, sent)
        assert exchange.exchange_bytes(
            plan, rank, itemsize=8, header_size=3, extra_sizes={k: 3 for k in truth}
        ) == {
            "gather": 2 * gathered,
            "scatter": 2 * sent[-1] + 8 * 5 * sum(1 for k in truth if plan.owner(k) == rank) * (world - 1),
        }
        part, back_sub = subsets[rank]
        key = lays[-1].key
        assert set(part) == ({key} if plan.owner(key) == rank else set()) and set(back_sub) == {key}
        assert torch.equal(back_sub[key][1], local[key]), (seed, rank)


# ---------------------------------------------------------------------------------------------- ZeRO readers
def _held(pieces, r) -> list[tuple[int, int]]:
    """(offset in the rank's buffer, offset in the parameter) of every element rank r holds."""
    return [(fo + k, po + k) for fo, po, ln in pieces[r] for k in range(ln)]


class _P:
    """A stand-in parameter: numel(), and ZeRO-3's partition_numel() / ds_numel."""

    def __init__(self, n, ps=None):
        self.n, self.ds_numel, self.ps = n, n, ps

    def numel(self):
        return self.n

    def partition_numel(self):
        return self.ps


@pytest.mark.parametrize("world", [1, 2, 3])
def test_zero_readers_map_each_parameter_into_the_flat_partitions(world, monkeypatch):
    """_stage12, _bf16 and _stage3 read DeepSpeed's (private) attributes into per-rank pieces; against brute
    force over the flat buffer: parameters laid end to end, cut into ``world`` partitions."""
    from types import SimpleNamespace

    from spectral_dist.integrations import deepspeed_compat as dc

    monkeypatch.setattr(dc.dist, "get_world_size", lambda group=None: world)
    sizes = [5, 1, 7]
    params = [_P(n) for n in sizes]
    offs = [0, 5, 6]
    total = sum(sizes)
    ps = -(-total // world)

    def brute(i, r):  # the elements of parameter i in partition r: (partition offset, parameter offset)
        return [
            (j - r * ps, j - offs[i])
            for j in range(offs[i], offs[i] + sizes[i])
            if r * ps <= j < (r + 1) * ps
        ]

    part = object()
    z12 = SimpleNamespace(
        round_robin_bit16_groups=[params],
        real_dp_process_group=["pg"],
        partition_size=[ps],
        round_robin_bit16_offsets=[offs],
        round_robin_bit16_meta=[params],
        single_partition_of_fp32_groups=[part],
    )
    zbf = SimpleNamespace(
        bf16_groups=[params],
        real_dp_process_group=["pg"],
        bf16_groups_flat=[torch.empty(ps * world)],
        fp32_groups_flat_partition=[part],
    )
    for got in (dc._stage12(z12), dc._bf16(zbf)):
        assert len(got) == 1 and got[0][0] is part and got[0][1] == 0 and got[0][3] == "pg"
        assert [p for p, _ in got[0][2]] == params
        for i, (_, pieces) in enumerate(got[0][2]):
            assert [_held(pieces, r) for r in range(world)] == [brute(i, r) for r in range(world)], i
    # ZeRO-3: each parameter split on its own into world partitions of ps_i, laid end to end in every rank's
    # sub-group buffer (q = the sum of the earlier parameters' ps_i); the group id comes from the sub-group map
    p3 = [_P(n, -(-n // world)) for n in sizes]
    z3 = SimpleNamespace(
        fp16_groups=[p3],
        dp_process_group="dp",
        fp32_partitioned_groups_flat=[part],
        sub_group_to_group_id=[4],
    )
    for zopt, pg in ((z3, "dp"), (SimpleNamespace(**vars(z3), sub_group_process_groups=["sub"]), "sub")):
        ((flat, gid, entries, got_pg),) = dc._stage3(zopt)
        assert flat is part and gid == 4 and got_pg == pg and [p for p, _ in entries] == p3
        q = 0
        for p, pieces in entries:
            for r in range(world):
                want = [(q + k, e) for k, e in enumerate(range(r * p.ps, min(p.n, (r + 1) * p.ps)))]
                assert _held(pieces, r) == want, (p.n, r)
            q += p.ps


def test_check_version_accepts_tested_minors_only(monkeypatch):
    from spectral_dist.integrations import deepspeed_compat as dc

    monkeypatch.delenv(dc.ALLOW_ENV, raising=False)
    assert dc.check_version("0.19.8") == "0.19.8"
    assert (
        dc.check_version("0.19.2+cu121") == "0.19.2+cu121"
    )  # any patch release and local tag of a tested minor
    for bad in ("0.20.0", "0.1.9", "1.19.8", "0.18.99"):
        with pytest.raises(
            dc.UnsupportedDeepSpeedError, match=rf"DeepSpeed {bad} .*\(0\.19\.8\).*{dc.ALLOW_ENV}=1"
        ):
            dc.check_version(bad)
    monkeypatch.setenv(dc.ALLOW_ENV, "0")
    with pytest.raises(dc.UnsupportedDeepSpeedError):
        dc.check_version("0.20.0")
    monkeypatch.setenv(dc.ALLOW_ENV, "1")
    assert dc.check_version("0.20.0") == "0.20.0"


def test_layout_helpers_against_brute_force():
    """holds_all, replicated, row blocks (1-D too), empty runs, and the per-rank load of a plan."""
    from spectral_dist.distributed.layout import replicated_layout, row_block_layout

    rep = replicated_layout("w", (3, 4), 2)
    assert rep.replicated and rep.holds_all(0) and rep.holds_all(1)
    rows = row_block_layout("w", (3, 4), [(0, 2), (2, 1)])
    assert _flat_indices(rows.slices[0]) == list(range(8)) and _flat_indices(rows.slices[1]) == [8, 9, 10, 11]
    assert not rows.holds_all(0) and not rows.holds_all(1) and not rows.replicated
    whole = row_block_layout("w", (3, 4), [(0, 3), (3, 0)])
    assert whole.holds_all(0) and not whole.holds_all(1)
    strided = MatrixLayout("w", (3, 4), [[Piece(0, 4, 3, 4)], [Piece(0, 2, 3, 4), Piece(2, 2, 3, 4)]])
    assert strided.holds_all(0) and not strided.holds_all(1)  # three contiguous rows; two column blocks
    assert MatrixLayout("e", (0, 4), [[], []]).holds_all(1)  # an empty matrix: nothing to hold
    vec = row_block_layout("b", (6,), [(0, 4), (4, 2)])
    assert _flat_indices(vec.slices[1]) == [4, 5]
    assert compress_runs([(0, 0), (3, 2), (7, 0), (9, 1)]) == [Piece(3, 2, 1, 2), Piece(9, 1, 1, 1)]
    rng = random.Random(3)
    lays = [_random_layout(rng, f"w{i}", 3) for i in range(7)]
    plan = build_plan(lays, 3)
    want = [sum(lay.cost for lay in lays if plan.owner(lay.key) == r) for r in range(3)]
    assert plan.loads() == want and sum(want) == sum(lay.cost for lay in lays)


# ---------------------------------------------------------------------------------------------- plan costs
def test_owner_plan_balances_the_methods_flops_not_just_the_shapes():
    """GPT-2's MLP pair (768 x 3072 up, 3072 x 768 down) has one shape cost, but the down matrix runs Polar
    Express (alpha 1) and the up matrix a Cholesky step (alpha 2), 2.7x cheaper: balanced on shapes, both
    Polar Express matrices land on one rank; on method_cost each rank gets one of each."""
    from spectral_dist.optim.matrix_step import method_cost

    shapes = {"h.0.up": (768, 3072), "h.0.down": (3072, 768), "h.1.up": (768, 3072), "h.1.down": (3072, 768)}
    methods = {k: ("cholesky" if k.endswith("up") else "polar_express") for k in shapes}
    lays = [MatrixLayout(k, s, [[(0, s[0] * s[1])], [(0, s[0] * s[1])]]) for k, s in shapes.items()]
    by_shape = build_plan(lays, 2)
    assert by_shape.owner("h.0.down") == by_shape.owner("h.1.down")  # the imbalance this fixes
    costs = {k: method_cost(shapes[k], methods[k]) for k in shapes}
    plan = build_plan(lays, 2, costs)
    assert plan.owner("h.0.down") != plan.owner("h.1.down") and plan.owner("h.0.up") != plan.owner("h.1.up")
    assert plan.loads() == [costs["h.0.up"] + costs["h.0.down"]] * 2 and plan.costs == costs
    assert plan.hash != by_shape.hash  # ZeRO checkpoints record which plan they were written with
    # the flop model's order at GPT-2 shapes: Polar Express > eigenbasis (fused qkv) > Cholesky > eigenbasis
    pe, chol = method_cost((3072, 768), "polar_express"), method_cost((768, 3072), "cholesky")
    eig_qkv, eig_sq = method_cost((768, 2304), "eigenbasis"), method_cost((768, 768), "eigenbasis")
    assert pe > eig_qkv > chol > eig_sq > 0
    assert method_cost((768, 3072), "svd") > pe and method_cost((768, 768), "gram") > eig_sq


def test_the_engines_plan_weights_each_matrix_by_its_method():
    """The one-process engine builds its plan from the optimizer's groups: alpha 1 -> Polar Express's flops,
    alpha 2 -> Cholesky's, another alpha -> the eigenbasis's (basis="auto")."""
    from torch import nn

    from spectral_dist import SpectralNewton
    from spectral_dist.optim.matrix_step import method_cost

    a, b, c = nn.Linear(48, 16), nn.Linear(16, 48), nn.Linear(16, 16)
    opt = SpectralNewton(
        [
            {"params": [a.weight], "alpha": 1.0},
            {"params": [b.weight], "alpha": 2.0},
            {"params": [c.weight], "alpha": 1.5, "jacobi_steps": 2},
        ],
        lr=0.01,
    )
    for p in (a.weight, b.weight, c.weight):
        p.grad = torch.randn_like(p)
    opt.step()
    costs = opt._get_engine().plan.costs
    assert sorted(costs.values()) == sorted(
        [
            method_cost((16, 48), "polar_express"),
            method_cost((48, 16), "cholesky"),
            method_cost((16, 16), "eigenbasis", jacobi_steps=2),
        ]
    )
    # each Jacobi step costs about a power step: the plan weighs it
    assert (
        method_cost((16, 16), "eigenbasis", 2)
        > method_cost((16, 16), "eigenbasis", 1)
        > method_cost((16, 16), "eigenbasis")
    )
