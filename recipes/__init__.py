"""Training recipes: ``python -m recipes.vit_imagenet`` (or ``accelerate launch -m recipes.vit_imagenet``) from
the repository root; ``accelerate launch recipes/vit_imagenet.py`` works too. Shared pieces: :mod:`recipes.common`."""
