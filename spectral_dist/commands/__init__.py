"""Subcommands of the spectral-dist CLI, one module each (see spectral_dist/cli.py)."""
