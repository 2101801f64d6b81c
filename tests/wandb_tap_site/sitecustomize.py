"""Test-only start-up hook (on PYTHONPATH only in processes a test starts through ``wandb_tap.env``): record
the process's ``wandb.Run.log`` calls (see tests/wandb_tap.py)."""

import os

if os.environ.get("SPECTRAL_DIST_TEST_WANDB_TAP"):
    import wandb_tap

    wandb_tap.install(os.environ["SPECTRAL_DIST_TEST_WANDB_TAP"])
