"""Error messages and documented defaults of the core, pinned exactly.

A bad input gets an error that says what is wrong and what to change; these tests assert the text,
including the offending value or name, so that a changed, dropped or mangled message fails here
(they are part of the mutation tier, docs/testing.md)."""

import inspect
import math
import re

import pytest
import torch
from torch import nn

from spectral_dist import SpectralNewton
from spectral_dist.distributed.layout import _as_piece, build_plan
from spectral_dist.optim.spectral_newton import normalize_name, validate_group
from spectral_dist.spectral import DecompositionError
from spectral_dist.spectral.decompose import _retry
from spectral_dist.spectral.direction import cholesky_direction, spectral_direction, tracked_direction
from spectral_dist.spectral.transform import check_damping


def _p(shape=(4, 3)):
    return nn.Parameter(torch.randn(*shape))


def _opt(**kw):
    return SpectralNewton([_p()], **kw)


def _exact(msg):
    return "^" + re.escape(msg) + "$"


# ---------------------------------------------------------------- construction options
@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(lr=-1.0), "lr must be a finite number >= 0, got -1.0"),
        (dict(lr="x"), "lr must be a finite number >= 0, got 'x'"),
        (
            dict(lr=torch.tensor(0.01)),
            "lr must be a finite number >= 0, got tensor(0.0100) (a tensor lr is for torch optimizers whose step "
            "is compiled or captured; SpectralNewton's step runs eagerly, so pass a float, e.g. lr=float(lr))",
        ),
        (dict(weight_decay=-0.5), "weight_decay must be a finite number >= 0, got -0.5"),
        (dict(adamw_lr=-2.0), "adamw_lr must be a finite number >= 0, got -2.0"),
        (dict(adamw_weight_decay=-0.25), "adamw_weight_decay must be a finite number >= 0, got -0.25"),
        (dict(rms_target=-0.2), "rms_target must be a finite number >= 0, got -0.2"),
        (dict(rms_target=float("inf")), "rms_target must be a finite number >= 0, got inf"),
        (dict(nesterov="yes"), "nesterov must be True or False, got 'yes'"),
        (dict(nesterov=1), "nesterov must be True or False, got 1"),
        (dict(momentum=1.0), "momentum must be in [0, 1), got 1.0"),
        (dict(momentum=-0.1), "momentum must be in [0, 1), got -0.1"),
        (dict(momentum=True), "momentum must be in [0, 1), got True"),
        (dict(momentum="0.9"), "momentum must be in [0, 1), got '0.9'"),
        (dict(master_weights="no"), "master_weights must be True or False, got 'no'"),
        (dict(master_weights=0), "master_weights must be True or False, got 0"),
        (dict(max_consecutive_skips=0), "max_consecutive_skips must be a positive integer, got 0"),
        (dict(max_consecutive_skips=True), "max_consecutive_skips must be a positive integer, got True"),
        (dict(refresh_every=0), "refresh_every must be a positive integer, got 0"),
        (dict(ns_steps=1.5), "ns_steps must be a positive integer, got 1.5"),
        (dict(jacobi_steps=-1), "jacobi_steps must be an integer >= 0 (0: power step only), got -1"),
        (dict(jacobi_steps=True), "jacobi_steps must be an integer >= 0 (0: power step only), got True"),
        (dict(rank=0), "rank must be a positive integer or None, got 0"),
        (dict(damping=-1.0), "damping must be >= 0, got -1.0"),
        (dict(damping=float("nan")), "damping must be a finite number >= 0, got nan"),
        (dict(damping=True), "damping must be a finite number >= 0, got True"),
        (dict(adamw_eps=0.0), "adamw_eps must be a finite number > 0, got 0.0"),
        (dict(adamw_betas=(0.9, 1.0)), "adamw_betas must be two numbers in [0, 1), got (0.9, 1.0)"),
        (
            dict(basis="cholesky", alpha=1.0),
            "basis='cholesky' is exact for alpha = 0 or 2 only, got alpha=1.0",
        ),
        (
            dict(basis="cholesky", alpha=3.0),
            "basis='cholesky' is exact for alpha = 0 or 2 only, got alpha=3.0",
        ),
        (
            dict(basis="cholesky", alpha="auto"),
            "basis='cholesky' is exact for alpha = 0 or 2 only, got alpha='auto'",
        ),
        (
            dict(lr=0.0, adamw_lr=0.01),
            "adamw_lr=0.01 follows lr's schedule as adamw_lr * lr / (lr at construction), so it needs lr > 0 at "
            "construction; leave adamw_lr unset (AdamW then uses lr) or pass lr > 0",
        ),
    ],
)
def test_constructor_errors_name_the_option_and_value(kw, msg):
    with pytest.raises(ValueError, match=_exact(msg)):
        _opt(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(momentum=0.0),
        dict(momentum=0.999),
        dict(momentum=0),
        dict(basis="cholesky", alpha=0.0),
        dict(basis="cholesky", alpha=2.0),
        dict(basis="cholesky", alpha=2),
        dict(lr=0.0),
        dict(weight_decay=0.0, adamw_weight_decay=0.0, rms_target=0.0),
        dict(max_consecutive_skips=1),
        dict(adamw_betas=[0.0, 0.5]),
    ],
)
def test_constructor_accepts_boundary_values(kw):
    opt = _opt(**kw)
    g = opt.param_groups[0]
    for k, v in kw.items():
        want = tuple(v) if k == "adamw_betas" else v
        got = opt.max_consecutive_skips if k == "max_consecutive_skips" else g[k]
        assert got == want and type(got) is type(want)


def test_spectral_group_option_error():
    with pytest.raises(ValueError, match=_exact("spectral must be None (by ndim), True or False, got 'yes'")):
        SpectralNewton([{"params": [_p()], "spectral": "yes"}])


def test_adamw_lr_needs_base_lr_not_current_lr():
    """validate_group checks the lr at construction (base_lr) when the group has one, not the current lr."""
    g = dict(_opt().param_groups[0])
    g.update(adamw_lr=0.01, lr=0.0, base_lr=0.5)
    validate_group(g)  # lr was scheduled to 0: fine
    g.update(lr=0.5, base_lr=0.0)
    with pytest.raises(ValueError, match=r"^adamw_lr=0\.01 follows lr's schedule"):
        validate_group(g)


