"""GPT-2-style byte-level language model with SpectralNewton, AdamW or Muon.

    accelerate launch recipes/gpt_lm.py                               # the stdlib's own source, CPU minutes
    accelerate launch recipes/gpt_lm.py --data_path corpus.parquet --text_column text
    accelerate launch recipes/gpt_lm.py --dataset /data/my_text_dataset   # datasets.save_to_disk

Data: bytes (vocabulary 256, no tokenizer to download) of the Python standard library's ``*.py`` files in
sorted path order, every 20th file held out (default); a text file or a parquet file (``--data_path``); or a
text dataset saved on disk (``--dataset``). Windows of ``seq_len + 1`` bytes, drawn in a seeded order.

Model: transformers' GPT2LMHeadModel built from a GPT2Config (no downloads).
Metrics: val/loss (nats per byte), val/bpb (bits per byte), val/ppl.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.config import TrainConfig, parse_config  # noqa: E402
from common.data import TokenChunks, collate_tokens, stdlib_corpus, text_corpus  # noqa: E402
from common.train import Task, train  # noqa: E402


@dataclass
class GPTRecipeConfig(TrainConfig):
    data_path: str | None = None  # .txt (any text file) or .parquet
    dataset: str | None = None  # datasets.load_from_disk path
    text_column: str = "text"
    max_corpus_bytes: int = 4_000_000  # 0: no limit
    seq_len: int = 128
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.0
    attn_implementation: str = "sdpa"
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1
    eval_batches: int = 20
    output_dir: str = "outputs/gpt_lm"

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
    )
    return train(cfg, task)


if __name__ == "__main__":
    main()
