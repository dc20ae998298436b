"""Linear evaluation: probe and metrics against hand-computed values, a frozen backbone that provably stays
unchanged, the feature cache, and a full evaluation on a tiny benchmark written in the real MSL format."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from raysys import models
from raysys.errors import run_command
from raysys.eval import features
from raysys.eval import linear as ev
from raysys.models.io import load_model, model_digest

torch.set_num_threads(1)

CLASSES = ["Arm cover", "Other rover part", "Artifact"]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]  # one colour per class: an easy benchmark
# (split, per-class counts): train is imbalanced so the majority class is 2.
SPLITS = {"train": [3, 2, 5], "val": [1, 1, 1], "test": [2, 3, 1]}


# ----------------------------------------------------------------------------- fixtures


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return models.ContrastiveModel("resnet18", width=0.125, small_stem=True)


def write_msl(root, corrupt_train: int = 0):
    """A tiny MSL v2.1 benchmark in the real layout: images/, <split>-set-v2.1.txt, headerless class_map.csv.
    ``corrupt_train`` extra train files are listed but hold garbage bytes."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "class_map.csv").write_text("".join(f"{i},{name}\n" for i, name in enumerate(CLASSES)))
    labels = {}
    for split, counts in SPLITS.items():
        lines = []
        for label, count in enumerate(counts):
            for k in range(count):
                name = f"{split}{label}{k:02d}_DRCL.jpg"
                pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 15, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "images" / name, quality=95)
                lines.append(f"{name} {label}")
        if split == "train":
            for k in range(corrupt_train):
                (root / "images" / f"broken{k}_DRCL.jpg").write_bytes(b"not a jpeg at all")
                lines.append(f"broken{k}_DRCL.jpg 0")
        (root / f"{split}-set-v2.1.txt").write_text("\n".join(lines) + "\n")
        labels[split] = [int(line.split()[1]) for line in lines]
    return labels


def snapshot(model):
    """Every parameter and buffer (persistent or not), each module's mode, and requires_grad flags."""
    tensors = {f"p:{n}": t.detach().clone() for n, t in model.named_parameters()}
    tensors.update({f"b:{n}": t.detach().clone() for n, t in model.named_buffers()})
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    return tensors, modes, grads


def assert_same(before, after):
    (t0, m0, g0), (t1, m1, g1) = before, after
    assert t0.keys() == t1.keys()
    for name in t0:
        assert torch.equal(t0[name], t1[name]), f"{name} changed"
    assert m0 == m1, "module train/eval modes were not restored"
    assert g0 == g1, "requires_grad flags changed"


def count_forward(model):
    """Wrap ``model.features`` to count its calls."""
    calls = {"n": 0}
    inner = model.features

    def counted(x):
        calls["n"] += 1
        return inner(x)

    model.features = counted
    return calls


# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_hand_computed():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 0, 3]  # class 3 is predicted but never true: it must not count in balanced acc.
    m = ev.classification_metrics(y_true, y_pred, num_classes=4)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["per_class_accuracy"] == {0: pytest.approx(2 / 3), 1: pytest.approx(1 / 2), 2: 0.0}
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # F1 = 2PR/(P+R): class 0 P 2/3 R 2/3, class 1 P 1/2 R 1/2, class 2 nothing right; class 3 never true
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    skewed = ev.classification_metrics([0, 0, 1], [0, 0, 0], num_classes=2)  # class 0: P 2/3, R 1, F1 0.8
    assert skewed["macro_f1"] == pytest.approx(0.4) and skewed["balanced_accuracy"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert m["n_test"] == 6


def test_majority_baseline_hand_computed():
    m = ev.majority_baseline(train_y=[1, 1, 2, 0, 1, 2], test_y=[0, 1, 2, 2], num_classes=3)
    assert m["majority_class"] == 1
    assert m["accuracy"] == pytest.approx(1 / 4)
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)  # recall 0, 1, 0
    assert m["confusion_matrix"] == [[0, 1, 0], [0, 1, 0], [0, 2, 0]]
    assert m["n_train"] == 6 and m["n_test"] == 4
    # ties go to the lowest class id; num_classes is inferred when not given
    tie = ev.majority_baseline(train_y=[2, 2, 1, 1], test_y=[1, 2, 2])
    assert tie["majority_class"] == 1 and tie["accuracy"] == pytest.approx(1 / 3)
    assert len(tie["confusion_matrix"]) == 3


