"""Task heads of the pretext methods (plain PyTorch): what sits on the backbone in place of the
contrastive projection head while pretraining, and is dropped for evaluation like it.

A head's spec is a small dict saved in the model spec, so a checkpoint rebuilds it:
``{"kind": "tiles", "tiles": T, "classes": C}`` classifies a group of T patches from their pooled features
(rotation: T = 1; relative position: 2; jigsaw: 9), and ``{"kind": "dense", "classes": C, "scale": s}``
classifies every cell of the backbone's feature map at ``s`` times its resolution (colorization).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

HEAD_KINDS = ("tiles", "dense")


class TileClassifier(nn.Module):
    """Doersch et al.'s and Noroozi & Favaro's late fusion: one shared layer per patch (fc6), the group's
    outputs concatenated (fc7) and classified (fc8). Input ``[B * tiles, D]``, rows grouped by sample."""

    spatial = False

    def __init__(self, in_dim: int, tiles: int, classes: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_dim
        self.tiles = tiles
        self.per_tile = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True))
        self.joint = nn.Sequential(nn.Linear(tiles * hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes))

    def forward(self, h: Tensor) -> Tensor:
        if h.shape[0] % self.tiles:
            raise ValueError(f"expected a multiple of {self.tiles} patches, got {h.shape[0]}")
        return self.joint(self.per_tile(h).reshape(h.shape[0] // self.tiles, -1))


class DenseClassifier(nn.Module):
    """Per-cell class scores from the feature map ``[B, D, h, w]``: a 1x1 convolution block, then bilinear
    upsampling of the scores by ``scale`` -> ``[B, classes, h * scale, w * scale]``."""

    spatial = True

    def __init__(self, in_dim: int, classes: int, scale: int = 1, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_dim
        self.scale = scale
        self.net = nn.Sequential(nn.Conv2d(in_dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                 nn.ReLU(inplace=True), nn.Conv2d(hidden, classes, 1))

    def forward(self, fmap: Tensor) -> Tensor:
        scores = self.net(fmap)
        if self.scale == 1:
            return scores
        return F.interpolate(scores, scale_factor=self.scale, mode="bilinear", align_corners=False)


def build_head(spec: dict, in_dim: int) -> nn.Module:
    """The head a spec describes, on features (or feature maps) of ``in_dim`` channels."""
    kind = spec.get("kind")
    if kind == "tiles":
        return TileClassifier(in_dim, spec["tiles"], spec["classes"])
    if kind == "dense":
        return DenseClassifier(in_dim, spec["classes"], spec.get("scale", 1))
    raise ValueError(f"unknown head kind {kind!r}; valid kinds: {list(HEAD_KINDS)}")