def test_add_param_group_rejects_vector_with_spectral_true():
    opt = _opt()
    with pytest.raises(
        ValueError, match=_exact("spectral=True needs matrix parameters; got one of shape (5,)")
    ):
        opt.add_param_group({"params": [_p((5,))], "spectral": True})
    assert len(opt.param_groups) == 1


def test_complex_parameters_are_refused_by_name():
    # before: a complex gradient was cast to real in the finite check and the "polar factor" was wrong by 0.7
    model = nn.Sequential(nn.Linear(4, 4))
    model.register_parameter("z", nn.Parameter(torch.randn(4, 4, dtype=torch.complex64)))
    with pytest.raises(ValueError, match=r"parameter 'z' has dtype torch.complex64: .*torch.view_as_real"):
        SpectralNewton.from_model(model, alpha=1.0)
    opt = _opt()
    with pytest.raises(ValueError, match=re.escape("a parameter of shape (2, 2) has dtype torch.complex64")):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1


def test_sparse_gradients_are_refused_before_anything_changes():
    emb, lin = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 4)
    opt = SpectralNewton(
        [
            {"params": [lin.weight], "param_names": ["lin.weight"]},
            {"params": [emb.weight], "param_names": ["emb"]},
        ]
    )
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in (lin.weight, emb.weight)]
    with pytest.raises(
        RuntimeError, match=r"parameter 'emb' has a torch.sparse_coo gradient: .*sparse=False"
    ):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, (lin.weight, emb.weight)))
    assert not opt.state


# ---------------------------------------------------------------- defaults
def test_documented_defaults():
    sig = inspect.signature(SpectralNewton.__init__).parameters
    want = dict(
        lr=1e-3,
        alpha=1.0,
        momentum=0.95,
        nesterov=True,
        damping=1e-4,
        weight_decay=0.0,
        scale="rms",
        basis="auto",
        rank=None,
        refresh_every=1,
        jacobi_steps=0,
        adamw_lr=None,
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-8,
        adamw_weight_decay=0.0,
        rms_target=0.2,
        ns_steps=5,
        max_consecutive_skips=10,
        master_weights=True,
        max_batch_mb=256,
        distributed="auto",
        engine=None,
    )
    assert {k: sig[k].default for k in want} == want
    opt = _opt()
    g = opt.param_groups[0]
    for k, v in want.items():
        if k in ("max_consecutive_skips", "master_weights"):
            assert getattr(opt, k) == v
        elif k == "max_batch_mb":
            assert opt.max_batch_bytes == v * 2**20
        elif k in ("distributed", "engine"):
            assert getattr(opt, "_" + k) == v
        else:
            assert g[k] == v and type(g[k]) is type(v), k
    assert g["spectral"] is None and g["layer_type"] is None
    assert "layer_type" in opt.defaults and opt.defaults["layer_type"] is None
    fm = inspect.signature(SpectralNewton.from_model).parameters
    assert (
        fm["alpha"].default == "by_layer"
        and fm["verbose"].default is False
        and fm["head_names"].default == ()
    )


def test_distributed_and_engine_are_kept():
    sentinel = object()
    opt = _opt(distributed=False, engine=sentinel)
    assert opt._distributed is False and opt._engine is sentinel


def test_adamw_betas_kept_as_given_when_not_a_sequence():
    with pytest.raises(ValueError, match=_exact("adamw_betas must be two numbers in [0, 1), got 0.9")):
        _opt(adamw_betas=0.9)


def test_max_consecutive_skips_default_is_ten():
    from spectral_dist.optim import NonFiniteGradientError

    p = _p()
    opt = SpectralNewton([p])
    for _ in range(9):
        p.grad = torch.full_like(p, float("nan"))
        opt.step()
    p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(NonFiniteGradientError):
        opt.step()


# ---------------------------------------------------------------- from_model
def test_from_model_without_parameters():
    m = nn.Linear(2, 2)
    for q in m.parameters():
        q.requires_grad_(False)
    with pytest.raises(ValueError, match=_exact("model has no trainable parameters")):
        SpectralNewton.from_model(m)


def test_from_model_keeps_infos_and_is_quiet(capsys):
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"^SpectralNewton\.from_model: none of the model's"):
        opt = SpectralNewton.from_model(m)
    assert capsys.readouterr().out == ""
    assert [i.name for i in opt.param_infos] == [n for n, _ in m.named_parameters()]


def test_from_model_head_names_reach_classification():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    plain = {i.name: i.layer_type for i in SpectralNewton.from_model(m).param_infos}
    headed = {i.name: i.layer_type for i in SpectralNewton.from_model(m, head_names=("2",)).param_infos}
    assert plain["2.weight"] == "matrix" and headed["2.weight"] == "head"


def test_from_model_verbose_prints_alpha_table(capsys):
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    SpectralNewton.from_model(m, alpha={"matrix": 1.5}, verbose=True)
    out = capsys.readouterr().out
    assert "0.weight" in out and "1.5" in out


# ---------------------------------------------------------------- small helpers
def test_normalize_name_keeps_dots():
    assert normalize_name("module._orig_mod.layers.0.weight") == "layers.0.weight"


def test_resolve_alpha_meta_defaults():
    from spectral_dist.optim.classify import DEFAULT_ALPHA

    opt = _opt(alpha="auto")
    g = dict(opt.param_groups[0])
    g["layer_type"] = None
    assert opt.resolve_alpha_meta({}, g) == DEFAULT_ALPHA["matrix"]
    g["layer_type"] = "no_such_type"
    assert opt.resolve_alpha_meta({}, g) == 1.0


def test_adamw_lr_follows_schedule():
    g = {"adamw_lr": 0.02, "lr": 0.05, "base_lr": None}
    assert SpectralNewton.adamw_lr(g) == pytest.approx(0.02)
    g = {"adamw_lr": 0.02, "lr": 0.05, "base_lr": 0.1}
    assert SpectralNewton.adamw_lr(g) == pytest.approx(0.01)


# ---------------------------------------------------------------- load_state_dict
def _named_opt(names=("a", "b")):
    ps = [_p() for _ in names]
    return SpectralNewton([{"params": ps, "param_names": list(names)}]), ps


def test_load_state_dict_not_a_state_dict():
    opt, _ = _named_opt()
    with pytest.raises(
        ValueError, match=_exact("not an optimizer state dict: it needs 'state' and 'param_groups'")
    ):
        opt.load_state_dict({"state": {}})