# ----------------------------------------------------------------------------- probe


def gaussian_clusters(n_per_class, num_classes=4, dim=16, spread=0.5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (num_classes, dim))
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), dim))
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


@pytest.mark.parametrize("hidden", [0, 128])
def test_probe_separates_linearly_separable_clusters(hidden):
    x, y = gaussian_clusters(100)
    tx, ty = gaussian_clusters(50, seed=0)  # same centres (same seed), fresh noise below
    tx = tx + np.random.default_rng(1).normal(0, 0.5, tx.shape).astype(np.float32)
    # scale and offset are standardized away; 13 steps per epoch
    m = ev.linear_probe(x * 40 + 7, y, tx * 40 + 7, ty, num_classes=4, hidden=hidden, epochs=100, batch_size=32)
    assert m["accuracy"] >= 0.99 and m["balanced_accuracy"] >= 0.99
    assert m["train_accuracy"] == 1.0
    assert m["n_train"] == 400 and m["n_test"] == 200
    assert np.trace(np.array(m["confusion_matrix"])) == round(m["accuracy"] * 200)


def test_probe_on_random_labels_is_near_chance():
    rng = np.random.default_rng(0)
    x, tx = rng.normal(size=(800, 32)), rng.normal(size=(1000, 32))
    y, ty = rng.integers(0, 4, 800), rng.integers(0, 4, 1000)
    m = ev.linear_probe(x, y, tx, ty, num_classes=4, epochs=20)
    assert 0.19 < m["accuracy"] < 0.31  # chance 0.25; sd over 1,000 test labels is 0.014
    assert 0.19 < m["balanced_accuracy"] < 0.31


def test_dense_layer_is_linear_by_default_and_the_relu_variant_solves_xor():
    rng = np.random.default_rng(0)
    corners = rng.choice([-1.0, 1.0], size=(600, 2))
    y = (corners[:, 0] * corners[:, 1] > 0).astype(np.int64)  # XOR: no linear boundary exists
    x = (corners + rng.normal(0, 0.1, corners.shape)).astype(np.float32)
    xtr, ytr, xte, yte = x[:400], y[:400], x[400:], y[400:]
    linear = ev.linear_probe(xtr, ytr, xte, yte, num_classes=2, hidden=0, epochs=50)
    dense = ev.linear_probe(xtr, ytr, xte, yte, num_classes=2, hidden=128, epochs=50)
    mlp = ev.linear_probe(xtr, ytr, xte, yte, num_classes=2, hidden=128, epochs=50, activation="relu")
    assert linear["accuracy"] < 0.75 and dense["accuracy"] < 0.75 and mlp["accuracy"] > 0.97
    net = ev.train_probe(xtr, ytr, 2, hidden=128, epochs=1).net
    assert [type(m) for m in net] == [torch.nn.Linear, torch.nn.Linear]
    assert (net[0].in_features, net[0].out_features, net[1].out_features) == (2, 128, 2)
    relu = ev.train_probe(xtr, ytr, 2, hidden=128, epochs=1, activation="relu").net
    assert [type(m) for m in relu] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    with pytest.raises(ValueError, match="probe activation 'tanh' is unknown"):
        ev.train_probe(xtr, ytr, 2, hidden=128, epochs=1, activation="tanh")


