"""The probe leaves training untouched: parameters, buffers, .grad, optimizer state, RNG and mode flags."""

import pytest
import torch

from spectral_dist.models import classification_loss, image_batch, tiny_cnn
from spectral_dist.optim import SpectralNewton
from spectral_dist.probes import BACKENDS, CurvatureProbe, make_hvp, preserve_training_state

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained():
    torch.manual_seed(0)
    model = tiny_cnn(in_ch=1, width=2, num_classes=3, image_size=4, batchnorm=True, dropout=0.3).to(D)
    batch = image_batch(6, channels=1, size=4, num_classes=3, seed=1, dtype=D)
    opt = SpectralNewton.from_model(model, lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        classification_loss(model, batch).backward()
        opt.step()
    classification_loss(model, batch).backward()  # leave a live .grad and updated running stats
    model.train()
    return model, batch, opt


def _snapshot(model, opt):
    return dict(
        params=[p.detach().clone() for p in model.parameters()],
        grads=[p.grad.clone() for p in model.parameters()],
        grad_ids=[id(p.grad) for p in model.parameters()],
        buffers=[b.clone() for b in model.buffers()],
        modes=[m.training for m in model.modules()],
        rng=torch.get_rng_state(),
        opt={
            id(p): {k: (v.clone() if torch.is_tensor(v) else repr(v)) for k, v in st.items()}
            for p, st in opt.state.items()
        },
    )


def _assert_same(a, b):
    for k in ("params", "grads", "buffers"):
        assert len(a[k]) == len(b[k])
        for x, y in zip(a[k], b[k]):
            assert torch.equal(x, y), k
    assert a["grad_ids"] == b["grad_ids"]
    assert a["modes"] == b["modes"]
    assert torch.equal(a["rng"], b["rng"])
    assert a["opt"].keys() == b["opt"].keys()
    for pid in a["opt"]:
        sa, sb = a["opt"][pid], b["opt"][pid]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k], k


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_probe_leaves_batchnorm_dropout_model_untouched(mode):
    model, batch, opt = _trained()
    seen = []

    def loss_fn(m, b):
        seen.append((m.training, m.bn1.training, m.drop.training))
        return classification_loss(m, b)

    before = _snapshot(model, opt)
    for backend in BACKENDS:
        for est in ("per_layer", "all_layers"):
            CurvatureProbe(
                model, loss_fn, top_k=2, hvp=backend, mode=mode, estimator=est, samples=1, optimizer=opt
            ).measure(batch)
            _assert_same(before, _snapshot(model, opt))
    expect = mode == "train"
    assert seen and all(s == (expect, expect, expect) for s in seen)
    # the next draw of the global RNG is the one it would have been without the probe
    torch.set_rng_state(before["rng"])
    a = torch.rand(3)
    torch.set_rng_state(before["rng"])
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_restored_when_the_probe_raises(backend):
    model, batch, opt = _trained()
    calls = []
    fail_at = 3 if backend == "fd" else 2  # inside the HVPs (fd: between its two perturbed passes)

    def flaky(m, b):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("boom")
        return classification_loss(m, b)

    before = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match="boom"):
        CurvatureProbe(model, flaky, top_k=3, hvp=backend, optimizer=opt, kfac=False).measure(batch)
    _assert_same(before, _snapshot(model, opt))


def test_preserve_training_state_restores_everything_on_error():
    model, batch, opt = _trained()
    before = _snapshot(model, opt)
    with pytest.raises(ValueError):
        with preserve_training_state(model, opt):
            model.eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
                    p.grad.mul_(3.0)
                for b in model.buffers():
                    b.add_(1)
            for st in opt.state.values():
                for v in st.values():
                    if torch.is_tensor(v) and v.is_floating_point():
                        v.add_(1.0)
                st["extra"] = 1
            torch.rand(5)
            raise ValueError("x")
    _assert_same(before, _snapshot(model, opt))


def test_dropout_masks_shared_across_passes():
    """In train mode every backend sees the gradient pass's dropout mask, so they agree."""
    model, batch, _ = _trained()
    model.bn1 = torch.nn.Identity()  # keep dropout as the only train-mode randomness
    hs = {}
    for backend in BACKENDS:
        rep = CurvatureProbe(model, classification_loss, top_k=3, hvp=backend, mode="train").measure(batch)
        hs[backend] = torch.cat([lc.h for lc in rep.layers.values()])
    ref = hs["autograd"]
    assert (hs["func"] - ref).norm() < 1e-8 * ref.norm()
    assert (hs["fd"] - ref).norm() < 1e-5 * ref.norm()


def test_fd_restores_parameters_bitwise_and_counts_gradients():
    model, batch, _ = _trained()
    model.eval()
    params = [model.conv2.weight, model.fc.weight]
    saved = [p.detach().clone() for p in params]
    hvp = make_hvp(model, classification_loss, batch, params, backend="fd")
    for _ in range(3):
        hvp([torch.randn_like(p) for p in params])
    assert all(torch.equal(p, s) for p, s in zip(params, saved))
    assert hvp.gradient_evals == 6 and hvp.cost == 6.0 and hvp.calls == 3
