"""The clustering step: whitening + k-means against generating ids, quality measures against hand counts,
the cache (features once per encoder, k-means once per K), the oracle, a saved raysys model through Ray
Data, the texture encoder (encoding layer against a brute-force loop, training), and the join."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import bucket_keys

from raysys.data import formats, simulate
from raysys.data.schema import make_manifest
from raysys.data.sources import attach_clusters
from raysys.distributed import cluster_command
from raysys.distributed import clustering as cl
from raysys.errors import run_command
from raysys.eval.features import extract_features as reference_features
from raysys.models import ContrastiveModel
from raysys.models import texture as tx

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smoke_pool(tmp_path_factory):
    """The built-in smoke rover pool (600 simulated images, hidden labels) and its manifest."""
    root = tmp_path_factory.mktemp("builtin")
    roots = simulate.simulate(root, preset="smoke", progress=False)
    return formats.read_folder(roots["rover"], hidden_labels=True)


@pytest.fixture(scope="module")
def small_pool(smoke_pool):
    """Every 5th smoke image (120): enough for the Ray path, cheap enough for a 2-core machine."""
    return smoke_pool.take(np.arange(0, smoke_pool.num_rows, 5))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = ContrastiveModel("resnet18", width=0.125, small_stem=True)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"model": model.state_dict(), "model_spec": model.spec, "config": {}}, path)
    return path


def blobs(n_per: int, k: int, dim: int, seed: int = 0):
    """Well-separated Gaussian clusters with anisotropic scales (whitening must not break them)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (k, dim))
    ids = np.repeat(np.arange(k), n_per)
    scales = np.geomspace(0.01, 1.0, dim)
    return (centres[ids] + rng.normal(0, 1, (len(ids), dim)) * scales).astype(np.float32), ids


# ----------------------------------------------------------------------------- the math


def test_whitening_and_kmeans_recover_separated_clusters():
    x, ids = blobs(n_per=40, k=6, dim=300)  # 240 rows < 300 dims
    z = tx.reduce_features(x, dim=256)
    assert z.shape == (240, 24)  # at most N // 10 components
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    found = tx.cluster_features(x, 6, seed=0)
    assert found.dtype == np.int32 and set(found) == set(range(6))
    assert tx.cluster_quality(found, ids)["nmi"] > 0.95


def test_constant_directions_are_dropped_not_blown_up():
    x, ids = blobs(n_per=50, k=3, dim=4)
    x = np.hstack([x, np.full((150, 2), 3.0, np.float32)])  # two constant features: zero variance
    z = tx.reduce_features(x)
    assert z.shape == (150, 4) and np.isfinite(z).all()
    assert tx.cluster_quality(tx.cluster_features(x, 3), ids)["nmi"] > 0.95


def test_minibatch_kmeans_above_threshold(monkeypatch):
    x, ids = blobs(n_per=100, k=4, dim=8)
    monkeypatch.setattr(tx, "MINIBATCH_ROWS", 100)
    assert tx.cluster_quality(tx.cluster_features(x, 4), ids)["nmi"] > 0.95


def test_purity_and_nmi_by_hand():
    clusters = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    labels = np.array([5, 5, 7, 7, 7, 5, -1, 9, 9])
    # labeled: cluster 0 -> {5,5,7} majority 2; cluster 1 -> {7,7} 2; cluster 2 -> {5,9,9} 2 (the -1 ignored)
    assert tx.purity(clusters[labels >= 0], labels[labels >= 0]) == pytest.approx(6 / 8)
    q = tx.cluster_quality(clusters, labels)
    assert q["purity"] == pytest.approx(6 / 8) and q["n_labeled"] == 8
    assert tx.cluster_quality([3, 3, 8, 8], [1, 1, 0, 0])["nmi"] == pytest.approx(1.0)
    assert tx.cluster_quality([0, 1, 2], [-1, -1, -1]) == {}


def test_pair_precision_and_recall_by_hand_and_brute_force():
    # same-cluster pairs: 3 + 1 = 4, of which same class: (0,1) and (3,4) -> 1/2; same-class pairs: 1 + 3 = 4 -> 1/2
    assert tx.pair_precision_recall([0, 0, 0, 1, 1], [0, 0, 1, 1, 1]) == (0.5, 0.5)
    rng = np.random.default_rng(0)
    clusters, labels = rng.integers(0, 6, 200), rng.integers(0, 4, 200)
    pairs = [(i, j) for i in range(200) for j in range(i + 1, 200)]
    same_c = sum(clusters[i] == clusters[j] for i, j in pairs)
    same_y = sum(labels[i] == labels[j] for i, j in pairs)
    both = sum(clusters[i] == clusters[j] and labels[i] == labels[j] for i, j in pairs)
    q = tx.cluster_quality(clusters, labels)
    assert (q["pair_precision"], q["pair_recall"]) == (pytest.approx(both / same_c), pytest.approx(both / same_y))


