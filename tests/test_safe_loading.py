"""Loading a file never runs code from it unless the user says so (issue 20).

* A scan of the repository's Python files (``ast``) for calls that can run code stored in data: pickle,
  dill, cloudpickle, marshal, shelve and joblib loads, ``pickle.Unpickler`` and its subclasses,
  ``torch.load`` without a literal ``weights_only=True``, ``yaml.load``/``unsafe_load``/``full_load``,
  ``numpy.load`` with ``allow_pickle``, ``pandas.read_pickle`` and the builtins ``eval``/``exec``. Reviewed
  exceptions are listed with their count and reason; an exception that no longer matches fails too.
* A crafted pickle that creates a marker file when unpickled: every loader (``spectral-dist probe
  --checkpoint``, the CIFAR-10 reader, the recipes' ``--resume`` check) refuses it without the opt-in, and the
  marker is never created. Unpickled fully, the same payload does create the marker: the tests can fail.
"""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------- the scan

_PICKLERS = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
UNSAFE_CALLS = {f"{m}.{f}" for m in _PICKLERS for f in ("load", "loads", "Unpickler")} | {
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "shelve.Shelf",
    "shelve.DbfilenameShelf",
    "joblib.load",
    "pandas.read_pickle",
    "jsonpickle.decode",
    "yaml.load",
    "yaml.load_all",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",
    "builtins.eval",
    "builtins.exec",
}
UNPICKLER_BASES = {f"{m}.Unpickler" for m in _PICKLERS} | {"pickle._Unpickler"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load"}

# (path, enclosing function or class, finding) -> (how many such calls there, why they are acceptable).
# Keep it short and honest: a count that no longer matches (a new call in the same place, or an entry that
# matches nothing any more) fails the tests below.
REVIEWED = {
    ("recipes/common/data.py", "CifarUnpickler", "pickle.Unpickler subclass"): (
        1,
        "CIFAR-10's python format is pickle by design; find_class resolves only numpy's array-rebuilding "
        "globals and refuses every other one (test_cifar_loader_refuses_crafted_batch)",
    ),
    ("spectral_dist/commands/probe.py", "read_checkpoint", "torch.load without weights_only=True"): (
        1,
        "only with the user's explicit --trust-checkpoint (test_probe_refuses_crafted_checkpoint)",
    ),
    ("tests/test_safe_loading.py", "_unpickled_fully_creates_marker", "pickle.loads"): (
        1,
        "unpickles the test's own crafted payload in a tmp dir to prove it creates the marker",
    ),
}


class _Scanner(ast.NodeVisitor):
    """Findings ``(where, what, line)`` of one module; names are resolved through its imports."""

    def __init__(self):
        self.aliases: dict[str, str] = {}
        self.scope: list[str] = []
        self.found: list[tuple[str, str, int]] = []

    def _where(self) -> str:
        return ".".join(self.scope) or "<module>"

    def visit_Import(self, node):
        for a in node.names:
            if a.asname:
                self.aliases[a.asname] = a.name
            else:
                top = a.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node):
        if node.module and not node.level:
            for a in node.names:
                self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def _scoped(self, node):
        self.aliases.pop(node.name, None)  # a local definition shadows an imported name
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _scoped

    def visit_ClassDef(self, node):
        for base in node.bases:
            if self.dotted(base) in UNPICKLER_BASES:
                self.found.append(
                    (".".join([*self.scope, node.name]), "pickle.Unpickler subclass", node.lineno)
                )
        self._scoped(node)

    def dotted(self, node) -> str | None:
        if isinstance(node, ast.Name):
            if node.id in self.aliases:
                return self.aliases[node.id]
            return f"builtins.{node.id}" if node.id in ("eval", "exec") else node.id
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_Call(self, node):
        name = self.dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        splat = None in kw  # **kwargs: the value cannot be seen
        if name in UNSAFE_CALLS:
            self.found.append((self._where(), name, node.lineno))
        elif name in TORCH_LOADS:
            wo = kw.get("weights_only")
            if splat or not (isinstance(wo, ast.Constant) and wo.value is True):
                self.found.append((self._where(), "torch.load without weights_only=True", node.lineno))
        elif name in NUMPY_LOADS:
            ap = kw.get("allow_pickle")
            if splat or (ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False)):
                self.found.append((self._where(), "numpy.load with allow_pickle", node.lineno))
        self.generic_visit(node)


def scan_source(source: str, filename: str = "<source>") -> list[tuple[str, str, int]]:
    scanner = _Scanner()
    scanner.visit(ast.parse(source, filename))
    return scanner.found


