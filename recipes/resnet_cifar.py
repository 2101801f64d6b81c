"""ResNet image classification (convolutions: alpha ~ 2) with SpectralNewton, AdamW or Muon.

    accelerate launch -m recipes.resnet_cifar                                   # digits, a few CPU minutes
    accelerate launch -m recipes.resnet_cifar --config configs/recipes/resnet_cifar.yaml \
        --data_dir /data/cifar-10-batches-py                                    # CIFAR-10

Data: scikit-learn's digits upsampled to 32x32 RGB (default), or CIFAR-10 from its python-pickle folder
(``cifar-10-batches-py`` with data_batch_1..5 and test_batch; reflect-pad-4 crop + flip augmentation).
The batches are pickles by the data set's design: point ``--data_dir`` at a trusted copy (the official
cifar-10-python.tar.gz). They are read with a restricted unpickler that rebuilds numpy arrays and refuses
every other global, so a tampered file is refused instead of running code.

Model: a CIFAR-style ResNet (3x3 stem, stages of basic blocks with BatchNorm, stride-2 between stages,
global average pool, linear head). Conv kernels are the matrices SpectralNewton preconditions with
alpha = 2 under ``--alpha by_layer``; Muon (2-D matrices only) leaves them to AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

if __package__:  # python -m recipes.resnet_cifar, accelerate launch -m recipes.resnet_cifar
    from .common.config import TrainConfig, opt, parse_config
    from .common.data import cifar10_images, digits_images
    from .common.tasks import classification_task
    from .common.train import train
else:  # accelerate launch recipes/resnet_cifar.py: Python puts this file's folder first on sys.path
    from common.config import TrainConfig, opt, parse_config
    from common.data import cifar10_images, digits_images
    from common.tasks import classification_task
    from common.train import train


@dataclass
class ResNetRecipeConfig(TrainConfig):
    data_dir: str | None = opt(
        None, "CIFAR-10 cifar-10-batches-py folder (or its parent), a trusted copy (None: digits)."
    )
    width: int = opt(16, "Channels of the first stage; doubled at each later stage.")
    stages: int = opt(3, "Stages of the ResNet.")
    blocks: int = opt(1, "Basic blocks per stage (ResNet-20: 3).")
    label_smoothing: float = opt(0.0, "Label smoothing of the training loss.")
    lr: float = opt(2e-3, "Peak learning rate of the matrix step (of all parameters under adamw).")
    output_dir: str = opt("outputs/resnet_cifar", "Folder for metrics, W&B run, plots and checkpoints.")

    def validate(self):
        super().validate()
        for name in ("width", "stages", "blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, width: int = 16, stages: int = 3, blocks: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, cin = [], width
        for s in range(stages):
            cout = width * 2**s
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if (s > 0 and b == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def main(argv=None):
    cfg = parse_config(ResNetRecipeConfig, argv, description=__doc__.split("\n")[0])
    if cfg.data_dir:
        train_data, val_data = cifar10_images(cfg.data_dir, seed=cfg.seed)
    else:
        train_data, val_data = digits_images(size=32, seed=cfg.seed)
    task = classification_task(
        "resnet_cifar",
        lambda c: ResNet(c.width, c.stages, c.blocks, train_data.num_classes),
        train_data,
        val_data,
        cfg.label_smoothing,
        fsdp_block="BasicBlock",
    )
    return train(cfg, task)


if __name__ == "__main__":
    main()