def test_load_state_dict_group_count():
    opt, _ = _named_opt()
    sd = opt.state_dict()
    sd["param_groups"] = sd["param_groups"] * 2
    with pytest.raises(
        ValueError,
        match=_exact(
            "the state dict has 2 param groups, this optimizer has 1"
            " (build the optimizer the same way, e.g. SpectralNewton.from_model on the same model)"
        ),
    ):
        opt.load_state_dict(sd)


def test_load_state_dict_bad_group_option_names_group():
    opt, _ = _named_opt(("w0", "w1", "w2", "w3"))
    sd = opt.state_dict()
    sd["param_groups"][0]["momentum"] = 2.0
    with pytest.raises(
        ValueError,
        match=_exact("param group 0 (w0, w1, w2...) in the state dict: momentum must be in [0, 1), got 2.0"),
    ):
        opt.load_state_dict(sd)


def test_load_state_dict_betas_list_and_base_lr():
    opt, ps = _named_opt()
    sd = opt.state_dict()
    g = sd["param_groups"][0]
    g["adamw_betas"] = [0.8, 0.9]
    del g["base_lr"]
    g["lr"] = 0.25
    opt.load_state_dict(sd)
    g = opt.param_groups[0]
    assert g["adamw_betas"] == (0.8, 0.9) and isinstance(g["adamw_betas"], tuple)
    assert g["param_names"] == ["a", "b"] and g["params"][0] is ps[0]


def test_load_state_dict_name_mismatch_message():
    opt, _ = _named_opt(tuple(f"p{i}" for i in range(6)))
    other, _ = _named_opt(tuple(f"q{i}" for i in range(6)))
    with pytest.raises(ValueError) as e:
        opt.load_state_dict(other.state_dict())
    assert str(e.value) == (
        "the state dict's parameter names do not match this optimizer's: "
        "missing ['p0', 'p1', 'p2', 'p3', 'p4']..., "
        "unexpected ['q0', 'q1', 'q2', 'q3', 'q4']... (wrapper prefixes such as "
        "'module.' are ignored); build the optimizer over the same parameters"
    )


def test_load_state_dict_name_mismatch_five_names_no_ellipsis():
    opt, _ = _named_opt(tuple(f"p{i}" for i in range(5)))
    other, _ = _named_opt(tuple(f"q{i}" for i in range(5)))
    with pytest.raises(ValueError) as e:
        opt.load_state_dict(other.state_dict())
    assert str(e.value) == (
        "the state dict's parameter names do not match this optimizer's: "
        "missing ['p0', 'p1', 'p2', 'p3', 'p4'], "
        "unexpected ['q0', 'q1', 'q2', 'q3', 'q4'] (wrapper prefixes such as "
        "'module.' are ignored); build the optimizer over the same parameters"
    )


def test_load_param_state_must_be_dict():
    opt, _ = _named_opt()
    sd = opt.state_dict()
    sd["state"] = {0: [1, 2]}
    with pytest.raises(ValueError, match=_exact("state of parameter 'a' must be a dict, got list")):
        opt.load_state_dict(sd)


# ---------------------------------------------------------------- spectral/ and layout
def test_check_damping_message():
    with pytest.raises(ValueError, match=_exact("damping must be a finite number >= 0, got 'x'")):
        check_damping("x")


def test_cholesky_direction_alpha_message():
    with pytest.raises(
        ValueError, match=_exact("method='cholesky' is exact for alpha = 0 or 2 only, got alpha=1.0")
    ):
        cholesky_direction(torch.randn(4, 3), 1.0, 1e-4)
    with pytest.raises(
        ValueError, match=_exact("method='cholesky' is exact for alpha = 0 or 2 only, got alpha=1.0")
    ):
        spectral_direction(torch.randn(4, 3), alpha=1.0, method="cholesky")


def test_tracked_direction_messages():
    with pytest.raises(
        ValueError, match=_exact("tracked_direction works on one matrix (m, n), got shape (2, 4, 3)")
    ):
        tracked_direction(torch.randn(2, 4, 3), torch.zeros(3, 2), 1.0, 1e-4)
    with pytest.raises(ValueError, match=_exact("residual must be 'scaled' or 'drop', got 'keep'")):
        tracked_direction(torch.randn(4, 3), torch.zeros(3, 2), 1.0, 1e-4, residual="keep")


def test_spectral_direction_non_finite_input_message():
    G = torch.randn(4, 3)
    G[0, 0] = float("nan")
    with pytest.raises(
        ValueError,
        match=_exact(
            "spectral_direction got a non-finite G; the optimizer skips such steps before calling it"
        ),
    ):
        spectral_direction(G, alpha=1.0)


def test_retry_counts_and_messages():
    counter = {}

    def nan_then_ok(A):
        if A.dtype == torch.float32:
            return (torch.full_like(A, float("nan")),)
        return (A,)

    A = torch.ones(3, 2)
    (out,) = _retry(nan_then_ok, A, "svd", counter)
    assert counter == {"retries": 1} and out.dtype == torch.float32
    _retry(nan_then_ok, A, "svd", counter)
    assert counter == {"retries": 2}

    def always_fail(A):
        raise torch.linalg.LinAlgError("boom")

    with pytest.raises(
        DecompositionError, match=_exact("svd failed in torch.float32 and float64 for shape (3, 2)")
    ):
        _retry(always_fail, A, "svd", None)

    def always_nan(A):
        return (torch.full_like(A, float("nan")),)

    with pytest.raises(
        DecompositionError,
        match=_exact("eigh returned non-finite values in torch.float32 and float64 for shape (3, 2)"),
    ):
        _retry(always_nan, A, "eigh", None)


def test_layout_messages():
    with pytest.raises(
        ValueError,
        match=_exact("a piece is (offset, length) or (offset, length, count, stride), got (1, 2, 3)"),
    ):
        _as_piece((1, 2, 3))
    with pytest.raises(ValueError, match=_exact("build_plan needs world_size when there are no layouts")):
        build_plan([])


