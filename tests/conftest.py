"""Test-session environment: offline, CPU DeepSpeed, one intra-op thread per process.

Set before any test imports torch/deepspeed/wandb, and inherited by the processes that the distributed,
DeepSpeed and `accelerate launch` tests spawn: with 2-4 ranks on a 2-core machine, more than one thread per
process oversubscribes the cores and slows the suite several-fold.
"""

import os

import pytest

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


@pytest.fixture
def one_thread():
    """Single-threaded torch for tiny problems: intra-op threads only add contention on the shared 2-core
    test machine (tiny float64 eigenproblems ran 35x slower with 2). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch  # here, not at the top: the environment above must be set before torch loads

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
