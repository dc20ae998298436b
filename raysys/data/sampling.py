"""Class-stratified, group-preserving subsets of a labeled split (label fractions, the kNN monitor's bank).

How a subset is drawn (:func:`stratified_subset`, :func:`sample_groups`):

* Augmented copies stay with their original: the unit of sampling is the manifest's ``group_id`` (an MSL
  image and its ``-fh``/``-fv``/``-r90``... copies), so a subset never holds a copy without the rest of
  its group -- otherwise "5 % of the labels" would quietly be 5 % of the views of more originals.
* Per class ``c`` with ``n_c`` train images the target is ``f * n_c`` images. The count taken is the one
  nearest the target among all counts whole groups can make (a subset-sum over the class's group sizes;
  the smaller count on a tie): exactly ``round(f * n_c)`` when single images can make up the rest, the
  nearest multiple when all groups are the same size. Among the ways to make that count, the number of
  groups of each size stays as near proportional (``f`` times the groups of that size) as it allows,
  largest sizes first, so originals with many copies are neither favoured nor avoided.
* Which groups of each size: the first ones of a seeded shuffle of the class's groups. A seed shuffles
  the same way at every fraction, so one seed's subsets grow (almost) nested: the curve's steps reflect
  added labels rather than a fresh draw.
* Every class keeps at least one group, so the probe can still predict it at 5 % (at most one image off
  the target where that class has single-image groups).
"""

from __future__ import annotations

import numpy as np

from raysys.errors import ConfigError, DataError


def check_fractions(fractions) -> list[float]:
    """Sorted, de-duplicated fractions; :class:`ConfigError` unless each lies in (0, 1]."""
    fractions = sorted({float(f) for f in fractions})
    if not fractions:
        raise ConfigError("no label fractions given; pass values in (0, 1], e.g. --fractions 0.1 0.5 1")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"label fraction {bad[0]} is outside (0, 1]; pass fractions such as 0.05 or 1")
    return fractions


def check_seeds(seeds) -> list[int]:
    """The probe/subset seeds as a list; :class:`ConfigError` when there are none."""
    count = seeds if isinstance(seeds, (int, np.integer)) else len(seeds)
    if count < 1:
        raise ConfigError(f"need at least 1 seed per fraction (got {count}); use --seeds 3 for error bars")
    return list(range(seeds)) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]


def _group_table(labels: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inverse, sizes, group_label)``: each row's group index, each group's size and class; a group
    holding several classes is a broken manifest."""
    _, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    group_label = np.empty(len(sizes), np.int64)
    group_label[inverse] = labels
    mixed = np.flatnonzero(group_label[inverse] != labels)
    if len(mixed):
        raise DataError(f"augmentation group {np.asarray(groups)[mixed[0]]!r} holds images of several classes; "
                         "augmented copies must carry their original's label")
    return inverse, sizes, group_label


def _reachable(sizes: np.ndarray, available: np.ndarray) -> list[np.ndarray]:
    """``reach[j][t]``: can ``t`` images be made from whole groups of the first ``j`` sizes (bounded
    subset-sum; one sliding-window pass per residue of the size)."""
    reach = [np.zeros(int(sizes @ available) + 1, bool)]
    reach[0][0] = True
    for size, count in zip(sizes.tolist(), available.tolist()):
        prev, new = reach[-1], np.zeros_like(reach[-1])
        for r in range(size):
            sums = np.concatenate([[0], np.cumsum(prev[r::size])])
            i = np.arange(len(sums) - 1)
            new[r::size] = sums[i + 1] - sums[np.maximum(i - count, 0)] > 0  # any of the last count+1 steps
        reach.append(new)
    return reach


def _groups_per_size(sizes: np.ndarray, available: np.ndarray, target: float, at_least_one: bool) -> np.ndarray:
    """How many of the ``available`` groups of each (ascending) size to take: the reachable total nearest
    ``target``, made with per-size counts as near proportional as it allows (module docstring)."""
    reach = _reachable(sizes, available)
    totals = np.flatnonzero(reach[-1])
    if at_least_one:
        totals = totals[totals > 0]
    total = int(totals[np.argmin(np.abs(totals - target))])  # first minimum: the smaller total on a tie
    fraction = target / float(sizes @ available)
    take = np.zeros(len(sizes), np.int64)
    for j in reversed(range(len(sizes))):  # largest size first; smaller sizes make up the rest
        counts = np.arange(min(int(available[j]), total // int(sizes[j])) + 1)
        counts = counts[reach[j][total - counts * sizes[j]]]  # the rest must stay makeable
        take[j] = counts[np.argmin(np.abs(counts - fraction * available[j]))]
        total -= int(take[j] * sizes[j])
    return take


def sample_groups(labels, groups, targets: dict, rng: np.random.Generator, at_least_one: bool = False) -> np.ndarray:
    """Sorted row indices of whole groups per class, about ``targets[c]`` rows of class ``c`` (classes not in
    ``targets`` get none). ``groups`` gives each row's group (e.g. the manifest's ``group_id``); the classes
    are visited in ascending order, each shuffling its groups with ``rng``. See the module docstring."""
    labels = np.asarray(labels, dtype=np.int64)
    inverse, sizes, group_label = _group_table(labels, groups)
    chosen = []
    for c in sorted(targets):
        members = rng.permutation(np.flatnonzero(group_label == c))
        if len(members) == 0:
            continue
        size_values, available = np.unique(sizes[members], return_counts=True)
        take = _groups_per_size(size_values, available, float(targets[c]), at_least_one)
        for size, count in zip(size_values, take):
            chosen += members[sizes[members] == size][:count].tolist()
    return np.flatnonzero(np.isin(inverse, chosen))


def stratified_subset(labels, groups, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a class-stratified, group-preserving ``fraction`` of the rows (see the module
    docstring for the rule and its precision)."""
    (fraction,) = check_fractions([fraction])
    labels = np.asarray(labels, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    targets = {int(c): fraction * int(n) for c, n in zip(classes, counts)}
    return sample_groups(labels, groups, targets, np.random.default_rng(seed), at_least_one=True)
