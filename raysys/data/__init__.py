"""Data layer: real on-disk formats, the built-in simulator, batched augmentations, Ray Data pipeline."""
