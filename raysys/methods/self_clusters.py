"""Self-clustering: cluster ids from the model being trained, as in incremental false-negative detection
(IFND, Chen et al. 2022): plain SimCLR for ``warmup`` epochs, then before every ``every``-th epoch the pool's
backbone features are PCA-whitened and k-means-clustered (the recipe of :func:`cluster_features`) into
``k`` clusters, and the cluster-aware rule reads the new ids from the next batch on.

:class:`SelfClusters` holds the schedule and the current table (image key -> cluster id); the Train worker
embeds the pool and feeds it in. Before the first clustering every id is -1 (unknown), which the cluster rule
treats as "not the same cluster": the warm-up is plain SimCLR. The table is part of the checkpoint, so a
resumed trial continues with the ids it had. Plain PyTorch + scikit-learn; no Ray import.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from raysys.models.texture import cluster_features


class SelfClusters:
    """The self-clustering schedule and the current cluster table."""

    def __init__(self, k: int, warmup: int, every: int, seed: int = 0):
        if k < 2 or warmup < 0 or every < 1:
            raise ValueError(f"self-clustering needs k >= 2, warmup >= 0 and every >= 1 (got {k}, {warmup}, {every})")
        self.k, self.warmup, self.every, self.seed = k, warmup, every, seed
        self.keys = torch.zeros(0, dtype=torch.int64)  # sorted image keys
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.epoch = -1  # the epoch before which the table was made (-1: none yet)

    def due(self, epoch: int) -> bool:
        """Whether the pool is re-clustered before (0-based) ``epoch``."""
        return epoch >= self.warmup and (epoch - self.warmup) % self.every == 0

    def update(self, keys: np.ndarray, features: np.ndarray, epoch: int) -> np.ndarray:
        """Cluster ``features [N, D]`` of the images ``keys [N]`` (int64, distinct) into the new table; returns
        the ids in ``keys``' order. k-means is seeded by the run's seed and the epoch."""
        keys = np.asarray(keys, dtype=np.int64)
        if len(np.unique(keys)) != len(keys):
            raise ValueError("self-clustering: an image was embedded twice; its key must be unique")
        ids = cluster_features(features, min(self.k, len(keys)), seed=self.seed * 1000 + epoch)
        order = np.argsort(keys)
        self.keys, self.ids = torch.from_numpy(keys[order]), torch.from_numpy(ids[order].astype(np.int64))
        self.epoch = epoch
        return ids

    def lookup(self, keys: Tensor) -> Tensor:
        """Cluster ids of image ``keys`` (int64 tensor, any device); -1 for images the table lacks."""
        if len(self.keys) == 0:
            return torch.full_like(keys, -1)
        if self.keys.device != keys.device:  # moved once per table, not once per batch
            self.keys, self.ids = self.keys.to(keys.device), self.ids.to(keys.device)
        at = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        return torch.where(self.keys[at] == keys, self.ids[at], torch.full_like(keys, -1))

    def state_dict(self) -> dict:
        return {"keys": self.keys.cpu(), "ids": self.ids.cpu(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.keys, self.ids, self.epoch = state["keys"].long(), state["ids"].long(), int(state["epoch"])
