"""GPT-2-style byte-level language model with SpectralNewton, AdamW or Muon.

    accelerate launch -m recipes.gpt_lm                               # the stdlib's own source, CPU minutes
    accelerate launch -m recipes.gpt_lm --data_path corpus.parquet --text_column text
    accelerate launch -m recipes.gpt_lm --dataset /data/my_text_dataset   # datasets.save_to_disk

Data: bytes (vocabulary 256, no tokenizer to download) of the Python standard library's ``*.py`` files in
sorted path order, every 20th file held out (default); a text file or a parquet file (``--data_path``); or a
text dataset saved on disk (``--dataset``). Windows of ``seq_len + 1`` bytes, drawn in a seeded order.

Model: transformers' GPT2LMHeadModel built from a GPT2Config (no downloads).
Metrics: val/loss (nats per byte), val/bpb (bits per byte), val/ppl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F

if __package__:  # python -m recipes.gpt_lm, accelerate launch -m recipes.gpt_lm
    from .common.config import TrainConfig, opt, parse_config
    from .common.data import TokenChunks, collate_tokens, stdlib_corpus, text_corpus
    from .common.train import Task, train
else:  # accelerate launch recipes/gpt_lm.py: Python puts this file's folder first on sys.path
    from common.config import TrainConfig, opt, parse_config
    from common.data import TokenChunks, collate_tokens, stdlib_corpus, text_corpus
    from common.train import Task, train


@dataclass
class GPTRecipeConfig(TrainConfig):
    data_path: str | None = opt(
        None, "A text file (.txt or any other) or a .parquet file (None: the stdlib)."
    )
    dataset: str | None = opt(None, "A Hugging Face text dataset saved with save_to_disk.")
    text_column: str = opt("text", "The text column of a parquet file or dataset.")
    max_corpus_bytes: int = opt(4_000_000, "Use at most this many bytes of the corpus (0: no limit).")
    seq_len: int = opt(128, "Context length in bytes.")
    n_embd: int = opt(128, "Embedding size.")
    n_layer: int = opt(4, "Transformer layers.")
    n_head: int = opt(4, "Attention heads.")
    dropout: float = opt(0.0, "Dropout of residuals, embeddings and attention.")
    attn_implementation: Literal["eager", "sdpa"] = opt("sdpa", "transformers' attention implementation.")
    batch_size: int = opt(16, "Sequences per process in each micro-batch.")
    lr: float = opt(2e-3, "Peak learning rate of the matrix step (of all parameters under adamw).")
    weight_decay: float = opt(0.1, "Decoupled weight decay (none on norms, biases and embeddings).")
    eval_batches: int = opt(20, "Batches per evaluation (0: the whole validation split).")
    output_dir: str = opt("outputs/gpt_lm", "Folder for metrics, W&B run, plots and checkpoints.")

    def validate(self):
        super().validate()
        if self.data_path and self.dataset:
            raise ValueError("give at most one of --data_path and --dataset")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}")
        if self.seq_len < 2:
            raise ValueError(f"--seq_len must be >= 2, got {self.seq_len}")


def build_model(cfg: GPTRecipeConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    gc = GPT2Config(
        vocab_size=256,
        n_positions=cfg.seq_len,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    gc._attn_implementation = cfg.attn_implementation
    return GPT2LMHeadModel(gc)


def lm_loss(model, batch):
    """Next-byte cross-entropy; ``batch`` is (n, seq_len + 1) token ids."""
    logits = model(input_ids=batch[:, :-1]).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def lm_eval(model, batch, mask):
    logits = model(input_ids=batch[:, :-1]).logits.float()
    nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").sum(-1)
    m = mask.to(nll.dtype)
    return {"nll_sum": (nll * m).sum(), "tokens": m.sum() * (batch.shape[1] - 1)}


def lm_metrics(sums):
    loss = sums["nll_sum"] / max(sums["tokens"], 1.0)
    return {"val/loss": loss, "val/bpb": loss / math.log(2), "val/ppl": math.exp(min(loss, 50.0))}


def main(argv=None):
    cfg = parse_config(GPTRecipeConfig, argv, description=__doc__.split("\n")[0])
    if cfg.data_path or cfg.dataset:
        train_tok, val_tok = text_corpus(
            cfg.data_path, cfg.dataset, cfg.text_column, max_bytes=cfg.max_corpus_bytes
        )
    else:
        train_tok, val_tok = stdlib_corpus(max_bytes=cfg.max_corpus_bytes)
    task = Task(
        name="gpt_lm",
        build_model=build_model,
        train_data=TokenChunks(train_tok, cfg.seq_len),
        val_data=TokenChunks(val_tok, cfg.seq_len),
        collate=collate_tokens,
        loss_fn=lm_loss,
        eval_fn=lm_eval,
        eval_metrics=lm_metrics,
        main_metric="val/loss",
        fsdp_block="GPT2Block",
    )
    return train(cfg, task)


if __name__ == "__main__":
    main()
