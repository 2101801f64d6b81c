"""Fused MoE expert weights (experts, out, in): one spectral step per expert (``batch_dims=1``), equal to the same
experts held as separate Linear modules, and to the float64 SVD reference per expert."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spectral_dist import SpectralNewton, spectral_direction
from spectral_dist.optim.classify import classify_parameters

E, D, H = 3, 8, 16


class FusedMoE(nn.Module):
    """Every token through every expert (a dense mixture keeps the test about the optimizer)."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Module()
        self.experts.up_proj = nn.Parameter(torch.randn(E, H, D) / D**0.5)
        self.experts.down_proj = nn.Parameter(torch.randn(E, D, H) / H**0.5)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        h = torch.nn.functional.gelu(torch.einsum("bd,ehd->ebh", x, self.experts.up_proj))
        return self.head(torch.einsum("ebh,edh->bd", h, self.experts.down_proj))


class SplitMoE(nn.Module):
    def __init__(self, fused: FusedMoE):
        super().__init__()
        self.experts = nn.ModuleList()
        for e in range(E):
            ex = nn.Module()
            ex.up_proj = nn.Linear(D, H, bias=False)
            ex.down_proj = nn.Linear(H, D, bias=False)
            with torch.no_grad():
                ex.up_proj.weight.copy_(fused.experts.up_proj[e])
                ex.down_proj.weight.copy_(fused.experts.down_proj[e])
            self.experts.append(ex)
        self.head = nn.Linear(D, 2)
        self.head.load_state_dict(fused.head.state_dict())

    def forward(self, x):
        return self.head(sum(ex.down_proj(torch.nn.functional.gelu(ex.up_proj(x))) for ex in self.experts))


def test_fused_experts_are_classified_per_expert():
    infos = {i.name: i for i in classify_parameters(FusedMoE())}
    up, down = infos["experts.up_proj"], infos["experts.down_proj"]
    assert (up.layer_type, up.batch_dims) == ("mlp_up", 1)
    assert (down.layer_type, down.batch_dims) == ("mlp_down", 1)
    opt = SpectralNewton.from_model(FusedMoE())
    groups = {g["layer_type"]: g for g in opt.param_groups if g["spectral"]}
    assert groups["mlp_up"]["batch_dims"] == 1 and groups["mlp_up"]["alpha"] == 2.0


@pytest.mark.parametrize("alpha", ["by_layer", 1.65, "auto"])
def test_fused_experts_step_as_the_same_experts_held_apart(alpha):
    """The same gradients (the split model's, stacked) through both optimizers, 4 steps."""
    torch.manual_seed(0)
    fused = FusedMoE()
    split = SplitMoE(fused)
    opt_f = SpectralNewton.from_model(fused, alpha=alpha, lr=1e-2)
    # at alpha 1.65 "auto" gives the split experts a tracked eigenbasis (inexact), a stack the exact float64
    # Gram: the reference then names "gram"
    opt_s = SpectralNewton.from_model(split, alpha=alpha, lr=1e-2, basis="gram" if alpha == 1.65 else "auto")
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        opt_s.zero_grad()
        split(torch.randn(16, D, generator=g)).pow(2).mean().backward()
        fused.experts.up_proj.grad = torch.stack([ex.up_proj.weight.grad for ex in split.experts])
        fused.experts.down_proj.grad = torch.stack([ex.down_proj.weight.grad for ex in split.experts])
        for a, b in zip(fused.head.parameters(), split.head.parameters()):
            a.grad = b.grad.clone()
        opt_s.step()
        opt_f.step()
    tol = 1e-6  # the same math per matrix, batched differently: float32 round-off
    for e, ex in enumerate(split.experts):
        torch.testing.assert_close(fused.experts.up_proj[e], ex.up_proj.weight, atol=tol, rtol=0)
        torch.testing.assert_close(fused.experts.down_proj[e], ex.down_proj.weight, atol=tol, rtol=0)
    assert not torch.equal(fused.experts.down_proj[0], SplitMoE(FusedMoE()).experts[0].down_proj.weight)
    assert "tracked" not in opt_f.state[fused.experts.up_proj]  # no per-expert basis kept for a stack


def test_fused_experts_first_step_matches_the_float64_svd_per_expert():
    torch.manual_seed(0)
    fused = FusedMoE()
    opt = SpectralNewton.from_model(fused, alpha=1.3, lr=1.0, momentum=0.0, basis="gram")
    before = fused.experts.up_proj.detach().clone()
    x = torch.randn(16, D)
    fused(x).pow(2).mean().backward()
    G = fused.experts.up_proj.grad.detach().double()
    opt.step()
    got = (before - fused.experts.up_proj.detach()).double()
    for e in range(E):
        want = spectral_direction(G[e], 1.3, 1e-4, "svd")
        want = want * (0.2 * (H * D) ** 0.5 / torch.linalg.matrix_norm(want))  # scale="rms", per expert
        torch.testing.assert_close(got[e], want, atol=1e-5, rtol=1e-4)


