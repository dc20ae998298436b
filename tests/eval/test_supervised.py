"""Supervised baseline: learns an easy benchmark (beats the majority class), is deterministic from its seed,
writes a model.pt the linear evaluation loads unchanged (checked against predictions recomputed from the
file), and rejects bad input with one-line errors before any work. Fine-tuning starts from the given weights
(first step sees them exactly), trains the backbone at a lower rate, and leaves the caller's model alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from raysys.eval import linear as ev
from raysys.eval import supervised
from raysys.eval.supervised import RESULT_FILE, fine_tune, train_supervised
from raysys.models import ContrastiveModel
from raysys.models.io import load_model, model_digest

torch.set_num_threads(1)

SIZE = 16
CLASSES = ["Arm cover", "Other rover part", "Artifact"]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
# Train is imbalanced (majority class 2); test is balanced so the majority baseline scores 1/3.
SPLITS = {"train": [8, 6, 12], "val": [2, 2, 2], "test": [6, 6, 6]}
SETTINGS = dict(width=0.125, small_stem=True, image_size=SIZE, epochs=12, batch_size=8, lr=3e-3, progress=False)


def class_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """One colour and one stripe direction per class (0: none, 1: horizontal, 2: vertical), plus noise."""
    pixels = np.array(COLOURS[label], dtype=float) + rng.normal(0, 12, (SIZE, SIZE, 3))
    if label == 1:
        pixels[::4] *= 0.4
    elif label == 2:
        pixels[:, ::4] *= 0.4
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_msl(root, splits=SPLITS):
    """A tiny MSL v2.1 benchmark in the real layout (images/, <split>-set-v2.1.txt, headerless class_map.csv),
    lossless PNGs at the training size so the test can read them back exactly."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "class_map.csv").write_text("".join(f"{i},{name}\n" for i, name in enumerate(CLASSES)))
    for split, counts in splits.items():
        lines = []
        for label, count in enumerate(counts):
            for k in range(count):
                name = f"{split}{label}{k:02d}_DRCL.png"
                Image.fromarray(class_image(label, rng)).save(root / "images" / name)
                lines.append(f"{name} {label}")
        (root / f"{split}-set-v2.1.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_msl(tmp_path_factory.mktemp("bench") / "msl")


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train_supervised(bench, out, seed=0, **SETTINGS), out


def test_learns_easy_benchmark_and_json_matches_predictions_recomputed_from_the_file(bench, run):
    result, out = run
    written = json.loads((out / RESULT_FILE).read_text())
    assert written == json.loads(json.dumps({k: v for k, v in result.items() if k != "model_path"}))
    assert result["model_path"] == str(out / "model.pt")

    # independent reference: the majority baseline from the label files themselves
    test_lines = (bench / "test-set-v2.1.txt").read_text().split("\n")
    test_rows = [line.split() for line in test_lines if line]
    test_y = np.array([int(label) for _, label in test_rows])
    majority = np.mean(test_y == 2)  # class 2 is the most frequent train class
    assert result["majority"]["accuracy"] == pytest.approx(majority)
    assert result["metrics"]["accuracy"] > majority + 0.3

    # recompute the classifier's test predictions from model.pt, reading the images with PIL directly
    saved = torch.load(out / "model.pt", weights_only=True)
    model = load_model(out)
    head = torch.nn.Linear(model.feature_dim, len(CLASSES))
    head.load_state_dict(saved["classifier"])
    images = np.stack([np.asarray(Image.open(bench / "images" / name).convert("RGB")) for name, _ in test_rows])
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        pred = head(model.features(x)).argmax(1).numpy()
    assert result["metrics"]["accuracy"] == pytest.approx(np.mean(pred == test_y))
    assert result["metrics"]["confusion_matrix"] == [
        [int(np.sum((test_y == t) & (pred == p))) for p in range(3)] for t in range(3)]
    per_class = [np.mean(pred[test_y == c] == c) for c in range(3)]
    assert result["metrics"]["balanced_accuracy"] == pytest.approx(np.mean(per_class))
    assert result["val_metrics"]["n_test"] == sum(SPLITS["val"])
    assert [h["epoch"] for h in result["history"]] == list(range(1, SETTINGS["epochs"] + 1))
    assert result["counts"]["train"]["per_class"] == SPLITS["train"]
    assert result["skipped"] == []


def test_same_seed_gives_identical_weights_and_leaves_global_rng_alone(bench, run, tmp_path):
    first = torch.load(run[1] / "model.pt", weights_only=True)
    rng_before = torch.random.get_rng_state()
    again = train_supervised(bench, tmp_path / "again", seed=0, **SETTINGS)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    second = torch.load(tmp_path / "again" / "model.pt", weights_only=True)
    for part in ("model", "classifier"):
        assert first[part].keys() == second[part].keys()
        assert all(torch.equal(first[part][k], second[part][k]) for k in first[part])
    assert again["metrics"] == run[0]["metrics"]

    other = torch.load(train_supervised(bench, tmp_path / "other", seed=1, **SETTINGS)["model_path"], weights_only=True)
    assert not all(torch.equal(first["model"][k], other["model"][k]) for k in first["model"])


def test_model_file_works_with_load_model_and_linear_evaluation(bench, run, tmp_path):
    result, out = run
    model = load_model(out)
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["config"]["image_size"] == SIZE and saved["config"]["method"] == "supervised"
    assert saved["model_spec"] == model.spec

    # only the backbone was trained: the projector equals a fresh seed-0 model's, the backbone does not
    torch.manual_seed(0)
    init = ContrastiveModel("resnet18", 0.125, small_stem=True).state_dict()
    trained = model.state_dict()
    assert all(torch.equal(trained[k], init[k]) for k in init if k.startswith("projector."))
    assert not torch.equal(trained["backbone.conv1.weight"], init["backbone.conv1.weight"])

    with torch.no_grad():
        features = model.features(torch.rand(2, 3, SIZE, SIZE))
    assert features.shape == (2, 512 // 8)
    report = ev.evaluate(model, bench, tmp_path, "fab", SIZE, epochs=20, progress=False)
    assert report["feature_dim"] == 64
    assert report["metrics"]["n_test"] == sum(SPLITS["test"])
    assert (tmp_path / "eval-fab.json").is_file()


def _one_line_error(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_bad_input_raises_one_line_value_error_before_work(bench, tmp_path):
    out = tmp_path / "out"
    assert "does not exist" in _one_line_error(lambda: train_supervised(tmp_path / "nowhere", out, progress=False))

    no_train = write_msl(tmp_path / "no-train", {"val": [1, 1, 1], "test": [2, 2, 2]})
    assert "'train'" in _one_line_error(lambda: train_supervised(no_train, out, progress=False))

    assert "epochs" in _one_line_error(lambda: train_supervised(bench, out, epochs=0, progress=False))
    assert "crop_scal" in _one_line_error(
        lambda: train_supervised(bench, out, augment={"crop_scal": [0.5, 1]}, progress=False))
    assert not out.exists()  # nothing was written


# ----------------------------------------------------------------------------- fine-tuning


def pretrained_model(folder):
    """A stand-in pretrained encoder (seeded random weights, BatchNorm statistics moved off their init so
    loading them is visible), saved in the trainer's model.pt format."""
    torch.manual_seed(5)
    model = ContrastiveModel("resnet18", 0.125, small_stem=True)
    with torch.no_grad():
        model.train()(torch.rand(8, 3, SIZE, SIZE))  # one forward pass in train mode updates running stats
    model.eval()
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "model_spec": model.spec, "config": {"image_size": SIZE}},
               folder / "model.pt")
    return model


def record_first_epoch(monkeypatch):
    """Wrap the training epoch to record the model's tensors and the optimizer's groups at its first call."""
    seen = {}
    real = supervised._train_epoch

    def wrapper(model, head, optimizer, *args):
        if not seen:
            seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            seen["groups"] = [(g["lr"], [id(p) for p in g["params"]]) for g in optimizer.param_groups]
            seen["backbone"] = [id(p) for p in model.backbone.parameters()]
            seen["head"] = [id(p) for p in head.parameters()]
        return real(model, head, optimizer, *args)

    monkeypatch.setattr(supervised, "_train_epoch", wrapper)
    return seen


def test_fine_tune_starts_from_the_pretrained_weights_and_trains_the_backbone(bench, tmp_path, monkeypatch):
    pretrained = pretrained_model(tmp_path / "pretrained")
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    seen = record_first_epoch(monkeypatch)
    out = tmp_path / "fine-tuned"
    result = fine_tune(tmp_path / "pretrained", bench, out, epochs=3, lr=3e-3, batch_size=8, progress=False)

    # the first training step sees exactly the pretrained weights and BatchNorm statistics
    assert seen["state"].keys() == before.keys()
    assert all(torch.equal(seen["state"][k], before[k]) for k in before)
    # backbone at lr / 10, head at lr
    assert [lr for lr, _ in seen["groups"]] == pytest.approx([3e-4, 3e-3])
    assert [ids for _, ids in seen["groups"]] == [seen["backbone"], seen["head"]]

    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["config"]["method"] == "fine-tune" and saved["config"]["backbone_lr"] == pytest.approx(3e-4)
    assert saved["config"]["image_size"] == SIZE  # taken from the pretrained run's config
    assert saved["config"]["init_model_digest"] == model_digest(pretrained)
    assert not torch.equal(saved["model"]["backbone.conv1.weight"], before["backbone.conv1.weight"])
    assert all(torch.equal(saved["model"][k], before[k]) for k in before if k.startswith("projector."))
    assert (out / supervised.FINE_TUNE_FILE).is_file() and not (out / RESULT_FILE).exists()
    assert result["method"] == "fine-tune" and result["metrics"]["n_test"] == sum(SPLITS["test"])

    # unlike fine-tuning, the linear probe leaves the same pretrained backbone untouched
    report = ev.evaluate(load_model(tmp_path / "pretrained"), bench, tmp_path, "probe", SIZE, epochs=5,
                         progress=False)
    assert report["model_digest"] == model_digest(pretrained)


def test_fine_tune_from_a_model_object_leaves_it_unchanged_and_equals_the_file_route(bench, tmp_path):
    pretrained = pretrained_model(tmp_path / "pretrained")
    digest = model_digest(pretrained)
    settings = dict(epochs=2, lr=3e-3, batch_size=8, image_size=SIZE, progress=False)
    fine_tune(pretrained, bench, tmp_path / "from-object", **settings)
    assert model_digest(pretrained) == digest and not pretrained.training
    fine_tune(tmp_path / "pretrained", bench, tmp_path / "from-file", **settings)
    a = torch.load(tmp_path / "from-object" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "from-file" / "model.pt", weights_only=True)
    for part in ("model", "classifier"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert "does not exist" in _one_line_error(lambda: fine_tune(tmp_path / "nowhere", bench, tmp_path / "x"))
    assert "backbone_lr" in _one_line_error(
        lambda: train_supervised(bench, tmp_path / "x", init_model=pretrained, backbone_lr=0.0, progress=False))


# ----------------------------------------------------------------------------- step budget and weights file


def test_step_budget_sets_the_epochs_from_the_train_split_size(bench, tmp_path):
    # 26 train images in batches of 8: 3 steps per epoch (the partial batch is dropped), so 10 steps need 4 epochs
    assert supervised.steps_per_epoch(26, 8) == 3 and supervised.steps_per_epoch(5, 8) == 1
    assert supervised.epochs_for_steps(10, 26, 8) == 4 and supervised.epochs_for_steps(9, 26, 8) == 3
    result = train_supervised(bench, tmp_path, seed=0, **{**SETTINGS, "epochs": 1}, steps=10)
    assert result["epochs"] == 4 and len(result["history"]) == 4
    assert result["config"]["step_budget"] == 10 and result["config"]["epochs"] == 4
    assert "steps" in _one_line_error(lambda: train_supervised(bench, tmp_path / "x", steps=0, progress=False))


def test_weights_file_starts_the_supervised_reference_from_its_weights(bench, tmp_path, monkeypatch):
    pretrained = pretrained_model(tmp_path / "pretrained")
    weights = tmp_path / "backbone.pt"
    torch.save(pretrained.backbone.state_dict(), weights)  # a bare backbone state dict, as torchvision ships
    seen = record_first_epoch(monkeypatch)
    out = tmp_path / "transfer"
    result = train_supervised(bench, out, seed=0, init_weights=weights, **{**SETTINGS, "epochs": 2})

    expected = pretrained.backbone.state_dict()
    assert all(torch.equal(seen["state"][f"backbone.{k}"], v) for k, v in expected.items())
    assert [lr for lr, _ in seen["groups"]] == pytest.approx([3e-4, 3e-3])  # fine-tuning's rates
    assert result["method"] == "supervised-transfer" and (out / RESULT_FILE).is_file()
    assert result["config"]["init_model"] == str(weights.resolve())
    assert "not both" in _one_line_error(lambda: train_supervised(
        bench, tmp_path / "y", init_weights=weights, init_model=tmp_path / "pretrained", progress=False))
    assert "not a file" in _one_line_error(lambda: train_supervised(
        bench, tmp_path / "y", init_weights=tmp_path / "missing.pt", progress=False))
    assert not (tmp_path / "y").exists()
