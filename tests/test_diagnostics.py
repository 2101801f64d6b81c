"""Single-process tests of the gradient-trajectory diagnostics (sketch, predictors, ranks, monitor)."""

import json
import math

import pytest
import torch
from torch import nn

from spectral_dist.diagnostics import (
    KINDS,
    PREDICTORS,
    GradientSketch,
    SketchSlice,
    TrajectoryMonitor,
    effective_rank,
    increment_spectrum,
    predict_next,
    predictable_rank,
)
from spectral_dist.diagnostics.predictors import min_history
from spectral_dist.diagnostics.reduce import owner_plan
from spectral_dist.diagnostics.sketch import local_runs

pytestmark = pytest.mark.usefixtures("one_thread")


def _vec(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


# JL tolerance: ||Sx||^2 / ||x||^2 has standard deviation ~ sqrt(2 / dim) = 0.0625 at dim = 512 for every
# kind on dense vectors, so a single ratio must lie within 0.3 (~5 sigma) of 1 and the mean of 12
# independent ratios within 0.07 (~4 sigma). Seeds are fixed: the test is deterministic.
@pytest.mark.parametrize("kind", KINDS)
def test_jl_norm_preservation(kind):
    ratios = []
    for seed in range(12):
        x = _vec(3000, 100 + seed).reshape(60, 50)
        s = GradientSketch(dim=512, seed=seed, kind=kind).sketch({"w": x})
        ratios.append(float(s.norm() ** 2 / x.norm() ** 2))
    assert all(abs(r - 1) < 0.3 for r in ratios), ratios
    assert abs(sum(ratios) / len(ratios) - 1) < 0.07, ratios


@pytest.mark.parametrize("kind", KINDS)
def test_jl_distance_preservation(kind):
    sk = GradientSketch(dim=512, seed=3, kind=kind)
    xs = [_vec(2000, i) + 0.5 * i for i in range(6)]
    zs = [sk.sketch({"g": x}) for x in xs]
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            d_true = float((xs[i] - xs[j]).norm())
            d_sk = float((zs[i] - zs[j]).norm())
            assert abs(d_sk / d_true - 1) < 0.15, (i, j, d_sk, d_true)
            # Linearity: the sketch of a difference is the difference of sketches.
            diff = sk.sketch({"g": xs[i] - xs[j]})
            torch.testing.assert_close(diff, zs[i] - zs[j], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_slices_sum_to_whole(kind):
    sk = GradientSketch(dim=64, seed=7, kind=kind, block_size=100)
    x = _vec(1037, 1).reshape(17, 61)
    whole = sk.sketch({"w": x})
    flat = x.reshape(-1)
    cuts = [0, 1, 99, 100, 101, 350, 700, 1036, 1037]
    parts = sum(sk.sketch_slice("w", flat[a:b], a) for a, b in zip(cuts[:-1], cuts[1:]))
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
    # SketchSlice inputs go through the same path.
    via = sk.sketch_tensor("w", SketchSlice(flat[350:1037], 350)) + sk.sketch_tensor(
        "w", SketchSlice(flat[:350], 0)
    )
    torch.testing.assert_close(via, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_sketches_sum_to_whole_sketch(kind):
    sk = GradientSketch(dim=32, seed=1, kind=kind)
    named = {"a": _vec(300, 1).reshape(10, 30), "b": _vec(7, 2), "c": _vec(1, 3).reshape(())}
    layers = sk.sketch_layers(named)
    assert list(layers) == ["a", "b", "c"] and all(v.shape == (32,) for v in layers.values())
    torch.testing.assert_close(sum(layers.values()), sk.sketch(named))
    # Concatenation order does not matter: each name keys its own columns.
    torch.testing.assert_close(sk.sketch(list(reversed(list(named.items())))), sk.sketch(named))


@pytest.mark.parametrize("kind", KINDS)
def test_projection_depends_only_on_seed_name_index(kind):
    a = GradientSketch(dim=16, seed=5, kind=kind, block_size=8)
    b = GradientSketch(dim=16, seed=5, kind=kind, block_size=8)
    cols = a.columns("layer.weight", 0, 30)
    torch.testing.assert_close(b.columns("layer.weight", 10, 20), cols[10:20])
    assert not torch.allclose(a.columns("layer.bias", 0, 30), cols)
    assert not torch.allclose(
        GradientSketch(dim=16, seed=6, kind=kind, block_size=8).columns("layer.weight", 0, 30), cols
    )
    if kind == "countsketch":
        assert ((cols != 0).sum(1) == 1).all() and set(cols[cols != 0].abs().tolist()) == {1.0}
    if kind == "rademacher":
        torch.testing.assert_close(cols.abs(), torch.full_like(cols, 0.25))


def test_local_runs_cover_a_column_shard():
    gshape, lshape, off = (3, 6, 5), (2, 4, 5), (1, 2, 0)
    full = torch.arange(math.prod(gshape)).reshape(gshape)
    box = full[1:3, 2:6, :].reshape(-1)
    got = torch.cat([torch.arange(g, g + n) for _, g, n in local_runs(gshape, lshape, off)])
    assert torch.equal(got, box)
    assert list(local_runs((4, 3), (2, 3), (2, 0))) == [(0, 6, 6)]  # a row shard is one run
    assert list(local_runs((4, 3), (0, 3), (4, 0))) == []  # an empty shard has none


def test_sketch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        GradientSketch(kind="sparse")
    with pytest.raises(ValueError, match="dim"):
        GradientSketch(dim=0)
    with pytest.raises(ValueError, match="block_size"):
        GradientSketch(block_size=-1)
    with pytest.raises(ValueError, match="offset"):
        GradientSketch().sketch_slice("w", torch.ones(3), -1)
    with pytest.raises(ValueError, match="value"):
        GradientSketch().sketch_tensor("w", [1.0, 2.0])


def test_predictors_pure_functions():
    a, b = _vec(20, 1), _vec(20, 2)
    const = torch.stack([a] * 6)
    a64, b64 = a.double(), b.double()
    drift = torch.stack([a64 + t * b64 for t in range(6)])
    for p in PREDICTORS:
        torch.testing.assert_close(predict_next(const, p), a)
    torch.testing.assert_close(predict_next(drift, "linear"), a64 + 6 * b64)
    torch.testing.assert_close(predict_next(drift, "lstsq"), a64 + 6 * b64)
    assert (predict_next(drift, "last") - drift[-1]).abs().max() == 0
    # Batched over leading dimensions.
    assert predict_next(torch.stack([drift, drift]), "lstsq").shape == (2, 20)
    assert min_history("lstsq", ar_order=3) == 4
    with pytest.raises(ValueError, match="history"):
        predict_next(drift[:2], "lstsq")
    with pytest.raises(ValueError, match="predictors"):
        predict_next(drift, "oracle")


def test_ranks_pure_functions():
    g = torch.Generator().manual_seed(0)
    r, T, d = 3, 20, 50
    basis = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    coef = torch.linalg.qr(torch.randn(T - 1, r, generator=g, dtype=torch.float64))[0]  # equal energies
    window = torch.cat([torch.zeros(1, d, dtype=torch.float64), (coef @ basis.T).cumsum(0)])
    sv = increment_spectrum(window)
    assert int(predictable_rank(sv, 0.9)) == r and int(predictable_rank(sv, 0.99)) == r
    assert abs(float(effective_rank(sv)) - r) < 1e-6
    still = torch.ones(5, d)
    assert (
        int(predictable_rank(increment_spectrum(still), 0.9)) == 0
        and float(effective_rank(increment_spectrum(still))) == 0
    )
    with pytest.raises(ValueError, match="energy"):
        predictable_rank(sv, 1.5)
    with pytest.raises(ValueError, match="window"):
        increment_spectrum(window[:1])


def _monitor(named, **kw):
    kw.setdefault("every", 1)
    kw.setdefault("sketch_dim", 64)
    return TrajectoryMonitor(named, **kw)


def test_constant_gradient_has_zero_last_path_length():
    named = {"w": torch.zeros(30, 20), "b": torch.zeros(20)}
    g = {"w": _vec(600, 1).reshape(30, 20), "b": _vec(20, 2)}
    mon = _monitor(named)
    for _ in range(8):
        mon.update(g)
    s = mon.summary()
    for scope in [s["global"], *s["layers"].values()]:
        assert scope["path_length"]["last"] == 0.0
        assert scope["path_length_ratio"]["ema"] < 1e-12
        assert scope["path_length_ratio"]["lstsq"] < 1e-10
        assert scope["predictable_rank_90"] == 0
    assert s["num_predictions"] == {"last": 7, "ema": 7, "linear": 6, "lstsq": 5}


def test_linear_drift_has_zero_linear_path_length():
    named = {"w": torch.zeros(40, 25), "b": torch.zeros(25)}
    a = {"w": _vec(1000, 1).reshape(40, 25), "b": _vec(25, 2)}
    b = {"w": _vec(1000, 3).reshape(40, 25), "b": _vec(25, 4)}
    mon = _monitor(named, kind="gaussian")
    for t in range(10):
        mon.update({k: a[k] + 0.3 * t * b[k] for k in a})
    s = mon.summary()
    for scope in [s["global"], *s["layers"].values()]:
        assert scope["path_length_ratio"]["linear"] < 1e-9
        assert scope["path_length_ratio"]["lstsq"] < 1e-9
        assert scope["path_length_ratio"]["last"] > 1e-3
        assert scope["predictable_rank_99"] == 1  # constant increments
    assert s["global"]["path_length"]["last"] > 1e3 * s["global"]["path_length"]["linear"]


@pytest.mark.parametrize("r", [1, 4])
def test_increments_in_rank_r_subspace_give_predictable_rank_r(r):
    n, T = 500, 24
    g = torch.Generator().manual_seed(r)
    basis = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
    coef = torch.linalg.qr(torch.randn(T - 1, r, generator=g))[0] * 10
    grads = torch.cat([torch.randn(1, n, generator=g), (coef @ basis.T)]).cumsum(0)
    mon = _monitor({"w": torch.zeros(20, 25)}, sketch_dim=128, window=T, per_layer=False)
    for t in range(T):
        mon.update({"w": grads[t].reshape(20, 25)})
    s = mon.summary()["global"]
    assert s["predictable_rank_90"] == r and s["predictable_rank_99"] == r
    assert r - 0.5 < s["effective_rank"] < r + 0.5


def test_monitor_reads_grads_schedule_and_log_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    mon = TrajectoryMonitor(model, sketch_dim=32, window=4, every=3)
    flags = []
    for step in range(10):
        model.zero_grad()
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        flags.append(mon.update())
    assert flags == [True, False, False, True, False, False, True, False, False, True]
    assert mon.num_sketches == 4 and len(mon.history) == 4
    # Per-layer sketches sum to the global one.
    torch.testing.assert_close(mon.history[-1][1:].sum(0), mon.history[-1][0])
    log = mon.to_log_dict()
    json.dumps(log)
    assert log["traj/global/num_sketches"] == 4
    for key in [
        "traj/global/path_length/last",
        "traj/global/path_length_ratio/lstsq",
        "traj/global/predictable_rank_90",
        "traj/global/predictable_rank_99",
        "traj/global/effective_rank",
        "traj/0.weight/predictable_rank_90",
        "traj/2.bias/path_length/linear",
    ]:
        assert key in log, key
    assert set(mon.summary()["layers"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(k.startswith("x/") for k in mon.to_log_dict(prefix="x/"))


def test_monitor_skips_nonfinite_and_missing_grads():
    mon = _monitor({"a": torch.zeros(4), "b": torch.zeros(3)})
    assert mon.update({"a": torch.ones(4)})  # missing "b" counts as a zero gradient
    assert not mon.update({"a": torch.tensor([1.0, float("nan"), 0, 0]), "b": torch.ones(3)})
    assert mon.skipped_nonfinite == 1 and mon.num_sketches == 1
    assert mon.summary()["layers"]["b"]["path_length"]["last"] == 0.0
    with pytest.raises(ValueError, match="grads"):
        mon.update({"c": torch.ones(2)})


def test_monitor_state_dict_resume_matches_uninterrupted():
    named = {"w": torch.zeros(12)}
    seq = [_vec(12, t) for t in range(9)]
    full = _monitor(named, window=4)
    for v in seq:
        full.update({"w": v})
    first = _monitor(named, window=4)
    for v in seq[:5]:
        first.update({"w": v})
    resumed = _monitor(named, window=4)
    resumed.load_state_dict(first.state_dict())
    for v in seq[5:]:
        resumed.update({"w": v})
    assert resumed.to_log_dict() == full.to_log_dict()
    with pytest.raises(ValueError, match="state"):
        _monitor(named, predictors=("last",)).load_state_dict(first.state_dict())


def test_monitor_rejects_bad_arguments():
    named = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="window"):
        TrajectoryMonitor(named, window=1)
    with pytest.raises(ValueError, match="every"):
        TrajectoryMonitor(named, every=0)
    with pytest.raises(ValueError, match="predictors"):
        TrajectoryMonitor(named, predictors=("last", "oracle"))
    with pytest.raises(ValueError, match="kind"):
        TrajectoryMonitor(named, kind="fft")
    with pytest.raises(ValueError, match="dim"):
        TrajectoryMonitor(named, sketch_dim=-4)
    with pytest.raises(ValueError, match="ema_beta"):
        TrajectoryMonitor(named, ema_beta=1.0)
    with pytest.raises(ValueError, match="distributed"):
        TrajectoryMonitor(named, distributed="yes")
    with pytest.raises(ValueError, match="model_or_named_params"):
        TrajectoryMonitor({})


def test_owner_plan_balances_and_is_deterministic():
    sizes = [100, 1, 50, 50, 3]
    owners = owner_plan(sizes, 2)
    assert owners == owner_plan(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [101, 103]


def test_countsketch_chunking_does_not_change_the_sketch(monkeypatch):
    from spectral_dist.diagnostics import sketch as sketch_mod

    sk = GradientSketch(dim=16, seed=4, kind="countsketch")
    x = _vec(1000, 9)
    whole = sk.sketch_slice("w", x, 123)
    monkeypatch.setattr(sketch_mod, "_COUNT_CHUNK", 7)
    torch.testing.assert_close(sk.sketch_slice("w", x, 123), whole)