def test_batch_dims_errors_say_what_to_change():
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(
        ValueError, match=r"batch_dims=1 needs parameters with at least 3 dims .* batch_dims=0"
    ):
        SpectralNewton([{"params": [p], "batch_dims": 1}])
    q = nn.Parameter(torch.randn(2, 4, 4))
    with pytest.raises(
        ValueError, match=r"batch_dims=1 .* basis='eigenbasis' keeps one per matrix; use 'auto'"
    ):
        SpectralNewton([q], batch_dims=1, alpha=1.5, basis="eigenbasis")
    with pytest.raises(ValueError, match=r"batch_dims must be an integer >= 0, got -1"):
        SpectralNewton([q], batch_dims=-1)


def _moe_steps(model, opt, steps, rank=0, world=1):
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(8, D, generator=g)
        per = 8 // world
        opt.zero_grad()
        model(x[rank * per : (rank + 1) * per]).pow(2).mean().backward()
        opt.step()


def moe_worker(rank, world) -> dict:
    """DDP and FSDP2 (Shard(0) of 3 experts: whole experts per rank) against one process."""
    from dist_scenarios import full_params, wrap

    from spectral_dist.distributed.engine import DistributedEngine

    out = {}
    for mode in ("ddp", "fsdp2"):
        torch.manual_seed(0)
        model = FusedMoE()
        wrapped, inner = wrap(model, mode)
        opt = SpectralNewton.from_model(inner, lr=1e-2)
        _moe_steps(wrapped, opt, 5, rank, world)
        assert isinstance(opt._engine, DistributedEngine)
        out[mode] = {n: t.numpy() for n, t in full_params(inner).items()}  # by value through the queue
    return out


def _one_process_reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = FusedMoE()
    _moe_steps(model, SpectralNewton.from_model(model, lr=1e-2, distributed=False), 5)
    return {n: p.detach() for n, p in model.named_parameters()}


def _assert_equal_to(ref: dict, got: dict, what) -> None:
    for n, r in ref.items():
        err = float((torch.from_numpy(got[n]) - r).abs().max() / r.abs().max())
        assert err < 5e-5, (what, n, err)  # the gradients' reduction order, through the alpha-2 Cholesky


@pytest.mark.parametrize("world", [2, 4])
def test_fused_experts_over_ranks_equal_one_process(world):
    """3 experts: 2 + 1 per FSDP2 shard at 2 ranks, one rank with none at 4."""
    from dist_helpers import run_workers

    ref = _one_process_reference()
    for res in run_workers(moe_worker, world, timeout=300):
        for mode, got in res.items():
            _assert_equal_to(ref, got, mode)