def python_files() -> list[str]:
    """The repository's Python files, tracked or new (git ignores .venv, outputs, wandb); without git, a walk."""
    r = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if r.returncode == 0 and r.stdout:
        return sorted({f for f in r.stdout.split("\0") if f and (ROOT / f).is_file()})
    skip = {".git", ".venv", "venv", "wandb", "outputs", "build", "dist", "__pycache__", "shared"}
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
        out += [str(Path(dirpath, f).relative_to(ROOT)) for f in filenames if f.endswith(".py")]
    return sorted(out)


def scan_repository() -> dict[tuple[str, str, str], list[int]]:
    found: dict[tuple[str, str, str], list[int]] = {}
    for rel in python_files():
        for where, what, line in scan_source((ROOT / rel).read_text(encoding="utf-8"), rel):
            found.setdefault((rel, where, what), []).append(line)
    return found


def test_scanner_flags_every_unsafe_form_and_nothing_safe():
    bad = textwrap.dedent(
        """
        import pickle, marshal, shelve, dill, yaml, joblib
        import pickle as pk
        import numpy as np
        import torch
        from pickle import loads as ld
        from torch import load as tload
        from yaml import unsafe_load

        def f(path, data, kw):
            pickle.load(open(path, "rb"))
            pk.loads(data)
            ld(data)
            pickle.Unpickler(open(path, "rb")).load()
            marshal.loads(data)
            shelve.open(path)
            dill.loads(data)
            joblib.load(path)
            yaml.load(data, Loader=yaml.Loader)
            yaml.full_load(data)
            unsafe_load(data)
            torch.load(path)
            torch.load(path, weights_only=False)
            tload(path, map_location="cpu")
            torch.load(path, **kw)
            np.load(path, allow_pickle=True)
            eval("1 + 1")
            exec("x = 1")

        class R(pickle.Unpickler):
            pass
        """
    )
    found = scan_source(bad)
    lines = {line for _, _, line in found}
    calls = [i + 1 for i, text in enumerate(bad.splitlines()) if text.startswith("    ") and "(" in text]
    class_line = bad.splitlines().index("class R(pickle.Unpickler):") + 1
    assert lines == set(calls) | {class_line}, found  # every call in f is flagged, and the class R
    assert [(w, what) for w, what, _ in found if w == "R"] == [("R", "pickle.Unpickler subclass")]
    whats = [what for _, what, _ in found]
    assert whats.count("torch.load without weights_only=True") == 4
    assert {
        "pickle.load",
        "pickle.loads",
        "pickle.Unpickler",
        "marshal.loads",
        "shelve.open",
        "dill.loads",
    } < set(whats)
    assert {
        "joblib.load",
        "yaml.load",
        "yaml.full_load",
        "yaml.unsafe_load",
        "numpy.load with allow_pickle",
    } < set(whats)
    assert {"builtins.eval", "builtins.exec"} < set(whats)
    good = textwrap.dedent(
        """
        import json, yaml, torch, numpy as np

        def g(model, path, eval_fn):
            model.eval()
            eval_fn(model)
            torch.load(path, map_location="cpu", weights_only=True)
            yaml.safe_load(open(path))
            np.load(path)
            np.load(path, allow_pickle=False)
            json.load(open(path))
            pickle = None
            pickle.dumps(1)

        def load(paths):
            return paths

        load([1])
        """
    )
    assert scan_source(good) == []


def test_repository_has_no_unreviewed_unsafe_loading():
    found = scan_repository()
    assert "tests/test_safe_loading.py" in {k[0] for k in found}  # the scan saw this very file
    unreviewed = {k: v for k, v in found.items() if len(v) > REVIEWED.get(k, (0, ""))[0]}
    msg = "\n".join(
        f"  {path}:{lines} in {where}: {what}" for (path, where, what), lines in unreviewed.items()
    )
    assert not unreviewed, (
        "code that can run code from a file (unpickling, eval/exec, yaml.load):\n"
        f"{msg}\nRead it safely (torch.load(..., weights_only=True), safetensors, JSON, yaml.safe_load), or, "
        "if it must stay, add it to REVIEWED in tests/test_safe_loading.py with the count and the reason."
    )


def test_reviewed_exceptions_still_match():
    found = scan_repository()
    stale = {k: len(found.get(k, [])) for k, (n, _) in REVIEWED.items() if len(found.get(k, [])) < n}
    assert not stale, (
        f"REVIEWED entries that match fewer calls than listed (now: {stale}); update or remove them"
    )
    assert all(n >= 1 and len(reason) > 20 for n, reason in REVIEWED.values())


# ------------------------------------------------------------------------------- the crafted payload


