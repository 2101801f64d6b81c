"""Packaging: a core install (torch, numpy) imports and steps SpectralNewton; each extra installs and imports;
an integration imported without its extra names the extra; the DeepSpeed extra follows the tested versions.

``test_fresh_environment`` builds a real virtual environment (no system site packages) as a user would: torch
from the usual pin first (``TORCH_SPEC``, as launch/setup.sh), then ``pip install .`` and each extra in turn.
pip takes packages from its cache, which launch/setup.sh has filled, so it costs installs, not downloads.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_OF = {  # an import of each integration and the extra its error must name
    "spectral_dist.deepspeed": "deepspeed",
    "spectral_dist.integrations.hf": "hf",
    "spectral_dist.reporting": "report",
    "spectral_dist.logging.plots": "recipes",
}
HEAVY = (
    "deepspeed",
    "transformers",
    "accelerate",
    "wandb",
    "pandas",
    "matplotlib",
    "datasets",
    "sklearn",
    "scipy",
)


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_core_dependencies_and_deepspeed_range_follow_the_tested_versions():
    from spectral_dist.integrations.deepspeed_compat import TESTED_VERSIONS

    project = _pyproject()["project"]
    assert [re.split(r"[<>=!~ ]", d)[0] for d in project["dependencies"]] == ["torch", "numpy"]
    releases = sorted(tuple(map(int, v.split("."))) for vs in TESTED_VERSIONS.values() for v in vs)
    lowest, newest = releases[0], releases[-1]
    want = f"deepspeed>={'.'.join(map(str, lowest))},<{newest[0]}.{newest[1] + 1}"
    assert project["optional-dependencies"]["deepspeed"] == [want]
    extras = project["optional-dependencies"]
    assert {"deepspeed", "hf", "recipes", "report", "all", "test"} <= set(extras)


def test_core_import_pulls_in_no_extra():
    code = (
        "import sys, spectral_dist; from spectral_dist import SpectralNewton; import spectral_dist.probes, "
    )
    code += "spectral_dist.diagnostics, spectral_dist.logging, spectral_dist.cli; "
    code += f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("module,extra", sorted(EXTRAS_OF.items()))
def test_integration_without_its_extra_names_it(module, extra):
    blocked = {"deepspeed": "deepspeed", "hf": "transformers", "report": "pandas", "recipes": "matplotlib"}[
        extra
    ]
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules[{blocked!r}] = None  # as if not installed
        try:
            import {module}
        except ImportError as e:
            print(type(e).__name__, e)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("MissingExtraError"), r.stdout
    assert f"pip install 'spectral-dist[{extra}]'" in r.stdout and blocked in r.stdout, r.stdout


CORE_STEP = """
import sys, torch
import spectral_dist
from spectral_dist import SpectralNewton
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
opt = SpectralNewton.from_model(model, alpha="by_layer", lr=1e-2)
before = [p.detach().clone() for p in model.parameters()]
model(torch.randn(32, 8)).square().mean().backward()
opt.step()
assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
assert opt.stats()["0.weight"]["kind"] == "spectral", opt.stats()
heavy = [m for m in {heavy!r} if m in sys.modules]
assert not heavy, heavy
for module, extra in {extras!r}.items():
    try:
        __import__(module)
    except ImportError as e:
        assert f"pip install 'spectral-dist[{{extra}}]'" in str(e), (module, str(e))
    else:
        raise AssertionError(f"{{module}} imported without its extra")
print("core ok", spectral_dist.__version__)
"""

EXTRA_CHECKS = {
    "deepspeed": "import deepspeed, spectral_dist.deepspeed as d; assert d.initialize",
    "hf": "import spectral_dist.integrations.hf as h, spectral_dist.integrations.accelerate; assert h.SpectralNewtonTrainer",
    "report": "import spectral_dist.reporting, spectral_dist.logging.plots",
    "recipes": "import wandb, datasets, sklearn, PIL, pyarrow, yaml, tqdm; import recipes.common.train, recipes.gpt_lm",
    "all": "import spectral_dist.deepspeed, spectral_dist.integrations.hf, spectral_dist.reporting, recipes.vit_imagenet",
}


@pytest.mark.slow
def test_fresh_environment(tmp_path):
    """A fresh virtual environment: torch, then the core only (import, one step, the extras named), then each
    extra in turn (it installs and its modules import). Prints the time of every stage."""
    src = tmp_path / "src"  # pip builds in the source folder: a copy keeps the checkout clean
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("spectral_dist", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    env_dir = tmp_path / "venv"
    times = {}
    t = time.perf_counter()
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["DS_ACCELERATOR"] = "cpu"

    def pip(*args):
        r = subprocess.run(
            [py, "-m", "pip", "install", "-q", *args], env=env, capture_output=True, text=True, timeout=900
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    def run(code):
        r = subprocess.run([py, "-c", code], env=env, cwd=src, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        return r.stdout

    isolated = run(
        "import sys; print(sys.prefix != sys.base_prefix, any('site-packages' in p and "
        f"not p.startswith({str(env_dir)!r}) for p in sys.path))"
    )
    assert isolated.split() == ["True", "False"], isolated  # a venv that sees no other site-packages
    times["venv"] = time.perf_counter() - t
    t = time.perf_counter()
    pip(os.environ.get("TORCH_SPEC", "torch==2.13.0"))
    times["torch"] = time.perf_counter() - t
    t = time.perf_counter()
    pip(str(src))
    times["core"] = time.perf_counter() - t
    assert "core ok" in run(CORE_STEP.format(heavy=HEAVY, extras=EXTRAS_OF))
    for extra, check in EXTRA_CHECKS.items():
        t = time.perf_counter()
        pip(f"{src}[{extra}]")
        run(check)
        times[extra] = time.perf_counter() - t
    r = subprocess.run([py, "-m", "pip", "check"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    print("fresh environment, seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
