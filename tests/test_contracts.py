"""torch.optim contracts, one process: live param groups, adamw_lr under schedules, name-matched and validated
state loading, atomic add_param_group, fp32 master weights for bf16, partial non-finite gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spectral_dist.optim import SpectralNewton

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(*params, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def test_scheduler_still_drives_the_step_after_load_state_dict():
    """accelerate.prepare calls load_state_dict; torch replaces group dicts there. The step must read the live
    groups: a LambdaLR factor of 0.1 makes the update 10x smaller, with or without the round trip."""
    moves = {}
    for roundtrip in (False, True):
        W = nn.Parameter(torch.zeros(6, 4))
        opt = SpectralNewton([W], lr=1.0, momentum=0.0, nesterov=False)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1)
        if roundtrip:
            opt.load_state_dict(opt.state_dict())
        _grads(W)
        opt.step()
        sched.step()
        moves[roundtrip] = W.detach().norm().item()
    assert moves[True] == pytest.approx(moves[False], rel=1e-6)
    assert moves[False] == pytest.approx(0.1 * 0.2 * (6 * 4) ** 0.5, rel=1e-5)  # lr 0.1 x RMS 0.2


def test_adamw_lr_follows_the_schedule():
    b = nn.Parameter(torch.zeros(5))
    opt = SpectralNewton([b], lr=0.1, adamw_lr=0.01)
    assert opt.param_groups[0]["base_lr"] == 0.1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    _grads(b)
    opt.step()
    sched.step()
    # first Adam step: |m_hat / sqrt(v_hat)| = 1 per entry, so every entry moves by the effective lr
    assert torch.allclose(b.detach().abs(), torch.full((5,), 0.005), rtol=1e-4)
    assert SpectralNewton.adamw_lr(opt.param_groups[0]) == pytest.approx(0.01 * 0.5)


def test_adamw_lr_needs_a_positive_base_lr():
    with pytest.raises(ValueError, match="adamw_lr.*lr > 0"):
        SpectralNewton([nn.Parameter(torch.zeros(3))], lr=0.0, adamw_lr=0.01)


def test_lr_zero_step_changes_nothing():
    """torch DCP initialises state with a zero-gradient step at lr 0: with adamw_lr and weight decay set,
    nothing may move (an absolute adamw_lr used to decay the vectors)."""
    W, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
    before = [W.detach().clone(), b.detach().clone()]
    opt = SpectralNewton([W, b], lr=0.1, adamw_lr=0.05, weight_decay=0.1, adamw_weight_decay=0.1)
    opt.param_groups[0]["lr"] = 0.0
    W.grad, b.grad = torch.zeros_like(W), torch.zeros_like(b)
    opt.step()
    assert torch.equal(W, before[0]) and torch.equal(b, before[1])


def _trained(order, steps=3):
    torch.manual_seed(0)
    params = {"a": nn.Parameter(torch.randn(5, 4)), "b": nn.Parameter(torch.randn(5, 4))}
    opt = SpectralNewton([(n, params[n]) for n in order], lr=0.01, momentum=0.9)
    for s in range(steps):
        for i, n in enumerate(sorted(params)):
            g = torch.Generator().manual_seed(10 * s + i)
            params[n].grad = torch.randn(5, 4, generator=g)
        opt.step()
    return opt, params


def test_load_state_dict_matches_parameters_by_name():
    src, sp = _trained(["a", "b"])
    dst, dp = _trained(["b", "a"], steps=0)
    dst.load_state_dict(src.state_dict())
    for n in ("a", "b"):  # same shapes: matching by position would swap the momenta
        assert torch.equal(dst.state[dp[n]]["momentum_buffer"], src.state[sp[n]]["momentum_buffer"]), n
    # the loaded state is a copy: stepping one optimizer leaves the other alone
    assert (
        dst.state[dp["a"]]["momentum_buffer"].data_ptr() != src.state[sp["a"]]["momentum_buffer"].data_ptr()
    )


def test_load_state_dict_ignores_wrapper_prefixes_and_rejects_other_names():
    src, _ = _trained(["a", "b"])
    sd = src.state_dict()
    renamed = copy.deepcopy(sd)
    renamed["param_groups"][0]["param_names"] = ["module.a", "module._orig_mod.b"]
    dst, dp = _trained(["a", "b"], steps=0)
    dst.load_state_dict(renamed)
    assert "momentum_buffer" in dst.state[dp["a"]]
    wrong = copy.deepcopy(sd)
    wrong["param_groups"][0]["param_names"] = ["a", "c"]
    with pytest.raises(ValueError, match=r"missing \['b'\].*unexpected \['c'\]"):
        dst.load_state_dict(wrong)


def test_load_state_dict_validates_hyperparameters_and_shapes():
    src, _ = _trained(["a", "b"])
    dst, _ = _trained(["a", "b"], steps=0)
    bad = copy.deepcopy(src.state_dict())
    bad["param_groups"][0]["momentum"] = 1.0  # matrices would never move
    with pytest.raises(ValueError, match="momentum must be in"):
        dst.load_state_dict(bad)
    bad = copy.deepcopy(src.state_dict())
    bad["state"][0]["momentum_buffer"] = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="'a'.*shape"):
        dst.load_state_dict(bad)
    assert dst.param_groups[0]["momentum"] == 0.9 and not dst.state  # a refused load changes nothing


def test_load_keeps_fp32_state_of_bf16_parameters():
    W = nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
    opt = SpectralNewton([("w", W)], lr=1e-3)
    _grads(W)
    opt.step()
    sd = opt.state_dict()
    W2 = nn.Parameter(W.detach().clone())
    opt2 = SpectralNewton([("w", W2)], lr=1e-3)
    opt2.load_state_dict(sd)
    for k in ("momentum_buffer", "master"):
        assert opt2.state[W2][k].dtype == torch.float32, k
        assert torch.equal(opt2.state[W2][k], opt.state[W][k]), k


def test_rejected_add_param_group_leaves_the_optimizer_as_it_was():
    W = nn.Parameter(torch.randn(4, 3))
    opt = SpectralNewton([W], lr=0.01)
    for bad in (
        {"params": [nn.Parameter(torch.randn(3, 3))], "momentum": 1.5},
        {"params": [nn.Parameter(torch.randn(3))], "spectral": True},
    ):
        with pytest.raises(ValueError):
            opt.add_param_group(bad)
        assert len(opt.param_groups) == 1
    _grads(W)
    opt.step()  # still usable
    assert opt.stats()["group0.param0"]["steps"] == 1


@pytest.mark.parametrize("kind", ["matrix", "vector"])
def test_a_single_inf_skips_the_parameter(kind):
    """One Inf among finite entries must skip the step (momentum untouched), not only an all-NaN gradient."""
    p = nn.Parameter(torch.randn(6, 5) if kind == "matrix" else torch.randn(7))
    opt = SpectralNewton([p], lr=0.01)
    _grads(p)
    opt.step()
    state = copy.deepcopy(opt.state[p])
    before = p.detach().clone()
    _grads(p, seed=1)
    p.grad.view(-1)[3] = float("inf")
    opt.step()
    assert torch.equal(p, before)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(opt.state[p][k], v), k
    assert opt.stats()["group0.param0"]["skipped"] == 1


def test_bf16_master_weights_keep_small_updates():
    """At lr 1e-4 a bf16 parameter updated in bf16 loses most of its update (entries never change); with fp32
    master weights the stored value is the fp32 run's, rounded once."""
    torch.manual_seed(0)
    W32 = torch.randn(64, 48)
    runs = {}
    for name, dtype, master in (
        ("fp32", torch.float32, True),
        ("master", torch.bfloat16, True),
        ("plain", torch.bfloat16, False),
    ):
        W = nn.Parameter(W32.to(dtype).clone())
        ref = W32.to(dtype).float() if dtype == torch.bfloat16 else W32.clone()
        opt = SpectralNewton([W], lr=1e-4, master_weights=master)
        for s in range(5):
            W.grad = torch.randn(64, 48, generator=torch.Generator().manual_seed(s)).to(dtype)
            opt.step()
        start = W32.to(dtype).float() if dtype == torch.bfloat16 else W32
        runs[name] = (W.detach().float() - start, (opt.state[W].get("master", W.detach()).float() - ref))
    fp32 = runs["fp32"][0]
    lost_master = ((runs["master"][1] - fp32).norm() / fp32.norm()).item()
    lost_plain = ((runs["plain"][0] - fp32).norm() / fp32.norm()).item()
    unchanged_plain = (runs["plain"][0] == 0).float().mean().item()
    assert lost_master < 1e-2, lost_master
    assert lost_plain > 0.3 and unchanged_plain > 0.5, (lost_plain, unchanged_plain)