def zero_moe_worker(rank, world) -> dict:
    """ZeRO 2 and 3 (the experts' flat partitions split across ranks mid-expert) through spectral_dist's
    DeepSpeed initialize, the optimizer from the config by layer."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dist_helpers import spectral_ds_config

    from spectral_dist.deepspeed import initialize

    out = {}
    for stage in (2, 3):
        torch.manual_seed(0)
        zero = {"stage3_param_persistence_threshold": 10} if stage == 3 else {}  # partition the experts
        cfg = spectral_ds_config(8 // world, stage, **zero)
        engine, *_ = initialize(model=FusedMoE(), config=cfg)
        g = torch.Generator().manual_seed(7)
        per = 8 // world
        for _ in range(5):
            x = torch.randn(8, D, generator=g)[rank * per : (rank + 1) * per]
            engine.backward(engine(x).pow(2).mean())
            engine.step()
        groups = {g["layer_type"]: g.get("batch_dims") for g in engine.basic_optimizer.param_groups}
        params = {}
        for n, p in engine.module.named_parameters():
            if hasattr(p, "ds_id"):  # ZeRO-3: gather the partitioned parameter
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    params[n] = p.detach().clone().numpy()
            else:
                params[n] = p.detach().clone().numpy()
        out[stage] = dict(params=params, groups=groups)
        engine.destroy()
    return out


def test_fused_experts_under_zero_equal_one_process():
    from dist_helpers import run_workers

    ref = _one_process_reference()
    for stage, r in run_workers(zero_moe_worker, 2, timeout=300)[0].items():
        assert r["groups"]["mlp_up"] == 1, (stage, r["groups"])
        _assert_equal_to(ref, r["params"], f"ZeRO-{stage}")


def _tiny_mixtral():
    import transformers as T

    cfg = T.MixtralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    return T.MixtralForCausalLM(cfg)


def test_mixtral_trains_through_the_trainer_and_resumes_exactly(tmp_path):
    """transformers' Mixtral (fused experts): the HF Trainer trains it with per-expert groups; a run resumed from
    a saved model + optimizer state ends bit-identical to the uninterrupted one. (The resume goes through
    torch.save/torch.load, weights_only: transformers 5.25's Trainer writes Mixtral's checkpoint in the per-expert
    format and reads it back without conversion, so its own resume_from_checkpoint loses the experts, under
    AdamW too: 'missing keys ... experts.gate_up_proj'.)"""
    import io

    from hf_trainer_script import train_resumable

    trained, opt = train_resumable(_tiny_mixtral, tmp_path / "trainer", 4)
    fused = [n for g in opt.param_groups if g["batch_dims"] == 1 for n in g["param_names"]]
    assert len(fused) == 4 and all(".experts." in n for n in fused)  # gate_up and down, 2 layers
    assert all(s["steps"] == 4 for n, s in opt.stats().items() if n in fused)

    def steps(model, opt, ts):
        for t in ts:
            x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(t))
            opt.zero_grad()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()

    torch.manual_seed(0)
    model = _tiny_mixtral()
    opt = SpectralNewton.from_model(model, lr=1e-2)
    steps(model, opt, range(4))
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    model = _tiny_mixtral()
    opt = SpectralNewton.from_model(model, lr=1e-2)
    steps(model, opt, range(2))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(1)  # a fresh model with other weights
    model = _tiny_mixtral()
    model.load_state_dict(saved["model"])
    opt = SpectralNewton.from_model(model, lr=1e-2)
    opt.load_state_dict(saved["opt"])
    steps(model, opt, range(2, 4))
    for n, p in model.named_parameters():
        assert torch.equal(p, straight[n]), n


def test_probes_leave_expert_stacks_out_and_refuse_them_by_name():
    from spectral_dist.probes import CurvatureProbe

    def loss_fn(model, x):
        return model(x).pow(2).mean()

    probe = CurvatureProbe(FusedMoE(), loss_fn, top_k=2)
    assert [s["name"] for s in probe.specs] == ["head.weight"]  # the experts (3-D stacks) are not probed
    with pytest.raises(
        ValueError, match=r"'experts.up_proj' is a stack of 3 matrices .* probe the model's other"
    ):
        CurvatureProbe(FusedMoE(), loss_fn, top_k=2, layers=["experts.up_proj"])


def test_trainer_diagnostics_on_mixtral_probe_the_matrices_not_the_expert_stacks(tmp_path):
    from hf_trainer_script import ByteCorpus, diagnostics_callback, make_args
    from transformers import Trainer

    from spectral_dist.integrations.hf import spectral_newton_optimizers

    torch.manual_seed(0)
    model = _tiny_mixtral()
    args = make_args(tmp_path, report_to=[], max_steps=2)
    trainer = Trainer(
        model=model, args=args, train_dataset=ByteCorpus(), optimizers=spectral_newton_optimizers(model, args)
    )
    diag = diagnostics_callback(trainer=trainer, every=2, max_layers=0)
    trainer.add_callback(diag)
    trainer.train()
    assert diag.probe_layers and not any(".experts." in n for n in diag.probe_layers)
    curv = {k for row in trainer.state.log_history for k in row if k.startswith("curv/")}
    assert any("self_attn.q_proj" in k for k in curv), sorted(curv)[:5]


def test_auto_alpha_probes_the_matrices_and_leaves_expert_stacks_at_their_default():
    from spectral_dist.optim import AutoAlpha

    torch.manual_seed(0)
    model = nn.Sequential()
    model.moe = FusedMoE()
    model.moe.head = nn.Identity()
    model.mid = nn.Linear(D, D)
    model.out = nn.Linear(D, 2)
    opt = SpectralNewton.from_model(model, alpha="auto", lr=1e-2)

    def loss_fn(m, x):
        return m(x).pow(2).mean()

    auto = AutoAlpha(opt, model, loss_fn, every=1, top_k=2)
    assert set(auto.targets) == {"mid.weight"}
    x = torch.randn(16, D)
    auto.maybe_update(0, x)
    loss_fn(model, x).backward()
    opt.step()
    up = model.moe.experts.up_proj
    assert opt.state[up]["alpha_estimate"] is None  # not probed: the by-layer default, mlp_up's 2
    assert opt.resolve_alpha(up, next(g for g in opt.param_groups if up in g["params"])) == 2.0


def test_plain_constructor_warns_about_fused_experts_as_one_matrix(recwarn):
    with pytest.warns(
        UserWarning, match=r"'experts.up_proj' of shape \(3, 16, 8\) looks like fused MoE experts"
    ):
        SpectralNewton(FusedMoE().named_parameters())
    recwarn.clear()
    SpectralNewton.from_model(FusedMoE())  # batch_dims=1 there: nothing to say
    SpectralNewton(
        [{"params": [FusedMoE().experts.up_proj], "param_names": ["experts.up_proj"], "batch_dims": 1}]
    )
    assert not [w for w in recwarn if "fused MoE" in str(w.message)]
