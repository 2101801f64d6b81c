"""Classify a model's parameters into layer types, so each gets the right step and curvature exponent.

Layer types and their default exponents. The first paper has alpha ~ 2 for convolutions, ~ 1 for attention and
< 1 for MLP up-projections; the defaults follow what this project measured and what trained best on an
independent harness (issue 22, ``docs/benchmarks.md`` section 4): the curvature probes give attention ~1.65
and MLP-up ~2 on small transformers, and with those exponents a hand-written GPT ends level with an fp32 Muon,
while the paper's MLP-up 0.5 costs ~0.06 nats; conv 2 beat conv 1 and 1.5 on two CNNs, constant LR and
warmup + cosine.

==============  =========  ============================================================
layer type      step       default alpha
==============  =========  ============================================================
conv            spectral   2.0   (nn.Conv1d/2d/3d kernels, viewed as (out, in * k...))
attention       spectral   1.65  (q/k/v/out projections, fused qkv, nn.MultiheadAttention)
mlp_up          spectral   2.0   (up/gate projections, fc1, c_fc, ViT intermediate)
mlp_down        spectral   1.0   (down projections, fc2, GPT-2 mlp.c_proj, ViT output)
adapter         spectral   1.0   (LoRA factors: PEFT's lora_A/lora_B, lora_down/lora_up; not measured)
matrix          spectral   1.0   (any other matrix)
embedding       AdamW      -     (nn.Embedding, position embeddings, cls tokens, relative position bias tables)
head            AdamW      -     (lm_head, classifier, head; a CNN's final top-level Linear)
norm, bias      AdamW      -     (LayerNorm/BatchNorm/RMSNorm weights, all biases)
vector          AdamW      -     (any other parameter with ndim < 2, and vectors stored as (d, 1) or
                                  (1, d) matrices: weight_norm's magnitude, a Linear(1, d))
==============  =========  ============================================================

Fused MoE expert weights (experts, out, in), as in transformers' Mixtral (``mlp.experts.gate_up_proj``), get the
type their name says (``mlp_up``, ``mlp_down``, else ``matrix``) and ``batch_dims=1``: one spectral step per expert,
batched (``ParamInfo.batch_dims``; ``from_model`` puts them in groups of their own).

A parametrized weight (``torch.nn.utils.parametrize``: weight_norm, spectral_norm, orthogonal) is classified
as the weight of the module it parametrizes: its ``original`` (or the ``original<i>`` of the weight's shape)
gets that module's type.

How a type is recognised (``ParamInfo.how``): module types (convolutions, embeddings, norms,
nn.MultiheadAttention), naming conventions (GPT-2, Llama, ViT/BERT, nanoGPT), the model's layout (a Linear
that widens into an activation and one that narrows back, a fused q/k/v Linear d -> 3d and its square output
projection, kernel-shaped parameters), and, given ``example_input``, one traced forward (which Linear feeds an
attention op, which reads its output, which feeds an activation and which reads it back).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "DEFAULT_ALPHA",
    "PAPER_ALPHA",
    "SPECTRAL_TYPES",
    "ADAMW_TYPES",
    "ParamInfo",
    "classify_parameters",
    "classification_table",
    "fallback_warning",
    "matrix_names",
    "resolve_alpha_map",
]

# issue 22: attention and MLP-up from the probes' measurements (the paper's 1.0 and 0.5 trained worse);
# PAPER_ALPHA keeps the first paper's values for comparison (``alpha=PAPER_ALPHA``)
# adapters (LoRA factors): the generic matrix exponent; no probe has measured them
DEFAULT_ALPHA = {
    "conv": 2.0,
    "attention": 1.65,
    "mlp_up": 2.0,
    "mlp_down": 1.0,
    "adapter": 1.0,
    "matrix": 1.0,
}
PAPER_ALPHA = {"conv": 2.0, "attention": 1.0, "mlp_up": 0.5, "mlp_down": 1.0, "matrix": 1.0}
SPECTRAL_TYPES = tuple(DEFAULT_ALPHA)
ADAMW_TYPES = ("embedding", "head", "norm", "bias", "vector")

_HEAD = re.compile(r"(^|\.)(lm_head|classifier|head|heads|output_layer|fc_out|score)(\.|$)")
_EMBED = re.compile(
    r"(^|\.)(wte|wpe|embed\w*|embeddings?|pos_emb\w*|tok_emb\w*|position_\w*|cls_token|mask_token|"
    r"relative_position\w*|rel_pos\w*)(\.|$)"
)
_ATTN_PROJ = re.compile(
    r"(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv|qkv_proj|wqkv|query|key|value|query_key_value|c_attn|"
    r"to_q|to_k|to_v|to_out|wq|wk|wv|wo_attn)(\.|$)",
    re.IGNORECASE,
)
# in_proj / out_proj also name the projections of non-attention blocks (Mamba's mixer): attention only inside an
# attention scope or an nn.MultiheadAttention
_ATTN_PROJ_SCOPED = re.compile(r"(^|\.)(in_proj\w*|out_proj)(\.|$)")
_ATTN_SCOPE = re.compile(
    r"(^|\.)(attn|attention|self_attn|self_attention|mha|SelfAttention|EncDecAttention|cross_attn|"
    r"cross_attention|encoder_attn)(\.|$)",
    re.IGNORECASE,
)
# q/k/v/output projections named only by a letter or suffix inside an attention scope (T5's SelfAttention.q,
# DistilBERT's attention.q_lin)
_ATTN_SCOPED_NAME = re.compile(r"(^|\.)(c_proj|proj|dense|out|o|q|k|v|q_lin|k_lin|v_lin|out_lin)$")
_EXPERTS = re.compile(r"(^|\.)experts(\.|$)")
# Mamba's state-space parameters: (d_inner, d_state) tables, not linear maps ("A" only in an SSM-like module:
# elsewhere a parameter named A may well be a linear map)
_SSM_MODULE = re.compile(r"mamba|mixer|ssm|s4|s6", re.IGNORECASE)
_MLP_UP = re.compile(
    r"(^|\.)(up_proj|gate_proj|gate_up_proj|fc1|c_fc|w1|w3|wi|lin1|intermediate|dense_h_to_4h)(\.|$)"
)
_MLP_DOWN = re.compile(r"(^|\.)(down_proj|fc2|w2|wo|lin2|dense_4h_to_h)(\.|$)")
_MLP_SCOPE = re.compile(r"(^|\.)(mlp|ffn|feed_forward|feedforward)(\.|$)", re.IGNORECASE)
_VIT_OUTPUT = re.compile(r"(^|\.)layer\.\d+\.output\.dense$")
# PEFT's LoRA (q_proj.lora_A.default.weight, embed_tokens.lora_embedding_A.default), kohya/diffusers' lora_down/up
_ADAPTER = re.compile(r"(^|\.)(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_down|lora_up)(\.|$)")


@dataclass
class ParamInfo:
    """One trainable parameter and how the optimizer treats it.

    ``how`` says what the layer type rests on: ``"name"`` (a naming convention), ``"module"`` (the module's
    type: convolutions, embeddings, norms, nn.MultiheadAttention), ``"structure"`` (the model's layout without
    running it: module order and shapes), ``"graph"`` (a traced forward on ``example_input``), ``"user"``
    (``head_names``) or ``"fallback"`` (nothing recognised: the generic ``"matrix"`` / ``"vector"``);
    ``reason`` says which rule, in words.
    """

    name: str
    param: torch.Tensor
    layer_type: str
    module_type: str
    how: str = "name"
    reason: str = ""
    batch_dims: int = 0  # 1: a stack of matrices (fused MoE experts), stepped one matrix per expert

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


def _matrix_type(
    name: str, module: nn.Module, head_name: str | None, parent: nn.Module | None = None
) -> tuple[str, str, str]:
    """(layer type, how, reason) of a parameter with ndim >= 2 from its module's type and its name
    (``parent``: the module's parent, for nn.MultiheadAttention's out_proj)."""
    mod_name = name.rsplit(".", 1)[0] if "." in name else ""
    pname = name.rsplit(".", 1)[-1]
    if _ADAPTER.search(name):  # before the rest: LoRA factors sit inside q_proj, up_proj, embeddings, convs
        return "adapter", "name", "LoRA factor name"
    if (pname == "A_log" or (pname == "A" and _SSM_MODULE.search(type(module).__name__))) and not isinstance(
        module, (nn.Linear, nn.modules.conv._ConvNd)
    ):
        return "vector", "name", "state-space parameter (Mamba's A_log)"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv", "module", type(module).__name__
    if isinstance(module, nn.Embedding) or "embedding" in type(module).__name__.lower():
        return "embedding", "module", type(module).__name__
    if _EMBED.search(name):
        return "embedding", "name", "embedding-like name"
    if _HEAD.search(mod_name):
        return "head", "name", "head-like name"
    if head_name is not None and mod_name == head_name:
        return "head", "structure", "the model's last top-level Linear"
    if isinstance(module, nn.MultiheadAttention):
        return "attention", "module", "nn.MultiheadAttention"
    if _ATTN_PROJ.search(mod_name) or (
        _ATTN_PROJ_SCOPED.search(mod_name)
        and (_ATTN_SCOPE.search(mod_name) or isinstance(parent, nn.MultiheadAttention))
    ):
        return "attention", "name", "q/k/v/out projection name"
    if _ATTN_SCOPE.search(mod_name) and (_ATTN_SCOPED_NAME.search(mod_name) or isinstance(module, nn.Linear)):
        # any Linear of an attention module: also MLA's low-rank q_a/q_b/kv_a/kv_b projections (DeepSeek)
        return "attention", "name", "projection inside an attention module"
    if _MLP_UP.search(mod_name):
        return "mlp_up", "name", "up/gate projection name"
    if _MLP_DOWN.search(mod_name) or _VIT_OUTPUT.search(mod_name):
        return "mlp_down", "name", "down projection name"
    if _MLP_SCOPE.search(mod_name) and mod_name.endswith("c_proj"):
        return "mlp_down", "name", "c_proj inside an MLP module"
    return "matrix", "fallback", "not recognised"


# ------------------------------------------------------------------------------------------ structure

_ACTIVATION_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GLU,
    nn.Softplus,
    nn.PReLU,
)
_PASS_MODULES = (nn.Dropout, nn.Identity)


def _is_activation_module(m: nn.Module) -> bool:
    name = type(m).__name__.lower()
    return (
        isinstance(m, _ACTIVATION_MODULES) or "activation" in name or name.endswith(("gelu", "silu", "swish"))
    )


def _linear_dims(module: nn.Module, p: torch.Tensor) -> tuple[int, int] | None:
    """(in, out) of a linear map: nn.Linear, or transformers' Conv1D (weight stored as (in, out))."""
    if isinstance(module, nn.Linear) and _is_weight_of(module, p):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and p.ndim == 2 and getattr(module, "nf", None) == p.shape[1]:
        return int(p.shape[0]), int(p.shape[1])
    return None


