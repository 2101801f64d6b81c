"""Subcommands of the spectral-dist CLI, one module each (see spectral_dist/cli.py)."""


def require_positive(args, *names: str) -> None:
    """Raise naming the flag when an integer option that is set (not None) is below 1."""
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
