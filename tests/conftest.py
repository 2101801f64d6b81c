"""Test-session environment: offline, CPU DeepSpeed, one intra-op thread per process.

Set before any test imports torch/deepspeed/wandb, and inherited by the processes that the distributed,
DeepSpeed and `accelerate launch` tests spawn: with 2-4 ranks on a 2-core machine, more than one thread per
process oversubscribes the cores and slows the suite several-fold.
"""

import os

for key, value in {
    "DS_ACCELERATOR": "cpu",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)