def _is_weight_of(module: nn.Module, p: torch.Tensor) -> bool:
    """``p`` is ``module.weight``, or the parameter behind a parametrized weight (weight_norm's direction,
    spectral_norm's and orthogonal's original): one of the weight's shape."""
    if not parametrize.is_parametrized(module, "weight"):
        return p is module.weight
    plist = module.parametrizations["weight"]
    originals = [t for n, t in plist.named_parameters(recurse=False) if n.startswith("original")]
    return any(p is t for t in originals) and tuple(p.shape) == (module.out_features, module.in_features)


def _parametrized_host(model_modules: dict, mod_name: str):
    """(host module name, host module, tensor name) when ``mod_name`` is the ParametrizationList of
    ``<host>.parametrizations.<tensor>``, else None."""
    parts = mod_name.split(".")
    if len(parts) < 2 or parts[-2] != "parametrizations":
        return None
    host_name = ".".join(parts[:-2])
    host = model_modules.get(host_name)
    return None if host is None else (host_name, host, parts[-1])


def _fused_experts(name: str, module: nn.Module, p: torch.Tensor) -> bool:
    """A 3-D weight (experts, out, in) of a fused MoE layer: under an ``experts`` module (transformers' Mixtral,
    Qwen-MoE, DeepSeek) or of a module whose ``num_experts`` is its first dim."""
    if p.ndim != 3 or isinstance(module, nn.modules.conv._ConvNd):
        return False
    return bool(_EXPERTS.search(name)) or getattr(module, "num_experts", None) == p.shape[0]