def test_layout_values_and_messages():
    from spectral_dist.distributed.layout import MatrixLayout, Piece, Plan, matrix_cost, row_block_layout

    assert matrix_cost(()) == 0
    assert matrix_cost((5,)) == 5
    assert matrix_cost((6, 2, 2)) == 6 * 4 * 4
    assert matrix_cost((2, 6)) == 2 * 6 * 2
    assert _as_piece((3, 4)) == Piece(3, 4, 1, 4)
    assert _as_piece([1, 2, 3, 5]) == Piece(1, 2, 3, 5)
    lay = MatrixLayout("w", [2.0, 3], [[(0, 6)], [], [(0, 3), (3, 3)]])
    assert lay.shape == (2, 3) and all(type(s) is int for s in lay.shape)
    assert lay.holders() == [0, 2]
    assert lay.holds_all(0) and not lay.holds_all(1) and not lay.holds_all(2)
    assert MatrixLayout("s", (2, 3), [[Piece(0, 3, 2, 3)]]).holds_all(0)
    assert not MatrixLayout("t", (2, 4), [[Piece(0, 2, 2, 4), Piece(2, 2, 2, 4)]]).holds_all(0)
    assert row_block_layout("v", (6,), [(0, 2), (2, 4)]).slices == [[Piece(0, 2, 1, 2)], [Piece(2, 4, 1, 4)]]
    a = MatrixLayout("a", (2, 2), [[(0, 4)], [(0, 4)]])
    with pytest.raises(ValueError, match=_exact("duplicate matrix key 'a' in plan")):
        Plan((a, a), {"a": 0}, 2)
    with pytest.raises(ValueError, match=_exact("matrix 'a' has slices for 2 ranks, plan has 3")):
        Plan((a,), {"a": 0}, 3)
    plan = build_plan([a, MatrixLayout("b", (3, 3), [[(0, 9)], [(0, 9)]])])
    assert plan.world_size == 2
    assert sorted(plan.owned_numel(r) for r in range(2)) == [4, 9]
    assert plan.owned_numel(plan.owner("b")) == 9
    assert build_plan([], 3).world_size == 3
    from spectral_dist.distributed.layout import _check_cover

    overlap = MatrixLayout("o", (2, 3), [[(0, 4)], [(2, 2)]])  # 6 elements in all, two of them twice
    with pytest.raises(ValueError) as e:
        _check_cover(overlap)
    assert str(e.value) in {
        f"matrix 'o': pieces of different ranks overlap partially at elements {span}; pieces must be "
        "identical replicas or disjoint"
        for span in ("[2, 4)", "[0, 4)")
    }


# ---------------------------------------------------------------- exchange
def test_exchange_names():
    from spectral_dist.distributed.exchange import _names

    assert _names(["a", "b"]) == "'a', 'b'"
    assert _names(iter(["a", "b", "c"]), limit=2) == "'a', 'b' and 1 more"
    assert _names(["a", "b"], limit=2) == "'a', 'b'"
    assert _names(f"k{i}" for i in range(10)) == ", ".join(repr(f"k{i}") for i in range(8)) + " and 2 more"


def test_exchange_errors_name_rank_and_matrix(monkeypatch):
    from spectral_dist.distributed import exchange
    from spectral_dist.distributed.layout import MatrixLayout, Plan

    a = MatrixLayout("a", (2, 2), [[(0, 4)], [(0, 4)]])
    plan2 = Plan((a,), {"a": 0}, 2)
    with pytest.raises(ValueError, match=_exact("plan is for 2 ranks, process group has 1")):
        exchange.gather_to_owners(plan2, {}, False)
    with pytest.raises(
        KeyError, match=re.escape("rank 1 holds 4 elements of matrix 'a' but passed no local data")
    ):
        exchange._local_flat({}, "a", 4, 1)
    assert exchange._local_flat({}, "a", 0, 1).shape == (0,)
    with pytest.raises(
        ValueError, match=_exact("matrix 'a': rank 1 passed 3 local elements, its layout says 4")
    ):
        exchange._local_flat({"a": torch.zeros(3)}, "a", 4, 1)

    one = Plan((MatrixLayout("a", (2, 2), [[(0, 4)]]),), {"a": 0}, 1)
    with pytest.raises(KeyError, match=re.escape("rank 0 owns matrix 'a' but passed no result for it")):
        exchange.scatter_from_owners(one, {}, False)
    with pytest.raises(ValueError, match=_exact("matrix 'a': header has 2 numbers, expected 1")):
        exchange.scatter_from_owners(one, {"a": (torch.zeros(2), None, None)}, False)
    with pytest.raises(ValueError, match=_exact("matrix 'a': result has 3 elements, layout has 4")):
        exchange.scatter_from_owners(one, {"a": (torch.zeros(1), torch.zeros(3), None)}, False)

    class _Broken:
        def all_to_all_single(self, *a, **k):
            raise RuntimeError("peer died")

    monkeypatch.setattr(exchange, "dist", _Broken())
    with pytest.raises(
        exchange.ExchangeError, match=_exact("gather_to_owners of matrices 'a', 'b' failed: peer died")
    ):
        exchange._collective(None, None, [], [], None, ["a", "b"], "gather_to_owners")


def test_exchange_bytes_defaults():
    from spectral_dist.distributed import exchange
    from spectral_dist.distributed.layout import MatrixLayout, Plan

    a = MatrixLayout("a", (2, 2), [[(0, 2)], [(2, 2)]])
    plan = Plan((a,), {"a": 0}, 2)
    sig = inspect.signature(exchange.exchange_bytes).parameters
    assert sig["itemsize"].default == 4 and sig["header_size"].default == 0
    assert exchange.exchange_bytes(plan, 0) == {"gather": 0, "scatter": 2 * 4}
    assert exchange.exchange_bytes(plan, 1) == {"gather": 2 * 4, "scatter": 0}
    assert exchange.exchange_bytes(plan, 0, keys=("a",), header_size=1) == {"gather": 0, "scatter": 3 * 4}
    sig = inspect.signature(exchange.scatter_from_owners).parameters
    assert sig["header_size"].default == 1 and sig["dtype"].default == torch.float32


# ---------------------------------------------------------------- load_state_dict: matching and state entries
def test_load_state_dict_needs_both_keys():
    opt, _ = _named_opt()
    for bad in ({"param_groups": []}, {"state": {}}, [("state", {}), ("param_groups", [])]):
        with pytest.raises(
            ValueError, match=r"^not an optimizer state dict: it needs 'state' and 'param_groups'$"
        ):
            opt.load_state_dict(bad)


def test_load_state_dict_unlisted_state():
    opt, _ = _named_opt()
    sd = opt.state_dict()
    sd["state"] = {99: {}}
    with pytest.raises(
        ValueError, match=_exact("the state dict has state for parameter 99, which no param group lists")
    ):
        opt.load_state_dict(sd)


