"""AutoAlpha writes probe-estimated, EMA'd and clamped exponents that SpectralNewton(alpha="auto") uses."""

import math

import pytest
import torch

from spectral_dist.models import classification_loss, tiny_mlp
from spectral_dist.optim import DEFAULT_ALPHA, AutoAlpha, SpectralNewton
from spectral_dist.probes import CurvatureProbe

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(alpha="auto"):
    torch.manual_seed(0)
    model = tiny_mlp(in_dim=6, hidden=12, out_dim=3, depth=2).double()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(24, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g))
    opt = SpectralNewton.from_model(model, alpha=alpha, lr=0.02)
    return model, batch, opt


def _used_alphas(opt):
    return {name: opt.resolve_alpha(p, g) for name, p, g in opt.named_params() if opt.is_matrix(p, g)}


def test_auto_alpha_changes_the_alpha_used():
    model, batch, opt = _setup()
    auto = AutoAlpha(
        opt, model, classification_loss, every=3, ema=0.5, clamp=(0.0, 2.5), top_k=6, mode="per_layer"
    )
    assert set(auto.targets) == {"0.weight", "2.weight"}  # the head (4.weight) is AdamW
    before = _used_alphas(opt)
    assert before == {n: DEFAULT_ALPHA["matrix"] for n in before}
    exact = CurvatureProbe(model, classification_loss, top_k=6, hvp="fd", layers=list(auto.targets)).measure(
        batch
    )
    rep = auto.maybe_update(0, batch)  # a probe step: returns the probe's report, whose alphas it applied
    assert rep is auto.last_report and set(auto.targets) <= set(rep.layers)
    assert all(abs(rep.layers[n].alpha - exact.layers[n].alpha) < 1e-6 for n in auto.targets)
    after = _used_alphas(opt)
    for n, a in after.items():
        expect = min(2.5, max(0.0, exact.layers[n].alpha))
        assert math.isfinite(expect) and abs(a - expect) < 1e-6  # first probe: no EMA history yet
        assert a != before[n]
    # not a probe step: nothing changes
    assert auto.maybe_update(1, batch) is None and _used_alphas(opt) == after
    # the optimizer's step uses the estimate: compare with a fixed-alpha twin
    model2, _, opt2 = _setup(alpha=1.0)
    for o, m in ((opt, model), (opt2, model2)):
        o.zero_grad()
        classification_loss(m, batch).backward()
        o.step()
    assert not torch.equal(model[0].weight, model2[0].weight)


def test_ema_and_clamp():
    model, batch, opt = _setup()
    auto = AutoAlpha(
        opt, model, classification_loss, every=1, ema=0.75, clamp=(0.0, 1.2), top_k=6, mode="per_layer"
    )
    p = auto.targets["0.weight"]
    opt.state[p]["alpha_estimate"] = 0.2
    rep = auto.update(batch)
    a = rep.layers["0.weight"].alpha
    assert auto.estimates()["0.weight"] == pytest.approx(min(1.2, 0.75 * 0.2 + 0.25 * a))
    assert all(0.0 <= v <= 1.2 for v in auto.estimates().values())
    assert auto.gradient_equivalents == rep.cost["gradient_equivalents"] == 1 + 2 * rep.cost["hvps"]


def test_all_layers_default_cost_and_validation():
    model, batch, opt = _setup()
    auto = AutoAlpha(opt, model, classification_loss)
    rep = auto.update(batch)
    assert rep.estimator == "all_layers" and rep.cost["hvps"] == 8 * 2
    assert rep.cost["gradient_equivalents"] == 33
    with pytest.raises(ValueError, match="every"):
        AutoAlpha(opt, model, classification_loss, every=0)
    with pytest.raises(ValueError, match="ema"):
        AutoAlpha(opt, model, classification_loss, ema=1.0)
    with pytest.raises(ValueError, match="alpha='auto'"):
        AutoAlpha(_setup(alpha=1.0)[2], model, classification_loss)