def _vector_shaped(p: torch.Tensor) -> bool:
    """A matrix (ndim >= 2) whose matrix view (shape[0], rest) has one row or one column: its spectral step
    would be its normalised gradient, not a preconditioned one."""
    return p.ndim >= 2 and (p.shape[0] == 1 or p.numel() == p.shape[0])


def _dims_str(d: tuple[int, int]) -> str:
    return f"{d[0]}->{d[1]}"


def _structure_roles(model: nn.Module, cands: dict[str, tuple[nn.Module, torch.Tensor]], known: dict):
    """Layer types of the not-yet-recognised linear maps ``cands`` ({module name: (module, weight)}) from the
    model's layout, without running it. ``known``: {module name: layer type} of the recognised ones.

    Rules, in order (each only for modules no earlier rule claimed):

    1. MLP blocks in an ``nn.Sequential``: Linear(d->h), [Dropout], activation module, [Dropout],
       Linear(h->d') with h > d and d' < h: the first widens into an activation (``mlp_up``), the second
       narrows it back (``mlp_down``).
    2. Sibling pairs: under one parent, a Linear d->h and a Linear h->d with h > d (an MLP block whose
       activation is called functionally): ``mlp_up`` (every d->h sibling: gated MLPs have two) and
       ``mlp_down``.
    3. Fused attention: a Linear d->3d (fused q/k/v) is ``attention``; so is a square d->d sibling of a fused
       or name-recognised q/k/v projection (the output projection).
    """
    roles: dict[str, tuple[str, str]] = {}
    dims = {}
    for mname, (mod, p) in cands.items():
        d = _linear_dims(mod, p)
        if d is not None:
            dims[mname] = d
    modules = dict(model.named_modules())
    # 1. Sequential order
    for pname, parent in modules.items():
        if not isinstance(parent, nn.Sequential):
            continue
        kids = [(f"{pname}.{k}" if pname else k, m) for k, m in parent.named_children()]
        kids = [(n, m) for n, m in kids if not isinstance(m, _PASS_MODULES)]
        for i in range(len(kids) - 2):
            (na, _), (_, act), (nb, _) = kids[i], kids[i + 1], kids[i + 2]
            if na not in dims or nb not in dims or not _is_activation_module(act):
                continue
            (din, h), (hin, dout) = dims[na], dims[nb]
            if hin == h and h > din and dout < h:
                why = f"Sequential: Linear {_dims_str(dims[na])}, {type(act).__name__}, Linear {_dims_str(dims[nb])}"
                roles.setdefault(na, ("mlp_up", why + " (widens into the activation)"))
                roles.setdefault(nb, ("mlp_down", why + " (narrows back)"))
    # 2 and 3: siblings under one parent
    by_parent: dict[str, list[str]] = {}
    for mname in list(dims) + [n for n in known if n not in dims]:
        by_parent.setdefault(mname.rsplit(".", 1)[0] if "." in mname else "", []).append(mname)
    for names in by_parent.values():
        free = [n for n in names if n in dims and n not in roles]
        for a in free:
            din, h = dims[a]
            if h <= din:
                continue
            downs = [b for b in free if b != a and dims[b] == (h, din)]
            if downs:
                for b in downs:
                    roles.setdefault(b, ("mlp_down", f"narrows {_dims_str(dims[b])} back from sibling {a}"))
                roles.setdefault(
                    a, ("mlp_up", f"widens {_dims_str(dims[a])}; sibling {downs[0]} narrows back")
                )
        free = [n for n in names if n in dims and n not in roles]
        fused = [n for n in free if dims[n][1] == 3 * dims[n][0]]
        for n in fused:
            roles[n] = ("attention", f"fused q/k/v shape {_dims_str(dims[n])}")
        qkv = fused + [n for n in names if known.get(n) == "attention" and n not in dims]
        widths = {dims[n][0] for n in fused}
        for n in names:
            if n not in dims or n in roles or n in known:
                continue
            if qkv and dims[n][0] == dims[n][1] and (not widths or dims[n][0] in widths):
                roles[n] = ("attention", f"square {_dims_str(dims[n])} beside the q/k/v projection {qkv[0]}")
    return roles


