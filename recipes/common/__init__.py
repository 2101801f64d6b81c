"""Shared pieces of the recipes: config parsing, data, optimizers, the training loop and diagnostics."""