# ----------------------------------------------------------------------------- the texture encoder


def test_encoding_layer_matches_brute_force_loop():
    torch.manual_seed(0)
    layer = tx.TextureEncoding(channels=5, codewords=3).double()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    expected = torch.zeros(2, 3, 5, dtype=torch.float64)
    for b in range(2):
        desc = x[b].reshape(5, -1).t()  # 12 descriptors
        for i in range(len(desc)):
            logits = torch.stack([-layer.smoothing[k] * ((desc[i] - layer.codewords[k]) ** 2).sum() for k in range(3)])
            weights = torch.softmax(logits, 0)
            for k in range(3):
                expected[b, k] += weights[k] * (desc[i] - layer.codewords[k])
    torch.testing.assert_close(layer(x), expected)


def test_texture_encoder_output_is_unit_512d():
    torch.manual_seed(0)
    model = tx.TextureEncoder("resnet18", width=0.125, small_stem=True).eval()
    out = model.features(torch.rand(3, 3, 16, 16))
    assert out.shape == (3, 512)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_triplet_losses_by_hand():
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # batch hard, per anchor (hardest positive, nearest negative): 0 (1, 2), 1 (1, sqrt 5), 2 (1, 2), 3 (1, 3)
    hard = tx.batch_hard_triplet_loss(emb, labels, margin=1.5)
    expected = np.mean([max(0, 1 - 2 + 1.5), max(0, 1 - 5 ** 0.5 + 1.5), max(0, 1 - 2 + 1.5), max(0, 1 - 3 + 1.5)])
    assert hard.item() == pytest.approx(expected, rel=1e-5)
    dist = torch.cdist(emb, emb).numpy()
    terms = [dist[a, p] - dist[a, n] + 1.5 for a in range(4) for p in range(4) for n in range(4)
             if a != p and labels[a] == labels[p] and labels[a] != labels[n]]
    active = [t for t in terms if t > 0]
    assert tx.batch_all_triplet_loss(emb, labels, margin=1.5).item() == pytest.approx(np.mean(active), rel=1e-5)


