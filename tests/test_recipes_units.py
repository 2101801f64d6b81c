"""Fast in-process checks of the recipes' building blocks: config parsing, data, transforms, optimizers."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch

from recipes.common import data as D
from recipes.common.config import parse_config
from recipes.common.optim import MuonWithAdamW, build_optimizer, warmup_cosine
from recipes.vit_imagenet import ViTRecipeConfig, build_model
from spectral_dist.optim import SpectralNewton

ROOT = Path(__file__).resolve().parents[1]


def test_config_precedence_and_errors(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text(
        "lr: 0.01\nhidden: 48\nbetas: [0.8, 0.9]\nmixed_precision: bf16\nprogress: false\nresume: null\n"
    )
    cfg = parse_config(ViTRecipeConfig, ["--config", str(y), "--lr", "0.02", "--resume", "none"])
    assert cfg.lr == 0.02 and cfg.hidden == 48 and cfg.betas == [0.8, 0.9] and cfg.resume is None
    assert cfg.image_size == 32 and cfg.mixed_precision == "bf16" and cfg.progress is False
    assert parse_config(ViTRecipeConfig, ["--model", "vit_s16"]).image_size == 224
    assert parse_config(ViTRecipeConfig, ["--progress", "false"]).progress is False
    assert parse_config(ViTRecipeConfig, ["--config", str(y), "--progress", "true"]).progress is True
    assert parse_config(ViTRecipeConfig, ["--betas", "0.5", "0.6"]).betas == [0.5, 0.6]
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    typed = tmp_path / "typed.yaml"
    typed.write_text("max_steps: 1.5\n")
    for argv, says in (
        (["--config", str(bad)], "unknown field 'learning_rate'"),
        (
            ["--config", str(typed)],
            f"--config {typed}: argument --max_steps/--max-steps: invalid int value: '1.5'",
        ),
        (["--optimizer", "sgd"], "invalid choice"),
        (["--max_steps", "1.5"], "invalid int value"),
        (["--model", "vit_h14"], "invalid choice"),
        (["--image_size", "30"], "not a multiple of the patch size"),
        (["--data_dir", "a", "--dataset", "b"], "at most one of"),
        (["--mixed_precision", "fp8"], "--mixed_precision must be"),
        (["--betas", "0.9"], "--betas takes two values"),
        (["--config", str(tmp_path / "missing.yaml")], "no such file"),
    ):
        with pytest.raises(SystemExit):
            parse_config(ViTRecipeConfig, argv)
        assert says in capsys.readouterr().err, argv


@pytest.mark.parametrize("recipe", ["vit_imagenet", "resnet_cifar", "gpt_lm"])
def test_help_shows_every_default_and_a_sentence(recipe, capsys):
    """``--help``: every flag of the recipe's config with a sentence of help and its default."""
    import argparse
    import dataclasses
    import importlib

    mod = importlib.import_module(f"recipes.{recipe}")
    cls = next(v for k, v in vars(mod).items() if k.endswith("RecipeConfig"))
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps lines
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        assert len(help_text.split()) >= 2 and help_text.endswith("."), (f.name, help_text)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert f"--{f.name}" in text, f.name
        assert f"{' '.join(help_text.split())} (default: {default})" in text, (f.name, help_text, default)
    assert isinstance(argparse.ArgumentDefaultsHelpFormatter, type)


def test_sampler_resumes_exactly_and_shards():
    full = D.ResumableSampler(50, 4, rank=0, world_size=1, seed=3)
    it = iter(full)
    seq = [next(it) for _ in range(30)]  # crosses epochs (12 batches per epoch)
    resumed = iter(D.ResumableSampler(50, 4, seed=3, start=17))
    assert [next(resumed) for _ in range(13)] == seq[17:]
    assert {e for b in seq for _, e in b} == {0, 1, 2}
    epoch0 = [i for b in seq[:12] for i, _ in b]
    assert len(set(epoch0)) == 48  # no repeats within an epoch
    r0 = iter(D.ResumableSampler(50, 2, rank=0, world_size=2, seed=3))
    r1 = iter(D.ResumableSampler(50, 2, rank=1, world_size=2, seed=3))
    for _ in range(5):
        assert next(r0) + next(r1) == seq.pop(0)  # the two ranks split each global batch
    with pytest.raises(ValueError, match="smaller than one global batch"):
        D.ResumableSampler(5, 4, world_size=2)


def test_eval_batches_are_padded_to_the_same_count():
    b0 = D.eval_index_batches(11, 4, 0, 2)
    b1 = D.eval_index_batches(11, 4, 1, 2)
    assert len(b0) == len(b1) == 2
    seen = [i for idx, m in b0 + b1 for i, k in zip(idx, m) if k]
    assert sorted(seen) == list(range(11))
    assert all(len(idx) == 4 for idx, _ in b0 + b1)


