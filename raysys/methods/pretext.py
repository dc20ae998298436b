"""The pretext tasks that contrastive learning replaced (survey, seed 002): how a batch of images becomes
a task batch and its labels, with batched tensor ops (no per-image Python loops). Plain PyTorch, no Ray.

- rotation (Gidaris et al., RotNet): every image at 0/90/180/270 degrees, 4-way classification;
- relative position (Doersch et al.): the centre patch of a 3x3 grid and one of its 8 neighbours, with a
  gap and jitter between patches and colour dropping against chromatic-aberration cues;
- jigsaw (Noroozi & Favaro): the 9 tiles of a 3x3 grid in one of a fixed set of permutations chosen for
  large Hamming distance, classified by a shared-weight tile network;
- colorization (Zhang et al.): quantized ab colour of every cell predicted from luminance, soft-encoded
  and rebalanced towards rare colours.

Image sizes: the grids are laid on the whole (flipped) image, the papers' proportions scaled to it.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

GRID = 3  # tiles per side: relative position and jigsaw
NEIGHBOURS = tuple(i for i in range(GRID * GRID) if i != GRID * GRID // 2)  # label i -> grid cell NEIGHBOURS[i]
# Doersch et al.: 96 px patches with a 48 px gap (patch = 2/3 of a cell), jittered by up to 7 px (~5 % of a cell).
RELATIVE_PATCH, RELATIVE_JITTER = 2 / 3, 0.05
# Noroozi & Favaro: 64 px tiles placed at random in 75 px cells.
JIGSAW_TILE = 64 / 75
# Zhang et al.: ab grid 10, soft encoding over the 5 nearest bins with sigma 5, rebalancing with lambda 0.5 over
# the empirical distribution smoothed with sigma 5.
AB_GRID, SOFT_NEIGHBOURS, SOFT_SIGMA, REBALANCE_LAMBDA, SMOOTH_SIGMA = 10.0, 5, 5.0, 0.5, 5.0


def random_flip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Mirror a random half of the batch left-right (the one augmentation every pretext task keeps)."""
    flip = torch.rand(len(x), generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------------------------- rotation


def rotation_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """All four rotations of every image ``[B, 3, S, S]`` -> ``[4B, 3, S, S]`` and labels ``k`` (rotated by
    ``k * 90`` degrees counter-clockwise), grouped by rotation."""
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    return rotated, torch.arange(4, device=x.device).repeat_interleave(len(x))


# -------------------------------------------------------------------------------------- patches on a grid


def grid_geometry(size: int, fraction: float) -> tuple[int, int, int]:
    """``(cell, patch, margin)`` of a 3x3 grid centred on a ``size`` image, patches ``fraction`` of a cell."""
    cell = size // GRID
    patch = max(1, min(cell, round(cell * fraction)))
    return cell, patch, (size - GRID * cell) // 2


def extract_patches(x: Tensor, tops: Tensor, lefts: Tensor, patch: int) -> Tensor:
    """``[B, T, 3, patch, patch]`` crops of ``x [B, 3, S, S]`` at per-sample, per-tile corners ``[B, T]``."""
    steps = torch.arange(patch, device=x.device)
    rows = (tops[..., None] + steps)[..., :, None]  # [B, T, p, 1]
    cols = (lefts[..., None] + steps)[..., None, :]  # [B, T, 1, p]
    batch = torch.arange(len(x), device=x.device)[:, None, None, None]
    return x[batch, :, rows, cols].permute(0, 1, 4, 2, 3)  # advanced indices first: [B, T, p, p, 3]


def grid_corners(n: int, size: int, fraction: float, low: int, high: int, generator=None, device=None):
    """Top-left corners ``[n, 9]`` (rows, cols) of the grid's patches, each offset within its cell by a
    uniform integer in ``[low, high]``; returns them with the patch size."""
    cell, patch, margin = grid_geometry(size, fraction)
    origin = margin + cell * torch.arange(GRID, device=device)
    row0, col0 = origin.repeat_interleave(GRID), origin.repeat(GRID)

    def offsets():
        return torch.randint(low, high + 1, (n, GRID * GRID), generator=generator, device=device)

    return row0 + offsets(), col0 + offsets(), patch


def drop_colours(patches: Tensor, generator=None) -> Tensor:
    """Doersch et al.'s colour dropping: keep one random channel of each patch and replace the other two by
    Gaussian noise of 1/100 of the kept channel's spread (here around its mean, so the patch keeps its
    brightness): the network cannot use chromatic aberration to tell where in the image a patch was."""
    flat = patches.flatten(0, -4)  # [N, 3, p, p]
    keep = torch.randint(0, 3, (len(flat),), generator=generator, device=flat.device)
    kept = flat[torch.arange(len(flat), device=flat.device), keep][:, None]  # [N, 1, p, p]
    mean, std = kept.mean((2, 3), keepdim=True), kept.std((2, 3), keepdim=True)
    noise = mean + std / 100 * torch.randn(flat.shape, generator=generator, device=flat.device)
    mask = F.one_hot(keep, 3).to(flat.dtype)[:, :, None, None]
    return (mask * kept + (1 - mask) * noise).reshape(patches.shape)


def relative_position_batch(x: Tensor, generator=None) -> tuple[Tensor, Tensor]:
    """Centre patch and one random neighbour per image -> ``[2B, 3, p, p]`` (pairs adjacent) and the
    neighbour's position label in ``0..7`` (:data:`NEIGHBOURS`)."""
    cell, patch, _ = grid_geometry(x.shape[-1], RELATIVE_PATCH)
    centre = (cell - patch) // 2
    jitter = min(centre, max(1, round(cell * RELATIVE_JITTER))) if cell > patch else 0
    tops, lefts, patch = grid_corners(len(x), x.shape[-1], RELATIVE_PATCH, centre - jitter, centre + jitter,
                                      generator, x.device)
    labels = torch.randint(0, len(NEIGHBOURS), (len(x),), generator=generator, device=x.device)
    cells = torch.stack([torch.full_like(labels, GRID * GRID // 2),
                         torch.tensor(NEIGHBOURS, device=x.device)[labels]], 1)  # [B, 2]
    pairs = extract_patches(x, tops.gather(1, cells), lefts.gather(1, cells), patch)
    return drop_colours(pairs, generator).flatten(0, 1), labels


# ------------------------------------------------------------------------------------------------- jigsaw


@functools.lru_cache(maxsize=8)
def permutation_set(size: int = 100, seed: int = 0) -> np.ndarray:
    """``size`` permutations of the 9 tiles ``[size, 9]``, chosen greedily from all 9! for the largest
    minimum Hamming distance to those chosen so far (ties: the largest total distance). Noroozi & Favaro's
    Algorithm 1 maximizes the average distance alone; taking the minimum first keeps any two permutations of
    the set far apart, so no two classes are nearly the same puzzle."""
    if not 2 <= size <= 1000:
        raise ValueError(f"the jigsaw permutation set must hold 2..1000 permutations, got {size}")
    every = np.array(list(itertools.permutations(range(GRID * GRID))), dtype=np.int8)
    first = int(np.random.default_rng(seed).integers(len(every)))
    chosen = [first]
    nearest = (every != every[first]).sum(1)
    total = nearest.astype(np.int64)
    for _ in range(size - 1):
        ties = np.flatnonzero(nearest == nearest.max())
        pick = int(ties[np.argmax(total[ties])])
        chosen.append(pick)
        distance = (every != every[pick]).sum(1)
        nearest, total = np.minimum(nearest, distance), total + distance
    return every[chosen].astype(np.int64)


def normalize_tiles(tiles: Tensor) -> Tensor:
    """Each tile to the same mean and spread (Noroozi & Favaro normalize every tile on its own, so tiles
    cannot be matched by their brightness), mapped to a typical image's range in [0, 1]."""
    mean = tiles.mean((-3, -2, -1), keepdim=True)
    std = tiles.std((-3, -2, -1), keepdim=True).clamp_min(1e-3)
    return (tiles - mean) / std * 0.25 + 0.45


def jigsaw_batch(x: Tensor, permutations: Tensor, generator=None) -> tuple[Tensor, Tensor]:
    """The 9 tiles of every image in one permutation of ``permutations [P, 9]`` -> ``[9B, 3, t, t]`` (each
    image's tiles adjacent; tile ``i`` of the puzzle is grid cell ``permutation[i]``) and the permutation's
    index."""
    cell, tile, _ = grid_geometry(x.shape[-1], JIGSAW_TILE)
    tops, lefts, tile = grid_corners(len(x), x.shape[-1], JIGSAW_TILE, 0, cell - tile, generator, x.device)
    labels = torch.randint(0, len(permutations), (len(x),), generator=generator, device=x.device)
    order = permutations.to(x.device)[labels]  # [B, 9]
    tiles = extract_patches(x, tops.gather(1, order), lefts.gather(1, order), tile)
    return normalize_tiles(tiles).flatten(0, 1), labels


# ------------------------------------------------------------------------------------------- colorization


def rgb_to_lab(x: Tensor) -> Tensor:
    """sRGB in [0, 1] ``[B, 3, H, W]`` -> CIE Lab (D65): L in [0, 100], a and b roughly in [-110, 110]."""
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    to_xyz = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                           [0.0193339, 0.1191920, 0.9503041]], dtype=x.dtype, device=x.device)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,bjhw->bihw", to_xyz, linear) / white[:, None, None]
    f = torch.where(xyz > (6 / 29) ** 3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


@functools.lru_cache(maxsize=2)
def ab_bins(grid: float = AB_GRID) -> Tensor:
    """Centres ``[Q, 2]`` of the ab grid cells that sRGB colours reach, from the sRGB cube sampled at 64
    levels per channel: 261 at grid 10 (Zhang et al. count 313 in the gamut they used)."""
    levels = torch.linspace(0, 1, 64, dtype=torch.float64)
    cube = torch.cartesian_prod(levels, levels, levels).T.reshape(1, 3, -1, 1)
    ab = rgb_to_lab(cube)[0, 1:, :, 0].T
    return torch.unique(torch.round(ab / grid), dim=0).float() * grid


def nearest_bins(ab: Tensor, bins: Tensor, count: int = 1) -> tuple[Tensor, Tensor]:
    """Indices ``[N, count]`` of the bins nearest each ab value ``[N, 2]``, and their squared distances."""
    distance = torch.cdist(ab, bins.to(ab)) ** 2
    d, idx = distance.topk(count, dim=1, largest=False)
    return idx, d


def soft_encode(ab: Tensor, bins: Tensor) -> tuple[Tensor, Tensor]:
    """Zhang et al.'s soft target: Gaussian weights (sigma 5) over the 5 nearest bins ``[N, Q]``, and the
    nearest bin of each value ``[N]``."""
    idx, d = nearest_bins(ab, bins, SOFT_NEIGHBOURS)
    weights = torch.softmax(-d / (2 * SOFT_SIGMA ** 2), dim=1)
    return torch.zeros(len(ab), len(bins), device=ab.device).scatter_(1, idx, weights), idx[:, 0]


def smoothing_kernel(bins: Tensor) -> Tensor:
    """Gaussian (sigma 5) smoothing over the ab plane ``[Q, Q]``, columns summing to 1 so mass is kept."""
    kernel = torch.exp(-torch.cdist(bins, bins) ** 2 / (2 * SMOOTH_SIGMA ** 2))
    return kernel / kernel.sum(0, keepdim=True)


def rebalancing_weights(counts: Tensor, kernel: Tensor) -> Tensor:
    """Zhang et al.'s class rebalancing: ``w ∝ ((1 - λ) p̃ + λ / Q)^-1`` with ``p̃`` the bin distribution
    ``counts`` smoothed by ``kernel`` (:func:`smoothing_kernel`), scaled so ``E_p̃[w] = 1``."""
    smoothed = kernel @ (counts / counts.sum().clamp_min(1))
    w = 1 / ((1 - REBALANCE_LAMBDA) * smoothed + REBALANCE_LAMBDA / len(counts))
    return w / (smoothed * w).sum()


def colour_targets(x: Tensor, size: tuple[int, int], bins: Tensor) -> tuple[Tensor, Tensor]:
    """Soft targets ``[B * h * w, Q]`` and nearest bins ``[B * h * w]`` of the images' ab colour averaged
    over the ``size`` cells the head predicts."""
    ab = F.adaptive_avg_pool2d(rgb_to_lab(x)[:, 1:], size)
    return soft_encode(ab.permute(0, 2, 3, 1).reshape(-1, 2), bins)


def colorization_loss(scores: Tensor, soft: Tensor, nearest: Tensor, weights: Tensor) -> Tensor:
    """Rebalanced multinomial cross-entropy of ``scores [B, Q, h, w]`` against soft targets: each cell
    weighted by its nearest bin's rebalancing weight."""
    log_p = F.log_softmax(scores.float().permute(0, 2, 3, 1).reshape(-1, scores.shape[1]), dim=1)
    return -(weights[nearest] * (soft * log_p).sum(1)).mean()


def has_colour(images: np.ndarray, tolerance: int = 2) -> bool:
    """Whether any of the uint8 ``[N, H, W, 3]`` images has channels that differ (not grayscale as RGB)."""
    channels = images.astype(np.int16)
    return bool(np.abs(channels - channels[..., :1]).max(initial=0) > tolerance)