def test_master_copy_follows_weights_loaded_from_outside():
    W = nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
    opt = SpectralNewton([W], lr=1e-3)
    _grads(W)
    opt.step()
    with torch.no_grad():
        W.copy_(torch.ones_like(W))  # e.g. model weights reloaded, optimizer state kept
    _grads(W, seed=1)
    opt.step()
    assert (W.detach().float() - 1).abs().max().item() < 0.05  # stepped from the new weights


def test_state_exists_for_every_trainable_parameter():
    """The same state keys in every run (DCP and resumed runs need them), whether a gradient came or not."""
    used, unused = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4, 3))
    opt = SpectralNewton([("used", used), ("unused", unused)], lr=0.01, basis="tracked", rank=2)
    _grads(used)
    opt.step()
    assert set(opt.state[unused]) == set(opt.state[used])
    assert torch.equal(opt.state[unused]["momentum_buffer"], torch.zeros(4, 3))
    assert opt.state[unused]["tracked"]["step"] == 0


def test_dcp_state_dict_helpers_round_trip_one_process(tmp_path):
    """torch's own get/set_optimizer_state_dict (what torchtitan and accelerate's FSDP path use) on a plain
    model: FQN keys, and a resumed run equal to an uninterrupted one."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def model_and_opt():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
        return m, SpectralNewton.from_model(m, lr=0.02, weight_decay=0.01, adamw_lr=0.01)

    def train(m, opt, steps):
        for s in steps:
            g = torch.Generator().manual_seed(s)
            x, y = torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    m, opt = model_and_opt()
    train(m, opt, range(6))
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    m, opt = model_and_opt()
    train(m, opt, range(3))
    osd = get_optimizer_state_dict(m, opt)
    assert "0.weight" in osd["state"] and "momentum_buffer" in osd["state"]["0.weight"]
    msd = copy.deepcopy(m.state_dict())
    osd = copy.deepcopy(osd)
    m2, opt2 = model_and_opt()
    m2.load_state_dict(msd)
    set_optimizer_state_dict(m2, opt2, osd)
    train(m2, opt2, range(3, 6))
    for k, v in m2.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_step_reads_replaced_group_dicts():
    """torch's own Optimizer.load_state_dict (and wrappers built on it) put new dicts into param_groups: the
    next step must use them, not a cached dict."""
    W = nn.Parameter(torch.zeros(6, 4))
    opt = SpectralNewton([W], lr=1.0, momentum=0.0, nesterov=False)
    _grads(W)
    opt.step()
    opt.param_groups[0] = dict(opt.param_groups[0], lr=0.0)
    before = W.detach().clone()
    _grads(W, seed=1)
    opt.step()
    assert torch.equal(W, before)


def test_stats_start_at_zero_and_name_the_kind():
    """stats() before any step: every counter 0, matrices 'spectral' and the rest 'adamw'; after steps the
    counters are the optimizer's, without the internal consecutive-skip counter."""
    W, b = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(5))
    opt = SpectralNewton([W, b], lr=0.01)
    zero = dict(steps=0, skipped=0, retries=0, refreshes=0, decomposition_failures=0, fallbacks=0)
    assert opt.stats() == {
        "group0.param0": {"kind": "spectral", **zero},
        "group0.param1": {"kind": "adamw", **zero},
    }
    _grads(W, b)
    opt.step()
    W.grad[0, 0] = float("nan")
    opt.step()
    s = opt.stats()
    assert s["group0.param0"] == {"kind": "spectral", **zero, "steps": 1, "skipped": 1}
    assert s["group0.param1"]["kind"] == "adamw" and not any(
        k.startswith("consecutive") for k in s["group0.param0"]
    )