def test_pil_transforms():
    from PIL import Image

    img = Image.new("RGB", (50, 30), (255, 0, 0))
    out = D.random_resized_crop(img, 16, random.Random(0))
    assert out.size == (16, 16)
    assert D.center_crop_resize(img, 16).size == (16, 16)
    x = D.pil_to_tensor(out)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[0], torch.full((16, 16), (1 - 0.485) / 0.229), atol=1e-3)
    a = D.random_resized_crop(Image.radial_gradient("L").convert("RGB"), 8, random.Random(5))
    b = D.random_resized_crop(Image.radial_gradient("L").convert("RGB"), 8, random.Random(5))
    assert list(a.getdata()) == list(b.getdata())  # seeded: reproducible per (seed, epoch, index)


def test_image_folder_and_cifar(tmp_path):
    from test_recipes import make_cifar_folder, make_jpeg_folder

    root = make_jpeg_folder(tmp_path / "inet", classes=2, per_class=(3, 1))
    train, val = D.load_image_data(data_dir=root, image_size=24, seed=1)
    assert (len(train), len(val), train.num_classes) == (6, 2, 2)
    x, y = train[(4, 0)]
    assert x.shape == (3, 24, 24) and y == 1
    assert torch.equal(train[(4, 0)][0], x) and not torch.equal(train[(4, 1)][0], x)
    assert torch.equal(val[0][0], val[0][0])
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        D.load_image_data(data_dir=tmp_path, image_size=24)
    c = make_cifar_folder(tmp_path / "c", per_batch=4)
    tr, te = D.cifar10_images(c.parent)
    assert (len(tr), len(te), tr[(0, 0)][0].shape) == (20, 4, (3, 32, 32))
    (c / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        D.cifar10_images(c)


def _python2_pickle(obj) -> bytes:
    """``obj`` pickled as the official CIFAR-10 batches were (Python 2, protocol 2, numpy 1): bytes as Python 2
    str opcodes and ``numpy.core.multiarray._reconstruct`` (Python 3 would write ``_codecs.encode`` calls)."""
    import io
    import pickle
    import struct

    class Py2Pickler(pickle._Pickler):
        dispatch = dict(pickle._Pickler.dispatch)

        def save_str8(self, b):
            n = len(b)
            self.write(
                pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
            )
            self.write(b)
            self.memoize(b)

        dispatch[bytes] = save_str8

    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    data = f.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"_codecs" not in data and b"numpy.core.multiarray\n_reconstruct" in data
    return data


def test_cifar_batch_in_the_official_format(tmp_path):
    """The restricted unpickler reads a batch laid out as in cifar-10-python.tar.gz, and checks the layout."""
    import numpy as np
    from test_recipes import make_cifar_folder

    c = make_cifar_folder(tmp_path / "c", per_batch=4)
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 1, 4, 1], b"data": data}
    batch[b"filenames"] = [b"a.png", b"b.png", b"c.png", b"d.png"]
    (c / "test_batch").write_bytes(_python2_pickle(batch))
    _, te = D.cifar10_images(c)
    assert te.y.tolist() == [3, 1, 4, 1]
    x = torch.from_numpy(data.reshape(4, 3, 32, 32)).float() / 255
    mean, std = torch.tensor((0.4914, 0.4822, 0.4465)), torch.tensor((0.2470, 0.2435, 0.2616))
    assert torch.allclose(te.x, (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), atol=1e-6)
    for bad, match in (
        (batch | {b"data": data.astype(np.int64)}, "uint8 array"),
        (batch | {b"labels": [3, 1]}, "list of 4 ints"),
        ([batch], "not a CIFAR-10 batch"),
    ):
        (c / "test_batch").write_bytes(_python2_pickle(bad))
        with pytest.raises(ValueError, match=match):
            D.cifar10_images(c)


def test_hf_dataset_on_disk(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    imgs = [Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)) for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 2, 0, 1, 2]})
    ds = ds.cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(tmp_path / "ds"))
    train, val = D.load_image_data(dataset=tmp_path / "ds", image_size=16)
    assert (len(train), len(val), train.num_classes) == (6, 3, 3)
    assert train[(0, 0)][0].shape == (3, 16, 16)
    text = datasets.Dataset.from_dict({"text": ["abc" * 50, "def" * 50]})
    text.save_to_disk(str(tmp_path / "txt"))
    tr, va = D.text_corpus(dataset=tmp_path / "txt")
    assert tr.numel() + va.numel() == 302 and tr.dtype == torch.uint8


