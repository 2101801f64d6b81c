"""Vision Transformer image classification with SpectralNewton, AdamW or Muon.

    accelerate launch recipes/vit_imagenet.py                       # tiny ViT on digits, a few CPU minutes
    accelerate launch recipes/vit_imagenet.py --config configs/recipes/vit_s16_imagenet.yaml \
        --data_dir /data/imagenet                                   # ViT-S/16 on ImageNet

Data: scikit-learn's digits upsampled to 32x32 RGB (default, bundled, offline); ``--data_dir`` an
ImageNet-style folder (train/<class>/*.JPEG, val/<class>/...); or ``--dataset`` a Hugging Face image
dataset saved with ``save_to_disk``. Folder and dataset inputs get RandomResizedCrop + flip for training
and resize + center crop for evaluation (PIL and torch; no torchvision).

Model: transformers' ViTForImageClassification built from a config (no downloads): ``--model tiny``
(``--hidden``, ``--layers``, ``--heads``, ``--patch_size``), ``vit_s16`` or ``vit_b16``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.config import TrainConfig, parse_config  # noqa: E402
from common.data import digits_images, load_image_data  # noqa: E402
from common.tasks import classification_task  # noqa: E402
from common.train import train  # noqa: E402

VIT_SIZES = {  # hidden, layers, heads, patch (MLP 4x hidden)
    "vit_s16": (384, 12, 6, 16),
    "vit_b16": (768, 12, 12, 16),
}


@dataclass
class ViTRecipeConfig(TrainConfig):
    data_dir: str | None = None  # ImageNet-style folder with train/ and val/
    dataset: str | None = None  # datasets.load_from_disk path
    model: str = "tiny"  # tiny | vit_s16 | vit_b16
    image_size: int | None = None  # None: 32 for tiny, 224 otherwise
    patch_size: int = 8  # tiny only
    hidden: int = 64  # tiny only
    layers: int = 4  # tiny only
    heads: int = 4  # tiny only
    dropout: float = 0.0
    label_smoothing: float = 0.0
    attn_implementation: str = "sdpa"  # eager | sdpa
    output_dir: str = "outputs/vit_imagenet"

    def validate(self):
        super().validate()
        if self.model not in ("tiny", *VIT_SIZES):
            raise ValueError(f"--model must be tiny, vit_s16 or vit_b16, got {self.model!r}")
        if self.data_dir and self.dataset:
            raise ValueError("give at most one of --data_dir and --dataset")
        if self.image_size is None:
            self.image_size = 32 if self.model == "tiny" else 224
        patch = self.patch_size if self.model == "tiny" else VIT_SIZES[self.model][3]
        if self.image_size % patch:
            raise ValueError(f"--image_size {self.image_size} is not a multiple of the patch size {patch}")


def build_model(cfg: ViTRecipeConfig, num_labels: int):
    from transformers import ViTConfig, ViTForImageClassification

    if cfg.model == "tiny":
        hidden, layers, heads, patch = cfg.hidden, cfg.layers, cfg.heads, cfg.patch_size
    else:
        hidden, layers, heads, patch = VIT_SIZES[cfg.model]
    vc = ViTConfig(
        image_size=cfg.image_size,
        patch_size=patch,
        num_channels=3,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        num_labels=num_labels,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )
    vc._attn_implementation = cfg.attn_implementation
    return ViTForImageClassification(vc)


def main(argv=None):
    cfg = parse_config(ViTRecipeConfig, argv, description=__doc__.split("\n")[0])
    if cfg.data_dir or cfg.dataset:
        train_data, val_data = load_image_data(cfg.data_dir, cfg.dataset, cfg.image_size, seed=cfg.seed)
    else:
        train_data, val_data = digits_images(size=cfg.image_size, seed=cfg.seed)
    task = classification_task(
        "vit_imagenet",
        lambda c: build_model(c, train_data.num_classes),
        train_data,
        val_data,
        cfg.label_smoothing,
    )
    return train(cfg, task)


if __name__ == "__main__":
    main()
