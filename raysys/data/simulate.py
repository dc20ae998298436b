"""The built-in Mars-like data generator: four datasets in the exact real on-disk formats.

Used on a machine with no data (``raysys simulate --out DIR``). Everything is a deterministic function
of ``--seed``; the formats reproduced here are those of the README's Data section.

Written under ``out``:

* ``msl-labeled-data-set-v2.1/``  19 Curiosity classes, real class proportions, sol-ordered splits, train
  holds ``-fh/-fv/-r90/-r180/-r270`` copies (about 2,000 originals : 3,920 copies at paper scale).
* ``hirise-map-proj-v3_2/``       8 orbital classes (~80 % "other"), grayscale, six copies of every
  train/val original, minority rows repeated in the split file.
* ``rover-unlabeled/``            the pretraining pool: rover traverses over a Voronoi terrain map, with
  ``positions.csv``, ``hidden-labels.csv`` (diagnostics only) and ``holdout-traverses.txt``.
* ``diverse/``                    ImageFolder of >= 100 balanced procedural classes (ImageNet stand-in).

The visual model: every class is a *structure* (bands, rings, branching lines, grids, discs, ...) drawn on
shared noise textures, and every image then goes through strong *nuisance* shared by all classes
(colour cast, hue, saturation, brightness, contrast, gamma, blur, sensor noise, rotation, scale,
translation). Class identity lives in geometry, not in mean colour, so colour-jitter/crop invariance
(SimCLR) pays off while raw-pixel statistics are dominated by nuisance.

Documented choices:

* Every class appears at least once in every split at every preset, so the tiny MSL classes (Arm cover,
  DRT, ...) and tiny HiRISE classes are oversampled relative to the real proportions at small presets.
* The HiRISE preset figure counts *originals*; the files written are about 6x as many (the copies).
* Rover pool: the terrain classes (Nearby surface, Close-up rock, Distant landscape, Float, Layers,
  Light-toned veins, Sand) are regions of the map; the rover/sky/artifact classes are *events*: the rover
  stops and takes a short run of frames of a target (wheel, sun, cal target, drill hole, ...), so an event
  frame is spatially close to terrain frames of another class, as in real data. Event frequency is set
  so that the pool's class proportions are roughly the MSL train proportions.
* Hidden pool labels are MSL class ids.
* Rotations ``-r90/-r180/-r270`` are counter-clockwise (``numpy.rot90``); ``-brt`` multiplies by 1.25.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from raysys.errors import SimulateError

# ----------------------------------------------------------------------------------------------------
# Real class tables (mars-datasets.md)
# ----------------------------------------------------------------------------------------------------

MSL_CLASSES = [
    "Arm cover", "Other rover part", "Artifact", "Nearby surface", "Close-up rock", "DRT", "DRT spot",
    "Distant landscape", "Drill hole", "Night sky", "Float", "Layers", "Light-toned veins",
    "Mastcam cal target", "Sand", "Sun", "Wheel", "Wheel joint", "Wheel tracks",
]
MSL_TRAIN_COUNTS = [10, 190, 680, 1554, 1422, 8, 214, 342, 252, 40, 152, 182, 42, 122, 228, 182, 212, 62, 26]
MSL_VAL_COUNTS = [1, 11, 62, 74, 50, 4, 1, 14, 5, 3, 5, 21, 4, 12, 19, 5, 5, 1, 3]
MSL_TEST_COUNTS = [4, 10, 132, 187, 84, 6, 7, 34, 12, 4, 1, 17, 27, 29, 16, 19, 5, 5, 1]
MSL_TOTAL = 6820
MSL_TRAIN_ORIGINALS = 2000
MSL_SOLS = {"train": (3, 948), "val": (952, 1918), "test": (1922, 2224)}
MSL_AUGS = ("fh", "fv", "r90", "r180", "r270")

HIRISE_CLASSES = [
    "other", "crater", "dark dune", "slope streak", "bright dune", "impact ejecta", "swiss cheese", "spider",
]
HIRISE_ORIGINALS = {
    "train": [5717, 514, 88, 132, 223, 49, 183, 91],
    "val": [1603, 191, 12, 86, 11, 18, 73, 31],
    "test": [1482, 89, 66, 49, 16, 7, 42, 42],
}
HIRISE_TOTAL = 10815
HIRISE_AUGS = ("r90", "r180", "r270", "fh", "fv", "brt")
HIRISE_REPEATS = 2863  # minority-class rows repeated in the real split file

MSL_DIR, HIRISE_DIR, ROVER_DIR, DIVERSE_DIR = (
    "msl-labeled-data-set-v2.1", "hirise-map-proj-v3_2", "rover-unlabeled", "diverse")
STAMP = "raysys-simulate.json"
GENERATOR_VERSION = 4  # 3: held-out traverses drive back over their paths; 4: HiRISE at HIRISE_NUISANCE
# HiRISE products are calibrated, map-projected grayscale from one instrument: their brightness, contrast, gamma,
# blur and noise vary far less than a rover camera's. At the rover's full nuisance the demo HiRISE measured no
# encoder apart (README, Evaluation: frozen features of any encoder could not separate its train split).
HIRISE_NUISANCE = 0.3

# hirise_test: the demo's test split has the real one's 1,793 originals and class counts (at 1,000 originals in all
# it would hold 166, one or two of some classes, and balanced accuracy would move 6 points per image).
PRESETS = {
    "smoke": dict(size=32, count=600, msl=400, hirise=400, diverse_classes=100, diverse_per_class=4),
    "demo": dict(size=64, count=5000, msl=1800, hirise=1000, hirise_test=1793, diverse_classes=100,
                 diverse_per_class=20),
    "paper": dict(size=227, count=100_000, msl=MSL_TOTAL, hirise=HIRISE_TOTAL, diverse_classes=1000,
                  diverse_per_class=100),
}

# Rover pool: which MSL classes are map regions; the rest are events (rover / sky / artifact targets).
ROVER_TERRAIN = [3, 4, 7, 10, 11, 12, 14]
ROVER_EVENTS = [c for c in range(19) if c not in ROVER_TERRAIN]
METRES_TO_UNITS = 0.03  # texture units per metre: a 4 m step shifts the view by 6 % of its width
EVENT_MEAN_FRAMES = 4.0

_Z = 24  # appearance parameters per scene: 0..21 structure and colour, 22..23 texture offsets
_LATENT = 10  # nuisance latent dimensions (see _nuisance)


# ----------------------------------------------------------------------------------------------------
# Planning (pure functions: counts, names, splits; no pixels)
# ----------------------------------------------------------------------------------------------------

def apportion(total: int, weights, minimum: int = 1) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``weights``, each at least ``minimum``.

    Largest-remainder rounding, so integer weights summing to ``total`` are returned unchanged. When
    ``total`` is too small for the minimum, the minimum wins (the sum is then ``minimum * len(weights)``).
    """
    w = np.asarray(weights, dtype=np.float64)
    total = max(int(total), minimum * len(w))
    quota = total * w / w.sum()
    counts = np.maximum(np.floor(quota), minimum).astype(np.int64)
    while counts.sum() < total:
        counts[np.argmax(quota - counts)] += 1
    while counts.sum() > total:
        over = np.where(counts > minimum, counts - quota, -np.inf)
        counts[np.argmax(over)] -= 1
    return counts


