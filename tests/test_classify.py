"""from_model: every trainable parameter classified exactly once, with the paper's by-layer exponents."""

import pytest
import torch
from torch import nn

from spectral_dist import SpectralNewton, classify_parameters
from spectral_dist.models import (
    classification_loss,
    image_batch,
    lm_loss,
    tiny_cnn,
    tiny_gpt,
    tiny_resnet,
    tiny_vit,
    token_batch,
)
from spectral_dist.optim import classification_table


def _types(model):
    return {i.name: i.layer_type for i in classify_parameters(model)}


def _check_exactly_once(model, opt):
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_gpt2_classification():
    m = tiny_gpt()
    t = _types(m)
    assert t["transformer.h.0.attn.c_attn.weight"] == "attention"
    assert t["transformer.h.0.attn.c_proj.weight"] == "attention"
    assert t["transformer.h.0.mlp.c_fc.weight"] == "mlp_up"
    assert t["transformer.h.0.mlp.c_proj.weight"] == "mlp_down"
    assert t["transformer.wte.weight"] == "embedding" and t["transformer.wpe.weight"] == "embedding"
    assert t["transformer.h.1.ln_2.weight"] == "norm" and t["transformer.h.1.ln_2.bias"] == "bias"
    assert "lm_head.weight" not in t  # tied to wte: assigned once, as the embedding
    opt = SpectralNewton.from_model(m, lr=1e-3)
    _check_exactly_once(m, opt)
    alphas = {g["layer_type"]: g["alpha"] for g in opt.param_groups if g["spectral"]}
    assert alphas == {"attention": 1.0, "mlp_up": 0.5, "mlp_down": 1.0}


def test_vit_classification_and_training():
    m = tiny_vit()
    t = _types(m)
    assert t["vit.embeddings.patch_embeddings.projection.weight"] == "conv"
    assert (
        t["vit.embeddings.position_embeddings"] == "embedding"
        and t["vit.embeddings.cls_token"] == "embedding"
    )
    assert t["classifier.weight"] == "head"
    attn = [n for n, v in t.items() if v == "attention"]
    assert len(attn) == 2 * 4  # q, k, v, out per layer
    assert sum(v == "mlp_up" for v in t.values()) == 2 and sum(v == "mlp_down" for v in t.values()) == 2
    opt = SpectralNewton.from_model(m, lr=1e-2, alpha={"attention": 1.5})
    _check_exactly_once(m, opt)
    assert {g["layer_type"]: g["alpha"] for g in opt.param_groups if g["spectral"]}["attention"] == 1.5
    batch = image_batch(16)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = classification_loss(m, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25, losses
    assert all(s["steps"] == 8 for s in opt.stats().values())


@pytest.mark.parametrize("builder", [tiny_cnn, tiny_resnet])
def test_cnn_classification(builder, capsys):
    m = builder() if builder is tiny_resnet else builder(in_ch=3)
    m.conv1.weight.requires_grad_(False) if builder is tiny_cnn else None
    t = _types(m)
    assert all(
        v == "conv" for n, v in t.items() if n.endswith("weight") and "conv" in n or n == "stem.weight"
    )
    assert t["fc.weight"] == "head"  # the final top-level Linear of a CNN
    if builder is tiny_cnn:
        assert "conv1.weight" not in t  # frozen: not in the optimizer
    opt = SpectralNewton.from_model(m, verbose=True)
    out = capsys.readouterr().out
    assert "| parameter |" in out and "conv" in out
    _check_exactly_once(m, opt)


def test_alpha_options_and_errors():
    m = tiny_gpt()
    opt = SpectralNewton.from_model(m, alpha=0.7)
    assert {g["alpha"] for g in opt.param_groups if g["spectral"]} == {0.7}
    opt = SpectralNewton.from_model(m, alpha="auto")
    g = next(g for g in opt.param_groups if g["layer_type"] == "mlp_up")
    assert opt.resolve_alpha(g["params"][0], g) == 0.5  # the by-layer default until a probe runs
    with pytest.raises(ValueError, match="unknown layer types"):
        SpectralNewton.from_model(m, alpha={"convolution": 2.0})
    with pytest.raises(ValueError, match="alpha"):
        SpectralNewton.from_model(m, alpha="fast")
    with pytest.raises(ValueError, match="no trainable"):
        SpectralNewton.from_model(nn.Linear(2, 2).requires_grad_(False))


def test_gpt_trains_and_table():
    m = tiny_gpt()
    infos = classify_parameters(m)
    table = classification_table(infos)
    assert table.count("\n") == len(infos) + 1
    opt = SpectralNewton.from_model(m, lr=3e-3)
    batch = token_batch(8, 16)
    first = last = None
    for _ in range(8):
        opt.zero_grad()
        loss = lm_loss(m, batch)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < first - 0.3
    assert torch.isfinite(torch.stack([p.detach().sum() for p in m.parameters()])).all()