class Payload:
    """Pickles as a call of ``func(*args)``: what a crafted file runs when it is unpickled."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    """Three ways a pickle can create ``marker``: Python code, a shell command, a process."""
    return {
        "exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "os.system": Payload(os.system, f"touch '{marker}'"),
        "subprocess": Payload(subprocess.call, ["touch", str(marker)]),
    }


def _unpickled_fully_creates_marker(data: bytes, marker: Path) -> None:
    """The control: a plain pickle.loads of the crafted bytes does create the marker."""
    assert not marker.exists()
    pickle.loads(data, encoding="bytes")
    assert marker.exists(), "the payload did not run: the refusal tests would prove nothing"
    marker.unlink()


@pytest.mark.parametrize("kind", ["exec", "os.system", "subprocess"])
def test_payload_runs_when_unpickled_fully(tmp_path, kind):
    marker = tmp_path / "marker"
    _unpickled_fully_creates_marker(pickle.dumps({b"x": payloads(marker)[kind]}), marker)


def test_probe_refuses_crafted_checkpoint(tmp_path):
    from spectral_dist.cli import main

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"0.weight": torch.zeros(2, 2), "x": payloads(marker)["exec"]}, evil)
    args = ["probe", "--model", "mlp", "--checkpoint", str(evil), "--top_k", "2", "--batch_size", "4"]
    args += ["--no_plots", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="--trust-checkpoint") as err:
        main(args)
    assert not marker.exists()
    text = str(err.value)
    assert "global exec, which full unpickling would import and call" in text and str(evil) in text
    assert "runs whatever code the file names" in text
    # a pickled whole module is refused the same way, naming its class
    from spectral_dist.commands.probe import build

    torch.save(build("mlp", 4, 0, torch.float64)[0], tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.container\.Sequential.*--trust-checkpoint"):
        main(args[:4] + [str(tmp_path / "module.pt")] + args[5:])
    # the control: with the opt-in the file is unpickled fully and the payload runs (here in tmp_path)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        main(args + ["--trust-checkpoint"])
    assert marker.exists()


def _real_cifar_batch(n: int = 4) -> dict:
    rng = np.random.default_rng(1)
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


@pytest.mark.parametrize("kind", ["exec", "os.system", "subprocess"])
def test_cifar_loader_refuses_crafted_batch(tmp_path, kind):
    from test_recipes import make_cifar_folder

    from recipes.common import data as D

    folder = make_cifar_folder(tmp_path / "c", per_batch=4)
    train, test = D.cifar10_images(folder)
    assert (len(train), len(test)) == (20, 4)
    marker = tmp_path / "marker"
    batch = _real_cifar_batch() | {b"x": payloads(marker)[kind]}
    data = pickle.dumps(batch)
    _unpickled_fully_creates_marker(data, marker)
    (folder / "data_batch_3").write_bytes(data)
    with pytest.raises(pickle.UnpicklingError, match="refused to unpickle the global") as err:
        D.cifar10_images(folder)
    assert not marker.exists()
    text = str(err.value)
    assert str(folder / "data_batch_3") in text and "numpy arrays and nothing else" in text
    assert "no opt-in" in text and "cifar-10-python.tar.gz" in text


def test_cifar_unpickler_allows_numpy_arrays_only(tmp_path):
    from recipes.common.data import CifarUnpickler

    def read(obj, protocol):
        path = tmp_path / "b"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        with open(path, "rb") as f:
            return CifarUnpickler(f, path).load()

    batch = _real_cifar_batch()
    for protocol in (3, 4, 5):  # numpy 2 writes numpy._core names; protocol 5 rebuilds via _frombuffer
        got = read(batch, protocol)
        assert np.array_equal(got[b"data"], batch[b"data"]) and got[b"labels"] == batch[b"labels"]
    assert set(CifarUnpickler.ALLOWED) == {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        *((f"{c}.multiarray", "_reconstruct") for c in ("numpy.core", "numpy._core")),
        *((f"{c}.numeric", "_frombuffer") for c in ("numpy.core", "numpy._core")),
    }
    # harmless-looking globals are refused too: only what rebuilds an array is resolved
    for obj in (Path("x"), OrderedDict(), np.float64(1.0), torch.zeros(1)):
        with pytest.raises(pickle.UnpicklingError, match="refused to unpickle the global"):
            read({b"data": obj}, 4)


def test_recipe_resume_refuses_crafted_checkpoint(tmp_path):
    from recipes.common.optim import warmup_cosine
    from recipes.common.train import TrainState, check_checkpoint_files
    from spectral_dist.diagnostics import TrajectoryMonitor

    ckpt = tmp_path / "step_4"
    ckpt.mkdir()
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w])
    monitor = TrajectoryMonitor([("w", w)], sketch_dim=8, window=4, every=1, seed=0)
    # what accelerate.save_state writes for the registered objects (torch.save of their state dicts)
    for i, obj in enumerate([warmup_cosine(opt, 2, 10, 0.1), TrainState(), monitor]):
        torch.save(obj.state_dict(), ckpt / f"custom_checkpoint_{i}.pkl")
    torch.save(opt.state_dict(), ckpt / "optimizer.bin")
    check_checkpoint_files(ckpt)  # the recipes' own checkpoint passes

    marker = tmp_path / "marker"
    torch.save({"step": 4, "x": payloads(marker)["os.system"]}, ckpt / "custom_checkpoint_1.pkl")
    with pytest.raises(ValueError, match=r"custom_checkpoint_1\.pkl.*posix\.system.*--trust_checkpoint true"):
        check_checkpoint_files(ckpt)
    with pytest.raises(ValueError, match="DeepSpeed.*--trust_checkpoint true"):
        check_checkpoint_files(ckpt, deepspeed=True)
    with pytest.raises(ValueError, match=r"custom_checkpoint_1\.pkl"):  # the run's own folder: still checked
        check_checkpoint_files(ckpt, deepspeed=True, own=True)
    check_checkpoint_files(ckpt, trust=True)  # the opt-in: nothing is read here, accelerate reads it
    assert not marker.exists()
    (ckpt / "pytorch_model_fsdp_0").mkdir()
    (ckpt / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"")
    (ckpt / "custom_checkpoint_1.pkl").unlink()
    with pytest.raises(
        ValueError, match=r"torch\.distributed\.checkpoint.*\.metadata.*--trust_checkpoint true"
    ):
        check_checkpoint_files(ckpt)
    check_checkpoint_files(ckpt, own=True)  # --resume latest: the run's own DCP files


def test_recipe_checkpoint_written_by_accelerate_passes(tmp_path):
    """A real ``accelerator.save_state`` of what the recipes register (own process: accelerate's state is
    global) passes the check, and the resume reads it back."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from accelerate import Accelerator
        from recipes.common.optim import warmup_cosine
        from recipes.common.train import TrainState, check_checkpoint_files
        from spectral_dist.diagnostics import TrajectoryMonitor

        def setup():
            acc = Accelerator(cpu=True)
            model = torch.nn.Linear(3, 4)
            model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters()))
            sched, state = warmup_cosine(opt, 2, 10, 0.1), TrainState()
            monitor = TrajectoryMonitor([("weight", model.weight)], sketch_dim=8, window=4, every=1, seed=0)
            acc.register_for_checkpointing(sched, state, monitor)
            return acc, model, opt, sched, state

        acc, model, opt, sched, state = setup()
        for _ in range(3):
            model(torch.randn(2, 3)).sum().backward()
            opt.step(); sched.step(); opt.zero_grad()
        state.step, state.best = 3, 0.5
        acc.save_state({str(tmp_path / "ck")!r})
        check_checkpoint_files({str(tmp_path / "ck")!r})
        acc2, model2, opt2, sched2, state2 = setup()
        acc2.load_state({str(tmp_path / "ck")!r})
        assert state2.step == 3 and sched2.last_epoch == 3, (state2.step, sched2.last_epoch)
        assert torch.equal(model2.weight, model.weight)
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.stdout + r.stderr)[-4000:]


