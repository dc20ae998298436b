"""Benchmark: does ``raysys search`` find an image's own traverse? Every row of an embeddings file (``raysys
embed`` of a rover pool with its positions sidecar) as the query: the share whose first hit is the query
itself, and the share with a same-traverse image among the next k (5) -- against the share a random pick of k
would reach, computed from the traverse sizes.

    raysys embed --model RUN --data data/builtin/demo/rover-unlabeled --out runs/embed-demo.parquet
    python bench/search_traverse.py runs/embed-demo.parquet
"""

from __future__ import annotations

import argparse

import numpy as np

from raysys.eval.search import read_embeddings, same_group_rate


def chance(groups: np.ndarray, k: int) -> float:
    """Expected share of queries with a same-group row among k rows drawn at random from the others."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    n, own = len(groups), counts[inverse] - 1
    miss = np.ones(n)
    for j in range(k):  # drawing without replacement: the j-th pick misses the own group
        miss *= (n - 1 - own - j) / (n - 1 - j)
    return float(1 - miss.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("embeddings")
    p.add_argument("-k", type=int, default=5)
    args = p.parse_args()
    table, emb = read_embeddings(args.embeddings)
    traverse = table.column("traverse").to_numpy()
    self_first, same = same_group_rate(emb, traverse, args.k)
    print(f"{len(emb)} queries, {len(np.unique(traverse))} traverses: the query itself first for {self_first:.1%}; "
          f"a same-traverse image in the top {args.k} for {same:.1%} (random picks: {chance(traverse, args.k):.1%})")


if __name__ == "__main__":
    main()
