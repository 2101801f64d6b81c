"""``accelerate launch`` (the real CLI, 2 CPU processes) with a DeepSpeed config file naming spectral_newton.

Run as a script it is the training function that ``accelerate launch`` starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import free_port
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
STEPS, MICRO, WORLD = 3, 4, 2


def _options(stage: int) -> dict:
    cfg = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}_spectral_newton.json").read_text())
    return cfg["optimizer"]["params"]


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(STEPS * MICRO * WORLD, 2, 5, 5, generator=g), torch.randint(
        0, 5, (STEPS * MICRO * WORLD,), generator=g
    )


def main(out: str) -> None:
    import deepspeed
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from test_deepspeed import make_model

    from spectral_dist.integrations.accelerate import prepare_spectral_newton

    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])  # CPU: no backend otherwise
    assert acc.num_processes == WORLD and acc.distributed_type == "DEEPSPEED"
    x, y = _data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=MICRO, shuffle=False
    )
    model, opt, loader = prepare_spectral_newton(acc, make_model(0), loader)
    assert type(model.basic_optimizer).__name__ == "ZeroSpectralNewton"
    for xb, yb in loader:
        loss = nn.functional.cross_entropy(model(xb), yb)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
    params = list(model.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        final = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    if acc.is_main_process:
        torch.save({"final": final, "clip": model.gradient_clipping()}, out)
    acc.wait_for_everyone()


def reference(stage: int, clip: float) -> dict[str, torch.Tensor]:
    from test_deepspeed import make_model

    from spectral_dist.optim import LocalEngine, SpectralNewton

    opts = dict(_options(stage))
    opts["adamw_betas"] = tuple(opts["adamw_betas"])
    model = make_model(0)
    opt = SpectralNewton.from_model(model, engine=LocalEngine(), **opts)
    x, y = _data()
    n = MICRO * WORLD
    for s in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[s * n : (s + 1) * n]), y[s * n : (s + 1) * n]).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_launch_matches_single_process(tmp_path, stage):
    out = tmp_path / "result.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / f"deepspeed_test_zero{stage}.yaml"),
        "--main_process_port",
        str(free_port()),
        __file__,
        "--worker",
        str(out),
    ]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"accelerate launch timed out: {(e.stderr or '')[-3000:]}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    got = torch.load(out, weights_only=True)  # tensors and a float, written by the run above
    want = reference(stage, got["clip"])
    for name, w in want.items():
        rel = ((got["final"][name] - w).norm() / w.norm()).item()
        assert rel < 1e-5, (name, rel)
        assert not torch.equal(
            got["final"][name], dict(__import__("test_deepspeed").make_model(0).named_parameters())[name]
        )


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[2])
