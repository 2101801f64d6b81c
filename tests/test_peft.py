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
