"""The caller's reduced-precision settings (TF32 / bf16 float32 matmuls, autocast around the whole training step)
do not reach the optimizer's matrix math, and are restored after the step.

On this CPU ``torch.set_float32_matmul_precision("medium")`` and ``torch.backends.mkldnn.matmul.fp32_precision =
"bf16"`` make float32 matmuls run in bf16 passes, and CPU autocast runs mm/bmm in bf16: the same mechanisms
as TF32 and CUDA autocast on a GPU, so the guard is checked here bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spectral_dist import SpectralNewton
from spectral_dist.spectral.precision import exact_matmuls


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(48, 48),  # alpha 1.65: the eigenbasis
        nn.GELU(),
        nn.Linear(48, 96),  # alpha 2: Cholesky
        nn.GELU(),
        nn.Linear(96, 48),  # alpha 1: Polar Express
    )


def _trained(settings, steps: int = 3) -> list[torch.Tensor]:
    """``steps`` steps with the gradients computed in default precision; ``settings`` wraps opt.step() only."""
    model = _net()
    opt = SpectralNewton(
        [
            dict(params=[model[0].weight], alpha=1.65),
            dict(params=[model[2].weight], alpha=2.0),
            dict(params=[model[4].weight], alpha=1.0),
            dict(params=[p for n, p in model.named_parameters() if n.endswith("bias")]),
        ],
        lr=0.02,
        distributed=False,
    )
    for t in range(steps):
        x = torch.randn(64, 48, generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        with settings():
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


class _Legacy:
    """torch.set_float32_matmul_precision("medium") for the block (what ``"high"`` is to TF32 on a GPU)."""

    def __enter__(self):
        torch.set_float32_matmul_precision("medium")

    def __exit__(self, *exc):
        assert torch.get_float32_matmul_precision() == "medium", "the caller's setting was not restored"
        torch.set_float32_matmul_precision("highest")


class _Backend:
    """The per-backend API: float32 matmuls on CPU in bf16 passes, CUDA's in TF32."""

    def __enter__(self):
        self.before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.cuda.matmul.fp32_precision = "tf32"

    def __exit__(self, *exc):
        now = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = self.before
        assert now == ("tf32", "bf16"), f"the caller's setting was not restored: {now}"


class _Autocast:
    def __enter__(self):
        self.ctx = torch.autocast("cpu", torch.bfloat16)
        self.ctx.__enter__()

    def __exit__(self, *exc):
        on = torch.is_autocast_enabled("cpu")
        self.ctx.__exit__(*exc)
        assert on, "autocast was not restored"


class _Default:
    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


@pytest.fixture(autouse=True)
def _clean_precision():
    yield
    torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize(
    "settings", [_Legacy, _Backend, _Autocast], ids=["legacy_api", "backend_api", "autocast"]
)
def test_reduced_precision_settings_do_not_change_the_step(settings):
    """Three steps at alpha 1.65, 2 and 1 with opt.step() under the setting equal the default run bit for bit,
    and the setting is back on after every step (asserted on leaving the block)."""
    # the setting does lower this CPU's matmuls, so the check below can fail
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    with settings():
        low = a @ b
    assert not torch.equal(low, a @ b), "this setting does not change a float32 matmul here"
    ref = _trained(_Default)
    got = _trained(settings)
    for p, q in zip(got, ref):
        assert torch.equal(p, q), (p - q).abs().max()


def test_exact_matmuls_restores_after_an_exception():
    torch.set_float32_matmul_precision("high")
    with pytest.raises(ZeroDivisionError), exact_matmuls():
        assert torch.get_float32_matmul_precision() == "highest"
        raise ZeroDivisionError
    assert torch.get_float32_matmul_precision() == "high"
    # a legacy setting leaves the per-backend values it wrote as they were
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_the_owner_math_runs_exact_under_tf32_settings(monkeypatch):
    """The guard sits where the step's matrix math starts (every engine's owner computes through it): a spy
    on the batched kernels sees IEEE float32 and no autocast while the caller asked for TF32 and autocast."""
    from spectral_dist.optim import matrix_step as ms

    seen = []
    real = ms.direction_unchecked

    def spy(*args, **kwargs):
        seen.append((torch.get_float32_matmul_precision(), torch.is_autocast_enabled("cpu")))
        return real(*args, **kwargs)

    monkeypatch.setattr(ms, "direction_unchecked", spy)
    model = copy.deepcopy(_net())
    opt = SpectralNewton(model.parameters(), lr=0.01, alpha=1.0, distributed=False)
    model(torch.randn(8, 48)).sum().backward()
    torch.set_float32_matmul_precision("high")
    with torch.autocast("cpu", torch.bfloat16):
        opt.step()
    assert seen and all(s == ("highest", False) for s in seen), seen
    assert torch.get_float32_matmul_precision() == "high"