def test_pk_batches_draw_per_cluster_groups():
    labels = np.repeat(np.arange(10), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    for idx in tx.pk_batches(labels, per_cluster=4, batch_size=16, steps=5, rng=np.random.default_rng(0)):
        counts = np.bincount(labels[idx], minlength=10)
        assert sorted(counts[counts > 0]) == [4, 4, 4, 4] and counts[0] == 0  # the singleton is never drawn


def test_triplet_steps_decrease_the_loss_on_fixed_pseudo_labels():
    torch.manual_seed(0)
    model = tx.TextureEncoder("resnet18", width=0.125, small_stem=True)
    x = torch.rand(16, 3, 16, 16)
    labels = torch.arange(16) // 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def mean_over_all_triplets(emb):  # a fixed denominator: BA!=0 averages only over the active triplets
        d = torch.cdist(emb, emb).detach()
        return np.mean([max(0.0, d[a, p] - d[a, n] + 0.2) for a in range(16) for p in range(16) for n in range(16)
                        if a != p and labels[a] == labels[p] and labels[a] != labels[n]])

    before = mean_over_all_triplets(model(x))
    for _ in range(10):
        loss = tx.batch_all_triplet_loss(model(x), labels, margin=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert mean_over_all_triplets(model(x)) < 0.25 * before


def test_texture_training_runs_and_logs_history(smoke_pool):
    """A tiny run on 16 px smoke images: valid clusters and history; the NMI against the hidden labels is
    printed (-s) rather than asserted: at this scale training need not beat random weights."""
    from raysys.data.decode import load_images

    images, kept, _ = load_images(smoke_pool.column("path").to_pylist(), 16)
    labels = np.asarray(smoke_pool.column("label").to_pylist())[kept]
    cfg = tx.TextureConfig(width=0.125, epochs=2, batch_size=64)
    model, history = tx.train_texture_encoder(images, cfg, seed=0, progress=False, diagnostic_labels=labels)
    assert [h["epoch"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    assert history[0]["pseudo_k"] == 60 and "pseudo_nmi" in history[0]
    trained = tx.cluster_features(tx.embed_images(model, images), 19)
    torch.manual_seed(0)
    random_init = tx.cluster_features(tx.embed_images(cfg.build(16), images), 19)
    assert trained.shape == (len(images),) and 2 <= len(set(trained)) <= 19
    print("smoke NMI trained", tx.cluster_quality(trained, labels), "random", tx.cluster_quality(random_init, labels))


def test_texture_trunk_starts_from_a_weights_file(tmp_path):
    from raysys.models.backbones import build_backbone

    torch.manual_seed(1)
    net, _ = build_backbone("resnet18", 0.125, True)
    torch.save(net.state_dict(), tmp_path / "backbone.pt")
    torch.manual_seed(2)
    model = tx.TextureEncoder("resnet18", 0.125, True)
    report = model.load_trunk_weights(tmp_path / "backbone.pt")
    assert not report.mismatched and all(k.startswith("fc") or k in report.loaded for k in net.state_dict())
    assert torch.equal(model.trunk[0].weight, net.conv1.weight)
    assert torch.equal(model.trunk[7][1].conv2.weight, net.layer4[1].conv2.weight)
    with pytest.raises(tx.TextureConfigError, match="do not exist"):
        tx.TextureConfig(init_weights=str(tmp_path / "missing.pt")).validate()


def test_colour_invariant_texture_views_lose_colour_sometimes():
    """SimCLR's grayscale (p 0.2) in the colour-invariant views; none in the default's mild jitter."""
    from raysys.data.augment import augment

    red = torch.zeros(400, 16, 16, 3, dtype=torch.uint8)
    red[..., 0] = 200
    for invariant, low, high in ((False, 0.0, 0.0), (True, 0.1, 0.3)):
        views = augment(red, tx._texture_augment(16, invariant), torch.Generator().manual_seed(0))
        gray = ((views[:, 0] - views[:, 1]).abs().amax((1, 2)) < 1e-3).float().mean().item()
        assert low <= gray <= high, (invariant, gray)


# ----------------------------------------------------------------------------- cluster_assignments (Ray)


def test_saved_model_encoder_via_ray_data_and_cache(ray_session, small_pool, model_file, tmp_path, monkeypatch):
    calls = {"features": 0, "kmeans": 0}
    real_extract, real_cluster = cl.extract_features, cl.cluster_features

    def counting_extract(*a, **kw):
        calls["features"] += 1
        return real_extract(*a, **kw)

    def counting_cluster(*a, **kw):
        calls["kmeans"] += 1
        return real_cluster(*a, **kw)

    monkeypatch.setattr(cl, "extract_features", counting_extract)
    monkeypatch.setattr(cl, "cluster_features", counting_cluster)
    first = cl.cluster_assignments(small_pool, str(model_file), 5, cache_dir=tmp_path, image_size=16, progress=False)
    assert calls == {"features": 1, "kmeans": 1}
    assert first.schema.field("cluster_id").type == pa.int32() and first.schema.field("image_id").type == pa.string()
    assert sorted(first.column("image_id").to_pylist()) == sorted(small_pool.column("image_id").to_pylist())
    ids = first.column("cluster_id").to_numpy()
    assert 2 <= len(set(ids)) <= 5 and ids.min() >= 0 and ids.max() < 5
    meta = first.schema.metadata
    assert meta[cl.META_USES_LABELS] == b"false" and b"nmi" in meta[cl.META_QUALITY]

    # The features came through Ray Data equal the in-process reference extraction (row for row).
    from raysys.data.decode import load_images
    from raysys.models.io import load_model

    order = {i: r for r, i in enumerate(small_pool.column("image_id").to_pylist())}
    cached_ids, cached = cl._load_features(next((tmp_path / "features").glob("*.npz")))
    images, _, _ = load_images([small_pool.column("path")[order[i]].as_py() for i in cached_ids], 16)
    np.testing.assert_allclose(cached, reference_features(load_model(model_file), images, progress=False),
                               rtol=1e-4, atol=1e-5)

    again = cl.cluster_assignments(small_pool, str(model_file), 5, cache_dir=tmp_path, image_size=16, progress=False)
    assert calls == {"features": 1, "kmeans": 1} and again.equals(first)
    other_k = cl.cluster_assignments(small_pool, str(model_file), 3, cache_dir=tmp_path, image_size=16, progress=False)
    assert calls == {"features": 1, "kmeans": 2} and len(set(other_k.column("cluster_id").to_pylist())) <= 3
    cl.cluster_assignments(small_pool, str(model_file), 3, seed=1, cache_dir=tmp_path, image_size=16, progress=False)
    assert calls == {"features": 1, "kmeans": 3}
    assert len(list((tmp_path / "clusters").glob("*.parquet"))) == 3
    assert not list(tmp_path.rglob(".*.tmp*"))  # no temporary file left behind


def test_texture_encoder_end_to_end_is_cached(ray_session, small_pool, tmp_path, monkeypatch):
    trainings = []
    real_train = tx.train_texture_encoder
    monkeypatch.setattr(tx, "train_texture_encoder", lambda *a, **kw: trainings.append(1) or real_train(*a, **kw))
    kw = dict(cache_dir=tmp_path, image_size=16, progress=False, width=0.125, epochs=1, batch_size=32)
    table = cl.cluster_assignments(small_pool, "texture", 4, **kw)
    assert table.num_rows == small_pool.num_rows and set(table.column("cluster_id").to_pylist()) <= set(range(4))
    assert len(list((tmp_path / "encoders").glob("texture-*.pt"))) == 1
    cl.cluster_assignments(small_pool, "texture", 6, **kw)
    assert len(trainings) == 1  # a second K reuses the trained encoder
    cl.cluster_assignments(small_pool, "texture", 6, seed=1, encoder_seed=0, **kw)
    assert len(trainings) == 1  # so does another k-means seed on the same encoder (what a sweep's trials do)
    assert len(list((tmp_path / "clusters").glob("*-k6-s1.parquet"))) == 1


def test_oracle_uses_labels_and_says_so(small_pool, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        table = cl.cluster_assignments(small_pool, "oracle", 99, cache_dir=tmp_path)
    assert "USES THE TRUE LABELS" in caplog.text
    assert table.schema.metadata[b"raysys.uses_labels"] == b"true"
    joined = attach_clusters(small_pool, table)
    labels = np.asarray(joined.column("label").to_pylist())
    assert np.array_equal(joined.column("cluster_id").to_numpy(), labels)
    assert tx.cluster_quality(table.column("cluster_id").to_numpy(), labels)["nmi"] == pytest.approx(1.0)
    unlabeled = small_pool.set_column(small_pool.schema.get_field_index("label"), "label",
                                      pa.array([-1] * small_pool.num_rows, pa.int32()))
    with pytest.raises(cl.ClusterError, match="needs labels"):
        cl.cluster_assignments(unlabeled, "oracle", 5, cache_dir=tmp_path)


def test_noisy_labels_replace_the_stated_fraction():
    labels = np.repeat(np.arange(4), 50)  # 200 images, 4 classes
    assert np.array_equal(cl.noisy_labels(labels, 0.0, seed=0), labels)
    noisy = cl.noisy_labels(labels, 0.25, seed=3)
    assert np.array_equal(noisy, cl.noisy_labels(labels, 0.25, seed=3)), "the seed fixes the draw"
    # Only the 50 redrawn ids can change, and each keeps its class with chance 1/4: about 37.5 change
    # (binomial, 4.5-sigma band below).
    changed = int((noisy != labels).sum())
    assert 50 * 0.75 - 4.5 * (50 * 0.75 * 0.25) ** 0.5 <= changed <= 50
    assert set(np.unique(cl.noisy_labels(labels, 1.0, seed=0))) <= {0, 1, 2, 3}
    with pytest.raises(cl.ClusterError, match="out of range"):
        cl.noisy_labels(labels, 1.5, seed=0)


def test_noisy_oracle_lowers_nmi_and_is_cached_per_noise_and_seed(small_pool, tmp_path):
    clean = cl.cluster_assignments(small_pool, "oracle", None, cache_dir=tmp_path)
    noisy = cl.cluster_assignments(small_pool, "oracle", None, seed=1, cache_dir=tmp_path, noise=1.0)
    quality = [json.loads(t.schema.metadata[b"raysys.quality"])["nmi"] for t in (clean, noisy)]
    assert quality[0] == pytest.approx(1.0) and quality[1] < 0.5
    assert noisy.schema.metadata[b"raysys.uses_labels"] == b"true"
    assert len(list((tmp_path / "clusters").glob("oracle-*.parquet"))) == 2
    with pytest.raises(cl.ClusterError, match="only to --encoder oracle"):
        cl.cluster_assignments(small_pool, "texture", 4, cache_dir=tmp_path, noise=0.5)


def test_bad_arguments_fail_before_work(small_pool, tmp_path):
    with pytest.raises(cl.ClusterError, match="out of range"):
        cl.cluster_assignments(small_pool, "texture", 1, cache_dir=tmp_path)
    with pytest.raises(cl.ClusterError, match="out of range"):
        cl.cluster_assignments(small_pool, "texture", small_pool.num_rows + 1, cache_dir=tmp_path)
    with pytest.raises(cl.ClusterError, match="does not exist"):
        cl.cluster_assignments(small_pool, str(tmp_path / "nope.pt"), 3, cache_dir=tmp_path)
    with pytest.raises(tx.TextureConfigError, match="unknown texture settings"):
        cl.cluster_assignments(small_pool, "texture", 3, cache_dir=tmp_path, widht=0.5)
    assert not (tmp_path / "features").exists()


def test_attach_clusters_joins_by_id_and_fills_missing(caplog):
    manifest = make_manifest({"path": ["/a.png", "/b.png", "/c.png"], "image_id": ["a", "b", "c"],
                              "domain": ["rover"] * 3})
    assignments = pa.table({"image_id": ["c", "a", "zz"], "cluster_id": pa.array([7, 2, 1], pa.int32())})
    with caplog.at_level(logging.WARNING):
        joined = attach_clusters(manifest, assignments)
    assert joined.column("cluster_id").to_pylist() == [2, -1, 7]
    assert joined.schema.field("cluster_id").type == pa.int64()
    assert joined.column("image_id").to_pylist() == ["a", "b", "c"]
    assert "1 of 3 images have no cluster id" in caplog.text
    assert attach_clusters(joined, assignments).column_names.count("cluster_id") == 1


# ----------------------------------------------------------------------------- command line


def cli_args(**kw):
    parser = cluster_command.configure_parser(argparse.ArgumentParser())
    argv = [item for key, value in kw.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    return parser.parse_args(argv)


def test_cli_prints_path_sizes_and_quality(ray_session, small_pool, model_file, tmp_path, capsys):
    folder = tmp_path / "pool"
    folder.mkdir()
    for path in small_pool.column("path").to_pylist()[:40]:
        (folder / path.rsplit("/", 1)[1]).symlink_to(path)
    out = tmp_path / "clusters.parquet"
    code = cluster_command.run(cli_args(data=folder, encoder=model_file, k="3,4", cache_dir=tmp_path / "cache",
                           image_size=16, out=out))
    assert code == 0
    text = capsys.readouterr().out
    assert text.count(".parquet") >= 4 and "size min" in text and "NMI" not in text  # no labels in this folder
    assert (tmp_path / "clusters-k3.parquet").is_file() and (tmp_path / "clusters-k4.parquet").is_file()


@pytest.mark.parametrize("kw, message", [
    (dict(encoder="texture", k="1"), "out of range"),
    (dict(encoder="texture", k="x"), "not an integer"),
    (dict(encoder="texture"), "--k is required"),
    (dict(encoder="/no/such/model.pt", k="3"), "no such file"),
    (dict(encoder="oracle"), "needs labels"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, kw, message):
    folder = tmp_path / "pool"
    folder.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"img{i}.png")
    assert run_command("raysys cluster", cluster_command.run, cli_args(data=folder, cache_dir=tmp_path / "cache", **kw)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_texture_cache_is_shared_through_object_storage(ray_session, small_pool, s3_bucket, tmp_path, monkeypatch):
    """A second node (a fresh cache folder) with the same shared storage recomputes nothing; a new K there
    reuses the shared features and runs only k-means."""
    shared = f"{s3_bucket}/sweep/cache"
    kw = dict(image_size=16, progress=False, width=0.125, epochs=1, batch_size=32, shared=shared)
    first = cl.cluster_assignments(small_pool, "texture", 4, cache_dir=tmp_path / "node-a", **kw)
    keys = bucket_keys(s3_bucket)
    assert sorted(k.split("/")[2] for k in keys) == ["clusters", "encoders", "features"], keys

    def recompute(*args, **kwargs):
        raise AssertionError("recomputed what the shared cache holds")

    monkeypatch.setattr(tx, "train_texture_encoder", recompute)
    monkeypatch.setattr(cl, "extract_features", recompute)
    real_kmeans = cl.cluster_features
    monkeypatch.setattr(cl, "cluster_features", recompute)
    again = cl.cluster_assignments(small_pool, "texture", 4, cache_dir=tmp_path / "node-b", **kw)
    assert again.equals(first)
    monkeypatch.setattr(cl, "cluster_features", real_kmeans)
    other_k = cl.cluster_assignments(small_pool, "texture", 3, cache_dir=tmp_path / "node-c", **kw)
    assert set(other_k.column("cluster_id").to_pylist()) == {0, 1, 2}
    assert len(bucket_keys(s3_bucket)) == 4  # the new K's clusters published