def plan_msl_counts(total: int) -> dict[str, np.ndarray]:
    """Per-class image counts of each MSL split for a dataset of about ``total`` files.

    Returns ``{"train", "val", "test", "train_originals"}`` arrays of 19 counts; ``train`` includes the
    augmented copies. At ``total == 6820`` these are exactly the real counts.
    """
    s = total / MSL_TOTAL
    out = {
        "train": apportion(round(sum(MSL_TRAIN_COUNTS) * s), MSL_TRAIN_COUNTS),
        "val": apportion(round(sum(MSL_VAL_COUNTS) * s), MSL_VAL_COUNTS),
        "test": apportion(round(sum(MSL_TEST_COUNTS) * s), MSL_TEST_COUNTS),
    }
    train = out["train"]
    originals = apportion(round(MSL_TRAIN_ORIGINALS * s), train)
    # Each original has at most five copies, and an original never outnumbers its class.
    out["train_originals"] = np.clip(originals, -(-train // (1 + len(MSL_AUGS))), train)
    return out


def plan_hirise_counts(originals: int, test: int | None = None) -> dict[str, np.ndarray]:
    """Per-class HiRISE *original* counts per split for about ``originals`` originals (real ones at 10815), the
    test split with ``test`` originals instead when given (the real class shares either way)."""
    s = originals / HIRISE_TOTAL
    sizes = {split: round(sum(c) * s) for split, c in HIRISE_ORIGINALS.items()}
    if test is not None:
        sizes["test"] = test
    return {split: apportion(sizes[split], c) for split, c in HIRISE_ORIGINALS.items()}


def msl_name(sol: int, uid: int, rng: np.random.Generator) -> str:
    """A Mastcam-style product name, e.g. ``0042MR0001830110101823Q01_DRCL`` (first 4 digits: the sol)."""
    cam = ("ML", "MR", "MH")[rng.integers(3)]
    seq, cmd = rng.integers(0, 10000), rng.integers(0, 1000)
    prod = "QIPEC"[rng.integers(5)]
    return f"{sol:04d}{cam}{seq:06d}{cmd:03d}{uid % 10_000_000:07d}{prod}{rng.integers(1, 4):02d}_DRCL"


@dataclass
class ScenePlan:
    """Everything needed to render a list of images: labels, appearance, view and nuisance latents."""

    names: list[str]
    labels: np.ndarray  # int, class id
    z: np.ndarray  # [n, _Z] appearance in [0, 1)
    view: np.ndarray  # [n, 6] tx, ty, theta, log-scale, object jitter u, v
    latent: np.ndarray  # [n, _LATENT] standard-normal nuisance latent
    splits: list[str] = field(default_factory=list)
    copies: list[tuple[str, ...]] = field(default_factory=list)  # augmentation suffixes per original
    sols: np.ndarray | None = None


def _random_views(rng: np.random.Generator, labels: np.ndarray, upright: set[int]) -> np.ndarray:
    """Independent views: full rotation (small tilt for upright scenes), scale 0.7-1.4, world offset."""
    n = len(labels)
    theta = rng.uniform(0, 2 * np.pi, n)
    tilt = rng.normal(0, 0.06, n)
    is_up = np.isin(labels, list(upright))
    theta[is_up] = tilt[is_up]
    return np.stack([rng.uniform(0, 64, n), rng.uniform(0, 64, n), theta, rng.normal(0, 0.18, n),
                     np.zeros(n), np.zeros(n)], axis=1)


def plan_msl(total: int, seed: int) -> ScenePlan:
    """Plan the MSL dataset: one entry per *original*, with its split, sol, class and copies."""
    rng = np.random.default_rng([seed, 1])
    counts = plan_msl_counts(total)
    names, labels, splits, sols, copies = [], [], [], [], []
    uid = 0
    for split in ("train", "val", "test"):
        per_class = counts["train_originals"] if split == "train" else counts[split]
        lo, hi = MSL_SOLS[split]
        for c, n_orig in enumerate(per_class):
            n_copies = int(counts["train"][c] - n_orig) if split == "train" else 0
            k = np.full(n_orig, n_copies // n_orig)
            k[rng.choice(n_orig, n_copies % n_orig, replace=False)] += 1
            for i in range(n_orig):
                sol = int(rng.integers(lo, hi + 1))
                names.append(msl_name(sol, uid, rng))
                uid += 1
                labels.append(c)
                splits.append(split)
                sols.append(sol)
                picked = rng.choice(len(MSL_AUGS), k[i], replace=False)
                copies.append(tuple(MSL_AUGS[j] for j in sorted(picked)))
    labels = np.asarray(labels)
    n = len(labels)
    return ScenePlan(names, labels, rng.random((n, _Z)), _random_views(rng, labels, _MSL_UPRIGHT),
                     rng.standard_normal((n, _LATENT)), splits, copies, np.asarray(sols))


def plan_hirise(originals: int, seed: int, test: int | None = None) -> ScenePlan:
    """Plan the HiRISE dataset: one entry per original; train/val originals get all six copies."""
    rng = np.random.default_rng([seed, 2])
    counts = plan_hirise_counts(originals, test)
    n = sum(int(c.sum()) for c in counts.values())
    # Crops come from a few hundred source products; crop numbers are unique within a product.
    n_products = max(1, n // 25)
    products = [f"ESP_{o:06d}_{lat:04d}_RED" for o, lat in
                zip(rng.choice(np.arange(11000, 70000), n_products, replace=False),
                    rng.integers(0, 3600, n_products))]
    next_crop = np.ones(n_products, dtype=np.int64)
    names, labels, splits, copies = [], [], [], []
    for split in ("train", "val", "test"):
        for c, k in enumerate(counts[split]):
            for _ in range(k):
                p = int(rng.integers(n_products))
                names.append(f"{products[p]}-{next_crop[p]:04d}")
                next_crop[p] += 1
                labels.append(c)
                splits.append(split)
                copies.append(HIRISE_AUGS if split != "test" else ())
    labels = np.asarray(labels)
    view = _random_views(rng, labels, set())
    return ScenePlan(names, labels, rng.random((n, _Z)), view, rng.standard_normal((n, _LATENT)),
                     splits, copies)


@dataclass
class RoverPlan(ScenePlan):
    """A :class:`ScenePlan` for the pool plus capture poses."""

    x: np.ndarray = None
    y: np.ndarray = None
    heading: np.ndarray = None  # degrees in [0, 360)
    traverse: np.ndarray = None
    frame: np.ndarray = None
    holdout: list[int] = field(default_factory=list)
    map_size: float = 0.0


def _rover_map(count: int, rng: np.random.Generator) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """The terrain map: Voronoi regions (about one per 50 frames) with a terrain class drawn in proportion
    to the MSL train counts and their own appearance. Returns (map side, region class, sites, region z)."""
    n_regions = max(2 * len(ROVER_TERRAIN), count // 50)
    map_size = 80.0 * math.sqrt(n_regions)
    terrain_w = np.asarray(MSL_TRAIN_COUNTS, float)[ROVER_TERRAIN]
    region_class = rng.permutation(np.repeat(ROVER_TERRAIN, apportion(n_regions, terrain_w)))
    sites = rng.uniform(0, map_size, (n_regions, 2))
    region_z = rng.random((n_regions, _Z))
    return map_size, region_class, sites, region_z


def _rover_step(pos: np.ndarray, head: float, map_size: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """One driving step: turn a little, move 2-6 m ahead, and reflect at the map border (a step is far
    shorter than the map, so one reflection per axis suffices). Returns the new (position, heading)."""
    head += rng.normal(0, 0.2)
    step = rng.uniform(2, 6) * np.array([math.cos(head), math.sin(head)])
    pos = pos + step
    for d in range(2):
        if not 0 <= pos[d] <= map_size:
            pos[d] = -pos[d] if pos[d] < 0 else 2 * map_size - pos[d]
            head = math.pi - head if d == 0 else -head
    return pos, head


def _drive(lengths: np.ndarray, map_size: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The traverses: random walks from a random start, interrupted by events (the rover stands still and
    pans slightly around one target) so that events make up their MSL share of the frames. Returns rows
    ``(x, y, heading_rad, traverse, frame, event_class or -1, event_id)`` and the number of events."""
    event_w = np.asarray(MSL_TRAIN_COUNTS, float)[ROVER_EVENTS]
    f_event = event_w.sum() / sum(MSL_TRAIN_COUNTS)
    p_start = f_event / (EVENT_MEAN_FRAMES * (1 - f_event) + f_event)  # event share of frames = f_event
    rows = []
    event_id = 0
    for t, n_frames in enumerate(lengths):
        pos = rng.uniform(0, map_size, 2)
        head = rng.uniform(0, 2 * np.pi)
        ev_left, ev_class = 0, -1
        for f in range(n_frames):
            if ev_left == 0 and rng.random() < p_start:
                ev_left = int(rng.geometric(1 / EVENT_MEAN_FRAMES))
                ev_class = int(rng.choice(ROVER_EVENTS, p=event_w / event_w.sum()))
                event_id += 1
            if ev_left > 0:
                head += rng.normal(0, 0.05)
                ev_left -= 1
                rows.append((pos[0], pos[1], head, t, f, ev_class, event_id))
                continue
            pos, head = _rover_step(pos, head, map_size, rng)
            rows.append((pos[0], pos[1], head, t, f, -1, 0))
    return np.asarray(rows, dtype=np.float64), event_id


def _revisit(rows: np.ndarray, holdout: list[int], n_trav: int,
             rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Held-out drives that come back: the second half of each held-out traverse becomes a traverse of its own
    (a new id, frames numbered from 0) that re-drives the first half the other way round, one frame per frame,
    heading turned by 180 degrees, off the outbound track by a constant 1 m-scale offset plus 0.2 m of
    jitter. It keeps the traverse's lighting (its latent drifts on), so place recognition sees the same places
    on another drive at another heading. Returning frames are terrain frames (no event). ``rows`` as
    :func:`_drive` returns them; returns a new array and the held-out ids, the returns' included. The pool
    is untouched: only held-out frames move."""
    rows, held = rows.copy(), list(holdout)
    for i, t in enumerate(holdout):
        frames = np.flatnonzero(rows[:, 3] == t)
        half = len(frames) // 2
        out, back = frames[:half], frames[half:]
        at = out[np.clip(half - 1 - np.arange(len(back)), 0, None)] if half else back
        offset = rng.normal(0, 1.0, 2)
        rows[back, :2] = rows[at, :2] + offset + rng.normal(0, 0.2, (len(back), 2))
        rows[back, 2] = rows[at, 2] + np.pi + rng.normal(0, 0.1, len(back))
        rows[back, 3], rows[back, 4] = n_trav + i, np.arange(len(back))
        rows[back, 5], rows[back, 6] = -1, 0
        held.append(n_trav + i)
    return rows, sorted(held)


def _rover_views(x: np.ndarray, y: np.ndarray, head: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Views from the poses, so consecutive frames overlap: terrain = pose; an upright landscape pans with
    the heading; objects drift smoothly with position."""
    tx, ty = x * METRES_TO_UNITS, y * METRES_TO_UNITS
    theta = head.copy()
    upright = np.isin(labels, list(_MSL_UPRIGHT))
    tx = np.where(upright, head * 0.8 + (x + y) * METRES_TO_UNITS * 0.3, tx)
    theta[upright] = 0.03 * np.sin(head[upright] * 3)
    ju = 0.25 * np.sin(tx * 0.7 + head)
    jv = 0.25 * np.sin(ty * 0.7 - head)
    return np.stack([tx, ty, theta, 0.05 * np.sin(tx + ty), ju, jv], axis=1)


def _rover_latents(lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Nuisance latents: one lighting/camera state per traverse, drifting slowly frame to frame (AR(1))."""
    n = int(np.sum(lengths))
    latent = np.empty((n, _LATENT))
    base = rng.standard_normal((len(lengths), _LATENT))
    eps = rng.standard_normal((n, _LATENT))
    start = 0
    for t, n_frames in enumerate(lengths):
        dev = np.zeros(_LATENT)
        for i in range(start, start + n_frames):
            dev = 0.9 * dev + math.sqrt(1 - 0.81) * 0.35 * eps[i]
            latent[i] = base[t] + dev
        start += n_frames
    return latent


def plan_rover(count: int, seed: int) -> RoverPlan:
    """Plan the unlabeled pool: a Voronoi terrain map and rover traverses (random walks) across it.

    Terrain frames take the class and appearance of the region under the rover, and their view is a
    function of the pose (world offset = position, rotation = heading), so consecutive frames overlap.
    Event frames (see module doc) keep the rover still and pan slightly around one target.
    """
    from scipy.spatial import (
        cKDTree,  # scikit-learn's dependency; only needed for the pool
    )

    rng = np.random.default_rng([seed, 3])  # one stream, drawn in a fixed order: same seed, same plan
    n_trav = max(3, round(count / 100))
    lengths = apportion(count, rng.uniform(0.5, 1.5, n_trav))
    map_size, region_class, sites, region_z = _rover_map(count, rng)
    a, n_events = _drive(lengths, map_size, rng)
    event_z = rng.random((n_events + 1, _Z))
    latent = _rover_latents(lengths, rng)
    sols = (3 + a[:, 3] * 2220 // max(1, n_trav - 1)).astype(int)
    names = [msl_name(int(s), 2_000_000 + i, rng) for i, s in enumerate(sols)]
    holdout = sorted(rng.choice(n_trav, max(1, round(0.1 * n_trav)), replace=False).tolist())
    # The returns draw from their own stream: the pool's frames stay those of version 1.
    a, holdout = _revisit(a, holdout, n_trav, np.random.default_rng([seed, 4]))
    x, y, head, trav, frame, ev_class, ev_id = a.T
    n = len(a)
    region = cKDTree(sites).query(np.stack([x, y], 1))[1]
    is_event = ev_class >= 0
    labels = np.where(is_event, ev_class, region_class[region]).astype(np.int64)
    z = np.where(is_event[:, None], event_z[ev_id.astype(int)], region_z[region])
    view = _rover_views(x, y, head, labels)
    return RoverPlan(names, labels, z, view, latent, ["unlabeled"] * n, [()] * n, sols,
                     x=x, y=y, heading=np.degrees(head) % 360.0, traverse=trav.astype(int),
                     frame=frame.astype(int), holdout=holdout, map_size=map_size)


# ----------------------------------------------------------------------------------------------------
# Noise textures and rendering context
# ----------------------------------------------------------------------------------------------------

_FINE, _MED, _COARSE, _WHITE = range(4)
_PERIOD_TEXELS = (3.0, 8.0, 32.0, 1.0)  # typical feature period of each texture, in texels


class NoiseBank:
    """Four periodic 256x256 noise textures (fine grain, medium blobs, coarse relief, white).

    Sampling one shared bank at per-image offsets, rotations and scales is far cheaper than
    synthesising fresh noise for every image, and makes appearance a function of (offset, view).
    """

    N = 256

    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, 99])
        f = np.fft.fftfreq(self.N)
        fr = np.hypot(f[:, None], f[None, :])
        fr[0, 0] = 1e-6
        filters = (np.exp(-(((fr - 1 / 3) / 0.12) ** 2)),
                   np.exp(-((np.log(fr / 0.125) / 0.45) ** 2)),
                   fr ** -1.0 * np.exp(-((fr / 0.035) ** 2)),
                   np.ones_like(fr))
        self.flat = []
        for filt in filters:
            filt[0, 0] = 0
            t = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((self.N, self.N))) * filt))
            self.flat.append(((t - t.mean()) / t.std()).astype(np.float32).ravel())

    def sample(self, k: int, x: np.ndarray, y: np.ndarray, nearest: bool = False) -> np.ndarray:
        """Texture ``k`` at texel coordinates (x, y), wrapped; bilinear unless ``nearest``."""
        t, m, n = self.flat[k], self.N - 1, self.N
        if nearest:
            return t[(np.rint(y).astype(np.int32) & m) * n + (np.rint(x).astype(np.int32) & m)]
        x0, y0 = np.floor(x), np.floor(y)
        fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
        ix, iy = x0.astype(np.int32) & m, y0.astype(np.int32) & m
        ix1, r0, r1 = (ix + 1) & m, iy * n, ((iy + 1) & m) * n
        a, b, c, d = t[r0 + ix], t[r0 + ix1], t[r1 + ix], t[r1 + ix1]
        top = a + (b - a) * fx
        return top + (c + (d - c) * fx - top) * fy


class _Ctx:
    """Per-group rendering context: local (u, v) and world (U, V) coordinates of every pixel, params."""

    def __init__(self, size: int, z: np.ndarray, view: np.ndarray, bank: NoiseBank, base: np.ndarray):
        g = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1)
        self.gx, self.gy = g[None, None, :], g[None, :, None]  # sensor coordinates (no rotation)
        col = lambda a: a.astype(np.float32)[:, None, None]  # noqa: E731
        sc = np.exp(view[:, 3])
        cs, sn = col(np.cos(view[:, 2]) * sc), col(np.sin(view[:, 2]) * sc)
        self.u = cs * self.gx - sn * self.gy
        self.v = sn * self.gx + cs * self.gy
        self.U, self.V = self.u + col(view[:, 0]), self.v + col(view[:, 1])
        self.ju, self.jv = col(view[:, 4]), col(view[:, 5])
        self.z, self.bank, self.base, self.m = z, bank, base, len(z)
        self.ox, self.oy = col(z[:, 22] * NoiseBank.N), col(z[:, 23] * NoiseBank.N)

    def p(self, k: int, lo: float, hi: float) -> np.ndarray:
        """Appearance parameter k mapped to [lo, hi), shaped [m, 1, 1]."""
        return (lo + (hi - lo) * self.z[:, k]).astype(np.float32)[:, None, None]

    def tex(self, k: int, period: float | np.ndarray, salt: int = 0, shift=(0.0, 0.0),
            u=None, v=None, nearest: bool = False) -> np.ndarray:
        """Texture k at world coordinates with feature period ``period`` (image width = 2 units)."""
        u = self.U if u is None else u
        v = self.V if v is None else v
        f = _PERIOD_TEXELS[k] / period
        return self.bank.sample(k, u * f + self.ox + (salt * 61.7 + shift[0]),
                                v * f + self.oy + (salt * 29.3 + shift[1]), nearest)

    def obj(self, kx: int, ky: int, spread: float):
        """Local coordinates relative to an object centre placed by parameters kx, ky (+ pose jitter)."""
        return self.u - (self.p(kx, -spread, spread) + self.ju), self.v - (self.p(ky, -spread, spread) + self.jv)


def _soft(d: np.ndarray, w: float | np.ndarray = 0.03) -> np.ndarray:
    """1 where d < 0, 0 where d > 0, linear ramp of width w: anti-aliased inside test."""
    return np.clip(0.5 - d / w, 0.0, 1.0)


def _ground(c: _Ctx, salt: int = 0) -> np.ndarray:
    """Generic dusty ground: the backdrop of object classes and of the scene-level ones."""
    return (0.45 + 0.12 * c.tex(_COARSE, 1.6, salt) + 0.06 * c.tex(_MED, 0.35, salt + 1)
            + 0.05 * c.tex(_FINE, 0.06, salt + 2))


def _relief(c: _Ctx, k: int, period, salt: int) -> np.ndarray:
    """Directional-light shading of a height field (difference of two offset samples)."""
    return c.tex(k, period, salt) - c.tex(k, period, salt, shift=(1.2, 0.8))


def _blend(bg, fg, alpha):
    return bg + (fg - bg) * alpha


# ----------------------------------------------------------------------------------------------------
# MSL classes: each returns (L, colour) where L [m,S,S] is brightness and colour None (use the image's
# base colour) or a per-pixel colour map [m,S,S,3].
# ----------------------------------------------------------------------------------------------------

def _arm_cover(c):
    du, dv = c.obj(0, 1, 0.25)
    a, b = c.p(4, 0.5, 0.9), c.p(5, 0.3, 0.7)
    inside = _soft(np.abs(du) - a) * _soft(np.abs(dv) - b)
    panel = 0.5 + 0.2 * du / a + 0.3 * np.exp(-(((du - 0.5 * dv - c.p(6, -0.5, 0.5)) / 0.12) ** 2))
    k = c.p(7, 4, 8)  # bolt rows along the long edges
    bolt = ((np.abs(dv) - (b - 0.1)) ** 2 + ((np.mod(du * k, 1) - 0.5) / k) ** 2) < (0.035 ** 2)
    panel = panel - 0.4 * bolt
    return _blend(0.6 * _ground(c), panel, inside), None


def _other_rover_part(c):
    L = 0.25 + 0.1 * c.tex(_COARSE, 1.5)
    for j in range(3):  # cylindrical bars, later ones in front
        phi = c.p(4 + j, 0, np.pi)
        d = np.abs(c.u * np.cos(phi) + c.v * np.sin(phi) - c.p(7 + j, -0.6, 0.6))
        w = c.p(10 + j, 0.06, 0.22)
        bar = _soft(d - w, 0.02)
        shade = 0.35 + 0.5 * np.sqrt(np.clip(1 - (d / w) ** 2, 0, 1)) * c.p(13 + j, 0.6, 1.2)
        L = _blend(L, shade, bar)
    return L, None


def _artifact(c):
    # Sensor artefacts live in sensor coordinates: blocky compression tiles, streaked rows, lost rows.
    nb = c.p(4, 3, 8)
    qx, qy = np.floor((c.gx + 1) * nb) / nb, np.floor((c.gy + 1) * nb) / nb
    blocks = c.tex(_COARSE, 0.6, 1, u=qx, v=qy)
    rows = c.tex(_WHITE, 0.02, 2, u=c.p(5, 0, 50), v=c.gy, nearest=True)  # constant along each row
    L = 0.45 + 0.25 * blocks + 0.5 * (rows > c.p(6, 1.0, 1.8)) - 0.3 * (rows < -c.p(7, 1.2, 2.0))
    lost = c.gy > c.p(8, 0.0, 2.5)  # missing bottom rows (only when the cut falls inside the frame)
    return np.where(lost, 0.02, L), None


def _nearby_surface(c):
    per = c.p(0, 0.12, 0.3)
    peb = np.clip((c.tex(_MED, per, 1) - c.p(1, 0.5, 1.3)) * 3, 0, 1)
    shadow = np.clip((c.tex(_MED, per, 1, shift=(0.0, 1.5)) - c.p(1, 0.5, 1.3)) * 3, 0, 1)
    L = _ground(c) + 0.28 * peb - 0.22 * np.clip(shadow - peb, 0, 1)
    return L + 0.04 * c.tex(_FINE, 0.04, 3), None


def _close_up_rock(c):
    per = c.p(0, 0.8, 1.6)
    h = c.tex(_COARSE, per, 1) + 0.5 * c.tex(_MED, per / 3, 2)
    face = np.clip((h - c.p(1, -1.2, 0.0)) * 2, 0, 1)  # rock faces vs dark cracks
    L = 0.3 + 0.3 * face + 0.45 * _relief(c, _COARSE, per, 1) + 0.4 * _relief(c, _MED, per / 3, 2)
    return L + 0.12 * c.tex(_FINE, c.p(2, 0.03, 0.07), 4), None


def _drt(c):
    du, dv = c.obj(0, 1, 0.2)
    r = np.hypot(du, dv)
    R = c.p(4, 0.35, 0.65)
    ang = np.arctan2(dv, du)
    bristle = 0.5 + 0.5 * np.cos(ang * c.p(5, 30, 60).round() + 4 * r)
    head = 0.3 + 0.35 * bristle * _soft(0.35 * R - r, 0.02) + 0.25 * np.exp(-(((r - R) / 0.03) ** 2))
    hub = 0.7 - 0.5 * (np.abs(np.cos(3 * ang)) > 0.97) * _soft(np.abs(r - 0.2 * R) - 0.03)
    head = _blend(head, hub, _soft(r - 0.35 * R, 0.02))
    return _blend(0.15 + 0.05 * c.tex(_COARSE, 1.2), head, _soft(r - R, 0.02)), None


def _rock_bg(c):
    return 0.42 + 0.1 * c.tex(_COARSE, 1.2, 5) + 0.2 * _relief(c, _MED, 0.4, 6) + 0.1 * c.tex(_FINE, 0.05, 7)


def _drt_spot(c):
    du, dv = c.obj(0, 1, 0.3)
    r = np.hypot(du, dv)
    R = c.p(4, 0.22, 0.45)
    spot = 0.32 + 0.06 * c.tex(_COARSE, 1.0, 8) + 0.05 * np.cos(2 * np.pi * r * c.p(5, 10, 18))
    rim = 0.2 * np.exp(-(((r - R) / 0.03) ** 2))
    return _blend(_rock_bg(c), spot, _soft(r - R, 0.02)) + rim, None


def _distant_landscape(c):
    hz = c.p(0, -0.5, 0.15) + 0.15 * c.p(1, 0.3, 1.0) * c.tex(_COARSE, 1.2, 1, v=0 * c.V)
    sky = 0.55 + 0.25 * np.clip((c.v + 1) / (hz + 1.01), 0, 1)
    d = np.maximum(c.v - hz, 0.02)  # ground perspective: texture shrinks towards the horizon
    ground = 0.38 + 0.18 * c.tex(_MED, 0.6, 2, u=c.U / d * 0.3, v=1 / d) * np.clip(d * 3, 0, 1)
    ground = ground + 0.08 * c.tex(_COARSE, 1.0, 3)
    return _blend(sky, ground, _soft(hz - c.v, 0.03)), None


def _drill_hole(c):
    du, dv = c.obj(0, 1, 0.3)
    r = np.hypot(du, dv)
    rh = c.p(4, 0.08, 0.18)
    tail = np.exp(-(((r - 1.7 * rh) / (0.7 * rh)) ** 2)) * (0.6 + 0.4 * c.tex(_FINE, 0.05, 9))
    L = _rock_bg(c) + 0.35 * tail
    return _blend(L, 0.05 + 0.15 * r / rh, _soft(r - rh, 0.015)), None


def _night_sky(c):
    star = c.tex(_WHITE, 0.04, 1, nearest=True)
    stars = np.clip((star - c.p(0, 2.3, 2.9)) * 2, 0, 1)
    return 0.03 + 0.03 * (c.gy + 1) + 0.9 * stars, None


def _float(c):
    bg = 0.5 + 0.06 * c.tex(_FINE, 0.04, 1) + 0.05 * c.tex(_COARSE, 1.5, 2)
    du, dv = c.obj(2, 3, 0.3)
    du = du / c.p(5, 0.7, 1.4)
    r = np.hypot(du, dv)
    rr = c.p(4, 0.2, 0.45) * (1 + 0.25 * c.tex(_MED, 0.6, 3, u=c.u, v=c.v))
    lx, ly = 0.6, -0.8
    rock = _soft(r - rr, 0.03)
    shadow = _soft(np.hypot(du - 0.15 * lx, dv - 0.15 * ly) - rr, 0.05) * (1 - rock)
    nz = np.sqrt(np.clip(1 - (r / rr) ** 2, 0, 1))
    shade = 0.3 + 0.35 * nz + 0.35 * (-du * lx - dv * ly) / rr + 0.1 * c.tex(_FINE, 0.05, 4)
    return _blend(bg * (1 - 0.5 * shadow), shade, rock), None


def _layers(c):
    phase = c.V * c.p(0, 2.5, 7.0) + c.p(1, 0.1, 0.6) * c.tex(_COARSE, 1.5, 1)
    band = 0.5 + 0.5 * np.cos(2 * np.pi * phase) + c.p(2, 0, 0.4) * np.cos(6 * np.pi * phase)
    band = np.clip((band - 0.5) * c.p(3, 1.2, 4.0) + 0.5, 0, 1)
    L = 0.33 + 0.35 * band + 0.07 * c.tex(_FINE, 0.05, 2) + 0.06 * c.tex(_MED, 0.5, 3)
    return L, None


def _veins(c):
    n = c.tex(_MED, c.p(0, 0.5, 1.0), 1)
    vein = np.exp(-((n / c.p(1, 0.1, 0.22)) ** 2))
    return 0.33 + 0.1 * c.tex(_COARSE, 1.5, 2) + 0.07 * c.tex(_FINE, 0.05, 3) + 0.5 * vein, None


# The calibration target's chips: fixed colours in a fixed layout, like the real target.
_CAL_COLOURS = np.array([
    [0.85, 0.15, 0.12], [0.15, 0.7, 0.2], [0.15, 0.25, 0.85], [0.9, 0.85, 0.15],
    [0.95, 0.95, 0.95], [0.6, 0.6, 0.6], [0.3, 0.3, 0.3], [0.9, 0.5, 0.1],
    [0.1, 0.7, 0.8], [0.7, 0.2, 0.7], [0.95, 0.95, 0.95], [0.1, 0.1, 0.1],
    [0.5, 0.3, 0.2], [0.8, 0.8, 0.5], [0.2, 0.4, 0.3], [0.6, 0.6, 0.9]], np.float32)


def _cal_target(c):
    du, dv = c.obj(0, 1, 0.25)
    A = c.p(4, 0.45, 0.8)
    inside = _soft(np.abs(du) - A, 0.02) * _soft(np.abs(dv) - A, 0.02)
    i = np.clip(np.floor((du / A + 1) * 2), 0, 3).astype(np.int32)
    j = np.clip(np.floor((dv / A + 1) * 2), 0, 3).astype(np.int32)
    chip = _CAL_COLOURS[i + 4 * j]
    fu, fv = np.mod((du / A + 1) * 2, 1), np.mod((dv / A + 1) * 2, 1)
    gap = (np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) < 0.08).astype(np.float32)
    post = np.hypot(du, dv) < 0.1 * A
    shadow = (np.abs(du + dv) < 0.04 * A) & (du - dv > 0)  # the gnomon's shadow
    L = _blend(0.6 * _ground(c), 0.9 - 0.7 * gap - 0.6 * shadow - 0.75 * post, inside)
    colour = _blend(c.base, chip, inside[..., None])
    return L, colour


def _sand(c):
    L = 0.55 + 0.09 * c.tex(_FINE, c.p(0, 0.025, 0.05), 1) + 0.05 * c.tex(_COARSE, 1.5, 2)
    ripple = np.cos(2 * np.pi * (c.U / c.p(1, 0.15, 0.3) + 0.5 * c.tex(_COARSE, 1.2, 3)))
    return L + c.p(2, 0.0, 0.07) * ripple, None


def _sun(c):
    du, dv = c.obj(0, 1, 0.4)
    r = np.hypot(du, dv)
    R = c.p(4, 0.04, 0.15)
    glow = 0.5 * np.exp(-r / (R * c.p(5, 1.5, 4.0)))
    flare = c.p(6, 0, 0.15) * np.exp(-(((r - 3 * R) / 0.02) ** 2))
    return 0.04 + glow + flare + _soft(r - R, 0.01), None


def _wheel(c):
    du, dv = c.obj(0, 1, 0.5)
    r = np.hypot(du, dv)
    R = c.p(4, 0.6, 1.0)
    ang = np.arctan2(dv, du)
    tread = 0.5 + 0.5 * np.cos(24 * ang + c.p(5, -8, 8) * r / R)
    spokes = (np.cos(6 * ang + c.p(6, 2, 5) * r / R) > 0.7).astype(np.float32)
    rim = r > 0.82 * R
    L = np.where(rim, 0.22 + 0.45 * tread, 0.18 + 0.35 * spokes)
    L = np.where(r < 0.15 * R, 0.7, L)
    return _blend(_ground(c), L, _soft(r - R, 0.02)), None


def _wheel_joint(c):
    du, dv = c.obj(0, 1, 0.25)
    r = np.hypot(du, dv)
    R = c.p(4, 0.3, 0.55)
    ang = np.arctan2(dv, du)
    phi = c.p(5, 0, 2 * np.pi)
    along, perp = du * np.cos(phi) + dv * np.sin(phi), np.abs(-du * np.sin(phi) + dv * np.cos(phi))
    w = c.p(6, 0.15, 0.3)
    arm = _soft(perp - w, 0.02) * (along > 0)
    L = _blend(0.22 + 0.08 * c.tex(_COARSE, 1.2), 0.4 + 0.3 * np.sqrt(np.clip(1 - (perp / w) ** 2, 0, 1)), arm)
    ring = _soft(np.abs(r - R) - 0.07, 0.02)
    bolts = (np.cos(8 * ang) > 0.9) & (np.abs(r - 0.7 * R) < 0.04)
    L = _blend(L, 0.15, _soft(r - R, 0.02))
    return _blend(L, 0.75, ring) + 0.5 * bolts, None


def _wheel_tracks(c):
    d, w = c.p(4, 0.3, 0.6), c.p(5, 0.12, 0.25)
    L = 0.5 + 0.08 * c.tex(_FINE, 0.04, 1) + 0.05 * c.tex(_COARSE, 1.5, 2)
    for side in (-1, 1):
        cross = c.u - side * d - c.ju
        band = _soft(np.abs(cross) - w, 0.03)
        marks = 0.5 + 0.5 * np.cos(2 * np.pi * (c.v * c.p(6, 3, 7) + 2 * np.abs(cross)))
        L = L - band * (0.12 + 0.2 * marks) + 0.15 * np.exp(-(((np.abs(cross) - w) / 0.03) ** 2))
    return L, None


_MSL_RENDER = [
    _arm_cover, _other_rover_part, _artifact, _nearby_surface, _close_up_rock, _drt, _drt_spot,
    _distant_landscape, _drill_hole, _night_sky, _float, _layers, _veins, _cal_target, _sand, _sun,
    _wheel, _wheel_joint, _wheel_tracks,
]
_MSL_UPRIGHT = {7}  # scenes that keep the horizon level
_MSL_METAL = {0, 1, 5, 16, 17}  # dust-covered hardware: a less saturated base colour
_MSL_DARKSKY = {9, 15}


# ----------------------------------------------------------------------------------------------------
# HiRISE classes (orbital, grayscale): each returns L [m,S,S]
# ----------------------------------------------------------------------------------------------------

def _terrain(c):
    return (0.5 + 0.12 * c.tex(_COARSE, c.p(19, 0.8, 2.0), 11) + 0.06 * c.tex(_MED, 0.4, 12)
            + 0.03 * c.tex(_FINE, 0.05, 13))


def _hi_other(c):
    # "other" is everything else on Mars: mix relief, ridges, mottling and faint layering at random.
    ridge = np.exp(-((c.tex(_MED, c.p(1, 0.3, 0.9), 1) / 0.3) ** 2))
    band = np.cos(2 * np.pi * (c.V * c.p(2, 2, 6) + 0.4 * c.tex(_COARSE, 1.2, 2)))
    return (_terrain(c) + c.p(3, 0, 0.5) * _relief(c, _COARSE, c.p(4, 0.5, 1.5), 3)
            + c.p(5, 0, 0.15) * ridge + c.p(6, 0, 0.08) * band + c.p(7, 0, 0.1) * c.tex(_MED, 0.3, 4))


def _hi_crater(c):
    du, dv = c.obj(0, 1, 0.35)
    r = np.maximum(np.hypot(du, dv), 1e-3)
    R = c.p(4, 0.2, 0.7)
    wr = 0.18 * R
    rim = np.exp(-(((r - R) / wr) ** 2))
    dh = np.where(r < R, 2 * r / R ** 2 * 0.4, 0) - 2 * (r - R) / wr ** 2 * 0.25 * rim * R  # dh/dr
    lt = c.p(5, 0, 2 * np.pi)
    shade = dh * (du * np.cos(lt) + dv * np.sin(lt)) / r
    return _terrain(c) - 0.12 * shade - 0.08 * (r < R), None


def _hi_dark_dune(c):
    phi = c.p(4, 0, np.pi)
    a, b = c.U * np.cos(phi) + c.V * np.sin(phi), -c.U * np.sin(phi) + c.V * np.cos(phi)
    n = c.tex(_MED, c.p(5, 0.25, 0.5), 1, u=a, v=b * 2.5)
    dunes = np.clip((n - c.p(6, -0.3, 0.6)) * 3, 0, 1)
    return 0.6 + 0.08 * c.tex(_COARSE, 1.5, 2) - 0.38 * dunes, None


def _hi_slope_streak(c):
    L = 0.45 + 0.12 * c.v + 0.08 * c.tex(_COARSE, 1.5, 1) + 0.03 * c.tex(_FINE, 0.05, 2)
    for j in range(4):
        v0 = c.p(4 + j, -1.0, 0.2)
        t = np.clip(c.v - v0, 0, None)
        w = 0.02 + 0.09 * t
        s = np.exp(-(((c.u - c.p(8 + j, -0.8, 0.8) - c.p(12 + j, -0.3, 0.3) * t ** 2) / w) ** 2))
        L = L - 0.3 * s * (c.v > v0) * np.exp(-t * c.p(16, 0.3, 1.5))
    return L, None


def _hi_bright_dune(c):
    phase = np.mod(c.V * c.p(4, 3, 8) + 0.3 * c.tex(_COARSE, 1.2, 1), 1)
    crest = phase ** 3  # long gentle stoss slope, sharp slip face
    return 0.35 + 0.05 * c.tex(_FINE, 0.05, 2) + 0.45 * crest, None


def _hi_ejecta(c):
    du, dv = c.obj(0, 1, 0.3)
    r = np.maximum(np.hypot(du, dv), 1e-3)
    rad = c.p(4, 6, 14)  # noise sampled on a circle: a random function of angle only
    ray_n = c.tex(_MED, 1.0, 1, u=du / r * rad / 8, v=dv / r * rad / 8)
    rays = np.clip((ray_n - 0.2) * 1.5, 0, 1) * np.exp(-r / c.p(5, 0.3, 0.8))
    return _terrain(c) * 0.85 + 0.45 * rays + 0.3 * np.exp(-((r / 0.15) ** 2)) - 0.4 * (r < 0.04), None


def _hi_swiss_cheese(c):
    per, t = c.p(4, 0.2, 0.45), c.p(5, 0.0, 0.8)
    pit = np.clip((c.tex(_MED, per, 1) - t) * 4, 0, 1)
    pit_s = np.clip((c.tex(_MED, per, 1, shift=(0.8, 0.8)) - t) * 4, 0, 1)
    return 0.72 + 0.04 * c.tex(_FINE, 0.05, 2) - 0.4 * pit + 0.2 * np.clip(pit - pit_s, 0, 1), None


def _hi_spider(c):
    du, dv = c.obj(0, 1, 0.3)
    r = np.maximum(np.hypot(du, dv), 1e-3)
    k = c.p(4, 1.0, 2.0)  # noise varying fast with angle, slowly with radius: branching radial troughs
    n = c.tex(_MED, 1.0, 1, u=du / r * k + 0.15 * r, v=dv / r * k)
    arms = np.exp(-((n / 0.35) ** 2)) * np.exp(-r / c.p(5, 0.4, 0.9))
    return _terrain(c) - 0.45 * arms - 0.3 * np.exp(-((r / 0.08) ** 2)), None


_HIRISE_RENDER = [
    lambda c: (_hi_other(c), None), _hi_crater, _hi_dark_dune, _hi_slope_streak, _hi_bright_dune,
    _hi_ejecta, _hi_swiss_cheese, _hi_spider,
]


# ----------------------------------------------------------------------------------------------------
# Diverse classes: background family x foreground shape x palette x frequency
# ----------------------------------------------------------------------------------------------------

DIVERSE_BACKGROUNDS = ("stripes", "checker", "dots", "waves", "rings", "blobs", "hatch", "grain")
DIVERSE_SHAPES = ("disk", "square", "triangle", "star", "ring", "cross", "ellipse", "none")
DIVERSE_FREQS = (2.0, 4.0, 8.0)
_N_PALETTES = 16


def _palettes(seed: int) -> np.ndarray:
    """Sixteen three-colour palettes (two background colours, one foreground), seeded."""
    rng = np.random.default_rng([seed, 4])
    hue = rng.uniform(0, 1, (_N_PALETTES, 3))
    val = rng.uniform(0.35, 1.0, (_N_PALETTES, 3))
    sat = rng.uniform(0.3, 1.0, (_N_PALETTES, 3))
    k = (np.array([5.0, 3.0, 1.0]) + hue[..., None] * 6) % 6  # HSV -> RGB
    rgb = val[..., None] * (1 - sat[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1))
    return rgb.astype(np.float32)


def plan_diverse_classes(n_classes: int, seed: int) -> list[tuple[str, int, int, int, int]]:
    """Distinct class definitions (name, background, shape, palette, frequency index), seeded."""
    combos = [(b, s, p, f) for b in range(len(DIVERSE_BACKGROUNDS)) for s in range(len(DIVERSE_SHAPES))
              for p in range(_N_PALETTES) for f in range(len(DIVERSE_FREQS))]
    if n_classes > len(combos):
        raise SimulateError(f"at most {len(combos)} diverse classes can be made; asked for {n_classes}")
    order = np.random.default_rng([seed, 5]).permutation(len(combos))[:n_classes]
    return [(f"{i:04d}-{DIVERSE_BACKGROUNDS[b]}-{DIVERSE_SHAPES[s]}-p{p:02d}-f{f}", b, s, p, f)
            for i, (b, s, p, f) in enumerate(combos[j] for j in order)]


def _diverse_render(c: _Ctx, defs: np.ndarray, palettes: np.ndarray):
    """defs [m, 4] = (background, shape, palette, freq) per image; returns (L, colour map)."""
    f = np.asarray(DIVERSE_FREQS, np.float32)[defs[:, 3]][:, None, None] * np.pi
    u, v = c.u, c.v
    r = np.hypot(u, v)
    bgs = [0.5 + 0.5 * np.cos(f * u),
           (np.cos(f * u) * np.cos(f * v) > 0).astype(np.float32),
           ((np.mod(u * f / np.pi, 1) - 0.5) ** 2 + (np.mod(v * f / np.pi, 1) - 0.5) ** 2 < 0.09).astype(np.float32),
           0.5 + 0.5 * np.cos(f * (u + 0.15 * np.sin(2 * f * v))),
           0.5 + 0.5 * np.cos(f * r),
           (c.tex(_MED, 2.0 / f * np.pi / 2, 1) > 0).astype(np.float32),
           np.maximum(np.cos(f * (u + v)) > 0.7, np.cos(f * (u - v)) > 0.7).astype(np.float32),
           np.clip(0.5 + 0.3 * c.tex(_FINE, 0.3 / f * np.pi / 2, 2), 0, 1)]
    bg = np.choose(defs[:, 0][:, None, None], bgs)
    du, dv = c.obj(0, 1, 0.35)
    rr = np.hypot(du, dv)
    R = c.p(4, 0.3, 0.6)
    ang = np.arctan2(dv, du)
    shapes = [rr - R, np.maximum(np.abs(du), np.abs(dv)) - 0.85 * R,
              np.maximum.reduce([dv - 0.5 * R, -0.87 * du - 0.5 * dv - 0.5 * R, 0.87 * du - 0.5 * dv - 0.5 * R]),
              rr - R * (0.65 + 0.35 * np.cos(5 * ang)), np.abs(rr - 0.8 * R) - 0.15 * R,
              np.maximum(np.minimum(np.abs(du), np.abs(dv)) - 0.25 * R, np.maximum(np.abs(du), np.abs(dv)) - R),
              np.hypot(du / 1.6, dv / 0.6) - R, np.full_like(rr, 1.0)]
    fg = _soft(np.choose(defs[:, 1][:, None, None], shapes), 0.03)
    pal = palettes[defs[:, 2]]  # [m, 3, 3]
    colour = pal[:, None, None, 0] + (pal[:, None, None, 1] - pal[:, None, None, 0]) * bg[..., None]
    colour = _blend(colour, pal[:, None, None, 2], fg[..., None])
    L = 0.85 + 0.1 * c.tex(_COARSE, 1.5, 3)
    return L, colour


# ----------------------------------------------------------------------------------------------------
# Nuisance and finishing
# ----------------------------------------------------------------------------------------------------

_SOIL = np.array([0.78, 0.55, 0.38], np.float32)
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ_INV = np.linalg.inv(_YIQ).astype(np.float32)


def _base_colours(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-image base colour [n,1,1,3]: Mars soil with variation; hardware greyer, sky scenes neutral."""
    c = _SOIL * (1 + 0.25 * (z[:, 19:22] - 0.5)).astype(np.float32)
    grey = c.mean(1, keepdims=True)
    c = np.where(np.isin(labels, list(_MSL_METAL))[:, None], 0.5 * c + 0.5 * grey, c)
    c = np.where(np.isin(labels, list(_MSL_DARKSKY))[:, None], 0.3 * c + 0.7 * grey, c)
    return c[:, None, None, :].astype(np.float32)


def _box3(a: np.ndarray) -> np.ndarray:
    """3x3 box blur of [n,S,S] with edge replication."""
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h = p[:, :, :-2] + p[:, :, 1:-1] + p[:, :, 2:]
    return (h[:, :-2] + h[:, 1:-1] + h[:, 2:]) * np.float32(1 / 9)


def _finish(L: np.ndarray, colour: np.ndarray | None, latent: np.ndarray, rng: np.random.Generator,
            strength: float = 1.0) -> np.ndarray:
    """Apply the shared nuisance and quantise: gamma, blur, colour cast/hue/saturation (RGB only),
    brightness, contrast, sensor noise. ``colour`` None means grayscale output [n,S,S]."""
    e = (latent * strength).astype(np.float32)
    col = lambda a: a[:, None, None]  # noqa: E731
    L = np.clip(L, 0, 1) ** col(np.exp(0.25 * e[:, 7]))
    for amount in (1 / (1 + np.exp(1.0 - e[:, 8])), 1 / (1 + np.exp(2.0 - e[:, 8]))):
        L = L + col(amount.astype(np.float32)) * (_box3(L) - L)
    bright = np.exp(0.4 * e[:, 5])
    if colour is None:
        img = L * col(bright)
        axes = (1, 2)
    else:
        hue, sat = 0.6 * e[:, 3], np.exp(0.45 * e[:, 4])
        rot = np.zeros((len(e), 3, 3), np.float32)
        rot[:, 0, 0] = 1
        rot[:, 1, 1] = rot[:, 2, 2] = np.cos(hue) * sat
        rot[:, 1, 2], rot[:, 2, 1] = -np.sin(hue) * sat, np.sin(hue) * sat
        gains = np.exp(0.3 * e[:, 0:3]) * bright[:, None]
        M = gains[:, :, None] * (_YIQ_INV @ rot @ _YIQ)  # per-image 3x3 colour transform
        rgb = L[..., None] * colour
        n, s = L.shape[0], L.shape[1]
        img = np.matmul(rgb.reshape(n, -1, 3), M.transpose(0, 2, 1)).reshape(n, s, s, 3)
        axes = (1, 2, 3)
    mean = img.mean(axis=axes, keepdims=True)
    img = mean + (img - mean) * np.exp(0.35 * e[:, 6]).reshape((-1,) + (1,) * len(axes))
    sigma = 0.02 * np.exp(0.5 * e[:, 9]).reshape((-1,) + (1,) * len(axes))
    img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _render_groups(fns, plan_labels, z, view, size, bank, base):
    """Run each class's renderer on its images; returns L [n,S,S] and an optional colour map."""
    n = len(plan_labels)
    L = np.empty((n, size, size), np.float32)
    colour = None if base is None else np.broadcast_to(base, (n, size, size, 3)).copy()
    for cls in np.unique(plan_labels):
        idx = np.flatnonzero(plan_labels == cls)
        ctx = _Ctx(size, z[idx], view[idx], bank, None if base is None else base[idx])
        Lc, cc = fns[cls](ctx)
        L[idx] = Lc
        if cc is not None:
            colour[idx] = cc
    return L, colour


def render_msl(labels, z, view, latent, size: int, bank: NoiseBank, rng: np.random.Generator) -> np.ndarray:
    """Render MSL-class images (also the rover pool): uint8 [n, size, size, 3]."""
    L, colour = _render_groups(_MSL_RENDER, labels, z, view, size, bank, _base_colours(z, labels))
    return _finish(L, colour, latent, rng)


def render_hirise(labels, z, view, latent, size: int, bank: NoiseBank, rng: np.random.Generator) -> np.ndarray:
    """Render HiRISE-class images: uint8 [n, size, size] grayscale."""
    L, _ = _render_groups(_HIRISE_RENDER, labels, z, view, size, bank, None)
    return _finish(L, None, latent, rng, strength=HIRISE_NUISANCE)


def augment_array(a: np.ndarray, kind: str) -> np.ndarray:
    """The benchmark augmentations on an image array [H, W(, C)]: flips, CCW rotations, brightening."""
    if kind == "fh":
        return a[:, ::-1]
    if kind == "fv":
        return a[::-1]
    if kind in ("r90", "r180", "r270"):
        return np.rot90(a, int(kind[1:]) // 90)
    if kind == "brt":
        return np.clip(a.astype(np.float32) * 1.25 + 0.5, 0, 255).astype(np.uint8)
    raise SimulateError(f"unknown augmentation {kind!r}; use one of fh, fv, r90, r180, r270, brt")


# ----------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------

def _batch_size(size: int) -> int:
    return max(8, (1 << 20) // (size * size))  # about 1 M pixels per batch


def _save(a: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(a)).save(path, format="JPEG", quality=90)


def _write_planned(plan: ScenePlan, folder: Path, render, size: int, seed: int, salt: int, bar) -> None:
    """Render the plan's originals batch by batch and write each with its augmented copies."""
    bank = NoiseBank(seed)
    bs = _batch_size(size)
    for b0 in range(0, len(plan.names), bs):
        sl = slice(b0, b0 + bs)
        rng = np.random.default_rng([seed, salt, b0])
        imgs = render(plan.labels[sl], plan.z[sl], plan.view[sl], plan.latent[sl], size, bank, rng)
        for name, img, copies in zip(plan.names[sl], imgs, plan.copies[sl]):
            _save(img, folder / f"{name}.jpg")
            for kind in copies:
                _save(augment_array(img, kind), folder / f"{name}-{kind}.jpg")
            bar.update(1 + len(copies))


def _write_lines(path: Path, lines) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def write_msl(root: Path, total: int, size: int, seed: int, bar=None) -> None:
    """Write the MSL v2.1 layout under ``root`` (the ``msl-labeled-data-set-v2.1`` folder)."""
    plan = plan_msl(total, seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    _write_planned(plan, root / "images", render_msl, size, seed, 1, bar or _NullBar())
    for split in ("train", "val", "test"):
        lines = sorted(f"{n}{'-' + k if k else ''}.jpg {lab}"
                       for n, lab, s, cps in zip(plan.names, plan.labels, plan.splits, plan.copies)
                       if s == split for k in ("",) + cps)
        _write_lines(root / f"{split}-set-v2.1.txt", lines)
    _write_lines(root / "class_map.csv", (f"{i},{name}" for i, name in enumerate(MSL_CLASSES)))


def write_hirise(root: Path, originals: int, size: int, seed: int, bar=None, test: int | None = None) -> None:
    """Write the HiRISE v3.2 layout under ``root`` (the ``hirise-map-proj-v3_2`` folder); ``test``: see
    :func:`plan_hirise_counts`."""
    plan = plan_hirise(originals, seed, test)
    (root / "map-proj-v3_2").mkdir(parents=True, exist_ok=True)
    _write_planned(plan, root / "map-proj-v3_2", render_hirise, size, seed, 2, bar or _NullBar())
    rows = [(f"{n}{'-' + k if k else ''}.jpg", int(lab), s)
            for n, lab, s, cps in zip(plan.names, plan.labels, plan.splits, plan.copies) for k in ("",) + cps]
    _write_lines(root / "labels-map-proj_v3_2.txt", (f"{n} {lab}" for n, lab, _ in rows))
    # Like the real split file, some minority-class train rows appear twice (right after themselves).
    rng = np.random.default_rng([seed, 6])
    minority = [i for i, (_, lab, s) in enumerate(rows) if lab != 0 and s == "train"]
    n_rep = min(len(minority), round(HIRISE_REPEATS * originals / HIRISE_TOTAL))
    repeat = set(rng.choice(minority, n_rep, replace=False).tolist()) if n_rep else set()
    _write_lines(root / "labels-map-proj_v3_2_train_val_test.txt",
                 (f"{n} {lab} {s}" for i, (n, lab, s) in enumerate(rows) for _ in range(1 + (i in repeat))))
    _write_lines(root / "landmarks_map-proj-v3_2_classmap.csv",
                 (f"{i},{name}" for i, name in enumerate(HIRISE_CLASSES)))


def write_rover(root: Path, count: int, size: int, seed: int, bar=None) -> None:
    """Write the unlabeled pool under ``root`` (``rover-unlabeled``): images, positions, hidden labels."""
    plan = plan_rover(count, seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    _write_planned(plan, root / "images", render_msl, size, seed, 3, bar or _NullBar())
    _write_lines(root / "positions.csv", ["name,x,y,heading,traverse,frame"] + [
        f"{n}.jpg,{x:.3f},{y:.3f},{h:.3f},{t},{f}"
        for n, x, y, h, t, f in zip(plan.names, plan.x, plan.y, plan.heading, plan.traverse, plan.frame)])
    _write_lines(root / "hidden-labels.csv",
                 ["name,label"] + [f"{n}.jpg,{lab}" for n, lab in zip(plan.names, plan.labels)])
    _write_lines(root / "holdout-traverses.txt", (str(t) for t in plan.holdout))


def write_diverse(root: Path, n_classes: int, per_class: int, size: int, seed: int, bar=None) -> None:
    """Write the ImageFolder stand-in for ImageNet: ``root/<class_name>/<image>.jpg``, balanced."""
    bar = bar or _NullBar()
    defs = plan_diverse_classes(n_classes, seed)
    palettes = _palettes(seed)
    bank = NoiseBank(seed)
    rng = np.random.default_rng([seed, 7])
    n = n_classes * per_class
    cls = np.repeat(np.arange(n_classes), per_class)
    table = np.array([d[1:] for d in defs], dtype=np.int64)[cls]
    z, latent = rng.random((n, _Z)), rng.standard_normal((n, _LATENT))
    view = _random_views(rng, cls, set())
    for d in defs:
        (root / d[0]).mkdir(parents=True, exist_ok=True)
    bs = _batch_size(size)
    for b0 in range(0, n, bs):
        sl = slice(b0, b0 + bs)
        ctx = _Ctx(size, z[sl], view[sl], bank, None)
        L, colour = _diverse_render(ctx, table[sl], palettes)
        imgs = _finish(L, colour, latent[sl], np.random.default_rng([seed, 8, b0]), strength=0.5)
        for i, img in zip(range(b0, b0 + len(imgs)), imgs):
            _save(img, root / defs[cls[i]][0] / f"{defs[cls[i]][0][:4]}_{i % per_class:05d}.jpg")
        bar.update(len(imgs))


class _NullBar:
    def update(self, n=1):
        pass


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------

def resolve(preset: str = "demo", size: int | None = None, count: int | None = None) -> dict:
    """The preset's parameters with explicit ``size``/``count`` overrides applied, validated."""
    if preset not in PRESETS:
        raise SimulateError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    if size is not None:
        if not 16 <= int(size) <= 1024:
            raise SimulateError(f"--size must be between 16 and 1024 pixels, got {size}")
        cfg["size"] = int(size)
    if count is not None:
        if int(count) < 20:
            raise SimulateError(f"--count (rover pool size) must be at least 20, got {count}")
        cfg["count"] = int(count)
    return cfg


def _dataset_jobs(out: Path, cfg: dict, seed: int):
    """(key, folder, stamp params, number of files, writer) for each dataset."""
    s = cfg["size"]
    msl_files = int(sum(v.sum() for k, v in plan_msl_counts(cfg["msl"]).items() if k != "train_originals"))
    hc = plan_hirise_counts(cfg["hirise"], cfg.get("hirise_test"))
    hirise_files = int((hc["train"].sum() + hc["val"].sum()) * (1 + len(HIRISE_AUGS)) + hc["test"].sum())
    dv = cfg["diverse_classes"] * cfg["diverse_per_class"]
    base = {"generator": "raysys.data.simulate", "version": GENERATOR_VERSION, "seed": seed, "size": s}
    return [
        ("msl", out / MSL_DIR, {**base, "msl": cfg["msl"]}, msl_files,
         lambda root, bar: write_msl(root, cfg["msl"], s, seed, bar)),
        ("hirise", out / HIRISE_DIR, {**base, "hirise_originals": cfg["hirise"], "hirise_test": cfg.get("hirise_test")},
         hirise_files, lambda root, bar: write_hirise(root, cfg["hirise"], s, seed, bar, cfg.get("hirise_test"))),
        ("rover", out / ROVER_DIR, {**base, "count": cfg["count"]}, cfg["count"],
         lambda root, bar: write_rover(root, cfg["count"], s, seed, bar)),
        ("diverse", out / DIVERSE_DIR,
         {**base, "classes": cfg["diverse_classes"], "per_class": cfg["diverse_per_class"]}, dv,
         lambda root, bar: write_diverse(root, cfg["diverse_classes"], cfg["diverse_per_class"], s, seed, bar)),
    ]


def _is_complete(folder: Path, params: dict) -> bool:
    try:
        return json.loads((folder / STAMP).read_text()) == params
    except (OSError, ValueError):
        return False


def simulate(out: str | Path, preset: str = "demo", size: int | None = None, count: int | None = None,
             seed: int = 0, progress: bool = True) -> dict:
    """Write the four simulated datasets under ``out``; return their folders (keys msl, hirise, rover,
    diverse).

    A dataset folder whose ``raysys-simulate.json`` stamp matches the parameters is left untouched, so
    calling this on every run is cheap. Each dataset is written into a hidden ``.NAME.partial`` folder,
    stamped last and then renamed into place, so an interrupted run never looks complete. A stale
    simulator folder (other parameters) is replaced; a folder not written by the simulator is refused.
    """
    cfg = resolve(preset, size, count)
    out = Path(out)
    jobs = _dataset_jobs(out, cfg, int(seed))
    todo = [j for j in jobs if not _is_complete(j[1], j[2])]
    for key, folder, *_ in todo:
        if folder.exists() and not (folder / STAMP).exists() and any(folder.iterdir()):
            raise SimulateError(f"{folder} exists and was not written by raysys simulate; "
                                f"choose another --out or move it away")
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=sum(j[3] for j in todo), disable=not (progress and todo), unit="img", desc="simulate") as bar:
        for key, folder, params, _, writer in todo:
            bar.set_postfix_str(key)
            tmp = out / f".{folder.name}.partial"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            writer(tmp, bar)
            (tmp / STAMP).write_text(json.dumps(params, indent=1, sort_keys=True))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    return {key: str(folder) for key, folder, *_ in jobs}


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``raysys simulate`` options to ``p``."""
    p.add_argument("--out", required=True, help="folder to write the four datasets into")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="smoke (32 px, seconds), demo (64 px), paper (227 px, real counts; cluster)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (overrides the preset)")
    p.add_argument("--count", type=int, default=None, help="rover pool size (overrides the preset)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    return p


def run(args: argparse.Namespace) -> int:
    """CLI body: simulate and print where each dataset went."""
    paths = simulate(args.out, args.preset, args.size, args.count, args.seed, progress=True)
    for key, path in paths.items():
        print(f"{key}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(configure_parser(argparse.ArgumentParser(description=__doc__)).parse_args()))
