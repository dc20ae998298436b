"""Self-clustering (IFND): its schedule, its table's lookups against a brute-force dict, its saved state, and a
MoCo queue taking the new ids."""

import numpy as np
import pytest
import torch

from raysys.config.presets import make_config
from raysys.methods.objectives import ObjectiveContext, make_objective
from raysys.methods.self_clusters import SelfClusters
from raysys.models.backbones import ContrastiveModel
from raysys.models.texture import cluster_quality


def _blobs(k: int = 3, n_per: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(k), n_per)
    centres = np.eye(k) * 10  # as many dimensions as clusters: whitening keeps every one of them
    return (centres[ids] + rng.normal(0, 0.5, (len(ids), k))).astype(np.float32), ids


def test_schedule_is_warmup_then_every_e_rounds():
    sc = SelfClusters(k=4, warmup=2, every=3)
    assert [e for e in range(10) if sc.due(e)] == [2, 5, 8]
    assert [e for e in range(4) if SelfClusters(4, 0, 1).due(e)] == [0, 1, 2, 3]


def test_before_any_clustering_every_id_is_unknown():
    keys = torch.tensor([5, -3, 2**62])
    assert SelfClusters(4, 1, 1).lookup(keys).tolist() == [-1, -1, -1]  # the cluster rule's "not the same cluster"


def test_lookup_matches_a_dict_and_unknown_keys_get_minus_one():
    features, truth = _blobs()
    rng = np.random.default_rng(1)
    keys = rng.choice(2**62, len(features), replace=False).astype(np.int64)  # 64-bit image keys, unsorted
    sc = SelfClusters(k=3, warmup=0, every=1, seed=7)
    ids = sc.update(keys, features, round_=0)
    assert cluster_quality(ids, truth)["nmi"] == pytest.approx(1.0)
    reference = dict(zip(keys.tolist(), ids.tolist()))
    query = np.concatenate([rng.permutation(keys)[:50], [keys.max() + 1, keys.min() - 1]])
    found = sc.lookup(torch.from_numpy(query)).tolist()
    assert found == [reference.get(q, -1) for q in query.tolist()]


def test_state_round_trip_keeps_the_table_and_its_round():
    features, _ = _blobs()
    keys = np.arange(len(features), dtype=np.int64) * 7919
    sc = SelfClusters(k=3, warmup=1, every=2)
    sc.update(keys, features, round_=3)
    restored = SelfClusters(k=3, warmup=1, every=2)
    restored.load_state_dict(sc.state_dict())
    assert restored.round == 3
    assert torch.equal(restored.lookup(torch.from_numpy(keys)), sc.lookup(torch.from_numpy(keys)))


def test_bad_schedule_and_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="k >= 2"):
        SelfClusters(k=1, warmup=0, every=1)
    with pytest.raises(ValueError, match="embedded twice"):
        SelfClusters(k=2, warmup=0, every=1).update(np.array([1, 1, 2, 3]), np.eye(4, dtype=np.float32), 0)


def test_a_moco_queue_takes_the_new_ids_of_a_reclustering():
    cfg = make_config("smoke", framework="moco", pair_rule="cluster", self_cluster_k=3).validate()
    model = ContrastiveModel(cfg.backbone, cfg.width, cfg.small_stem, cfg.proj_dim, cfg.proj_layers)
    objective = make_objective(cfg, model, ObjectiveContext(512))
    queue = objective.queue
    image_ids = torch.arange(100, 110)
    queue.enqueue(torch.randn(10, queue.dim), {"image_id": image_ids, "cluster_id": torch.full((10,), -1)})
    features, _ = _blobs(k=3, n_per=4)
    sc = SelfClusters(k=3, warmup=0, every=1)
    ids = sc.update(np.arange(100, 112), features, round_=0)  # images 100..111; the queue holds 100..109
    objective.relabel_clusters(sc.lookup)
    assert queue.entries()[1]["cluster_id"].tolist() == ids[:10].tolist()


def test_confident_clusters_accept_the_most_confident_growing_share():
    """The accepted share is accept x progress of the images, those with the widest margin between their own
    and the second-nearest centroid: points placed midway between two blobs go first; the accepted keep the
    plain clustering's ids, the rest get -1 (their pairs stay negatives)."""
    from raysys.methods.self_clusters import SOURCES, ConfidentSelfClusters
    from raysys.models.texture import cluster_margins

    features, truth = _blobs(k=3, n_per=40)
    midway = (features[:10] + features[40:50]) / 2  # between blobs 0 and 1: the least confident
    features = np.concatenate([features, midway])
    keys = np.arange(len(features), dtype=np.int64)
    plain, margin = cluster_margins(features, 3, seed=5)
    assert margin[120:].max() < np.sort(margin[:120])[10]  # the midway points are the least confident
    sc = ConfidentSelfClusters(k=3, warmup=0, every=1, seed=0, accept=0.8)
    assert SOURCES["self-confident"] is ConfidentSelfClusters and SOURCES["self"] is SelfClusters
    for progress, expected in ((0.0, 0), (0.5, 52), (1.0, 104), (2.0, 104)):
        ids = sc.update(keys, features, round_=5, progress=progress)  # seed 0 * 1000 + round 5: plain's seed
        accepted = ids >= 0
        assert accepted.sum() == expected
        assert not accepted[120:].any()
        assert (ids[accepted] == plain[accepted]).all()
        if expected:
            assert margin[accepted].min() >= margin[~accepted].max()
    assert cluster_quality(ids[ids >= 0], truth[(ids >= 0)[:120].nonzero()[0]])["nmi"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ConfidentSelfClusters(k=3, warmup=0, every=1, accept=0.0)