# ---------------------------------------------------------------------------------------------- graph

_ACT_OPS = (
    "relu",
    "gelu",
    "silu",
    "tanh",
    "sigmoid",
    "elu",
    "leakyrelu",
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "mish",
    "softplus",
    "glu",
    "prelu",
    "celu",
    "selu",
    "logsigmoid",
    "threshold",
)
_MATMUL_OPS = ("addmm", "mm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "mv", "addmv")
# view-like ops between a weight's AccumulateGrad node and the op that uses it
_WEIGHT_VIEWS = (
    "t",
    "transpose",
    "permute",
    "view",
    "reshapealias",
    "unsafeview",
    "expand",
    "tocopy",
    "clone",
)
_SEARCH_LIMIT = 64


def _op(node) -> str:
    return re.sub(r"backward\d*$", "", type(node).__name__.lower())


def _inputs(node) -> list:
    return [c for c, _ in node.next_functions if c is not None]


def _is_leaf(node) -> bool:
    return hasattr(node, "variable")


def _graph_roles(model: nn.Module, example_input, cands: dict[int, str], dims: dict[int, tuple[int, int]]):
    """Layer types from one traced forward on ``example_input`` (a tensor, a tuple of positional arguments or
    a dict of keyword arguments): the autograd graph of the outputs links every weight to the op that uses it
    and to what comes before and after it.

    For each candidate weight (``cands``: {id(param): name}) with its op node N: a Linear whose output flows
    (through views, splits, bias adds, scalings) into an attention op -- scaled_dot_product_attention, or a
    matmul of two activations such as q @ k^T and probs @ v -- produces queries, keys or values
    (``attention``); one whose input comes from an attention op is the output projection (``attention``). A
    Linear whose input comes from an activation (possibly times a gate) is ``mlp_down`` when it narrows
    (in > out) and the Linears feeding that activation or gate widen its output width back to its input
    width; those are ``mlp_up``. A weight used by a convolution op is ``conv``.
    """
    params = dict(model.named_parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            if isinstance(example_input, Mapping):
                out = model(**example_input)
            elif isinstance(example_input, tuple):
                out = model(*example_input)
            else:
                out = model(example_input)
    finally:
        model.train(was_training)
    roots = []

    def collect(o, depth=0):
        if depth > 4:
            return
        if isinstance(o, torch.Tensor):
            if o.grad_fn is not None:
                roots.append(o.grad_fn)
        elif isinstance(o, Mapping):
            for v in o.values():
                collect(v, depth + 1)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v, depth + 1)

    collect(out)
    consumers: dict = {}
    leaves: dict[int, list] = {}
    seen, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_leaf(n):
            leaves.setdefault(id(n.variable), []).append(n)
        for c in _inputs(n):
            consumers.setdefault(c, []).append(n)
            stack.append(c)
    # the op node(s) that use each parameter
    param_ops: dict = {}  # op node -> id(param)
    ops_of: dict[int, list] = {}
    for pid in [id(p) for p in params.values() if p.requires_grad and p.ndim >= 2]:  # weights, not biases
        for leaf in leaves.get(pid, []):
            frontier = list(consumers.get(leaf, []))
            for _ in range(_SEARCH_LIMIT):
                if not frontier:
                    break
                n = frontier.pop()
                if _op(n) in _WEIGHT_VIEWS:
                    frontier += consumers.get(n, [])
                    continue
                param_ops.setdefault(n, pid)
                ops_of.setdefault(pid, []).append(n)

    def kind(n) -> str:
        op = _op(n)
        if n in param_ops:
            return "param"
        if "scaleddotproduct" in op or "attention" in op:
            return "attention"
        if op in _MATMUL_OPS:
            return "attention" if sum(not _is_leaf(c) for c in _inputs(n)) >= 2 else "stop"
        if "norm" in op or "softmax" in op or "embedding" in op or "conv" in op:
            return "stop"
        if op in _ACT_OPS:
            return "act"
        if op in ("add", "sub") and sum(not _is_leaf(c) for c in _inputs(n)) >= 2:
            return "merge"  # a residual sum: the trail ends here
        return "pass"

    def search(starts, forward: bool, through_add: bool = False):
        found = {"attention": False, "act": [], "param": []}
        frontier, visited = list(starts), set()
        while frontier and len(visited) < _SEARCH_LIMIT:
            n = frontier.pop()
            if n in visited or _is_leaf(n):
                continue
            visited.add(n)
            k = kind(n)
            if k == "param":
                found["param"].append(n)
                continue
            if k == "attention":
                found["attention"] = True
                continue
            if k == "act":
                found["act"].append(n)
                continue
            if k == "stop" or (k == "merge" and not through_add):
                continue
            frontier += consumers.get(n, []) if forward else _inputs(n)
        return found

    roles: dict[int, tuple[str, str]] = {}
    for pid, name in cands.items():
        ops = ops_of.get(pid, [])
        if not ops:
            continue
        if any("conv" in _op(n) for n in ops):
            roles[pid] = ("conv", "used by a convolution op")
            continue
        fwd = search([c for n in ops for c in consumers.get(n, [])], forward=True)
        if fwd["attention"]:
            roles[pid] = ("attention", "its output feeds an attention op (q/k/v)")
            continue
        inputs = [c for n in ops for c in _inputs(n) if not _is_leaf(c)]
        bwd = search(inputs, forward=False)
        if bwd["attention"]:
            roles[pid] = ("attention", "its input comes from an attention op (output projection)")
            continue
        if not bwd["act"] or pid not in dims:
            continue
        feeders = search([c for a in bwd["act"] for c in _inputs(a)], forward=False, through_add=True)[
            "param"
        ]
        ups = list(dict.fromkeys(param_ops[n] for n in feeders + bwd["param"]))
        din, dout = dims[pid]
        ups = [u for u in ups if u in cands and dims.get(u) == (dout, din)]
        if din > dout and ups:
            roles[pid] = (
                "mlp_down",
                f"narrows {_dims_str(dims[pid])} out of an activation of {cands[ups[0]]}",
            )
            for u in ups:
                roles.setdefault(
                    u, ("mlp_up", f"widens {_dims_str(dims[u])} into an activation read by {name}")
                )
    return roles


def classify_parameters(
    model: nn.Module, head_names: tuple[str, ...] = (), example_input=None
) -> list[ParamInfo]:
    """Assign every trainable parameter of ``model`` exactly one layer type (tied parameters once).

    Layer types come from, in order of precedence: ``head_names``; module types (convolutions, embeddings,
    nn.MultiheadAttention, norms); naming conventions (GPT-2, Llama, ViT/BERT, timm, nanoGPT); a traced
    forward when ``example_input`` is given; the model's layout (see :func:`_structure_roles`); else the
    generic ``"matrix"``. ``ParamInfo.how`` / ``reason`` record which.

    ``head_names``: extra module names to treat as output heads (AdamW).
    ``example_input``: optional input for one forward pass (a tensor, a tuple of positional arguments or a dict
    of keyword arguments; the model runs in eval mode, gradients enabled, nothing is stepped), whose autograd
    graph shows which Linear produces queries/keys/values, which feeds an activation and widens, which reads
    it back, and which weights a convolution uses (see :func:`_graph_roles`).
    Raises ValueError if some trainable parameter could not be reached through ``named_modules``.
    """
    head_name = _last_top_level_linear(model)
    modules = dict(model.named_modules())
    seen: dict[int, ParamInfo] = {}
    out: list[ParamInfo] = []
    owner: dict[int, tuple[str, nn.Module]] = {}
    for mod_name, module in model.named_modules():
        # a parametrized weight's parameters live in <host>.parametrizations.<tensor>: read them as the host's
        host = (
            _parametrized_host(modules, mod_name)
            if isinstance(module, parametrize.ParametrizationList)
            else None
        )
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            as_name, as_module, as_mod_name = full, module, mod_name
            if host is not None:
                as_mod_name, as_module, tensor = host
                as_name = f"{as_mod_name}.{tensor}" if as_mod_name else tensor
            how, reason = "module", type(as_module).__name__
            bdims = 0
            if p.ndim >= 2 and (
                pname == "bias" or pname.endswith("_bias")
            ):  # per-expert bias stacks (GPT-OSS)
                t, how, reason = "bias", "name", f"bias of shape {tuple(p.shape)}"
            elif p.ndim >= 2 and _fused_experts(as_name, as_module, p) and not _ADAPTER.search(as_name):
                t = (
                    "mlp_up"
                    if _MLP_UP.search(as_name)
                    else "mlp_down"
                    if _MLP_DOWN.search(as_name)
                    else "matrix"
                )
                how, bdims = "structure", 1
                reason = f"fused MoE experts: {p.shape[0]} matrices {tuple(p.shape[1:])}, one step each"
            elif p.ndim >= 2:
                parent = modules.get(as_mod_name.rsplit(".", 1)[0] if "." in as_mod_name else "")
                t, how, reason = _matrix_type(as_name, as_module, head_name, parent if as_mod_name else None)
                if as_mod_name in head_names:
                    t, how, reason = "head", "user", "head_names"
                elif t == "matrix" and p.ndim >= 3:
                    t, how, reason = "conv", "structure", f"kernel-shaped {tuple(p.shape)}"
                if t in SPECTRAL_TYPES and _vector_shaped(p):
                    t, how, reason = "vector", "structure", f"a vector stored as shape {tuple(p.shape)}"
                elif host is not None and t in SPECTRAL_TYPES:
                    reason = f"{reason}; parametrized {host[2]} of {type(as_module).__name__}"
            elif pname == "bias" or pname.endswith("_bias"):
                t, how, reason = "bias", "name", "bias"
            elif _is_norm(module):
                t = "norm"
            elif _EMBED.search(full):
                t, how, reason = "embedding", "name", "embedding-like name"
            else:
                t, how, reason = "vector", "fallback", "other parameter with ndim < 2"
            info = ParamInfo(full, p, t, type(as_module).__name__, how, reason, bdims)
            seen[id(p)] = info
            owner[id(p)] = (as_mod_name, as_module)
            out.append(info)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    missing = trainable - set(seen)
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters were not reachable through named_modules()")
    fallback = [i for i in out if i.how == "fallback" and i.layer_type == "matrix"]
    if not fallback:
        return out
    if example_input is not None:
        dims = {}
        for i in out:
            d = _linear_dims(owner[id(i.param)][1], i.param)
            if d is not None:
                dims[id(i.param)] = d
        cands = {id(i.param): i.name for i in fallback}
        roles = _graph_roles(model, example_input, cands, dims)
        for i in fallback:
            if id(i.param) in roles:
                i.layer_type, i.reason = roles[id(i.param)]
                i.how = "graph"
    fallback = [i for i in out if i.how == "fallback" and i.layer_type == "matrix"]
    cands = {owner[id(i.param)][0]: (owner[id(i.param)][1], i.param) for i in fallback}
    known = {owner[id(i.param)][0]: i.layer_type for i in out if i.spectral and i.how != "fallback"}
    roles = _structure_roles(model, cands, known)
    for i in fallback:
        r = roles.get(owner[id(i.param)][0])
        if r is not None:
            i.layer_type, i.reason = r
            i.how = "structure"
    return out


def fallback_warning(infos: list[ParamInfo]) -> str | None:
    """A warning when every spectral matrix of a model fell back to the generic ``"matrix"`` type (so
    ``alpha="by_layer"`` gives all of them one alpha), else None."""
    spectral = [i for i in infos if i.spectral]
    if not spectral or any(i.how != "fallback" for i in spectral):
        return None
    names = ", ".join(i.name for i in spectral[:4]) + (", ..." if len(spectral) > 4 else "")
    return (
        f"none of the model's {len(spectral)} hidden matrices ({names}) was recognised as a convolution, "
        "attention or MLP layer by module type, name or structure: they all get the generic 'matrix' type "
        f"(alpha {DEFAULT_ALPHA['matrix']:g} under alpha='by_layer'). Pass example_input=<a batch> to classify "
        "them from a traced forward, an alpha mapping or number to set them yourself, or verbose=True to see "
        "the table"
    )


def matrix_names(infos: list[ParamInfo], stacks: bool = False) -> list[str]:
    """Names of the trainable spectral matrices among ``infos`` (conv, attention, MLP, adapters, other
    matrices), in order; ``stacks=False`` leaves out stacks of matrices (fused MoE experts, ``batch_dims`` > 0),
    which the curvature probe does not take (it measures one matrix at a time)."""
    return [
        i.name
        for i in infos
        if i.layer_type in SPECTRAL_TYPES and i.param.requires_grad and (stacks or not i.batch_dims)
    ]


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
    """A markdown table: name, shape, module, layer type, how it was recognised (and why), step, alpha."""
    alpha_map = dict(DEFAULT_ALPHA) if alpha_map is None else alpha_map
    rows = [
        "| parameter | shape | module | layer type | recognised by | step | alpha |",
        "|---|---|---|---|---|---|---|",
    ]
    for i in infos:
        step = "spectral" if i.spectral else "adamw"
        a = alpha_map.get(i.layer_type, "-") if i.spectral else "-"
        how = f"{i.how}: {i.reason}" if i.reason else i.how
        rows.append(
            f"| {i.name} | {tuple(i.param.shape)} | {i.module_type} | {i.layer_type} | {how} | {step} | {a} |"
        )
    return "\n".join(rows)
