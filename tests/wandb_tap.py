"""What the code under test hands to W&B, recorded through W&B's public ``Run.log`` (test helper).

W&B's offline run files are W&B's private format, so tests do not parse them. Instead :func:`install` wraps
``wandb.Run.log`` (the public method every logger calls, ``wandb.log`` included) so that each call also
appends ``{"run_dir", "run_id", "step", "data", "config"}`` to ``<tap_dir>/<pid>.jsonl``: the keys, the step,
scalar values and which offline-run folder (segment) the row went to. :func:`rows` reads them back and drops
the rows of segments that were set aside as ``*.abandoned`` (a killed run's rows after its checkpoint), so a
test sees what W&B keeps of the run.

In processes started by a test (``accelerate launch``, torchrun) :func:`env` does the same through
``tests/wandb_tap_site/sitecustomize.py``, which Python imports at start-up when its folder is on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ENV = "SPECTRAL_DIST_TEST_WANDB_TAP"
_SITE = Path(__file__).resolve().parent / "wandb_tap_site"
_state = {"dir": None, "configs": set()}


def _plain(v):
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return f"<{type(v).__name__}>"


def _patch(run_cls) -> None:
    if getattr(run_cls.log, "_tapped", False):
        return
    original = run_cls.log

    def log(self, data, step=None, commit=None):
        if _state["dir"] is not None:
            rec = {
                "t": time.time(),
                "run_dir": str(Path(self.dir).parent),
                "run_id": self.id,
                "step": step,
                "data": {str(k): _plain(v) for k, v in dict(data).items()},
            }
            if rec["run_dir"] not in _state["configs"]:  # the run's config, once per segment
                rec["config"] = {str(k): _plain(v) for k, v in dict(self.config).items()}
                _state["configs"].add(rec["run_dir"])
            path = Path(_state["dir"], f"{os.getpid()}.jsonl")
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return original(self, data, step=step, commit=commit)

    log._tapped = True
    run_cls.log = log


def install(tap_dir: str | Path) -> None:
    """Record every ``wandb.Run.log`` call of this process to ``tap_dir`` from now on."""
    Path(tap_dir).mkdir(parents=True, exist_ok=True)
    _state["dir"] = str(tap_dir)
    if "wandb.sdk.wandb_run" in sys.modules:
        _patch(sys.modules["wandb.sdk.wandb_run"].Run)
        return
    import importlib.abc
    import importlib.util

    class _Finder(importlib.abc.MetaPathFinder):  # patch wandb's Run when (if ever) the process imports it
        def find_spec(self, name, path=None, target=None):
            if name != "wandb.sdk.wandb_run":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                _patch(module.Run)

            spec.loader.exec_module = exec_and_patch
            return spec

    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def env(tap_dir: str | Path, base: dict | None = None) -> dict:
    """An environment whose Python processes record their W&B calls to ``tap_dir``."""
    out = dict(os.environ if base is None else base)
    Path(tap_dir).mkdir(parents=True, exist_ok=True)
    out[ENV] = str(tap_dir)
    paths = [str(_SITE), str(_SITE.parent)] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    out["PYTHONPATH"] = os.pathsep.join(paths)
    return out


def rows(tap_dir: str | Path, keep_abandoned: bool = False) -> list[dict]:
    """Every recorded ``Run.log`` call, in time order; calls whose segment folder was renamed ``*.abandoned``
    are dropped unless ``keep_abandoned``."""
    out = []
    for f in Path(tap_dir).glob("*.jsonl"):
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            d = Path(rec["run_dir"])
            if not keep_abandoned and not d.exists() and d.with_name(d.name + ".abandoned").exists():
                continue
            out.append(rec)
    return sorted(out, key=lambda r: r["t"])


def uninstall() -> None:
    """Stop recording in this process (the wrapper stays, and passes calls through)."""
    _state["dir"] = None
