"""Loss and evaluation functions shared by the image recipes, and their task."""

from __future__ import annotations

import torch.nn.functional as F

from .data import collate_images
from .train import Task

__all__ = [
    "logits_of",
    "classification_loss_fn",
    "classification_eval",
    "classification_metrics",
    "classification_task",
]


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def classification_loss_fn(label_smoothing: float = 0.0):
    """``loss_fn(model, (x, y))``: cross-entropy, computed in float32."""

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(logits_of(model(x)).float(), y, label_smoothing=label_smoothing)

    return loss_fn


def classification_eval(model, batch, mask):
    x, y = batch
    logits = logits_of(model(x)).float()
    m = mask.to(logits.dtype)
    loss = F.cross_entropy(logits, y, reduction="none")
    correct = (logits.argmax(-1) == y).to(logits.dtype)
    return {"loss_sum": (loss * m).sum(), "correct": (correct * m).sum(), "count": m.sum()}


def classification_metrics(sums):
    n = max(sums["count"], 1.0)
    return {"val/loss": sums["loss_sum"] / n, "val/acc": sums["correct"] / n}


def classification_task(
    name: str, build_model, train_data, val_data, label_smoothing: float = 0.0, fsdp_block: str | None = None
) -> Task:
    """The image-classification :class:`Task` of the ViT and ResNet recipes (val/acc is the main metric)."""
    return Task(
        name=name,
        build_model=build_model,
        train_data=train_data,
        val_data=val_data,
        collate=collate_images,
        loss_fn=classification_loss_fn(label_smoothing),
        eval_fn=classification_eval,
        eval_metrics=classification_metrics,
        main_metric="val/acc",
        fsdp_block=fsdp_block,
    )
