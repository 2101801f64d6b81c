"""Vision Transformer image classification with SpectralNewton, AdamW or Muon.

    accelerate launch -m recipes.vit_imagenet                       # tiny ViT on digits, a few CPU minutes
    accelerate launch -m recipes.vit_imagenet --config configs/recipes/vit_s16_imagenet.yaml \
        --data_dir /data/imagenet                                   # ViT-S/16 on ImageNet

(From the repository root; ``python -m recipes.vit_imagenet`` runs one process, and the file path
``accelerate launch recipes/vit_imagenet.py`` works as well.)

Data: scikit-learn's digits upsampled to 32x32 RGB (default, bundled, offline); ``--data_dir`` an
ImageNet-style folder (train/<class>/*.JPEG, val/<class>/...); or ``--dataset`` a Hugging Face image
dataset saved with ``save_to_disk``. Folder and dataset inputs get RandomResizedCrop + flip for training
and resize + center crop for evaluation (PIL and torch; no torchvision).

Model: transformers' ViTForImageClassification built from a config (no downloads): ``--model tiny``
(``--hidden``, ``--layers``, ``--heads``, ``--patch_size``), ``vit_s16`` or ``vit_b16``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

if __package__:  # python -m recipes.vit_imagenet, accelerate launch -m recipes.vit_imagenet
    from .common.config import TrainConfig, opt, parse_config
    from .common.data import digits_images, load_image_data
    from .common.tasks import classification_task
    from .common.train import train
else:  # accelerate launch recipes/vit_imagenet.py: Python puts this file's folder first on sys.path
    from common.config import TrainConfig, opt, parse_config
    from common.data import digits_images, load_image_data
    from common.tasks import classification_task
    from common.train import train

VIT_SIZES = {  # hidden, layers, heads, patch (MLP 4x hidden)
    "vit_s16": (384, 12, 6, 16),
    "vit_b16": (768, 12, 12, 16),
}


@dataclass
class ViTRecipeConfig(TrainConfig):
    data_dir: str | None = opt(None, "ImageNet-style folder with train/<class>/ and val/<class>/ images.")
    dataset: str | None = opt(None, "A Hugging Face image dataset saved with save_to_disk.")
    model: Literal["tiny", "vit_s16", "vit_b16"] = opt("tiny", "The ViT size.")
    image_size: int | None = opt(None, "Image side in pixels (None: 32 for tiny, 224 otherwise).")
    patch_size: int = opt(8, "Patch side in pixels (tiny only).")
    hidden: int = opt(64, "Hidden size (tiny only).")
    layers: int = opt(4, "Transformer layers (tiny only).")
    heads: int = opt(4, "Attention heads (tiny only).")
    dropout: float = opt(0.0, "Dropout of hidden states and attention probabilities.")
    label_smoothing: float = opt(0.0, "Label smoothing of the training loss.")
    attn_implementation: Literal["eager", "sdpa"] = opt("sdpa", "transformers' attention implementation.")
    output_dir: str = opt("outputs/vit_imagenet", "Folder for metrics, W&B run, plots and checkpoints.")

    def validate(self):
        super().validate()
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
        fsdp_block="ViTLayer",  # not _no_split_modules: accelerate would also wrap ViTEmbeddings and then fail
    )
    return train(cfg, task)


if __name__ == "__main__":
    main()
