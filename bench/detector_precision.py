"""Benchmark: how precisely label-free detectors find false negatives, on a trained encoder, without training.

Takes a saved model (a study trial's, say) and the pool it trained on (hidden labels: simulated data), makes
two augmented views of every image, and scores random batches of ``--batch-size`` images the way training
would: for each detector, the share of the pairs it removes from SimCLR's negatives that are true false
negatives (precision) and the share of the true false negatives it removes (recall), mean over ``--batches``
batches. Detectors: fnc at several k (per-anchor top-k of the support embeddings), self-clusters (k-means of
the backbone features into K) and self-confident at several accepted shares. Guides the detectors' defaults;
what they do while the encoder is still learning is the study's (experiments/fn_study.py) to show.

    python bench/detector_precision.py --model runs/fn_study/trials/simclr-s0
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from raysys.config import PretrainConfig
from raysys.data.augment import to_float, two_views
from raysys.data.decode import load_images
from raysys.data.schema import image_key
from raysys.data.sources import resolve_data
from raysys.methods.objectives import support_embedding
from raysys.methods.pairs import false_negative_stats, make_rule
from raysys.models.io import load_saved
from raysys.models.texture import cluster_margins


def embeddings(model, images: np.ndarray, cfg: PretrainConfig, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(support embeddings of two augmented views ``[N, D]``, backbone features of the plain images ``[N, F]``)."""
    generator = torch.Generator().manual_seed(seed)
    support, features = [], []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            batch = torch.from_numpy(images[start:start + 256])
            v1, v2 = two_views(batch, cfg.augment_config, generator)
            support.append(support_embedding(model(v1)[1], model(v2)[1]))
            features.append(model.features(to_float(batch, cfg.image_size)))
    return torch.cat(support), torch.cat(features).numpy()


def scores(rule, meta_of, labels: torch.Tensor, batches: list[np.ndarray]) -> tuple[float, float, float]:
    """Mean removed-pair precision, recall and removed pairs per anchor over ``batches`` (row indices)."""
    baseline, rows = make_rule("instance"), []
    for index in batches:
        meta = meta_of(index)
        stats = false_negative_stats(rule(meta), labels[index], baseline(meta))
        rows.append((stats["removed_precision"], stats["removed_recall"], stats["n_removed_pairs"] / (2 * len(index))))
    return tuple(float(np.nanmean(column)) for column in zip(*rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a run folder or model.pt trained on the built-in pool")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--k", type=int, default=20, help="self-clusters: K")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model, saved = load_saved(args.model)
    cfg = PretrainConfig.from_dict(saved)
    manifest, _ = resolve_data(cfg)
    images, rows, _ = load_images(manifest.column("path").to_pylist(), cfg.image_size)
    labels = torch.as_tensor(np.asarray(manifest.column("label"))[rows])
    ids = torch.tensor([image_key(i) for i in np.asarray(manifest.column("image_id"))[rows]])
    support, features = embeddings(model.eval(), images, cfg, args.seed)
    rng = np.random.default_rng(args.seed)
    batches = [rng.choice(len(images), args.batch_size, replace=False) for _ in range(args.batches)]
    base_rate = np.mean([false_negative_stats(make_rule("instance")({"image_id": ids[i]}), labels[i])["fn_fraction"]
                         for i in batches])
    print(f"{len(images)} images, batch {args.batch_size}, {args.batches} batches; same-class share of SimCLR's "
          f"negative pairs (the base rate) {base_rate:.3f}")
    print(f"{'detector':<28} {'precision':>9} {'recall':>7} {'removed/anchor':>15}")
    for k in (1, 2, 5, 10, 20):
        for threshold in (0.0, 0.5):
            rule = make_rule("fnc", k=k, threshold=threshold)
            p_, r_, n_ = scores(rule, lambda i: {"image_id": ids[i], "support": support[i]}, labels, batches)
            print(f"{f'fnc k={k} thr={threshold:g}':<28} {p_:>9.3f} {r_:>7.3f} {n_:>15.2f}")
    cluster_ids, margin = cluster_margins(features, args.k, seed=args.seed)
    for share in (1.0, 0.75, 0.5, 0.25, 0.1):
        kept = torch.from_numpy(cluster_ids.astype(np.int64))
        kept[torch.from_numpy(np.argsort(-margin, kind="stable")[round(share * len(margin)):])] = -1
        name = "self-clusters" if share == 1.0 else f"self-confident share {share:g}"
        p_, r_, n_ = scores(make_rule("cluster"), lambda i: {"image_id": ids[i], "cluster_id": kept[i]}, labels, batches)
        print(f"{f'{name} K={args.k}':<28} {p_:>9.3f} {r_:>7.3f} {n_:>15.2f}")


if __name__ == "__main__":
    main()
