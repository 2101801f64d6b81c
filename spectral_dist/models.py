"""Small models built from configs (no downloads) for tests, benchmarks, probes and the default recipes.

Each builder returns a module; ``*_batch`` makes a deterministic synthetic batch and ``*_loss`` is a
``loss_fn(model, batch) -> scalar`` in the form the probes expect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "tiny_mlp",
    "tiny_cnn",
    "tiny_resnet",
    "tiny_vit",
    "tiny_gpt",
    "image_batch",
    "token_batch",
    "classification_loss",
    "lm_loss",
    "BUILTIN_MODELS",
    "builtin_task",
]


def tiny_mlp(in_dim: int = 16, hidden: int = 32, out_dim: int = 4, depth: int = 2) -> nn.Module:
    layers, d = [], in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.Tanh()]
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class TinyCNN(nn.Module):
    """Two conv layers, optional BatchNorm and dropout, a linear head."""

    def __init__(
        self,
        in_ch: int = 1,
        width: int = 8,
        num_classes: int = 10,
        image_size: int = 8,
        batchnorm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x):
        x = torch.tanh(self.bn1(self.conv1(x)))
        x = torch.tanh(self.conv2(x))
        x = self.drop(self.pool(x).flatten(1))
        return self.fc(x)


def tiny_cnn(**kw) -> nn.Module:
    return TinyCNN(**kw)


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """A ResNet-style stack (stem, residual blocks with BatchNorm, global pool, head)."""

    def __init__(self, in_ch: int = 3, width: int = 16, blocks: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layers = nn.Sequential(*[_Block(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layers(x)
        return self.fc(x.mean(dim=(2, 3)))


def tiny_resnet(**kw) -> nn.Module:
    return TinyResNet(**kw)


def tiny_vit(
    image_size: int = 16,
    patch_size: int = 4,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    num_labels: int = 10,
    channels: int = 3,
    attn_implementation: str = "eager",
):
    """transformers ViTForImageClassification built from a config (eager attention: double backward works)."""
    from ._extras import require

    require("transformers", extra="hf", feature="models.tiny_vit")
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=channels,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = attn_implementation
    return ViTForImageClassification(cfg)


def tiny_gpt(
    vocab_size: int = 256,
    n_positions: int = 32,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    attn_implementation: str = "eager",
):
    """transformers GPT2LMHeadModel built from a config (byte-level vocabulary by default, no dropout)."""
    from ._extras import require

    require("transformers", extra="hf", feature="models.tiny_gpt")
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = attn_implementation
    return GPT2LMHeadModel(cfg)


def image_batch(
    n: int = 8, channels: int = 3, size: int = 16, num_classes: int = 10, seed: int = 0, dtype=torch.float32
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def token_batch(n: int = 4, seq: int = 16, vocab_size: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, seq), generator=g)


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy for (x, y) batches; works for plain modules and transformers' image classifiers."""
    x, y = batch
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits, y)


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Next-token cross-entropy for a (n, seq) tensor of token ids."""
    out = model(input_ids=batch)
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


BUILTIN_MODELS = ("mlp", "cnn", "resnet", "vit", "gpt")


def builtin_task(name: str, batch_size: int, seed: int, dtype=torch.float32):
    """``(model, loss_fn, batch)`` for a built-in tiny model (cast to ``dtype``) and a deterministic batch.

    Used by the ``probe`` and ``spectrum`` commands: mlp (16 -> 4 classes), cnn (1x8x8), resnet and vit
    (3x16x16), gpt (16 byte tokens).
    """
    torch.manual_seed(seed)
    if name == "mlp":
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, 16, generator=g, dtype=dtype)
        model, loss, batch = (
            tiny_mlp(),
            classification_loss,
            (x, torch.randint(0, 4, (batch_size,), generator=g)),
        )
    elif name == "cnn":
        model, loss = tiny_cnn(), classification_loss
        batch = image_batch(batch_size, channels=1, size=8, num_classes=10, seed=seed, dtype=dtype)
    elif name in ("resnet", "vit"):
        model, loss = (tiny_resnet() if name == "resnet" else tiny_vit()), classification_loss
        batch = image_batch(batch_size, channels=3, size=16, num_classes=10, seed=seed, dtype=dtype)
    elif name == "gpt":
        model, loss, batch = tiny_gpt(), lm_loss, token_batch(batch_size, 16, 256, seed=seed)
    else:
        raise ValueError(f"--model must be one of {BUILTIN_MODELS}, got {name!r}")
    return model.to(dtype), loss, batch
