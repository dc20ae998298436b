"""kNN classifier against a brute-force per-query loop (several k and temperatures, exact ties), hand-checked
tie breaking, and the training monitor: its images never come from test, it is stratified, and its score
equals kNN accuracy on features recomputed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import REPO

from raysys.data.augment import to_float
from raysys.data.schema import make_manifest
from raysys.eval import knn
from raysys.eval.linear import classification_metrics, load_benchmark
from raysys.models import ContrastiveModel

torch.set_num_threads(1)

BUILTIN_SMOKE = REPO / "data" / "builtin" / "smoke"


def brute_force_knn(train_x, train_y, query_x, num_classes, k, temperature):
    """One query at a time in float64 Python: cosine similarity, neighbours sorted by (similarity desc,
    train index asc), votes exp(sim / T) summed per class, near-equal votes (rel. 1e-9) tied -> lowest id."""
    unit = lambda v: np.asarray(v, np.float64) / np.linalg.norm(v)
    bank = [unit(v) for v in train_x]
    preds = []
    for q in query_x:
        q = unit(q)
        sims = [float(np.dot(q, b)) for b in bank]
        order = sorted(range(len(bank)), key=lambda i: (-sims[i], i))[: min(k, len(bank))]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_y[i])] += math.exp(sims[i] / temperature)
        best = max(votes)
        preds.append(min(c for c in range(num_classes) if votes[c] >= best * (1 - 1e-9)))
    return np.array(preds)


def sign_features(rng, n, prototypes):
    """Rows of a few +-1 prototypes in 16 dimensions: every norm is 4, so cosine similarities are exact
    multiples of 1/16 and many neighbours tie exactly."""
    return prototypes[rng.integers(0, len(prototypes), n)]


@pytest.mark.parametrize("k", [1, 3, 5, 20, 500])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_matches_brute_force_on_continuous_and_tied_features(k, temperature):
    rng = np.random.default_rng(k)
    num_classes = 4
    cont_train, cont_query = rng.normal(size=(120, 8)), rng.normal(size=(40, 8))
    prototypes = rng.choice([-1.0, 1.0], size=(5, 16))
    tied_train, tied_query = sign_features(rng, 120, prototypes), sign_features(rng, 40, prototypes)
    for train_x, query_x in ((cont_train, cont_query), (tied_train, tied_query)):
        train_y = rng.integers(0, num_classes, len(train_x))
        expected = brute_force_knn(train_x, train_y, query_x, num_classes, k, temperature)
        got = knn.knn_predict(train_x, train_y, query_x, num_classes, k=k, temperature=temperature, batch_size=7)
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == np.int64


def test_ties_hand_computed():
    v, w = [1.0, 0.0], [0.0, 1.0]
    train_x = np.array([v, v, v, w, w])
    train_y = np.array([2, 1, 0, 0, 0])
    query = np.array([v, w])
    # k=1: the lowest-index of three equally similar neighbours (label 2)
    assert knn.knn_predict(train_x, train_y, query, 3, k=1).tolist() == [2, 0]
    # k=2: neighbours 0 and 1 vote equally for classes 2 and 1 -> tie -> the lower id, 1 (not 0, no vote)
    assert knn.knn_predict(train_x, train_y, query, 3, k=2).tolist() == [1, 0]
    # k=3: three equal votes for 2, 1, 0 -> 0
    assert knn.knn_predict(train_x, train_y, query, 3, k=3).tolist() == [0, 0]
    # k=5: the 'w' rows (sim 0, label 0) add exp(-1/0.07) each, which breaks the three-way tie for 0
    assert knn.knn_predict(train_x, train_y, query, 3, k=5).tolist() == [0, 0]


def test_tiny_temperature_is_nearest_neighbour_and_batching_does_not_matter():
    rng = np.random.default_rng(3)
    train_x, train_y, query_x = rng.normal(size=(200, 6)), rng.integers(0, 5, 200), rng.normal(size=(90, 6))
    nearest = knn.knn_predict(train_x, train_y, query_x, 5, k=1)
    # at T = 1e-4 the best neighbour outweighs the other 19 by exp(gap / 1e-4); no overflow despite 1/T
    sharp = knn.knn_predict(train_x, train_y, query_x, 5, k=20, temperature=1e-4)
    np.testing.assert_array_equal(sharp, nearest)
    whole = knn.knn_predict(train_x, train_y, query_x, 5, batch_size=1000)
    np.testing.assert_array_equal(knn.knn_predict(train_x, train_y, query_x, 5, batch_size=1), whole)
    # torch inputs give the same answer as numpy inputs
    np.testing.assert_array_equal(
        knn.knn_predict(torch.tensor(train_x), torch.tensor(train_y), torch.tensor(query_x), 5), whole)


def test_accuracy_and_metrics_follow_the_predictions():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(3, 10)) * 3
    train_y, test_y = rng.integers(0, 3, 150), rng.integers(0, 3, 60)
    train_x = centres[train_y] + rng.normal(size=(150, 10))
    test_x = centres[test_y] + rng.normal(size=(60, 10))
    pred = brute_force_knn(train_x, train_y, test_x, 3, 20, 0.07)
    assert knn.knn_accuracy(train_x, train_y, test_x, test_y, 3) == pytest.approx(np.mean(pred == test_y))
    metrics = knn.knn_metrics(train_x, train_y, test_x, test_y, 3, k=20)
    expected = classification_metrics(test_y, pred, 3)
    assert {k: metrics[k] for k in expected} == expected
    assert metrics["k"] == 20 and metrics["n_train"] == 150
    assert metrics["accuracy"] > 0.8  # well-separated clusters: kNN must do clearly better than chance


@pytest.mark.parametrize("kwargs, word", [({"k": 0}, "k must"), ({"temperature": 0.0}, "temperature"),
                                           ({"batch_size": 0}, "batch_size")])
def test_bad_arguments_raise_one_line_errors(kwargs, word):
    x = np.zeros((3, 2)) + 1
    with pytest.raises(ValueError) as info:
        knn.knn_predict(x, np.array([0, 1, 1]), x, 2, **kwargs)
    assert word in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        knn.knn_predict(x, np.array([0, 1, 2]), x, 2)
    with pytest.raises(ValueError, match="same D"):
        knn.knn_predict(x, np.array([0, 1, 1]), np.zeros((2, 3)), 2)


# ----------------------------------------------------------------------------- monitor


def labeled_manifest(split_counts: dict, group_size: int = 1):
    """Rows per split and class; train rows come in augmentation groups of ``group_size`` (id, id-fh, ...)."""
    rows = {"path": [], "image_id": [], "group_id": [], "split": [], "label": [], "domain": []}
    suffixes = ["", "-fh", "-fv", "-r90"]
    for split, counts in split_counts.items():
        for label, count in enumerate(counts):
            size = group_size if split == "train" else 1
            for g in range(count // size):
                for s in suffixes[:size]:
                    image_id = f"{split}-{label}-{g}{s}"
                    rows["path"].append(f"/nowhere/{image_id}.png")
                    rows["image_id"].append(image_id)
                    rows["group_id"].append(f"{split}-{label}-{g}")
                    rows["split"].append(split)
                    rows["label"].append(label)
                    rows["domain"].append("msl")
    return make_manifest(rows)


def test_monitor_split_draws_bank_from_train_and_queries_from_val_stratified_never_test():
    manifest = labeled_manifest({"train": [60, 30, 10], "val": [20, 10, 10], "test": [50, 50, 50]})
    split = np.asarray(manifest.column("split").to_pylist())
    labels = np.asarray(manifest.column("label").to_pylist())
    result = knn.monitor_split(manifest, n_bank=50, n_query=20, seed=0)
    assert result.query_source == "val"
    assert set(split[result.bank]) == {"train"} and set(split[result.query]) == {"val"}
    # proportional shares, by hand: 50 of [60, 30, 10] -> [30, 15, 5]; 20 of [20, 10, 10] -> [10, 5, 5]
    assert np.bincount(labels[result.bank]).tolist() == [30, 15, 5]
    assert np.bincount(labels[result.query]).tolist() == [10, 5, 5]
    assert len(set(result.bank.tolist())) == 50
    again = knn.monitor_split(manifest, n_bank=50, n_query=20, seed=0)
    assert np.array_equal(again.bank, result.bank) and np.array_equal(again.query, result.query)
    assert not np.array_equal(knn.monitor_split(manifest, 50, 20, seed=1).bank, result.bank)
    # asking for more than there is: every train and val row, still no test row
    everything = knn.monitor_split(manifest, n_bank=10_000, n_query=10_000)
    assert sorted(everything.bank.tolist()) == np.flatnonzero(split == "train").tolist()
    assert sorted(everything.query.tolist()) == np.flatnonzero(split == "val").tolist()


def test_monitor_split_without_val_holds_out_whole_train_groups():
    manifest = labeled_manifest({"train": [60, 30, 12], "test": [10, 10, 10]}, group_size=3)
    split = np.asarray(manifest.column("split").to_pylist())
    groups = np.asarray(manifest.column("group_id").to_pylist())
    for seed in range(3):
        result = knn.monitor_split(manifest, n_bank=30, n_query=15, seed=seed)
        assert result.query_source == "train (held out)"
        assert set(split[result.bank]) == {"train"} and set(split[result.query]) == {"train"}
        assert not set(groups[result.bank]) & set(groups[result.query]), "a query's copy in the bank"
        query_groups = set(groups[result.query])
        assert sum(groups[split == "train"].tolist().count(g) for g in query_groups) == len(result.query)
        assert len(result.bank) == 30


def smoke_data(tmp_path_factory) -> dict:
    if (BUILTIN_SMOKE / "msl-labeled-data-set-v2.1").is_dir():
        from raysys.data.formats import discover

        return {k: str(v) for k, v in discover(BUILTIN_SMOKE).items()}
    from raysys.data.simulate import simulate

    return simulate(tmp_path_factory.mktemp("builtin"), preset="smoke", progress=False)


def test_monitor_score_equals_knn_on_hand_computed_features(tmp_path_factory):
    root = smoke_data(tmp_path_factory)["msl"]
    data = knn.load_monitor_data(root, image_size=16, n_bank=60, n_query=12, seed=0)
    manifest, names = load_benchmark(root)
    rows = knn.monitor_split(manifest, 60, 12, seed=0)
    labels = np.asarray(manifest.column("label").to_pylist())
    assert data.bank_labels.tolist() == labels[rows.bank].tolist()
    assert data.query_labels.tolist() == labels[rows.query].tolist()
    assert data.bank_images.shape == (60, 16, 16, 3) and data.num_classes == len(names)

    torch.manual_seed(0)
    model = ContrastiveModel("resnet18", 0.125, small_stem=True).train()
    score = knn.knn_monitor_score(model, data, device="cpu", k=5)
    assert all(m.training for m in model.modules()), "training mode restored"
    model.eval()
    with torch.no_grad():
        bank = model.features(to_float(torch.from_numpy(data.bank_images), 16)).numpy()
        query = model.features(to_float(torch.from_numpy(data.query_images), 16)).numpy()
    expected = np.mean(brute_force_knn(bank, data.bank_labels, query, data.num_classes, 5, 0.07) == data.query_labels)
    assert score == pytest.approx(expected)