def test_load_state_dict_group_keys_stay_clean():
    opt, _ = _named_opt()
    before = set(opt.param_groups[0])
    opt.load_state_dict(opt.state_dict())
    assert set(opt.param_groups[0]) == before
    assert all(isinstance(k, str) for k in opt.param_groups[0])


def test_load_state_dict_unnamed_groups():
    ps = [_p(), _p()]
    opt = SpectralNewton(ps)
    sd = opt.state_dict()
    sd["param_groups"][0]["momentum"] = 2.0
    with pytest.raises(
        ValueError, match=_exact("param group 0 (...) in the state dict: momentum must be in [0, 1), got 2.0")
    ):
        opt.load_state_dict(sd)
    sd = opt.state_dict()
    sd["state"] = {1: 7}
    with pytest.raises(
        ValueError, match=_exact("state of parameter 'group0.param1' must be a dict, got int")
    ):
        opt.load_state_dict(sd)
    opt.load_state_dict(opt.state_dict())
    assert "param_names" not in opt.param_groups[0]
    named, _ = _named_opt()  # names on the saved side only: matched by position
    opt.load_state_dict(named.state_dict())
    assert "param_names" not in opt.param_groups[0] and opt.param_groups[0]["params"] == ps


def test_load_state_dict_group_and_count_mismatch():
    a, b = _p(), _p()
    opt = SpectralNewton([{"params": [a], "param_names": ["a"]}, {"params": [b], "param_names": ["b"]}])
    swapped = SpectralNewton(
        [{"params": [_p()], "param_names": ["b"]}, {"params": [_p()], "param_names": ["a"]}]
    )
    with pytest.raises(
        ValueError, match=_exact("parameter 'b' is in param group 1 here but in group 0 in the state dict")
    ):
        opt.load_state_dict(swapped.state_dict())
    plain = SpectralNewton([a, b])
    fewer = SpectralNewton([_p()])
    with pytest.raises(
        ValueError, match=_exact("param group 0 has 2 parameters here and 1 in the state dict")
    ):
        plain.load_state_dict(fewer.state_dict())


def test_load_state_dict_missing_names_only():
    opt, _ = _named_opt(("a", "b"))
    other, _ = _named_opt(("a",))
    with pytest.raises(ValueError) as e:
        opt.load_state_dict(other.state_dict())
    assert str(e.value).startswith(
        "the state dict's parameter names do not match this optimizer's: missing ['b'], unexpected [] "
    )


def test_load_param_state_entries():
    opt, (a, _) = _named_opt()
    sd = opt.state_dict()
    sd["state"] = {0: {"exp_avg": torch.zeros(4, 3, dtype=torch.long)}}
    with pytest.raises(
        ValueError, match=_exact("state 'exp_avg' of parameter 'a' must be floating point, got torch.int64")
    ):
        opt.load_state_dict(sd)
    sd["state"] = {0: {"tracked": 5}}
    with pytest.raises(ValueError, match=_exact("tracked state of parameter 'a' must be a dict")):
        opt.load_state_dict(sd)
    inner = torch.ones(2)
    buf = torch.ones(4, 3)
    sd["state"] = {0: {"extra": {"t": inner, "n": 3}, "momentum_buffer": buf, "step": 4}}
    opt.load_state_dict(sd)
    st = opt.state[a]
    assert st["extra"]["n"] == 3 and st["step"] == 4
    assert torch.equal(st["extra"]["t"], inner) and st["extra"]["t"] is not inner
    assert torch.equal(st["momentum_buffer"], buf) and st["momentum_buffer"] is not buf


# ---------------------------------------------------------------- spectral/ defaults
def test_spectral_function_defaults():
    from spectral_dist.spectral import direction

    sig = inspect.signature
    assert sig(direction.newton_schulz).parameters["eps"].default == 1e-7
    assert sig(direction.newton_schulz).parameters["steps"].default == 5
    assert sig(direction.eigenbasis_direction).parameters["refresh_every"].default == 10
    tp = sig(direction.tracked_direction).parameters
    assert (
        tp["refresh_every"].default == 10
        and tp["power_iters"].default == 1
        and tp["residual"].default == "scaled"
    )


