"""from_model: every trainable parameter classified exactly once (by module type, name, structure or a traced
forward), with the measured by-layer exponents."""

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
from spectral_dist.optim.classify import DEFAULT_ALPHA, PAPER_ALPHA


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
    assert alphas == {"attention": 1.65, "mlp_up": 2.0, "mlp_down": 1.0}  # issue 22's measured defaults
    paper = SpectralNewton.from_model(m, alpha=PAPER_ALPHA)
    assert {g["layer_type"]: g["alpha"] for g in paper.param_groups if g["spectral"]}["mlp_up"] == 0.5


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
    assert opt.resolve_alpha(g["params"][0], g) == 2.0  # the by-layer default until a probe runs
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


# ------------------------------------------------------------------ structure and traced-graph classification


class _Block(nn.Module):
    """The hand-written GPT block of issue 22: fused ``qkv``, ``proj``, ``up``, ``down``; GELU called
    functionally, so no module name or activation module says which Linear is which."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))


class _HandGPT(nn.Module):
    def __init__(self, d=16, layers=2, block=_Block):
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.blocks = nn.ModuleList([block(d) for _ in range(layers)])
        self.out = nn.Linear(d, 256, bias=False)

    def forward(self, idx):
        x = self.tok(idx)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


class _Anonymous(nn.Module):
    """Uninformative names: separate q/k/v (a, b, c), output (o), eager softmax attention, a SwiGLU MLP
    (g, u gated by silu, w reading it back)."""

    def __init__(self, d=16, h=40):
        super().__init__()
        self.a, self.b, self.c, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.g, self.u = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.w = nn.Linear(h, d, bias=False)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        y = self.n1(x)
        att = torch.softmax(self.a(y) @ self.b(y).transpose(-1, -2) / 4.0, dim=-1)
        x = x + self.o(att @ self.c(y))
        y = self.n2(x)
        return x + self.w(torch.nn.functional.silu(self.g(y)) * self.u(y))


class _AnonNet(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blk = _Anonymous(d)
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        return self.fc(self.blk(x))


def _how(model, **kw):
    return {i.name: (i.layer_type, i.how) for i in classify_parameters(model, **kw)}


def test_hand_written_gpt_block_by_structure(recwarn):
    m = _HandGPT()
    t = _how(m)
    for i in range(2):
        assert t[f"blocks.{i}.qkv.weight"] == ("attention", "name")
        assert t[f"blocks.{i}.proj.weight"] == ("attention", "structure")  # square, beside the fused qkv
        assert t[f"blocks.{i}.up.weight"] == ("mlp_up", "structure")  # d -> 4d, a sibling reads 4d -> d
        assert t[f"blocks.{i}.down.weight"] == ("mlp_down", "structure")
    assert t["out.weight"] == ("head", "structure") and t["tok.weight"] == ("embedding", "module")
    opt = SpectralNewton.from_model(m)
    types = {g["layer_type"] for g in opt.param_groups if g["spectral"]}
    assert types == {"attention", "mlp_up", "mlp_down"}
    assert not [w for w in recwarn if "hidden matrices" in str(w.message)]


def test_hand_written_gpt_block_by_graph():
    m = _HandGPT()
    t = _how(m, example_input=torch.randint(0, 256, (2, 8)))
    for i in range(2):
        assert t[f"blocks.{i}.proj.weight"] == ("attention", "graph")
        assert t[f"blocks.{i}.up.weight"] == ("mlp_up", "graph")
        assert t[f"blocks.{i}.down.weight"] == ("mlp_down", "graph")
    assert all(p.grad is None for p in m.parameters())  # the trace computes no gradients
    assert m.training  # flags restored


def test_anonymous_attention_and_swiglu_by_graph():
    m = _AnonNet()
    static = {k.removeprefix("blk."): v for k, v in _how(m).items()}
    # without a forward, the SwiGLU shapes are enough (d->h twice, h->d); separate square q/k/v are not
    assert static["g.weight"] == ("mlp_up", "structure") and static["u.weight"] == ("mlp_up", "structure")
    assert static["w.weight"] == ("mlp_down", "structure")
    assert static["a.weight"] == ("matrix", "fallback")
    traced = {k.removeprefix("blk."): v for k, v in _how(m, example_input=torch.randn(2, 5, 16)).items()}
    for n in "abco":
        assert traced[f"{n}.weight"] == ("attention", "graph"), n
    assert traced["g.weight"] == ("mlp_up", "graph") and traced["u.weight"] == ("mlp_up", "graph")
    assert traced["w.weight"] == ("mlp_down", "graph")


def test_sequential_mlp_and_plain_mlp_warning():
    m = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 8), nn.Linear(8, 3))
    t = _how(m)
    assert t["0.weight"] == ("mlp_up", "structure") and t["3.weight"] == ("mlp_down", "structure")
    assert t["4.weight"] == ("head", "structure")
    # the order rule: widen into an activation, narrow to another width (not a sibling pair)
    t = _how(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 12), nn.Linear(12, 3)))
    assert t["0.weight"] == ("mlp_up", "structure") and t["2.weight"] == ("mlp_down", "structure")
    t = _how(
        nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 12), nn.Linear(12, 3))
    )  # no act.
    assert t["0.weight"] == ("matrix", "fallback") and t["2.weight"] == ("matrix", "fallback")
    # a plain MLP has no widen-then-narrow-back pair: every hidden matrix is generic, and from_model says so
    plain = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    assert _how(plain)["0.weight"] == ("matrix", "fallback") and _how(plain)["2.weight"] == (
        "matrix",
        "fallback",
    )
    with pytest.warns(UserWarning, match="none of the model's 2 hidden matrices"):
        SpectralNewton.from_model(plain)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SpectralNewton.from_model(plain, alpha=1.0)  # a single number: the types do not matter, no warning
        SpectralNewton.from_model(tiny_cnn())  # convolutions were recognised
        mixed = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 16), nn.Tanh(), nn.Linear(16, 3)
        )
        assert _how(mixed)["2.weight"] == ("matrix", "fallback")
        SpectralNewton.from_model(mixed)  # some hidden matrix (the conv) was recognised: no warning


def test_custom_conv_parameter_and_multihead_attention():
    class RawConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 1, 3, 3))
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.nn.functional.conv2d(x, self.kernel, padding=1).flatten(1))

    t = _how(RawConv())
    assert t["kernel"] == ("conv", "structure")
    assert t["mha.in_proj_weight"] == ("attention", "module")
    assert t["mha.out_proj.weight"] == ("attention", "name")


def test_hf_models_unchanged_by_example_input():
    gpt = tiny_gpt()
    assert _how(gpt, example_input=token_batch(2, 8)) == _how(gpt)
    assert _how(gpt)["transformer.h.0.mlp.c_fc.weight"] == ("mlp_up", "name")
    vit = tiny_vit()
    x, _ = image_batch(2)
    assert _how(vit, example_input=x) == _how(vit)
    assert not [i for i in classify_parameters(vit) if i.spectral and i.how == "fallback"]


def test_table_says_how(capsys):
    SpectralNewton.from_model(_HandGPT(), verbose=True)
    out = capsys.readouterr().out
    assert "| recognised by |" in out
    assert "structure: widens 16->64; sibling blocks.0.down narrows back" in out
    assert "name: q/k/v/out projection name" in out


def test_default_alphas_are_the_measured_ones():
    """Issue 22 chose these from the independent harness (docs/benchmarks.md section 4); changing them needs
    new evidence there."""
    assert DEFAULT_ALPHA == {
        "conv": 2.0,
        "attention": 1.65,
        "mlp_up": 2.0,
        "mlp_down": 1.0,
        "adapter": 1.0,  # not measured: the generic matrix value
        "matrix": 1.0,
    }
    assert PAPER_ALPHA == {"conv": 2.0, "attention": 1.0, "mlp_up": 0.5, "mlp_down": 1.0, "matrix": 1.0}
    opt = SpectralNewton.from_model(_HandGPT())
    got = {g["layer_type"]: g["alpha"] for g in opt.param_groups if g["spectral"]}
    assert got == {"attention": 1.65, "mlp_up": 2.0, "mlp_down": 1.0}
    d = opt.defaults
    assert (d["damping"], d["momentum"], d["nesterov"], d["scale"], d["rms_target"]) == (
        1e-4,
        0.95,
        True,
        "rms",
        0.2,
    )


def test_parametrized_weights_are_classified_as_their_modules_weight():
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    m = nn.Sequential(
        weight_norm(nn.Linear(8, 32)),
        nn.GELU(),
        spectral_norm(nn.Linear(32, 8)),
        nn.Conv1d(8, 8, 1),
        nn.Linear(8, 2),
    )
    t = _types(m)
    assert (
        t["0.parametrizations.weight.original1"] == "mlp_up"
    )  # weight_norm's direction: the Linear's weight
    assert t["0.parametrizations.weight.original0"] == "vector"  # its magnitude (32, 1): AdamW, not spectral
    assert t["2.parametrizations.weight.original"] == "mlp_down"
    assert t["3.weight"] == "conv"
    opt = SpectralNewton.from_model(m)
    _check_exactly_once(m, opt)
    names = {n for g in opt.param_groups for n in g["param_names"]}
    assert names == {n for n, p in m.named_parameters()}  # state_dict by name keeps the real names
    x = torch.randn(4, 8)
    for _ in range(2):
        opt.zero_grad()
        m[4](m[0:3](x)).pow(2).mean().backward()
        opt.step()
    assert "momentum_buffer" in opt.state[m[0].parametrizations.weight.original1]
    assert "exp_avg" in opt.state[m[0].parametrizations.weight.original0]


def test_vectors_stored_as_matrices_get_adamw():
    m = nn.Sequential(
        nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Conv2d(16, 1, 3), nn.Linear(4, 2)
    )
    t = _types(m)
    assert t["0.weight"] == "vector" and t["4.weight"] == "vector"  # (16, 1) and a (1, 16 * 9) kernel
    assert t["2.weight"] == "matrix"
    dw = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8, 2))  # depthwise (8, 1, 3, 3)
    assert _types(dw)["0.weight"] == "conv"


def test_lora_factors_are_adapters_wherever_they_sit():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)
            # PEFT's layout: q_proj.lora_A.default (an nn.Linear in a ModuleDict keyed by adapter name)
            self.q_proj.lora_A = nn.ModuleDict({"default": nn.Linear(8, 2, bias=False)})
            self.q_proj.lora_B = nn.ModuleDict({"default": nn.Linear(2, 8, bias=False)})
            self.up_proj = nn.Linear(8, 32)
            self.up_proj.lora_down = nn.Linear(8, 2, bias=False)
            self.up_proj.lora_up = nn.Linear(2, 32, bias=False)

    m = nn.Sequential(Attn(), nn.Linear(8, 2))
    t = _types(m)
    assert t["0.q_proj.weight"] == "attention" and t["0.up_proj.weight"] == "mlp_up"
    for n in ("q_proj.lora_A.default", "q_proj.lora_B.default", "up_proj.lora_down", "up_proj.lora_up"):
        assert t[f"0.{n}.weight"] == "adapter", n
    opt = SpectralNewton.from_model(m, alpha={"adapter": 0.5})
    got = {g["layer_type"]: g["alpha"] for g in opt.param_groups if g["spectral"]}
    assert got == {"attention": 1.65, "mlp_up": 2.0, "adapter": 0.5}


def _hf(name):
    import transformers as T

    small = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100
    )
    cfg, cls = {
        "t5": (
            T.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=100),
            T.T5ForConditionalGeneration,
        ),
        "distilbert": (
            T.DistilBertConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, vocab_size=100),
            T.DistilBertModel,
        ),
        "falcon": (
            T.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100),
            T.FalconForCausalLM,
        ),
        "mixtral": (
            T.MixtralConfig(**small, num_key_value_heads=1, num_local_experts=2),
            T.MixtralForCausalLM,
        ),
        "mamba": (
            T.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=100, state_size=4),
            T.MambaModel,
        ),
        "gpt_oss": (
            T.GptOssConfig(
                **small, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, head_dim=16
            ),
            T.GptOssForCausalLM,
        ),
        "deepseek_v3": (
            T.DeepseekV3Config(
                **small,
                num_key_value_heads=1,
                moe_intermediate_size=16,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_shared_experts=1,
                first_k_dense_replace=0,
                kv_lora_rank=8,
                q_lora_rank=8,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
                n_group=1,
                topk_group=1,
            ),
            T.DeepseekV3ForCausalLM,
        ),
        "swin": (
            T.SwinConfig(
                image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4
            ),
            T.SwinModel,
        ),
    }[name]
    torch.manual_seed(0)
    return cls(cfg)


def test_transformers_architectures_beyond_gpt2_and_vit():
    """Each was misclassified before: T5's SelfAttention.q/k/v/o and DistilBERT's q_lin.. fell back to the generic
    matrix, Falcon's multi-query query_key_value too, Swin's relative position bias table (49, heads) and Mamba's
    A_log got a spectral step, Mamba's in_proj/out_proj got attention's exponent, and Mixtral's fused experts
    (experts, out, in) were one 'kernel-shaped' matrix over all experts (now one matrix per expert)."""
    t = _types(_hf("t5"))
    for blk in ("encoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.1.EncDecAttention"):
        assert {t[f"{blk}.{x}.weight"] for x in "qkvo"} == {"attention"}, blk
    t = _types(_hf("distilbert"))
    assert {t[f"transformer.layer.0.attention.{x}_lin.weight"] for x in ("q", "k", "v", "out")} == {
        "attention"
    }
    assert _types(_hf("falcon"))["transformer.h.0.self_attention.query_key_value.weight"] == "attention"
    t = _types(_hf("swin"))
    tables = [n for n in t if n.endswith("relative_position_bias_table")]
    assert tables and {t[n] for n in tables} == {"embedding"}
    t = _types(_hf("mamba"))
    mixer = "layers.0.mixer"
    assert t[f"{mixer}.A_log"] == "vector"

    class Custom(nn.Module):  # a parameter named A outside an SSM-like module stays a matrix
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(torch.randn(8, 8))

    assert _types(nn.Sequential(Custom(), nn.Linear(8, 2)))["0.A"] == "matrix"
    assert t[f"{mixer}.in_proj.weight"] == "matrix" and t[f"{mixer}.out_proj.weight"] == "matrix"
    t = _types(_hf("gpt_oss"))  # per-expert bias stacks (experts, out) are biases, not matrices
    assert t["model.layers.0.mlp.experts.gate_up_proj_bias"] == "bias"
    assert t["model.layers.0.mlp.experts.gate_up_proj"] == "mlp_up"
    t = _types(_hf("deepseek_v3"))  # MLA's low-rank projections are attention's
    attn = "model.layers.0.self_attn"
    assert {t[f"{attn}.{x}.weight"] for x in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")} == {
        "attention"
    }
    model = _hf("mixtral")
    opt = SpectralNewton.from_model(model, lr=1e-3)
    params = dict(model.named_parameters())
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    experts = [n for n in by_name if ".experts." in n]
    assert experts
    for (
        n
    ) in experts:  # fused (experts, out, in): their MLP type, one matrix per expert; separate Linears: 2-D
        g = by_name[n]
        assert g["spectral"] and g["layer_type"] in ("mlp_up", "mlp_down"), n
        assert g["batch_dims"] == (1 if params[n].ndim == 3 else 0), n
    x = torch.randint(0, 100, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert all("momentum_buffer" in opt.state[params[n]] for n in experts)