def test_load_state_dict_hooks_names_and_tracked_basis():
    """The load path: pre-hooks may replace the state dict and post-hooks see the optimizer; the groups keep
    their parameter names; a tracked basis is loaded as a validated copy (not an alias of the saved tensor)."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = SpectralNewton.from_model(model, lr=0.02, basis="tracked", rank=2, alpha=1.0)
    _grads(*model.parameters())
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    p0 = model[0].weight
    basis = opt.state[p0]["tracked"]["basis"]
    assert basis.shape == (6, 2)
    opt2 = SpectralNewton.from_model(model, lr=0.02, basis="tracked", rank=2, alpha=1.0)
    names = [list(g["param_names"]) for g in opt2.param_groups]
    seen = []
    marker = copy.deepcopy(sd)
    marker["param_groups"][0]["lr"] = 0.005
    pre = opt2.register_load_state_dict_pre_hook(
        lambda o, s: seen.append(("pre", o is opt2, s is sd)) or marker
    )
    post = opt2.register_load_state_dict_post_hook(lambda o: seen.append(("post", o is opt2)))
    opt2.load_state_dict(sd)
    pre.remove()
    post.remove()
    assert seen == [("pre", True, True), ("post", True)]
    assert opt2.param_groups[0]["lr"] == 0.005  # the dict the pre-hook returned was loaded
    assert [list(g["param_names"]) for g in opt2.param_groups] == names
    assert all("params" in g and g["params"] for g in opt2.param_groups)
    loaded = opt2.state[p0]["tracked"]["basis"]
    assert torch.equal(loaded, basis)
    key = next(
        k for k, v in marker["state"].items() if "tracked" in v and v["tracked"]["basis"].shape == (6, 2)
    )
    marker["state"][key]["tracked"]["basis"].fill_(7.0)  # the saved copy changes ...
    assert torch.equal(opt2.state[p0]["tracked"]["basis"], basis)  # ... the loaded basis does not
    bad = copy.deepcopy(sd)
    bad["state"][key]["tracked"]["basis"] = torch.zeros(6, 3)
    with pytest.raises(
        ValueError, match=r"tracked basis of parameter .* has shape \(6, 3\), expected \(6, 2\)"
    ):
        opt2.load_state_dict(bad)
    bad["state"][key]["tracked"] = [1, 2]
    with pytest.raises(ValueError, match="tracked state of parameter .* must be a dict"):
        opt2.load_state_dict(bad)


def test_eigenbasis_state_of_a_wide_matrix_saves_and_resumes_on_the_smaller_side():
    """basis='eigenbasis' keeps a wide weight's basis on its smaller side (4 x 4 for a 4 x 10 weight): saved,
    loaded, and resumed to the same next step as the uninterrupted run. A checkpoint written before the basis
    moved there (the 10 x 4 right basis) loads as 'no basis yet' (a fresh SVD at the next step, as a new run
    does); any other shape is refused by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(16, 10)

    def train(opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    opt = SpectralNewton.from_model(model, lr=0.02, basis="eigenbasis", alpha=1.5)
    train(opt, 2)
    W = model[0].weight
    assert opt.state[W]["tracked"]["basis"].shape == (4, 4) and opt.state[W]["tracked"]["step"] == 2
    sd = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    train(opt, 1)
    after = copy.deepcopy(model.state_dict())
    model.load_state_dict(weights)
    opt2 = SpectralNewton.from_model(model, lr=0.02, basis="eigenbasis", alpha=1.5)
    opt2.load_state_dict(sd)
    train(opt2, 1)
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())
    key = next(k for k, v in sd["state"].items() if "tracked" in v and v["tracked"]["basis"].shape == (4, 4))
    old = copy.deepcopy(sd)
    old["state"][key]["tracked"]["basis"] = torch.randn(10, 4)
    opt3 = SpectralNewton.from_model(model, lr=0.02, basis="eigenbasis", alpha=1.5)
    opt3.load_state_dict(old)
    tr = opt3.state[W]["tracked"]
    assert tr["step"] == 0 and tr["basis"].shape == (4, 4) and not tr["basis"].any()
    train(opt3, 1)
    assert opt3.state[W]["tracked"]["step"] == 1 and opt3.state[W]["counters"]["refreshes"] >= 1
    old["state"][key]["tracked"]["basis"] = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"has shape \(4, 3\), expected \(4, 4\)"):
        opt3.load_state_dict(old)
    # a square weight's basis has the same shape either way: loaded as saved, not reset
    sq = nn.Linear(5, 5)
    opt4 = SpectralNewton([sq.weight], lr=0.02, basis="eigenbasis", alpha=1.5)
    sq.weight.grad = torch.randn(5, 5)
    opt4.step()
    saved = copy.deepcopy(opt4.state_dict())
    opt5 = SpectralNewton([sq.weight], lr=0.02, basis="eigenbasis", alpha=1.5)
    opt5.load_state_dict(saved)
    assert opt5.state[sq.weight]["tracked"]["step"] == 1
    assert torch.equal(opt5.state[sq.weight]["tracked"]["basis"], opt4.state[sq.weight]["tracked"]["basis"])


