"""raysys: Ray-distributed contrastive self-supervised learning on planetary images."""

__version__ = "0.1.0"
