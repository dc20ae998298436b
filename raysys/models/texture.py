"""The deep texture-clustering encoder the paper's cluster-aware method relies on (Panambur et al. 2022).

Architecture (Deep Encoding Pooling network, Xue, Zhang & Dana, CVPR 2018, as Panambur et al. adapt it):
a ResNet trunk's last feature map feeds two branches -- a Deep-TEN texture-encoding layer
(:class:`TextureEncoding`, 8 codewords) and a global average pool -- each projected to 64-d; their
outer product (a bilinear combination, 64 x 64) is L2-normalized and projected to a 512-d embedding,
itself L2-normalized.

Training needs no labels (:func:`train_texture_encoder`): every epoch the embeddings of all images are
PCA-whitened, L2-normalized and clustered with k-means (:func:`cluster_features`); the cluster ids are
pseudo-labels for a batch-hard triplet loss on batches of ``per_cluster`` images from each of several
clusters. The same whitening + k-means recipe (and its quality measures) is what
:mod:`raysys.distributed.clustering` applies to any encoder's features, so it lives here, free of Ray.

Plain PyTorch + scikit-learn; no Ray import.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.metrics import normalized_mutual_info_score
from threadpoolctl import threadpool_limits
from torch import Tensor, nn
from tqdm.auto import tqdm

from raysys.data.augment import AugmentConfig, augment
from raysys.errors import DataError, ModelFileError, TextureConfigError
from raysys.models.backbones import (
    LoadReport,
    Normalize,
    build_backbone,
    embed,
    load_init_weights,
)

log = logging.getLogger(__name__)

PCA_DIM = 256
# Above this many rows k-means switches to MiniBatchKMeans: full Lloyd iterations over 100K x 256
# features for K up to 300 cost minutes per K, mini-batches seconds, at a small loss in inertia.
MINIBATCH_ROWS = 20_000
# Whitened PCA components whose variance is below this fraction of the largest are dropped: dividing
# by a near-zero standard deviation would blow numerical noise up to unit variance.
_MIN_RELATIVE_VARIANCE = 1e-6


# ----------------------------------------------------------------------------- features -> clusters


def reduce_features(features: np.ndarray, dim: int = PCA_DIM, seed: int = 0) -> np.ndarray:
    """PCA-whiten ``features`` ``[N, D]`` to at most ``dim`` components, then L2-normalize each row.

    The number of components is ``min(dim, D, N // 10)`` (at least 2), less any whose variance is
    numerically zero. The ``N // 10`` cap matters on small pools: whitening divides by variances estimated
    from N samples, and as the number of components nears N - 1 the whitened points approach a regular
    simplex -- all equidistant, so k-means finds nothing (measured: NMI 0.03 instead of 1.0 on 240
    well-separated points in 239 components).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features [N, D] with N >= 2 to whiten, got shape {x.shape}")
    n_components = min(dim, x.shape[1], max(2, len(x) // 10), len(x))
    # Tall data (the usual case): an eigendecomposition of the D x D covariance, ~10x faster than an SVD of X.
    solver = "covariance_eigh" if x.shape[0] >= x.shape[1] else "auto"
    pca = PCA(n_components=n_components, whiten=True, svd_solver=solver, random_state=seed)
    z = pca.fit_transform(x)
    keep = pca.explained_variance_ > _MIN_RELATIVE_VARIANCE * max(pca.explained_variance_[0], 1e-300)
    z = z[:, keep]
    if z.shape[1] == 0:  # every image has the same features: nothing to whiten, one direction is as good as any
        z = np.ones((len(x), 1))
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return z.astype(np.float32)


def _kmeans(x: np.ndarray, k: int, seed: int):
    """k-means fitted to rows ``x`` (KMeans; MiniBatchKMeans above ``MINIBATCH_ROWS``)."""
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means needs 1 <= K <= number of rows, got K={k} for {len(x)} rows")
    if len(x) > MINIBATCH_ROWS:
        return MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096).fit(x)
    return KMeans(n_clusters=k, random_state=seed, n_init=3).fit(x)


def kmeans_ids(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means cluster ids ``int32 [N]`` of rows ``x``."""
    return _kmeans(x, k, seed).labels_.astype(np.int32)


def cluster_features(features: np.ndarray, k: int, seed: int = 0, dim: int = PCA_DIM) -> np.ndarray:
    """The clustering recipe of Panambur et al.: PCA-whitening to ``dim`` -> L2 -> k-means with ``k`` clusters.

    Runs single-threaded: it shares the machine with training (other trials, Ray Data tasks), and on an
    oversubscribed 2-core machine spinning OpenMP/BLAS threads made PCA + k-means of 5,000 x 512 features
    take 53 s instead of 2 s (measured).
    """
    with threadpool_limits(limits=1):
        return kmeans_ids(reduce_features(features, dim, seed), k, seed)


def cluster_margins(features: np.ndarray, k: int, seed: int = 0, dim: int = PCA_DIM) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cluster_features`' ids and each row's confidence in its cluster: the distance to the second-nearest
    centroid minus the distance to its own (0: on the border between two clusters), in the whitened space."""
    with threadpool_limits(limits=1):
        x = reduce_features(features, dim, seed)
        km = _kmeans(x, k, seed)
    nearest = np.sort(km.transform(x), axis=1)
    margin = nearest[:, 1] - nearest[:, 0] if k > 1 else np.zeros(len(x))
    return km.labels_.astype(np.int32), margin


def purity(cluster_ids, labels) -> float:
    """Fraction of images whose label is their cluster's most frequent label."""
    cluster_ids, labels = np.asarray(cluster_ids), np.asarray(labels)
    _, cluster_index = np.unique(cluster_ids, return_inverse=True)
    _, label_index = np.unique(labels, return_inverse=True)
    counts = np.zeros((cluster_index.max() + 1, label_index.max() + 1), dtype=np.int64)
    np.add.at(counts, (cluster_index, label_index), 1)
    return float(counts.max(axis=1).sum() / len(labels))


def pair_precision_recall(cluster_ids, labels) -> tuple[float, float]:
    """Over all pairs of distinct images: the fraction of same-cluster pairs that share a label (precision)
    and of same-label pairs that share a cluster (recall) -- what cluster-aware elimination's removed pairs
    score in i.i.d. batches, computed from the contingency table without training."""
    _, c = np.unique(np.asarray(cluster_ids), return_inverse=True)
    _, y = np.unique(np.asarray(labels), return_inverse=True)
    counts = np.zeros((c.max() + 1, y.max() + 1), dtype=np.float64)
    np.add.at(counts, (c, y), 1)

    def pairs(n):
        return float((n * (n - 1) / 2).sum())

    both = pairs(counts)
    return both / max(pairs(counts.sum(1)), 1.0), both / max(pairs(counts.sum(0)), 1.0)


def cluster_quality(cluster_ids, labels) -> dict:
    """``{"nmi", "purity", "pair_precision", "pair_recall", "n_labeled"}`` of a clustering against known
    labels, ignoring labels < 0; an empty dict when no label is known. NMI is scikit-learn's (arithmetic
    normalization); pair precision and recall as :func:`pair_precision_recall`."""
    cluster_ids, labels = np.asarray(cluster_ids), np.asarray(labels)
    if cluster_ids.shape != labels.shape:
        raise ValueError(f"cluster ids and labels differ in length ({len(cluster_ids)} vs {len(labels)})")
    known = labels >= 0
    if not known.any():
        return {}
    c, y = cluster_ids[known], labels[known]
    precision, recall = pair_precision_recall(c, y)
    return {"nmi": float(normalized_mutual_info_score(y, c)), "purity": purity(c, y), "pair_precision": precision,
            "pair_recall": recall, "n_labeled": int(known.sum())}


# ----------------------------------------------------------------------------- the model


class TextureEncoding(nn.Module):
    r"""Residual encoding layer of Deep-TEN (H. Zhang, J. Xue, K. Dana, "Deep TEN: Texture Encoding
    Network", CVPR 2017, Sec. 3; reference implementation ``encoding.nn.Encoding`` of PyTorch-Encoding).

    Input: a feature map ``[B, C, H, W]``, read as N = H * W descriptors :math:`x_i \in R^C`. With K
    learned codewords :math:`c_k` and smoothing factors :math:`s_k`, the residuals
    :math:`r_{ik} = x_i - c_k` are soft-assigned,

    .. math:: a_{ik} = \frac{\exp(-s_k \lVert r_{ik} \rVert^2)}{\sum_j \exp(-s_j \lVert r_{ij} \rVert^2)},

    and aggregated over descriptors, :math:`e_k = \sum_i a_{ik} r_{ik}`. Output ``[B, K, C]``. The sum is
    orderless, which is what makes it a texture (not a layout) descriptor. Computed in the expanded form
    :math:`e_k = \sum_i a_{ik} x_i - c_k \sum_i a_{ik}`, which never builds the ``[B, N, K, C]`` residuals.
    Initialization as the reference: codewords ~ U(±1/sqrt(K C)), smoothing factors ~ U(0, 1)
    (the reference stores :math:`-s_k` ~ U(-1, 0)).
    """

    def __init__(self, channels: int, codewords: int = 8):
        super().__init__()
        self.channels, self.num_codewords = channels, codewords
        bound = 1.0 / math.sqrt(codewords * channels)
        self.codewords = nn.Parameter(torch.empty(codewords, channels).uniform_(-bound, bound))
        self.smoothing = nn.Parameter(torch.empty(codewords).uniform_(0.0, 1.0))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected a feature map [B, {self.channels}, H, W], got shape {tuple(x.shape)}")
        desc = x.flatten(2).transpose(1, 2)  # [B, N, C]
        # ||x_i - c_k||^2 = ||x_i||^2 - 2 x_i.c_k + ||c_k||^2
        dist = (desc.pow(2).sum(-1, keepdim=True) - 2 * desc @ self.codewords.t()
                + self.codewords.pow(2).sum(-1)).clamp_min(0.0)  # [B, N, K]
        assign = torch.softmax(-self.smoothing * dist, dim=2)
        return assign.transpose(1, 2) @ desc - assign.sum(1).unsqueeze(-1) * self.codewords  # [B, K, C]


def _trunk(net: nn.Module) -> nn.Sequential:
    """A ResNet up to its last feature map (ScaledResNet.forward would also pool it)."""
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


class TextureEncoder(nn.Module):
    """ResNet trunk -> (texture encoding, global average pool) -> 64-d each -> bilinear -> L2 -> 512-d -> L2.

    Takes float images in [0, 1] ``[B, 3, S, S]`` and normalizes them itself (as
    :class:`raysys.models.ContrastiveModel`), so :meth:`features` can stand in for a contrastive
    model's in feature extraction. ``spec`` holds the constructor arguments.
    """

    def __init__(self, backbone_name: str = "resnet18", width: float = 1.0, small_stem: bool = False,
                 codewords: int = 8, branch_dim: int = 64, embed_dim: int = 512, reduce_dim: int = 128):
        super().__init__()
        self.spec = dict(backbone_name=backbone_name, width=width, small_stem=small_stem, codewords=codewords,
                         branch_dim=branch_dim, embed_dim=embed_dim, reduce_dim=reduce_dim)
        net, channels = build_backbone(backbone_name, width, small_stem)
        self.trunk = _trunk(net)
        reduced = min(reduce_dim, channels)
        # As in the DEP network: a 1x1 conv shrinks the map before encoding (K x C codes stay small).
        self.texture = nn.Sequential(
            nn.Conv2d(channels, reduced, 1, bias=False), nn.BatchNorm2d(reduced), nn.ReLU(inplace=True),
            TextureEncoding(reduced, codewords), nn.Flatten(),
        )
        self.texture_proj = nn.Sequential(nn.Linear(codewords * reduced, branch_dim), nn.BatchNorm1d(branch_dim))
        self.pool_proj = nn.Sequential(nn.Linear(channels, branch_dim), nn.BatchNorm1d(branch_dim))
        self.embed = nn.Linear(branch_dim * branch_dim, embed_dim)
        self.normalize = Normalize()

    @classmethod
    def from_spec(cls, spec: dict) -> "TextureEncoder":
        """Rebuild a model from its ``spec``."""
        return cls(**spec)

    def load_trunk_weights(self, path) -> LoadReport:
        """Start the trunk from a backbone weights file (a ResNet state dict of the same architecture and width,
        e.g. ImageNet or a raysys run's), as the paper's texture model started from a pretrained network."""
        net, _ = build_backbone(self.spec["backbone_name"], self.spec["width"], self.spec["small_stem"])
        report = load_init_weights(net, path)
        self.trunk.load_state_dict(_trunk(net).state_dict())
        return report

    def forward(self, x: Tensor) -> Tensor:
        """L2-normalized embeddings ``[B, embed_dim]`` of images in [0, 1]."""
        fmap = self.trunk(self.normalize(x))
        # Deep-TEN L2-normalizes the flattened codes before its linear layer.
        t = self.texture_proj(F.normalize(self.texture(fmap), dim=1))
        g = self.pool_proj(fmap.mean((2, 3)))
        bilinear = torch.einsum("bi,bj->bij", t, g).flatten(1)
        return F.normalize(self.embed(F.normalize(bilinear, dim=1)), dim=1)

    features = forward  # what clustering embeds: the same embedding the triplet loss shapes


# ----------------------------------------------------------------------------- the loss and the sampler


def batch_hard_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017): for every anchor with at least one
    positive and one negative in the batch, ``relu(max d(a, p) - min d(a, n) + margin)`` with Euclidean
    distances; mean over those anchors (0 when there are none)."""
    dist = torch.cdist(embeddings, embeddings)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return embeddings.sum() * 0.0  # keeps the graph: a step with no triplet is a no-op, not an error
    hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(~neg, float("inf")).amin(1)
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()


def batch_all_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Batch-all triplet loss (Hermans, Beyer & Leibe 2017, "BA≠0"): ``relu(d(a, p) - d(a, n) + margin)``
    over every (anchor, positive, negative) triplet in the batch, averaged over the triplets whose loss
    is non-zero (0 when there are none)."""
    dist = torch.cdist(embeddings, embeddings)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    valid = (same & ~eye).unsqueeze(2) & (~same).unsqueeze(1)  # [anchor, positive, negative]
    losses = F.relu(dist.unsqueeze(2) - dist.unsqueeze(1) + margin)[valid]
    active = losses > 0
    if not active.any():
        return embeddings.sum() * 0.0
    return losses[active].mean()


def pk_batches(labels: np.ndarray, per_cluster: int, batch_size: int, steps: int,
               rng: np.random.Generator):
    """Yield ``steps`` index arrays, each ``per_cluster`` images from each of ``batch_size // per_cluster``
    distinct clusters (clusters with at least two images only; smaller clusters are drawn with
    replacement so every drawn cluster gives ``per_cluster`` images)."""
    labels = np.asarray(labels)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    members = [m for m in members if len(m) >= 2]
    if len(members) < 2:
        raise ValueError("triplet batches need at least two clusters holding two or more images each")
    per_batch = min(max(2, batch_size // per_cluster), len(members))
    for _ in range(steps):
        chosen = rng.choice(len(members), per_batch, replace=False)
        yield np.concatenate([rng.choice(members[c], per_cluster, replace=len(members[c]) < per_cluster)
                              for c in chosen])


TRIPLET_LOSSES = {"batch_all": batch_all_triplet_loss, "batch_hard": batch_hard_triplet_loss}


# ----------------------------------------------------------------------------- training


@dataclass
class TextureConfig:
    """Texture-encoder settings. The paper's run: full width, 100 epochs, SGD lr 1e-4 from ImageNet
    weights, K=150 pseudo-clusters. We start from random weights (nothing is downloaded) and train a few CPU
    epochs, where lr 1e-4 barely moves the model: lr 0.02 with batch-all mining and two views per image
    raised the pseudo-label NMI steadily on the demo pool, where lr 0.05 without the second view and
    batch-hard mining (which collapsed the embedding towards the margin) did not."""

    backbone: str = "resnet18"
    width: float = 0.25
    small_stem: bool | None = None  # None: small stem below 96 px, as the pretraining presets
    codewords: int = 8
    embed_dim: int = 512
    epochs: int = 5
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 128
    per_cluster: int = 4
    pseudo_k: int = 150  # clamped to N // 10 on small pools, so clusters hold ~10 images on average
    margin: float = 0.2
    mining: str = "batch_all"  # or "batch_hard"
    two_views: bool = True  # each image enters a batch twice, differently augmented: a guaranteed positive
    pca_dim: int = PCA_DIM
    # Colour invariance: SimCLR's strong colour jitter and random grayscale instead of mild jitter, so the
    # clusters cannot follow a traverse's colour cast and lighting instead of its terrain.
    colour_invariant: bool = False
    init_weights: str | None = None  # start the trunk from this backbone weights file (the paper's was pretrained)

    def validate(self) -> TextureConfig:
        """Raise :class:`TextureConfigError` on the first invalid field; return self."""
        checks = [
            ("width", self.width > 0), ("codewords", self.codewords >= 1), ("embed_dim", self.embed_dim >= 1),
            ("epochs", self.epochs >= 1), ("lr", self.lr > 0), ("momentum", 0 <= self.momentum < 1),
            ("weight_decay", self.weight_decay >= 0), ("per_cluster", self.per_cluster >= 2),
            ("batch_size", self.batch_size >= 2 * self.per_cluster), ("pseudo_k", self.pseudo_k >= 2),
            ("margin", self.margin > 0), ("pca_dim", self.pca_dim >= 1), ("mining", self.mining in TRIPLET_LOSSES),
        ]
        if self.init_weights is not None and not Path(self.init_weights).is_file():
            raise TextureConfigError(f"texture weights {self.init_weights} do not exist; pass a backbone weights file")
        for name, ok in checks:
            if not ok:
                raise TextureConfigError(f"texture setting {name}={getattr(self, name)!r} is invalid "
                                         f"(need batch_size >= 2 * per_cluster >= 4, positive sizes and rates, "
                                         f"mining in {sorted(TRIPLET_LOSSES)})")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> TextureConfig:
        """Build from keyword settings; unknown keys raise :class:`TextureConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TextureConfigError(f"unknown texture settings {unknown}; valid: {sorted(known)}")
        return cls(**data).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def pseudo_clusters(self, n_images: int) -> int:
        """Number of k-means pseudo-labels for a pool of ``n_images``: ``pseudo_k``, at most ``n // 10``."""
        return max(2, min(self.pseudo_k, n_images // 10))

    def build(self, image_size: int) -> TextureEncoder:
        small = self.small_stem if self.small_stem is not None else image_size < 96
        return TextureEncoder(self.backbone, self.width, small, self.codewords, embed_dim=self.embed_dim)


def _texture_augment(size: int, colour_invariant: bool) -> AugmentConfig:
    """Crops, flips and mild colour changes: invariances a texture descriptor should have, without SimCLR's
    strong colour distortion (colour is part of what separates Mars terrain textures) -- or, colour-invariant,
    with SimCLR's colour jitter (p 0.8, 0.4/0.4/0.4/0.1) and grayscale (p 0.2)."""
    if colour_invariant:
        return AugmentConfig(size=size, crop_scale=(0.35, 1.0), flip_p=0.5, jitter_p=0.8, brightness=0.4,
                             contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.2)
    return AugmentConfig(size=size, crop_scale=(0.35, 1.0), flip_p=0.5, jitter_p=0.5, brightness=0.2,
                         contrast=0.2, saturation=0.2, hue=0.02, grayscale_p=0.0)


@torch.inference_mode()
def embed_images(model: nn.Module, images: np.ndarray, batch_size: int = 256, device=None) -> np.ndarray:
    """Features ``float32 [N, D]`` of uint8 ``[N, S, S, 3]`` images (``model.features``, eval mode).
    Leaves the model in eval mode on ``device``."""
    device = torch.device(device or next(model.parameters()).device)
    return embed(model.eval().to(device), images, batch_size, device)


def train_texture_encoder(
    images: np.ndarray, cfg: TextureConfig | None = None, seed: int = 0, device=None, progress: bool = True,
    diagnostic_labels: np.ndarray | None = None,
) -> tuple[TextureEncoder, list[dict]]:
    """Train a :class:`TextureEncoder` without labels on uint8 images ``[N, S, S, 3]``.

    Each epoch: embed every image (no augmentation), re-estimate pseudo-labels with
    :func:`cluster_features` (``cfg.pseudo_clusters(N)`` clusters), then ``N // batch_size`` SGD steps of
    :func:`batch_hard_triplet_loss` on augmented P x K batches from :func:`pk_batches`.
    ``diagnostic_labels`` (true classes, -1 unknown) are never trained on; when given, each epoch's
    history entry holds the NMI of its pseudo-labels against them.
    Returns the model (eval mode, CPU) and one history dict per epoch (``loss`` is the epoch mean).
    """
    cfg = (cfg or TextureConfig()).validate()
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3):
        raise ValueError(f"images must be uint8 [N, S, S, 3], got {getattr(images, 'dtype', type(images))} "
                         f"{getattr(images, 'shape', '')}")
    n, size = len(images), images.shape[1]
    k_pseudo = cfg.pseudo_clusters(n)
    if n < 2 * cfg.per_cluster or n < k_pseudo:
        raise DataError(f"{n} images are too few to train the texture encoder; need at least "
                         f"{max(2 * cfg.per_cluster, k_pseudo)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = cfg.build(size)
    if cfg.init_weights:
        model.load_trunk_weights(cfg.init_weights)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    aug = _texture_augment(size, cfg.colour_invariant)
    triplet_loss = TRIPLET_LOSSES[cfg.mining]
    views = 2 if cfg.two_views else 1
    steps = max(1, n // cfg.batch_size)  # an epoch costs N embeddings; with two views it sees N / 2 images
    history = []
    for epoch in range(cfg.epochs):
        pseudo = cluster_features(embed_images(model, images, device=device), k_pseudo, seed + epoch, cfg.pca_dim)
        model.train()
        losses = []
        batches = pk_batches(pseudo, cfg.per_cluster, cfg.batch_size // views, steps, rng)
        for idx in tqdm(batches, total=steps, desc=f"texture epoch {epoch + 1}/{cfg.epochs}", disable=not progress):
            batch = torch.from_numpy(images[idx]).to(device)
            x = torch.cat([augment(batch, aug, generator) for _ in range(views)])
            target = torch.from_numpy(pseudo[idx]).to(device).repeat(views)
            loss = triplet_loss(model(x), target, cfg.margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "pseudo_k": k_pseudo}
        if diagnostic_labels is not None:
            entry.update({f"pseudo_{k}": v for k, v in cluster_quality(pseudo, diagnostic_labels).items()})
        log.info("texture encoder %s", entry)
        history.append(entry)
    return model.eval().cpu(), history


# ----------------------------------------------------------------------------- saving


def save_texture_encoder(model: TextureEncoder, path: str | Path, **extra) -> None:
    """Write the weights, spec and any ``extra`` JSON-able entries (e.g. settings, history) to ``path``."""
    torch.save({"texture_model": model.state_dict(), "texture_spec": model.spec, **extra}, path)


def load_texture_encoder(path: str | Path) -> TextureEncoder:
    """Rebuild a :class:`TextureEncoder` (eval mode, CPU) saved by :func:`save_texture_encoder`."""
    saved = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(saved, dict) or "texture_spec" not in saved:
        raise ModelFileError(f"{path} is not a texture-encoder file (no 'texture_spec' entry)")
    model = TextureEncoder.from_spec(saved["texture_spec"])
    model.load_state_dict(saved["texture_model"])
    return model.eval()
