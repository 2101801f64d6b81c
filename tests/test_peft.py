"""LoRA through PEFT and the Hugging Face Trainer: the adapter factors are classified as ``adapter`` (not as the
attention or MLP matrix they sit in), the frozen base stays out of the optimizer, and a Trainer run resumed from
its checkpoint ends bit-identical to the uninterrupted one (optimizer state matched by PEFT's parameter names)."""

from __future__ import annotations

import peft  # in the test extra: a missing peft fails here rather than skipping
import torch
from hf_trainer_script import make_model, train_resumable

from spectral_dist import SpectralNewton

TARGETS = ["c_attn", "c_proj", "c_fc"]


def _lora_model():
    model = make_model()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=True)
    return peft.get_peft_model(model, cfg)


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_factors_are_adapters_and_the_base_stays_out():
    model = _lora_model()
    opt = SpectralNewton.from_model(model, lr=1e-2)
    types = {n: g["layer_type"] for g in opt.param_groups for n in g["param_names"]}
    lora = [n for n in types if ".lora_A." in n or ".lora_B." in n]
    assert len(lora) == 2 * 2 * 4  # A and B, 2 layers, c_attn + attn.c_proj + c_fc + mlp.c_proj
    assert {types[n] for n in lora} == {"adapter"}
    assert set(types) == {n for n, p in model.named_parameters() if p.requires_grad}  # only the adapters
    assert {g["alpha"] for g in opt.param_groups if g["layer_type"] == "adapter"} == {1.0}


def _train(out, steps, resume=None, save_steps=None):
    return train_resumable(_lora_model, out, steps, resume=resume, save_steps=save_steps)


def test_trainer_with_lora_resumes_exactly(tmp_path):
    init = _lora(_lora_model())
    straight, opt = _train(tmp_path / "straight", 6)
    end = _lora(straight)
    assert all(not torch.equal(end[n], init[n]) for n in end if ".lora_B." in n)  # B starts at zero and moves
    stats = opt.stats()
    assert {s["kind"] for n, s in stats.items() if "lora_" in n} == {"spectral"}
    assert all(s["steps"] == 6 for n, s in stats.items() if "lora_" in n)

    _train(tmp_path / "split", 6, save_steps=3)  # writes checkpoint-3 on the way
    resumed, _ = _train(tmp_path / "split", 6, resume=str(tmp_path / "split" / "checkpoint-3"))
    got = _lora(resumed)
    assert got.keys() == end.keys()
    for n in end:
        assert torch.equal(got[n], end[n]), n


def _lora_steps(model, step, rank=0, world=1):
    """3 steps on 4 sequences each (this rank's share); ``step(loss)`` does backward + optimizer step."""
    from hf_trainer_script import ByteCorpus

    data = ByteCorpus()
    per = 4 // world
    for t in range(3):
        ids = torch.stack([data[i]["input_ids"] for i in range(4 * t, 4 * t + 4)])[
            rank * per : (rank + 1) * per
        ]
        step(model(input_ids=ids, labels=ids).loss)


def zero_lora_worker(rank, world) -> dict:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dist_helpers import spectral_ds_config

    from spectral_dist.deepspeed import initialize

    torch.manual_seed(0)
    engine, *_ = initialize(model=_lora_model(), config=spectral_ds_config(4 // world, 2))

    def step(loss):
        engine.backward(loss)
        engine.step()

    _lora_steps(engine, step, rank, world)
    types = {g["layer_type"] for g in engine.basic_optimizer.param_groups}
    return dict(params={n: t.numpy().copy() for n, t in _lora(engine.module).items()}, types=types)


def fsdp2_lora_worker(rank, world) -> dict:
    from dist_scenarios import full_params, wrap

    torch.manual_seed(0)
    model = _lora_model()
    wrap(model, "fsdp2")  # the frozen base and the adapters in one FSDP2 unit
    opt = SpectralNewton.from_model(model, lr=1e-2)

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    _lora_steps(model, step, rank, world)
    params = {n: t.numpy().copy() for n, t in full_params(model).items() if "lora_" in n}
    return dict(params=params, types={g["layer_type"] for g in opt.param_groups})


def test_lora_under_zero2_and_fsdp2_equals_one_process():
    """LoRA on 2 processes, under DeepSpeed ZeRO-2 (optimizer from the config, by layer) and under FSDP2 (frozen
    base and adapters sharded together): only the adapters are stepped, and they end where one process ends."""
    from dist_helpers import run_workers

    torch.manual_seed(0)
    model = _lora_model()
    opt = SpectralNewton.from_model(model, lr=1e-2, distributed=False)

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    _lora_steps(model, step)
    ref = _lora(model)
    for worker in (zero_lora_worker, fsdp2_lora_worker):
        for res in run_workers(worker, 2, timeout=300):
            assert res["types"] == {"adapter"}
            for n, r in ref.items():
                err = float((torch.from_numpy(res["params"][n]) - r).abs().max() / r.abs().max())
                assert err < 5e-4, (
                    worker.__name__,
                    n,
                    err,
                )  # reduction order; lora_B starts at 0: small values