@pytest.mark.slow
def test_recipe_resume_end_to_end(tmp_path):
    """The real recipe (one process, 1-2 steps): its own checkpoint resumes; a checkpoint with a crafted
    ``custom_checkpoint_1.pkl`` is refused before accelerate reads it, unless ``--trust_checkpoint true``."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    env = dict(
        os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)
    )
    base = [
        sys.executable,
        "-m",
        "recipes.resnet_cifar",
        "--width",
        "4",
        "--stages",
        "1",
        "--batch_size",
        "8",
    ]
    base += ["--eval_every", "0", "--eval_batches", "1", "--diag_every", "0", "--traj_sketch_dim", "8"]
    base += ["--progress", "false", "--wandb_mode", "disabled", "--output_dir", str(out)]

    def run(*args):
        return subprocess.run([*base, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    r = run("--max_steps", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("--max_steps", "2", "--resume", "latest")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_2"
    state = torch.load(ckpt / "custom_checkpoint_1.pkl", weights_only=True)
    assert state["step"] == 2  # the TrainState
    torch.save(state | {"x": payloads(marker)["os.system"]}, ckpt / "custom_checkpoint_1.pkl")
    r = run("--max_steps", "3", "--resume", "latest")
    assert r.returncode != 0 and not marker.exists()
    assert "refused custom_checkpoint_1.pkl" in r.stderr and "--trust_checkpoint true" in r.stderr, r.stderr[
        -3000:
    ]
    # the control: with the opt-in accelerate unpickles it fully and the payload runs
    r = run("--max_steps", "3", "--resume", "latest", "--trust_checkpoint", "true")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert marker.exists()