@pytest.mark.parametrize("basis", ["svd", "polar_express"])
def test_shard_local_engine_on_one_process_equals_the_default(basis):
    """On one process ShardLocalEngine's block is the whole matrix: its updates (applied one matrix at a time,
    not batched) equal the default engine's bit for bit, weight decay included, and so do the counters."""
    from spectral_dist.distributed import ShardLocalEngine

    alpha = 1.0 if basis == "polar_express" else 0.5
    runs = []
    for engine in (None, ShardLocalEngine()):
        torch.manual_seed(0)
        W, V, b = (
            nn.Parameter(torch.randn(6, 5)),
            nn.Parameter(torch.randn(4, 6)),
            nn.Parameter(torch.randn(5)),
        )
        opt = SpectralNewton([W, V, b], lr=0.05, weight_decay=0.1, basis=basis, alpha=alpha, engine=engine)
        for seed in range(3):
            _grads(W, V, b, seed=seed)
            opt.step()
        W.grad[1, 1] = float("inf")  # a skip: the parameter and its momentum stay
        opt.step()
        runs.append(([p.detach().clone() for p in (W, V, b)], opt.stats()))
    (p0, s0), (p1, s1) = runs
    assert all(torch.equal(a, c) for a, c in zip(p0, p1)) and s0 == s1
    assert s1["group0.param0"]["skipped"] == 1 and s1["group0.param0"]["steps"] == 3