def test_stdlib_corpus_is_deterministic():
    a_tr, a_va = D.stdlib_corpus(max_bytes=100_000)
    b_tr, b_va = D.stdlib_corpus(max_bytes=100_000)
    assert torch.equal(a_tr, b_tr) and torch.equal(a_va, b_va)
    assert a_tr.numel() >= 100_000 and a_va.numel() > 0
    chunks = D.TokenChunks(a_tr, 16)
    assert chunks[(3, 0)].shape == (17,) and torch.equal(chunks[3][1:], a_tr[49:65].long())


@pytest.mark.parametrize("name", ["adamw", "spectral_newton", "muon"])
def test_optimizers_step_and_round_trip(name):
    cfg = parse_config(
        ViTRecipeConfig, ["--optimizer", name, "--hidden", "16", "--layers", "1", "--heads", "2"]
    )
    model = build_model(cfg, 3)
    opt = build_optimizer(cfg, model)
    sched = warmup_cosine(opt, 2, 10, 0.1)
    kind = {"adamw": torch.optim.AdamW, "spectral_newton": SpectralNewton, "muon": MuonWithAdamW}[name]
    assert isinstance(opt, kind)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(x).logits, y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(g["lr"] > 0 for g in opt.param_groups)
    sd = opt.state_dict()
    model2 = copy.deepcopy(model)
    opt2 = build_optimizer(cfg, model2)
    opt2.load_state_dict(copy.deepcopy(sd))
    # the whole state dict comes back: hyperparameters and every per-parameter state tensor, by key
    tensors = _assert_same_state(opt2.state_dict(), sd)
    assert tensors >= sum(1 for p in model.parameters() if p.requires_grad), tensors
    # and training continues identically for a step
    for m, o in ((model, opt), (model2, opt2)):
        torch.nn.functional.cross_entropy(m(x).logits, y).backward()
        o.step()
        o.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    _assert_same_state(opt2.state_dict(), opt.state_dict())


def _assert_same_state(got, want, path="state_dict") -> int:
    """Recursive equality of two state dicts (tensors with torch.equal); returns how many tensors it compared."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), path
        return 1
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (
            path,
            sorted(map(str, got)),
            sorted(map(str, want)),
        )
        return sum(_assert_same_state(got[k], want[k], f"{path}[{k!r}]") for k in want)
    if isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), path
        return sum(_assert_same_state(g, w, f"{path}[{i}]") for i, (g, w) in enumerate(zip(got, want)))
    assert got == want, (path, got, want)
    return 0


def test_muon_needs_hidden_matrices():
    from recipes.resnet_cifar import ResNet, ResNetRecipeConfig

    cfg = parse_config(ResNetRecipeConfig, ["--optimizer", "muon"])
    with pytest.raises(ValueError, match="no 2-D hidden matrices"):
        build_optimizer(cfg, ResNet(4, 1, 1))


def test_accelerate_and_recipe_configs_are_valid():
    import yaml

    from recipes.gpt_lm import GPTRecipeConfig
    from recipes.resnet_cifar import ResNetRecipeConfig

    kinds = {}
    for f in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        c = yaml.safe_load(f.read_text())
        kinds[f.stem] = c["distributed_type"]
        ds = (c.get("deepspeed_config") or {}).get("deepspeed_config_file")
        assert ds is None or (ROOT / ds).is_file(), (f.name, ds)
    assert {
        kinds[k] for k in ("cpu", "multi_gpu", "fsdp2", "deepspeed_zero2", "deepspeed_zero3", "multi_node")
    } == {
        "NO",
        "MULTI_GPU",
        "FSDP",
        "DEEPSPEED",
    }
    recipe_cls = {"vit": ViTRecipeConfig, "resnet": ResNetRecipeConfig, "gpt": GPTRecipeConfig}
    files = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
    assert len(files) >= 7
    for f in files:
        cls = next(c for k, c in recipe_cls.items() if f.stem.startswith(k))
        cfg = parse_config(cls, ["--config", str(f)])
        assert cfg.max_steps >= 1


def test_jacobi_steps_reach_the_recipes_optimizer():
    """--jacobi_steps (and --basis) reach every SpectralNewton group the recipe builds; bad values are refused."""
    argv = ["--optimizer", "spectral_newton", "--hidden", "16", "--layers", "1", "--heads", "2"]
    cfg = parse_config(ViTRecipeConfig, argv + ["--basis", "auto", "--jacobi_steps", "2"])
    opt = build_optimizer(cfg, build_model(cfg, 3))
    assert {(g["jacobi_steps"], g["basis"]) for g in opt.param_groups} == {(2, "auto")}
    bad = parse_config(ViTRecipeConfig, argv + ["--jacobi_steps", "-1"])
    with pytest.raises(ValueError, match="jacobi_steps must be an integer >= 0"):
        build_optimizer(bad, build_model(bad, 3))
