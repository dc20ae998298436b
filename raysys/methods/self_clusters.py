"""Self-clustering: cluster ids from the model being trained, as in incremental false-negative detection
(IFND, Chen et al. 2022): plain SimCLR for ``warmup`` rounds, then before every ``every``-th round the pool's
backbone features are PCA-whitened and k-means-clustered (the recipe of :func:`cluster_features`) into
``k`` clusters, and the cluster-aware rule reads the new ids from the next batch on.

Two cluster sources, registered in :data:`SOURCES` (``--self-cluster-source``): :class:`SelfClusters` gives
every image its cluster; :class:`ConfidentSelfClusters` gives one only to the images that sit most
confidently in theirs, a share that grows over training (IFND's incremental acceptance).

A source holds the schedule, in rounds (:mod:`raysys.config.schedule`: epochs, or shares of a step budget too
short for them), and the current table (image key -> cluster id); the Train worker
embeds the pool and feeds it in. Before the first clustering every id is -1 (unknown), which the cluster rule
treats as "not the same cluster": the warm-up is plain SimCLR. The table is part of the checkpoint, so a
resumed trial continues with the ids it had. Plain PyTorch + scikit-learn; no Ray import.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from raysys.models.texture import cluster_features, cluster_margins


class SelfClusters:
    """The self-clustering schedule and the current cluster table: every image in its cluster."""

    name = "self"

    @classmethod
    def from_config(cls, cfg) -> "SelfClusters":
        return cls(cfg.self_cluster_k, cfg.self_cluster_warmup, cfg.self_cluster_every, cfg.seed)

    def __init__(self, k: int, warmup: int, every: int, seed: int = 0):
        if k < 2 or warmup < 0 or every < 1:
            raise ValueError(f"self-clustering needs k >= 2, warmup >= 0 and every >= 1 (got {k}, {warmup}, {every})")
        self.k, self.warmup, self.every, self.seed = k, warmup, every, seed
        self.keys = torch.zeros(0, dtype=torch.int64)  # sorted image keys
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.round = -1  # the round before which the table was made (-1: none yet)

    def due(self, round_: int) -> bool:
        """Whether the pool is re-clustered before (0-based) round ``round_``."""
        return round_ >= self.warmup and (round_ - self.warmup) % self.every == 0

    def update(self, keys: np.ndarray, features: np.ndarray, round_: int, progress: float = 1.0) -> np.ndarray:
        """Cluster ``features [N, D]`` of the images ``keys [N]`` (int64, distinct) into the new table; returns
        the ids in ``keys``' order (-1: no cluster). k-means is seeded by the run's seed and the round;
        ``progress`` is the share of training done, in [0, 1]."""
        keys = np.asarray(keys, dtype=np.int64)
        if len(np.unique(keys)) != len(keys):
            raise ValueError("self-clustering: an image was embedded twice; its key must be unique")
        ids = self._ids(features, min(self.k, len(keys)), self.seed * 1000 + round_, progress)
        order = np.argsort(keys)
        self.keys, self.ids = torch.from_numpy(keys[order]), torch.from_numpy(ids[order].astype(np.int64))
        self.round = round_
        return ids

    def _ids(self, features: np.ndarray, k: int, seed: int, progress: float) -> np.ndarray:
        return cluster_features(features, k, seed=seed)

    def lookup(self, keys: Tensor) -> Tensor:
        """Cluster ids of image ``keys`` (int64 tensor, any device); -1 for images the table lacks."""
        if len(self.keys) == 0:
            return torch.full_like(keys, -1)
        if self.keys.device != keys.device:  # moved once per table, not once per batch
            self.keys, self.ids = self.keys.to(keys.device), self.ids.to(keys.device)
        at = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        return torch.where(self.keys[at] == keys, self.ids[at], torch.full_like(keys, -1))

    def state_dict(self) -> dict:
        return {"keys": self.keys.cpu(), "ids": self.ids.cpu(), "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        """A saved table; an older raysys's counted epochs, which were its rounds."""
        self.keys, self.ids = state["keys"].long(), state["ids"].long()
        self.round = int(state.get("round", state.get("epoch", -1)))


class ConfidentSelfClusters(SelfClusters):
    """IFND's incremental acceptance (Chen et al., ICLR 2022): of each clustering, only the share
    ``accept * progress`` of the images most confident in their cluster keep their id (confidence: the margin
    between the distances to the second-nearest and the own centroid, :func:`cluster_margins`); the rest get
    -1, so their pairs stay negatives. Early embeddings are poor, so few pairs are removed early, more as the
    embedding improves. IFND raises the share stepwise to all images by the end of training; here it grows
    linearly with the share of training done, up to ``accept`` (1.0, the default: IFND's end point)."""

    name = "self-confident"

    @classmethod
    def from_config(cls, cfg) -> "ConfidentSelfClusters":
        return cls(cfg.self_cluster_k, cfg.self_cluster_warmup, cfg.self_cluster_every, cfg.seed,
                   cfg.self_cluster_accept)

    def __init__(self, k: int, warmup: int, every: int, seed: int = 0, accept: float = 1.0):
        super().__init__(k, warmup, every, seed)
        if not 0.0 < accept <= 1.0:
            raise ValueError(f"confident self-clustering needs a final accepted share in (0, 1] (got {accept})")
        self.accept = accept

    def _ids(self, features: np.ndarray, k: int, seed: int, progress: float) -> np.ndarray:
        ids, margin = cluster_margins(features, k, seed=seed)
        keep = round(self.accept * min(max(progress, 0.0), 1.0) * len(ids))
        rejected = np.argsort(-margin, kind="stable")[keep:]
        ids = ids.astype(np.int64)
        ids[rejected] = -1
        return ids


# The registry: --self-cluster-source NAME -> its class.
SOURCES: dict[str, type[SelfClusters]] = {cls.name: cls for cls in (SelfClusters, ConfidentSelfClusters)}
