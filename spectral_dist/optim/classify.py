"""Classify a model's parameters into layer types, so each gets the right step and curvature exponent.

Layer types and their default exponents (first paper: alpha ~ 2 for convolutions, ~ 1 for attention,
< 1 for MLP up-projections):

==============  =========  ============================================================
layer type      step       default alpha
==============  =========  ============================================================
conv            spectral   2.0   (nn.Conv1d/2d/3d kernels, viewed as (out, in * k...))
attention       spectral   1.0   (q/k/v/out projections, fused qkv, nn.MultiheadAttention)
mlp_up          spectral   0.5   (up/gate projections, fc1, c_fc, ViT intermediate)
mlp_down        spectral   1.0   (down projections, fc2, GPT-2 mlp.c_proj, ViT output)
matrix          spectral   1.0   (any other matrix)
embedding       AdamW      -     (nn.Embedding, position embeddings, cls tokens)
head            AdamW      -     (lm_head, classifier, head; a CNN's final top-level Linear)
norm, bias      AdamW      -     (LayerNorm/BatchNorm/RMSNorm weights, all biases)
vector          AdamW      -     (any other parameter with ndim < 2)
==============  =========  ============================================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "DEFAULT_ALPHA",
    "SPECTRAL_TYPES",
    "ADAMW_TYPES",
    "ParamInfo",
    "classify_parameters",
    "classification_table",
    "resolve_alpha_map",
]

DEFAULT_ALPHA = {"conv": 2.0, "attention": 1.0, "mlp_up": 0.5, "mlp_down": 1.0, "matrix": 1.0}
SPECTRAL_TYPES = tuple(DEFAULT_ALPHA)
ADAMW_TYPES = ("embedding", "head", "norm", "bias", "vector")

_HEAD = re.compile(r"(^|\.)(lm_head|classifier|head|heads|output_layer|fc_out|score)(\.|$)")
_EMBED = re.compile(
    r"(^|\.)(wte|wpe|embed\w*|embeddings?|pos_emb\w*|tok_emb\w*|position_\w*|cls_token|mask_token)(\.|$)"
)
_ATTN_PROJ = re.compile(
    r"(^|\.)(q_proj|k_proj|v_proj|o_proj|out_proj|qkv|qkv_proj|wqkv|query|key|value|c_attn|in_proj\w*|"
    r"to_q|to_k|to_v|to_out|wq|wk|wv|wo_attn)(\.|$)",
    re.IGNORECASE,
)
_ATTN_SCOPE = re.compile(r"(^|\.)(attn|attention|self_attn|self_attention|mha)(\.|$)", re.IGNORECASE)
_MLP_UP = re.compile(
    r"(^|\.)(up_proj|gate_proj|gate_up_proj|fc1|c_fc|w1|w3|wi|lin1|intermediate|dense_h_to_4h)(\.|$)"
)
_MLP_DOWN = re.compile(r"(^|\.)(down_proj|fc2|w2|wo|lin2|dense_4h_to_h)(\.|$)")
_MLP_SCOPE = re.compile(r"(^|\.)(mlp|ffn|feed_forward|feedforward)(\.|$)", re.IGNORECASE)
_VIT_OUTPUT = re.compile(r"(^|\.)layer\.\d+\.output\.dense$")


@dataclass
class ParamInfo:
    """One trainable parameter and how the optimizer treats it."""

    name: str
    param: torch.Tensor
    layer_type: str
    module_type: str

    @property
    def spectral(self) -> bool:
        return self.layer_type in SPECTRAL_TYPES

    @property
    def matrix_shape(self) -> tuple[int, int] | None:
        if not self.spectral:
            return None
        return (self.param.shape[0], self.param.numel() // max(1, self.param.shape[0]))


def _is_norm(module: nn.Module) -> bool:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)
    return isinstance(module, norms) or "norm" in type(module).__name__.lower()


def _last_top_level_linear(model: nn.Module) -> str | None:
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    return last if last is not None and "." not in last else None


def _matrix_type(name: str, module: nn.Module, head_name: str | None) -> str:
    mod_name = name.rsplit(".", 1)[0] if "." in name else ""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if (
        isinstance(module, nn.Embedding)
        or "embedding" in type(module).__name__.lower()
        or _EMBED.search(name)
    ):
        return "embedding"
    if _HEAD.search(mod_name) or (head_name is not None and mod_name == head_name):
        return "head"
    if isinstance(module, nn.MultiheadAttention) or _ATTN_PROJ.search(mod_name):
        return "attention"
    if _ATTN_SCOPE.search(mod_name) and re.search(r"(^|\.)(c_proj|proj|dense|out|o)$", mod_name):
        return "attention"
    if _MLP_UP.search(mod_name):
        return "mlp_up"
    if _MLP_DOWN.search(mod_name) or _VIT_OUTPUT.search(mod_name):
        return "mlp_down"
    if _MLP_SCOPE.search(mod_name) and mod_name.endswith("c_proj"):
        return "mlp_down"
    return "matrix"


def classify_parameters(model: nn.Module, head_names: tuple[str, ...] = ()) -> list[ParamInfo]:
    """Assign every trainable parameter of ``model`` exactly one layer type (tied parameters once).

    ``head_names``: extra module names to treat as output heads (AdamW).
    Raises ValueError if some trainable parameter could not be reached through ``named_modules``.
    """
    head_name = _last_top_level_linear(model)
    seen: dict[int, ParamInfo] = {}
    out: list[ParamInfo] = []
    for mod_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            if p.ndim >= 2:
                t = _matrix_type(full, module, head_name)
                if mod_name in head_names:
                    t = "head"
            elif pname == "bias" or pname.endswith("_bias"):
                t = "bias"
            elif _is_norm(module):
                t = "norm"
            else:
                t = "embedding" if _EMBED.search(full) else "vector"
            info = ParamInfo(full, p, t, type(module).__name__)
            seen[id(p)] = info
            out.append(info)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    missing = trainable - set(seen)
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters were not reachable through named_modules()")
    return out


def resolve_alpha_map(alpha) -> dict[str, float | str]:
    """Turn from_model's ``alpha`` argument into {layer_type: alpha}.

    ``"by_layer"``: the defaults above. A number or ``"auto"``: the same for every spectral type. A mapping:
    overrides on top of the defaults (keys must be spectral layer types).
    """
    if isinstance(alpha, str):
        if alpha == "by_layer":
            return dict(DEFAULT_ALPHA)
        if alpha == "auto":
            return dict.fromkeys(SPECTRAL_TYPES, "auto")
        raise ValueError(
            f"alpha must be 'by_layer', 'auto', a number or a mapping layer_type->alpha, got {alpha!r}"
        )
    if isinstance(alpha, Mapping):
        bad = set(alpha) - set(SPECTRAL_TYPES)
        if bad:
            raise ValueError(
                f"unknown layer types in alpha mapping: {sorted(bad)}; valid: {list(SPECTRAL_TYPES)}"
            )
        return {**DEFAULT_ALPHA, **alpha}
    return dict.fromkeys(SPECTRAL_TYPES, alpha)


def classification_table(infos: list[ParamInfo], alpha_map: Mapping[str, float | str] | None = None) -> str:
    """A markdown table: name, shape, module, layer type, step, alpha."""
    alpha_map = dict(DEFAULT_ALPHA) if alpha_map is None else alpha_map
    rows = ["| parameter | shape | module | layer type | step | alpha |", "|---|---|---|---|---|---|"]
    for i in infos:
        step = "spectral" if i.spectral else "adamw"
        a = alpha_map.get(i.layer_type, "-") if i.spectral else "-"
        rows.append(
            f"| {i.name} | {tuple(i.param.shape)} | {i.module_type} | {i.layer_type} | {step} | {a} |"
        )
    return "\n".join(rows)