def test_probe_is_deterministic_from_seed_and_leaves_global_rng_alone():
    x, y = gaussian_clusters(30, spread=3.0)  # overlapping: predictions depend on the exact weights
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = ev.train_probe(x, y, 4, hidden=128, epochs=5, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = ev.train_probe(x, y, 4, hidden=128, epochs=5, seed=7)
    c = ev.train_probe(x, y, 4, hidden=128, epochs=5, seed=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_probe_rejects_bad_input():
    x, y = gaussian_clusters(5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ev.linear_probe(x, y, x, y, num_classes=3)
    with pytest.raises(ValueError, match="differ in width"):
        ev.linear_probe(x, y, x[:, :4], y, num_classes=4)


# ----------------------------------------------------------------------------- frozen backbone


def test_extract_features_leaves_the_model_unchanged_and_matches_a_direct_forward():
    from raysys.data.augment import to_float

    model = tiny_model().train()
    model.projector.eval()  # a mixed-mode model: each module's own mode must come back
    images = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    before = snapshot(model)
    digest = model_digest(model)
    feats = features.extract_features(model, images, batch_size=3, device="cpu", progress=False)
    assert_same(before, snapshot(model))
    assert model_digest(model) == digest
    assert all(p.grad is None for p in model.parameters())
    assert feats.dtype == np.float32 and feats.shape == (7, model.feature_dim)
    # independent reference: one eval-mode forward over all images at once (batching must not matter)
    reference = tiny_model().eval()
    with torch.no_grad():
        expected = reference.features(to_float(torch.from_numpy(images), 16)).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)
    assert features.extract_features(model, images[:0], device="cpu", progress=False).shape == (0, model.feature_dim)


def test_model_digest_sees_a_running_stat_change():
    model = tiny_model()
    digest = model_digest(model)
    assert model_digest(tiny_model()) == digest  # same weights, same digest
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean[0] += 1e-3
    assert model_digest(model) != digest


def test_extract_features_rejects_non_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        features.extract_features(tiny_model(), np.zeros((2, 16, 16, 3), np.float32), progress=False)


# ----------------------------------------------------------------------------- benchmark features + cache


def test_benchmark_features_are_cached_per_model_and_report_skipped_files(tmp_path):
    from raysys.data.formats import read_manifest

    labels = write_msl(tmp_path / "msl", corrupt_train=1)
    manifest = read_manifest(tmp_path / "msl")
    model = tiny_model()
    calls = count_forward(model)
    cache = tmp_path / "cache"

    first = features.benchmark_features(model, manifest, 16, cache_dir=cache, batch_size=4, device="cpu", progress=False)
    assert not first["cache_hit"] and calls["n"] > 0
    assert [p.name for p in cache.iterdir()] == [f"features-{first['model_digest']}-{first['manifest_digest']}-16px.npz"]
    assert [(s["split"], s["path"].rsplit("/", 1)[-1]) for s in first["skipped"]] == [("train", "broken0_DRCL.jpg")]
    for split in ("train", "val", "test"):
        expected = labels[split][:-1] if split == "train" else labels[split]  # the broken file is last in train
        assert first[split]["y"].tolist() == expected
        assert first[split]["x"].shape == (len(expected), model.feature_dim)

    n = calls["n"]
    second = features.benchmark_features(model, manifest, 16, cache_dir=cache, batch_size=4, device="cpu", progress=False)
    assert second["cache_hit"] and calls["n"] == n  # no forward pass at all
    for split in ("train", "val", "test"):
        for key in ("x", "y", "image_id"):
            np.testing.assert_array_equal(second[split][key], first[split][key])
    assert second["skipped"] == first["skipped"]

    # another image size or other weights are other features: a miss, not a stale hit
    assert not features.benchmark_features(model, manifest, 20, cache_dir=cache, device="cpu", progress=False)["cache_hit"]
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    assert not features.benchmark_features(model, manifest, 16, cache_dir=cache, device="cpu", progress=False)["cache_hit"]
    assert len(list(cache.iterdir())) == 3


# ----------------------------------------------------------------------------- evaluate + CLI


def test_evaluate_writes_the_report_and_leaves_the_backbone_unchanged(tmp_path):
    labels = write_msl(tmp_path / "msl", corrupt_train=1)
    model = tiny_model().train()
    before = snapshot(model)
    result = ev.evaluate(model, tmp_path / "msl", tmp_path / "out", "msl", 16, epochs=50, device="cpu", progress=False)
    assert_same(before, snapshot(model))

    saved = json.loads((tmp_path / "out" / "eval-msl.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"metrics", "majority", "class_names", "counts", "model_digest", "probe", "skipped", "val_metrics"} <= saved.keys()
    assert saved["class_names"] == CLASSES
    assert saved["model_digest"] == model_digest(model) and saved["backbone_unchanged"]
    assert saved["probe"]["hidden"] == 0 and saved["probe"]["epochs"] == 50 and saved["image_size"] == 16
    assert saved["counts"]["train"] == {"rows": 11, "used": 10, "per_class": SPLITS["train"]}
    assert saved["counts"]["test"] == {"rows": 6, "used": 6, "per_class": SPLITS["test"]}
    assert [s["path"].rsplit("/", 1)[-1] for s in saved["skipped"]] == ["broken0_DRCL.jpg"]
    # majority baseline by hand: train's most frequent class is 2, which is 1 of the 6 test images
    assert saved["majority"]["majority_class"] == 2
    assert saved["majority"]["accuracy"] == pytest.approx(labels["test"].count(2) / 6)
    assert saved["metrics"]["n_train"] == 10 and saved["metrics"]["n_test"] == 6
    assert set(saved["metrics"]["per_class_accuracy"]) == {"0", "1", "2"}
    # one colour per class: even random-init features separate them better than the majority guess
    assert saved["metrics"]["accuracy"] > saved["majority"]["accuracy"]


def test_evaluate_requires_train_and_test_splits(tmp_path):
    write_msl(tmp_path / "msl")
    (tmp_path / "msl" / "test-set-v2.1.txt").unlink()
    with pytest.raises(ValueError, match="no 'test' rows"):
        ev.evaluate(tiny_model(), tmp_path / "msl", tmp_path / "out", "msl", 16, progress=False)
    assert not (tmp_path / "out").exists()


def save_run(run_dir, model, config):
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_spec": model.spec, "config": config}, run_dir / "model.pt")


def test_load_model_from_run_folder_checkpoint_dir_or_file(tmp_path):
    model = tiny_model(seed=3)
    save_run(tmp_path / "run", model, {"image_size": 16})
    ckpt = tmp_path / "run" / "checkpoint_000001"
    ckpt.mkdir()
    torch.save({"model": model.state_dict(), "model_spec": model.spec, "config": {}}, ckpt / "state.pt")
    digest = model_digest(model)
    for path in (tmp_path / "run", ckpt, tmp_path / "run" / "model.pt"):
        loaded = load_model(path)
        assert model_digest(loaded) == digest and not loaded.training
    with pytest.raises(ValueError, match=r"neither model\.pt .* nor state\.pt"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'model' and 'model_spec'"):
        load_model(tmp_path / "other.pt")


def cli_args(*argv):
    return ev.configure_parser(argparse.ArgumentParser()).parse_args(list(argv))


def test_cli_rejects_bad_paths_with_exit_code_2(tmp_path, capsys):
    save_run(tmp_path / "run", tiny_model(), {})
    write_msl(tmp_path / "msl")
    cases = [
        ("--model", str(tmp_path / "nowhere"), "--benchmark", str(tmp_path / "msl")),
        ("--model", str(tmp_path / "run"), "--benchmark", str(tmp_path / "msl"), "--benchmark", str(tmp_path / "nothing")),
        ("--model", str(tmp_path / "run"), "--benchmark", str(tmp_path / "run")),  # a folder, but no dataset
    ]
    for argv in cases:
        assert run_command("raysys linear-eval", ev.run, cli_args(*argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("raysys linear-eval: error:") and err.count("\n") == 1
    assert not list((tmp_path / "run").glob("eval-*.json"))


def test_cli_evaluates_a_saved_run(tmp_path, capsys):
    save_run(tmp_path / "run", tiny_model(), {"image_size": 16})
    write_msl(tmp_path / "msl-labeled-data-set-v2.1")
    argv = ("--model", str(tmp_path / "run"), "--benchmark", str(tmp_path / "msl-labeled-data-set-v2.1"),
            "--epochs", "5", "--hidden", "128", "--device", "cpu")
    assert ev.run(cli_args(*argv)) == 0
    report = json.loads((tmp_path / "run" / "eval-msl-labeled-data-set-v2.1.json").read_text())
    assert report["image_size"] == 16 and report["probe"]["hidden"] == 128  # image size from the saved config
    out = capsys.readouterr().out
    assert "msl-labeled-data-set-v2.1" in out and f"{report['metrics']['accuracy']:.2%}" in out
    assert len(list((tmp_path / "run" / "feature-cache").glob("*.npz"))) == 1