# ---------------------------------------------------------------- counters of the failure paths, exactly
def test_failure_counters_are_exact(monkeypatch):
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(6, 4))
    V = nn.Parameter(torch.randn(6, 4))
    opt = SpectralNewton([W], lr=0.1, basis="svd")
    topt = SpectralNewton([V], lr=0.1, basis="tracked", rank=2, refresh_every=100)
    for p, o in ((W, opt), (V, topt)):
        p.grad = torch.randn(6, 4)
        o.step()
    assert topt.state[V]["tracked"]["step"] == 1
    real = torch.linalg.svd

    def f32_fails(A, *a, **k):
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("float32 only")
        return real(A, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", f32_fails)
    for _ in range(2):
        W.grad = torch.randn(6, 4)
        opt.step()
    c = opt.state[W]["counters"]
    assert (c["steps"], c["retries"], c["decomposition_failures"], c["consecutive_failures"]) == (3, 2, 0, 0)

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    for i in (1, 2):
        V.grad = torch.randn(6, 4)
        topt.step()
        W.grad = torch.randn(6, 4)
        opt.step()
        c, tc = opt.state[W]["counters"], topt.state[V]["counters"]
        assert (c["steps"], c["decomposition_failures"], c["consecutive_failures"], c["fallbacks"]) == (
            3,
            i,
            i,
            0,
        )
        assert (tc["steps"], tc["decomposition_failures"], tc["consecutive_failures"], tc["fallbacks"]) == (
            1 + i,
            i,
            i,
            i,
        )
        assert tc["retries"] == i and topt.state[V]["tracked"]["step"] == 1
    W.grad = torch.randn(6, 4)
    with pytest.raises(DecompositionError):
        opt.step()
    assert opt.state[W]["counters"]["decomposition_failures"] == 3
    monkeypatch.setattr(torch.linalg, "svd", real)
    V.grad = torch.randn(6, 4)
    topt.step()
    tc = topt.state[V]["counters"]
    assert (tc["steps"], tc["decomposition_failures"], tc["consecutive_failures"], tc["fallbacks"]) == (
        4,
        2,
        0,
        2,
    )
    tr = topt.state[V]["tracked"]
    assert tr["step"] == 2 and tr["basis"].shape == (4, 2) and tr["basis"].dtype == torch.float32
    assert topt.stats()["group0.param0"] == dict(
        kind="spectral", steps=4, skipped=0, retries=2, refreshes=1, decomposition_failures=2, fallbacks=2
    )


def test_skips_are_counted():
    p = _p()
    opt = SpectralNewton([p], max_consecutive_skips=3)
    for _ in range(2):
        p.grad = torch.full_like(p, float("nan"))
        opt.step()
    assert opt.stats()["group0.param0"]["skipped"] == 2
    assert opt.state[p]["counters"]["consecutive_skips"] == 2
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["counters"]["consecutive_skips"] == 0
    assert opt.stats()["group0.param0"]["skipped"] == 2


def test_adamw_part_matches_torch_adamw():
    torch.manual_seed(1)
    a, b, c = (nn.Parameter(torch.randn(5)) for _ in range(3))
    ref = [nn.Parameter(t.detach().clone()) for t in (b, c)]
    opt = SpectralNewton([a, b, c], lr=0.05, adamw_weight_decay=0.1)
    topt = torch.optim.AdamW(ref, lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    a0 = a.detach().clone()
    for _ in range(3):
        g1, g2 = torch.randn(5), torch.randn(5)
        a.grad = None  # no gradient: left alone, the others still step
        b.grad, c.grad = g1.clone(), g2.clone()
        ref[0].grad, ref[1].grad = g1.clone(), g2.clone()
        opt.step()
        topt.step()
    assert torch.equal(a, a0)
    torch.testing.assert_close(b, ref[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c, ref[1], rtol=1e-6, atol=1e-7)
    assert opt.state[b]["adam_step"] == 3 and opt.state[c]["adam_step"] == 3


# ---------------------------------------------------------------- spectral/: options reach the methods
def _fail_in_float32(real):
    def f(A, *a, **k):
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("float32 only")
        return real(A, *a, **k)

    return f


def test_direction_retries_are_counted(monkeypatch):
    from spectral_dist.spectral import direction

    torch.manual_seed(0)
    G = torch.randn(6, 4)
    monkeypatch.setattr(torch.linalg, "svd", _fail_in_float32(torch.linalg.svd))
    want = {"svd": ({"retries": 1}, {"retries": 2}), "tracked": ({"retries": 2}, {"retries": 3})}
    want["eigenbasis"] = ({"retries": 1}, {"retries": 1})
    for method, (first, second) in want.items():
        counter, state = {}, {}
        direction.spectral_direction(G, 1.0, method=method, counter=counter, state=state, rank=2)
        assert counter.get("retries") == first["retries"], method
        direction.spectral_direction(G, 1.0, method=method, counter=counter, state=state, rank=2)
        assert counter.get("retries") == second["retries"], method


def test_cholesky_retry_is_counted(monkeypatch):
    from spectral_dist.spectral import direction

    torch.manual_seed(0)
    G = torch.randn(6, 4)
    real = torch.linalg.cholesky_ex

    def fails_in_float32(A, *a, **k):
        L, info = real(A, *a, **k)
        return L, (torch.ones_like(info) if A.dtype == torch.float32 else info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", fails_in_float32)
    counter = {}
    D = direction.spectral_direction(G, 2.0, method="cholesky", counter=counter)
    assert counter == {"retries": 1} and D.dtype == torch.float32
    direction.spectral_direction(G, 2.0, method="cholesky", counter=counter)
    assert counter == {"retries": 2}
    torch.testing.assert_close(D, direction.spectral_direction(G, 2.0, method="svd"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "shape, tracked, eigen", [((3, 6), (6, 3), (3, 3)), ((6, 3), (3, 3), (3, 3)), ((7, 4), (4, 4), (4, 4))]
)
def test_rank_is_capped_by_both_sides(shape, tracked, eigen):
    """tracked keeps right singular vectors (n x r), eigenbasis the smaller side's (min(m, n) x r)."""
    from spectral_dist.spectral import direction

    for fn, basis in ((direction.tracked_direction, tracked), (direction.eigenbasis_direction, eigen)):
        state = {}
        fn(torch.randn(*shape), 1.0, 1e-4, state, 5)
        assert tuple(state["basis"].shape) == basis, fn.__name__


def test_batched_tracked_keeps_rank():
    from spectral_dist.spectral import direction

    state = {}
    direction.spectral_direction(torch.randn(2, 3, 6), 1.0, method="tracked", rank=2, state=state)
    assert [tuple(s["basis"].shape) for s in state["batch"]] == [(6, 2), (6, 2)]


def test_methods_and_steps_reach_the_implementation(monkeypatch):
    from spectral_dist.spectral import direction

    torch.manual_seed(0)
    G = torch.randn(6, 4)
    eig = direction.spectral_direction(G, 1.0, method="eigenbasis", rank=2)
    assert torch.equal(eig, direction.eigenbasis_direction(G, 1.0, 1e-4, {}, 2))
    ns2 = direction.spectral_direction(G, 1.0, method="newton_schulz", ns_steps=2)
    assert torch.equal(ns2, direction.newton_schulz(G, steps=2)) and not torch.equal(
        ns2, direction.newton_schulz(G)
    )
    pe2 = direction.spectral_direction(G, 1.0, method="polar_express", ns_steps=2)
    assert torch.equal(pe2, direction.polar_express(G, steps=2)) and not torch.equal(
        pe2, direction.polar_express(G)
    )
    monkeypatch.setattr(direction, "newton_schulz", lambda X, **k: X * float("nan"))
    with pytest.raises(
        DecompositionError,
        match=_exact("method='newton_schulz' produced non-finite values for finite G of shape (6, 4)"),
    ):
        direction.spectral_direction(G, 1.0, method="newton_schulz")


# ---------------------------------------------------------------- DeepSpeed version gate and ZeRO kinds
def test_deepspeed_version_gate(monkeypatch):
    from spectral_dist.integrations import deepspeed_compat as dc

    monkeypatch.delenv(dc.ALLOW_ENV, raising=False)
    tested = ", ".join(v for vs in dc.TESTED_VERSIONS.values() for v in vs)
    with pytest.raises(dc.UnsupportedDeepSpeedError) as e:
        dc.check_version("0.18.1+cu12")
    assert str(e.value) == (
        f"DeepSpeed 0.18.1+cu12 is not a version spectral_newton's ZeRO integration was tested with ({tested}); "
        "it reads ZeRO's partition layout from private attributes that change between releases. Install a "
        f"tested version (pip install 'spectral-dist[deepspeed]'), or set {dc.ALLOW_ENV}=1 to try anyway "
        "(tests/test_deepspeed.py then tells whether results still equal one process)"
    )
    minor = next(iter(dc.TESTED_VERSIONS))
    assert dc.check_version(f"{minor}+local") == f"{minor}+local"
    assert dc.check_version(f"{minor}.99") == f"{minor}.99"
    monkeypatch.setenv(dc.ALLOW_ENV, "1")
    assert dc.check_version("0.18.1") == "0.18.1"


def test_deepspeed_installed_version_and_zero_kinds(monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from spectral_dist.integrations import deepspeed_compat as dc
    from spectral_dist.integrations.deepspeed import SpectralConfigError

    monkeypatch.setenv(dc.ALLOW_ENV, "1")
    assert dc.check_version() == deepspeed.__version__
    fakes = {
        "stage3": DeepSpeedZeroOptimizer_Stage3.__new__(DeepSpeedZeroOptimizer_Stage3),
        "stage12": DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer),
        "bf16": BF16_Optimizer.__new__(BF16_Optimizer),
    }
    for kind, z in fakes.items():
        assert dc.zero_kind(z) == kind
        monkeypatch.setattr(dc, "_" + kind, lambda zopt, kind=kind: [kind, zopt])
    for kind, z in fakes.items():
        got_kind, entries = dc.partition_entries(z)
        assert got_kind == kind and entries[0] == kind and entries[1] is z
    with pytest.raises(
        SpectralConfigError,
        match=_exact(
            "DeepSpeed wrapped the optimizer in SGD, which spectral_newton does not support: "
            "set zero_optimization.stage to 1, 2 or 3 with offload disabled"
        ),
    ):
        dc.zero_kind(torch.optim.SGD([_p()], lr=0.1))


# ---------------------------------------------------------------- exchange: the process group reaches every call
class _GroupDist:
    """torch.distributed for 2 threads that records the group argument of every call."""

    def __init__(self, world, backend="gloo"):
        import threading

        self.world, self.backend, self.local = world, backend, threading.local()
        self.barrier = threading.Barrier(world)
        self.box: dict = {}
        self.groups: list = []

    def get_rank(self, group=None):
        self.groups.append(group)
        return self.local.rank

    def get_world_size(self, group=None):
        self.groups.append(group)
        return self.world

    def get_backend(self, group=None):
        self.groups.append(group)
        return self.backend

    def all_to_all_single(self, out, inp, output_split_sizes=None, input_split_sizes=None, group=None):
        self.groups.append(group)
        r = self.local.rank
        self.box[r] = list(torch.split(inp, input_split_sizes))
        self.barrier.wait()
        got = [self.box[s][r] for s in range(self.world)]
        self.barrier.wait()
        out.copy_(torch.cat(got))
        self.barrier.wait()


def test_comm_device_by_backend(monkeypatch):
    from spectral_dist.distributed import exchange

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    group = object()
    for backend, want in (
        ("NCCL", torch.device("cuda", 3)),
        ("nccl", torch.device("cuda", 3)),
        ("gloo", "cpu"),
    ):
        fake = _GroupDist(1, backend)
        monkeypatch.setattr(exchange, "dist", fake)
        assert exchange.comm_device(group) == torch.device(want)
        assert fake.groups == [group]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(exchange, "dist", _GroupDist(1, "nccl"))
    assert exchange.comm_device(group) == torch.device("cpu")


def test_exchange_passes_the_group(monkeypatch):
    import threading

    from spectral_dist.distributed import exchange
    from spectral_dist.distributed.layout import MatrixLayout, Plan

    lay = MatrixLayout("w", (2, 3), [[(0, 3)], [(3, 3)]])
    plan = Plan((lay,), {"w": 0}, 2)
    truth = torch.arange(6, dtype=torch.float32)
    fake = _GroupDist(2)
    monkeypatch.setattr(exchange, "dist", fake)
    group, out, errors = object(), [None, None], []

    def run(rank):
        fake.local.rank = rank
        try:
            local = {"w": truth[3 * rank : 3 * rank + 3]}
            full = exchange.gather_to_owners(plan, local, group, dtype=torch.float64)
            res = {k: (torch.tensor([7.0]), 2 * v.reshape(-1), None) for k, v in full.items()}
            back = exchange.scatter_from_owners(plan, res, group, dtype=torch.float64)
            out[rank] = (full, back)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            fake.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    full = out[0][0]["w"]
    assert full.dtype == torch.float64 and torch.equal(full, truth.double().view(2, 3))
    assert out[1][0] == {}
    for rank in range(2):
        h, local, extra = out[rank][1]["w"]
        assert torch.equal(h, torch.tensor([7.0], dtype=torch.float64)) and extra is None
        assert torch.equal(local, 2 * truth[3 * rank : 3 * rank + 3].double())
    assert fake.groups and all(g is group for g in fake.groups)


# ---------------------------------------------------------------- decompose and transform
def test_robust_decompositions_name_themselves(monkeypatch):
    from spectral_dist.spectral.decompose import robust_eigh, robust_svd

    A = torch.eye(3)[:, :2].contiguous()

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("forced")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.raises(
        DecompositionError, match=_exact("SVD failed in torch.float32 and float64 for shape (3, 2)")
    ):
        robust_svd(A)
    monkeypatch.setattr(torch.linalg, "eigh", _fail_in_float32(torch.linalg.eigh))
    counter = {"retries": 4}
    evals, _ = robust_eigh(torch.eye(2), counter)
    assert counter == {"retries": 5} and evals.dtype == torch.float32
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(
        DecompositionError, match=_exact("eigh failed in torch.float32 and float64 for shape (2, 2)")
    ):
        robust_eigh(torch.eye(2))


def test_transform_values():
    from spectral_dist.spectral.transform import rank_floor, spectral_transform

    f = rank_floor(4, 3, torch.float32)
    assert f == pytest.approx(4 * torch.finfo(torch.float32).eps)
    assert rank_floor(4, 3, torch.float32, squared=True) == pytest.approx(math.sqrt(f))
    assert rank_floor(4, 3, torch.float32, squared=True) != pytest.approx(f)
    torch.testing.assert_close(
        spectral_transform(torch.tensor([0.5, 0.25]), 0.0, 0.0), torch.tensor([0.5, 0.25])
    )


def test_build_plan_lpt_by_hand():
    from spectral_dist.distributed.layout import replicated_layout

    def lays(*specs):
        return [replicated_layout(k, s, 2) for k, s in specs]

    # costs 64, 27, 8, 8 (numel 16, 9, 8, 4): LPT puts 64 on rank 0, 27 then 8 (numel 8) then 8 on rank 1
    plan = build_plan(lays(("a", (4, 4)), ("b", (3, 3)), ("c", (8, 1)), ("d", (2, 2))))
    assert plan.owners == {"a": 0, "b": 1, "c": 1, "d": 1}
    assert plan.loads() == [64, 43]
    # equal cost, the larger matrix first: c (numel 8) before d (numel 4)
    assert build_plan(lays(("d", (2, 2)), ("c", (8, 1)))).owners == {"c": 0, "d": 1}
    # empty matrices cost nothing: the count of matrices breaks the tie
    empty = build_plan(lays(*((k, (0, 3)) for k in "abcd")))
    assert empty.owners == {"a": 0, "b": 1, "c": 0, "d": 1}
    one = build_plan(lays(("a", (4, 4))))
    assert one.world_size == 2 and one.owners == {"a": 0}
    assert [rt.key for rt in one.routes["a"]] == ["a"]


# ---------------------------------------------------------------- update paths: non-contiguous and half precision
def test_channels_last_and_half_precision_updates():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last))
    V = nn.Parameter(torch.randn(6, 4))
    H = nn.Parameter(torch.randn(6, 4).to(torch.bfloat16))
    W2, V2 = nn.Parameter(W.detach().contiguous().clone()), nn.Parameter(V.detach().clone())
    H2 = nn.Parameter(H.detach().float().clone())
    assert not W.is_contiguous()
    opt = SpectralNewton([W, V, H], lr=0.1, weight_decay=0.5)
    ref = SpectralNewton([W2, V2, H2], lr=0.1, weight_decay=0.5)
    w0 = W.detach().clone()
    for _ in range(2):
        for p, q in ((W, W2), (V, V2), (H, H2)):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.to(p.dtype), g.to(q.dtype)
        opt.step()
        ref.step()
    assert not torch.allclose(W, w0)
    torch.testing.assert_close(W.detach().contiguous(), W2.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(V.detach(), V2.detach(), rtol=1e-5, atol=1e-6)
    master = opt.state[H]["master"]
    assert master.dtype == torch.float32 and H.dtype == torch.bfloat16
    assert torch.equal(H.detach(), master.to(torch.bfloat16))
    torch.testing.assert_close(master, H2.detach(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- finish_matrix on a rank that is not the owner
class _Slot:
    """The part of a matrix slot that finish_matrix reads on its failure paths."""

    def __init__(self, group, key="blocks.0.w"):
        self.group, self.key, self._meta = group, key, {}

    def meta(self):
        return self._meta


class _Result:
    def __init__(self, exc=None, error="boom"):
        self.exc, self.error = exc, error


def test_finish_matrix_failure_errors_name_matrix_and_owner():
    from spectral_dist.optim import matrix_step as ms

    opt = _opt()
    slot = _Slot(opt.param_groups[0])
    assert opt.finish_matrix(slot, ms.SKIP, None, None, 0, 0, None, 1) is None
    err = opt.finish_matrix(slot, ms.RAISE, None, None, 0, 0, None, 1)
    assert isinstance(err, DecompositionError)
    assert str(err) == (
        "the decomposition of 'blocks.0.w' failed 2 times in a row on its owner rank 1; see that rank's error"
    )
    exc = DecompositionError("owner's own error")
    assert opt.finish_matrix(slot, ms.RAISE, None, None, 0, 0, _Result(exc), 1) is exc
    err = opt.finish_matrix(slot, ms.RAISE, None, None, 0, 0, _Result(None), 2)
    assert str(err) == (
        "the decomposition of 'blocks.0.w' failed 4 times in a row on its owner rank 2; see that rank's error"
    )
    err = opt.finish_matrix(slot, ms.ERROR, None, None, 0, 0, _Result(None, "ValueError: bad"), 3)
    assert type(err) is RuntimeError
    assert str(err) == "computing the direction of 'blocks.0.w' failed on its owner rank 3: ValueError: bad"
    err = opt.finish_matrix(slot, ms.ERROR, None, None, 0, 0, None, 0)
    assert (
        str(err)
        == "computing the direction of 'blocks.0.w' failed on its owner rank 0; see that rank's error"
    )
    c = slot.meta()["counters"]
    assert (c["decomposition_failures"], c["consecutive_failures"], c["steps"]) == (6, 6, 0)


def test_check_method_messages():
    from spectral_dist.spectral.direction import _check_method

    with pytest.raises(
        ValueError, match=_exact("method='cholesky' is exact for alpha = 0 or 2 only, got alpha=1.0")
    ):
        _check_method("cholesky", 1.0)
    with pytest.raises(ValueError, match=r"^method must be one of .*, got 'qr'$"):
        _check_method("qr", 1.0)
    with pytest.raises(
        ValueError,
        match=_exact("method='newton_schulz' computes the polar factor and needs alpha=1, got alpha=2.0"),
    ):
        _check_method("newton_schulz", 2.0)
    _check_method("cholesky", 2.0)
    _check_method("cholesky", 0.0)


def test_spectral_defaults_by_behaviour():
    """The documented defaults, by what they do: the same numbers as passing them explicitly."""
    from spectral_dist.spectral import direction

    torch.manual_seed(0)
    G = torch.randn(6, 4)
    assert torch.equal(direction.newton_schulz(G), direction.newton_schulz(G, steps=5, eps=1e-7))
    for fn, explicit in (
        (direction.eigenbasis_direction, dict(refresh_every=10)),
        (direction.tracked_direction, dict(refresh_every=10, power_iters=1)),
    ):
        s_default, s_explicit = {}, {}
        for i in range(12):
            Gi = G + 0.3 * torch.randn(6, 4, generator=torch.Generator().manual_seed(i))
            a = fn(Gi, 1.0, 1e-4, s_default, 2)
            b = fn(Gi, 1.0, 1e-4, s_explicit, 2, **explicit)
            assert torch.equal(a, b), (fn.__name__, i)
            assert torch.equal(s_default["basis"], s_explicit["basis"]), (fn.__name__, i)