def test_state_keys_and_first_moments_after_steps():
    """The per-parameter state is what torch.optim users and checkpoints read: its keys, dtypes and the AdamW
    moments after one step (exp_avg = (1 - b1) g, exp_avg_sq = (1 - b2) g^2), the step counters, the tracked
    basis and the fp32 master copy of a bf16 matrix."""
    torch.manual_seed(0)
    W, b = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(5))
    Wb = nn.Parameter(torch.randn(4, 3).bfloat16())
    opt = SpectralNewton([W, b, Wb], lr=0.01, basis="tracked", rank=2)
    _grads(W, b, Wb)
    g = b.grad.clone()
    opt.step()
    sW, sb, sWb = (opt.state[p] for p in (W, b, Wb))
    assert (
        set(sW) == {"counters", "momentum_buffer", "alpha_estimate", "tracked"}
        and sW["alpha_estimate"] is None
    )
    assert sW["tracked"]["step"] == 1 and sW["tracked"]["basis"].shape == (4, 2)
    assert sW["tracked"]["basis"].dtype == torch.float32
    assert set(sb) == {"counters", "adam_step", "exp_avg", "exp_avg_sq"} and sb["adam_step"] == 1
    b1, b2 = opt.param_groups[0]["adamw_betas"]
    assert torch.allclose(sb["exp_avg"], (1 - b1) * g) and torch.allclose(sb["exp_avg_sq"], (1 - b2) * g * g)
    assert set(sWb) == {"counters", "momentum_buffer", "alpha_estimate", "tracked", "master"}
    assert sWb["master"].dtype == torch.float32 and sWb["momentum_buffer"].dtype == torch.float32
    assert torch.equal(sWb["master"].bfloat16(), Wb.detach())
    assert sWb["tracked"]["basis"].dtype == torch.float32
    Q = sW["tracked"]["basis"]  # the basis the step computed (not the zeros it started from): orthonormal
    assert torch.allclose(Q.mT @ Q, torch.eye(2), atol=1e-5)
    _grads(W, b, Wb, seed=1)
    opt.step()
    assert sW["tracked"]["step"] == 2 and sb["adam_step"] == 2 and sW["counters"]["steps"] == 2
    # refresh_every=1: a fresh SVD every step, and the counter adds them up
    opt.param_groups[0]["refresh_every"] = 1
    before = opt.stats()["group0.param0"]["refreshes"]
    for seed in (2, 3):
        _grads(W, b, Wb, seed=seed)
        opt.step()
    assert before >= 1 and opt.stats()["group0.param0"]["refreshes"] == before + 2


@pytest.mark.parametrize("kind", ["matrix", "vector"])
def test_a_finite_step_resets_the_consecutive_skip_count(kind):
    """max_consecutive_skips counts skips *in a row*: skip, step, skip does not raise; a second skip in a row
    does."""
    from spectral_dist.optim.spectral_newton import NonFiniteGradientError

    p = nn.Parameter(torch.randn(6, 5) if kind == "matrix" else torch.randn(7))
    opt = SpectralNewton([p], lr=0.01, max_consecutive_skips=2)
    for bad in (True, False, True):
        _grads(p)
        if bad:
            p.grad.view(-1)[0] = float("nan")
        opt.step()
    _grads(p)
    p.grad.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="2 consecutive steps"):
        opt.step()
