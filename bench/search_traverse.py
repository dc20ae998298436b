"""Benchmark: does ``raysys search`` find an image's own traverse? Every row of an embeddings file (``raysys
embed`` of a rover pool with its positions sidecar) as the query: the share whose first hit is the query
itself, and the share with a same-traverse image among the next k (5) -- against the share a random pick of k
would reach, computed from the traverse sizes. Side by side for the raw features and for the features centred
on the archive's mean (what ``raysys search`` ranks on), each with the spread of its similarities: the median
over queries of the cosine of the 1st and of the 10th nearest other image and of their difference, and the
median cosine of two images drawn at random.

    raysys embed --model RUN --data data/builtin/demo/rover-unlabeled --out runs/embed-demo.parquet
    python bench/search_traverse.py runs/embed-demo.parquet
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.neighbors import NearestNeighbors

from raysys.eval.search import archive_mean, read_embeddings, same_group_rate

SPREAD_RANK = 10  # the spread is the 1st minus this nearest other image's similarity
RANDOM_PAIRS = 100_000


def chance(groups: np.ndarray, k: int) -> float:
    """Expected share of queries with a same-group row among k rows drawn at random from the others."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    n, own = len(groups), counts[inverse] - 1
    miss = np.ones(n)
    for j in range(k):  # drawing without replacement: the j-th pick misses the own group
        miss *= (n - 1 - own - j) / (n - 1 - j)
    return float(1 - miss.mean())


def neighbour_similarities(emb: np.ndarray, k: int) -> np.ndarray:
    """Every row as the query: the cosine similarities of its ``k`` nearest other rows, best first ``[N, k]``."""
    index = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(emb)
    dist, _ = index.kneighbors(emb)
    return 1.0 - dist[:, 1:]  # the first hit is the query itself


def random_pair_similarity(emb: np.ndarray, pairs: int = RANDOM_PAIRS, seed: int = 0) -> float:
    """The median cosine similarity of ``pairs`` pairs of distinct rows drawn at random."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(emb), pairs)
    b = (a + rng.integers(1, len(emb), pairs)) % len(emb)  # never the row itself
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return float(np.median(np.einsum("ij,ij->i", unit[a], unit[b])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("embeddings")
    p.add_argument("-k", type=int, default=5)
    args = p.parse_args()
    table, emb = read_embeddings(args.embeddings)
    traverse = table.column("traverse").to_numpy()
    centred = emb - archive_mean(args.embeddings, emb)
    print(f"{len(emb)} queries, {len(np.unique(traverse))} traverses; a same-traverse image among {args.k} random "
          f"picks: {chance(traverse, args.k):.1%}")
    print(f"{'features':<8}  {'self first':>10}  {f'same traverse in top {args.k}':>22}  {'median cosine:':>14} "
          f"{'1st':>6}  {f'{SPREAD_RANK}th':>6}  {f'1st-{SPREAD_RANK}th':>8}  {'random pair':>11}")
    for name, features in (("raw", emb), ("centred", centred)):
        self_first, same = same_group_rate(features, traverse, args.k)
        sims = neighbour_similarities(features, SPREAD_RANK)
        print(f"{name:<8}  {self_first:>10.1%}  {same:>22.1%}  {'':>14} {np.median(sims[:, 0]):>6.3f}  "
              f"{np.median(sims[:, -1]):>6.3f}  {np.median(sims[:, 0] - sims[:, -1]):>8.3f}  "
              f"{random_pair_similarity(features):>11.3f}")

if __name__ == "__main__":
    main()
