"""Optional dependencies. The core install is torch and numpy; integrations, recipes and reports need an
extra (see pyproject.toml), and importing one without it raises :class:`MissingExtraError` naming the extra."""

from __future__ import annotations

import importlib.util

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ModuleNotFoundError):
    """A module of an optional extra is not installed; the message says which ``pip install`` adds it."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # sys.modules[module] is None: imports of it are blocked
        return False


def require(*modules: str, extra: str | tuple[str, ...], feature: str) -> None:
    """Raise :class:`MissingExtraError` unless every module in ``modules`` can be imported (nothing is
    imported here: only looked up). ``extra`` is the extra (or extras) that installs them."""
    missing = [m for m in modules if not _installed(m)]
    if not missing:
        return
    extras = (extra,) if isinstance(extra, str) else extra
    how = " or ".join(f"pip install 'spectral-dist[{e}]'" for e in extras)
    raise MissingExtraError(
        f"{feature} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: {how}",
        name=missing[0],
    )
