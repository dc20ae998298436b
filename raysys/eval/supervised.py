"""The supervised reference, "supervised, from scratch" -- the same backbone trained with labels on a
benchmark's train split -- its transfer-learning variant from a weights file, and fine-tuning of a pretrained
encoder, in one training loop.

Every comparison in the paper (Fig. 3, the horizontal line of Fig. 5, Table 2) puts "supervised" beside the
contrastive encoders. The benchmarks' own supervised baseline (Wagstaff et al. 2021: 74.5 % MSL v2.1, 92.8 %
HiRISE v3.2) is transfer learning, an ImageNet-pretrained AlexNet fine-tuned on the labels; no weights can be
downloaded here, so the default trains from scratch, and ``init_weights=`` is that reading for a user who has
weights of the same architecture. It trains for a step budget (``steps=``) rather than an epoch count, so a
small benchmark is not under-trained. Fine-tuning (:func:`fine_tune`, or ``init_model=`` of
:func:`train_supervised`) is the third read-out beside the frozen linear probe and the from-scratch
baseline: it starts from the pretrained weights (the caller's model is copied, never changed) and trains
the backbone with a lower learning rate (default ``lr / 10``) than the new linear head (``lr``), so the
pretrained features are adapted rather than overwritten by the head's large early gradients.
Plain PyTorch, no Ray: a sweep runs it inside a Ray task that already holds the right resources.

Recipe (documented choices):

* Backbone ``ContrastiveModel(backbone, width, small_stem)`` + one linear classifier on its pooled features,
  trained end to end with plain (unweighted) cross-entropy -- the paper's baseline, no class re-weighting --
  and Adam with a cosine decay of the learning rate to zero over all steps.
* Augmentation per batch with the batched :func:`raysys.data.augment.augment`: random resized crop with a
  milder area scale (0.5, 1) than SimCLR's (0.08, 1) -- a classifier must still see the object, while
  SimCLR's tiny crops exist to make the contrastive task hard -- horizontal flip, and SimCLR's colour
  jitter (s = 0.5, p = 0.8) and random grayscale (p = 0.2), since colour casts are nuisance on Mars images
  too. ``augment={...}`` overrides any :class:`AugmentConfig` field; ``size`` is always ``image_size``.
* Images are decoded once at ``image_size`` (as the linear evaluation does) and kept as uint8 on the
  device; test and val are scored on the unaugmented images (:func:`raysys.data.augment.to_float`).
* The final-epoch model is reported: val is scored after every epoch for the history, never used to pick.
* Deterministic from ``seed``: initial weights, shuffling and augmentation draws come from their own seeded
  generators (torch's global RNG is left as it was). Bit-identical on CPU for the same thread count; on
  CUDA cuDNN may pick non-deterministic kernels.

Outputs in ``out_dir``: ``model.pt`` in the trainer's format (``model``, ``model_spec``, ``config``; the
projector stays at its initial weights, only the backbone was trained) so :func:`raysys.models.io.load_model`
and the linear evaluation work on it unchanged, plus the trained head under ``classifier``; and
``supervised.json`` (``fine-tune.json`` when fine-tuning) with the classifier's own test and val metrics,
the majority baseline, the per-epoch history and timings.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from raysys.config import BACKBONES
from raysys.data.augment import AugmentConfig, to_float
from raysys.data.augment import augment as augment_batch
from raysys.data.decode import load_images
from raysys.errors import ConfigError, DataError
from raysys.eval.features import LABELED_SPLITS
from raysys.eval.linear import (
    DEFAULT_IMAGE_SIZE,
    classification_metrics,
    load_benchmark,
    majority_baseline,
)
from raysys.models import ContrastiveModel
from raysys.models.backbones import load_init_weights
from raysys.models.io import MODEL_FILE, load_saved, model_digest, save_model

RESULT_FILE = "supervised.json"
FINE_TUNE_FILE = "fine-tune.json"
FINE_TUNE_BACKBONE_LR_FACTOR = 0.1  # fine-tuning's default backbone lr, relative to the head's
# SimCLR's defaults (AugmentConfig) with a classifier-friendly crop scale; see the module docstring.
SUPERVISED_AUGMENT = {"crop_scale": (0.5, 1.0)}
_EVAL_BATCH = 512


def _check_settings(backbone, width, image_size, epochs, steps, batch_size, lr, backbone_lr, weight_decay,
                    augment) -> AugmentConfig:
    """Validate the cheap arguments before any image is decoded; return the augmentation config."""
    checks = [
        (backbone in BACKBONES, f"backbone {backbone!r} is unknown; choose one of {list(BACKBONES)}"),
        (width > 0, f"width must be > 0 (got {width})"),
        (isinstance(image_size, int) and image_size >= 8, f"image_size must be an integer >= 8 (got {image_size!r})"),
        (isinstance(epochs, int) and epochs >= 1, f"epochs must be an integer >= 1 (got {epochs!r})"),
        (steps is None or (isinstance(steps, int) and steps >= 1), f"steps must be an integer >= 1 (got {steps!r})"),
        (isinstance(batch_size, int) and batch_size >= 2,
         f"batch_size must be an integer >= 2 (got {batch_size!r}); BatchNorm needs two samples per batch"),
        (lr > 0, f"lr must be > 0 (got {lr})"),
        (backbone_lr is None or backbone_lr > 0, f"backbone_lr must be > 0 (got {backbone_lr})"),
        (weight_decay >= 0, f"weight_decay must be >= 0 (got {weight_decay})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    defaults = AugmentConfig(**SUPERVISED_AUGMENT).to_dict()
    return AugmentConfig.from_dict({**defaults, **(augment or {}), "size": image_size})


def _decode_splits(manifest, image_size: int) -> tuple[dict, list[dict]]:
    """``{split: (uint8 images [N, S, S, 3], int64 labels [N])}`` for each labeled split present, and the
    files that could not be decoded as ``{split, path, reason}``."""
    splits = np.asarray(manifest.column("split").to_pylist())
    paths = np.asarray(manifest.column("path").to_pylist())
    labels = np.asarray(manifest.column("label").to_pylist(), dtype=np.int64)
    data, skipped = {}, []
    for split in LABELED_SPLITS:
        rows = np.flatnonzero(splits == split)
        if len(rows) == 0:
            continue
        images, kept, bad = load_images(paths[rows].tolist(), image_size)
        data[split] = (images, labels[rows][kept])
        skipped += [{"split": split, "path": path, "reason": reason} for path, reason in bad]
    return data, skipped


def _seeded_model(backbone: str, width: float, small_stem: bool, num_classes: int, seed: int):
    """The contrastive model (its backbone is what gets trained) and a linear head, both initialised from
    ``seed`` without touching torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ContrastiveModel(backbone, width, small_stem)
        head = nn.Linear(model.feature_dim, num_classes)
    return model, head


def _seeded_head(feature_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """A linear head initialised from ``seed`` without touching torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(feature_dim, num_classes)


def _initial_model(init_model) -> tuple[ContrastiveModel, str]:
    """A private copy of the pretrained model (a :class:`ContrastiveModel` or a saved-model path) in train
    mode on CPU, and how to name its origin in the results."""
    if isinstance(init_model, ContrastiveModel):
        return copy.deepcopy(init_model).cpu().train(), "ContrastiveModel object"
    if isinstance(init_model, (str, Path)):
        return load_saved(init_model)[0].train(), str(Path(init_model).resolve())
    raise ValueError(f"init_model must be a ContrastiveModel or a saved-model path, got {type(init_model).__name__}")


@torch.no_grad()
def _predict(model: ContrastiveModel, head: nn.Module, images: torch.Tensor, image_size: int) -> np.ndarray:
    """Class ids of uint8 ``[N, S, S, 3]`` images on the model's device, unaugmented, in eval mode."""
    model.eval()
    head.eval()
    parts = [head(model.features(to_float(images[i : i + _EVAL_BATCH], image_size))).argmax(1).cpu()
             for i in range(0, len(images), _EVAL_BATCH)]
    return torch.cat(parts).numpy() if parts else np.zeros(0, np.int64)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of :func:`_train_epoch` (the last partial batch is dropped)."""
    return 1 if n_train <= batch_size else n_train // batch_size


def epochs_for_steps(steps: int, n_train: int, batch_size: int) -> int:
    """The fewest epochs that make at least ``steps`` optimizer steps on ``n_train`` images."""
    return math.ceil(steps / steps_per_epoch(n_train, batch_size))


def _train_epoch(model, head, optimizer, scheduler, images, labels, cfg, batch_size, shuffle_gen, aug_gen):
    """One pass over the train images in shuffled batches (the last partial batch is dropped when there is
    more than one batch, so BatchNorm never sees a batch of one); returns (mean loss, train accuracy)."""
    model.train()
    head.train()
    order = torch.randperm(len(images), generator=shuffle_gen)
    batches = [order] if len(order) <= batch_size else list(order.split(batch_size))[: len(order) // batch_size]
    total_loss, correct, seen = 0.0, 0, 0
    for idx in batches:
        idx = idx.to(images.device)
        x = augment_batch(images[idx], cfg, aug_gen)
        logits = head(model.features(x))
        loss = nn.functional.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(1) == labels[idx]).sum())
        seen += len(idx)
    return total_loss / seen, correct / seen


def _run_kind(init_model, init_weights, lr: float, backbone_lr: float | None) -> tuple:
    """From scratch, from a weights file or fine-tuning: (pretrained copy, its name) -- both None unless
    fine-tuning -- the method name, and the backbone lr, which defaults to ``lr`` from scratch and to
    ``lr / 10`` otherwise."""
    if init_model is not None and init_weights is not None:
        raise ConfigError("give init_model (fine-tune a raysys model) or init_weights (a weights file), not both")
    if init_weights is not None and not Path(init_weights).is_file():
        raise ConfigError(f"init_weights {init_weights} is not a file; pass a backbone weights file")
    init, init_name = _initial_model(init_model) if init_model is not None else (None, None)
    method = "fine-tune" if init is not None else "supervised-transfer" if init_weights is not None else "supervised"
    if backbone_lr is None:
        backbone_lr = lr if method == "supervised" else lr * FINE_TUNE_BACKBONE_LR_FACTOR
    return init, init_name, method, backbone_lr


def _check_decoded(benchmark_root, data: dict, skipped: list[dict]) -> None:
    """Fail in one line before any training when too few images decoded: train and test need at least one
    each, and train needs two, since BatchNorm cannot train on a batch of one."""
    for split in ("train", "test"):
        if len(data[split][1]) == 0:
            raise DataError(f"benchmark {benchmark_root}: no {split} image could be decoded "
                             f"({len(skipped)} skipped, first: {skipped[0]['reason']}); check the image files")
    if len(data["train"][1]) < 2:
        raise DataError(f"benchmark {benchmark_root} has a single decodable train image; supervised training needs at least 2")


def _prepare_model(init, init_weights, backbone: str, width: float, small_stem: bool, num_classes: int, seed: int,
                   device):
    """The model to train and a new seeded head, both moved to ``device``: a fresh seeded model (loaded from
    ``init_weights`` when given), or the pretrained copy ``init``, whose own architecture then replaces the
    arguments in the results. Returns (model, head, (backbone, width, small_stem), digest of the initial
    weights unless from scratch, else None)."""
    if init is None:
        model, head = _seeded_model(backbone, width, small_stem, num_classes, seed)
        arch, init_digest = (backbone, width, small_stem), None
        if init_weights is not None:
            load_init_weights(model, init_weights)  # logs what did not match; fails when nothing does
            init_digest = model_digest(model)
    else:
        model, head = init, _seeded_head(init.feature_dim, num_classes, seed)
        arch = (init.spec["backbone_name"], init.spec["width"], init.spec["small_stem"])
        init_digest = model_digest(model)
    return model.to(device), head.to(device), arch, init_digest


def _optimizer(model: ContrastiveModel, head: nn.Module, lr: float, backbone_lr: float, weight_decay: float,
               total_steps: int):
    """Adam over the backbone (at ``backbone_lr``) and the head (at ``lr``) -- the projector is not used here,
    so it stays as it was -- with a cosine decay of the learning rate to zero over ``total_steps``."""
    optimizer = torch.optim.Adam([{"params": model.backbone.parameters(), "lr": backbone_lr},
                                  {"params": head.parameters(), "lr": lr}], weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step / total_steps, 1.0))))
    return optimizer, scheduler


def _fit(model, head, on_device: dict, data: dict, cfg: AugmentConfig, *, epochs: int, batch_size: int, lr: float,
         backbone_lr: float, weight_decay: float, seed: int, image_size: int, desc: str,
         progress: bool) -> tuple[list[dict], int]:
    """Train for ``epochs``; val accuracy after each epoch goes into the history only (the final model is
    reported, never the best). Returns (history, optimizer steps per epoch)."""
    train_x, train_y = on_device["train"]
    per_epoch = steps_per_epoch(len(train_y), batch_size)
    optimizer, scheduler = _optimizer(model, head, lr, backbone_lr, weight_decay, epochs * per_epoch)
    shuffle_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)  # own stream: shuffling and augmentation draws stay apart

    history = []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        loss, train_acc = _train_epoch(model, head, optimizer, scheduler, train_x, train_y, cfg, batch_size,
                                       shuffle_gen, aug_gen)
        row = {"epoch": epoch + 1, "loss": loss, "train_accuracy_augmented": train_acc}
        if "val" in on_device and len(on_device["val"][1]):
            val_pred = _predict(model, head, on_device["val"][0], image_size)
            row["val_accuracy"] = float(np.mean(val_pred == data["val"][1]))
        history.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "epoch"})
    return history, per_epoch


def _scores(model, head, data: dict, on_device: dict, num_classes: int, image_size: int) -> tuple[dict, dict]:
    """The trained classifier's own scores on unaugmented images: test metrics, train accuracy and the
    majority baseline; and, apart since they come last in the results, the val metrics when val has images."""
    train_y, test_y = data["train"][1], data["test"][1]
    scores = {
        "metrics": classification_metrics(test_y, _predict(model, head, on_device["test"][0], image_size), num_classes),
        "train_accuracy": float(np.mean(_predict(model, head, on_device["train"][0], image_size) == train_y)),
        "majority": majority_baseline(train_y, test_y, num_classes),
    }
    val = {}
    if "val" in data and len(data["val"][1]):
        val["val_metrics"] = classification_metrics(
            data["val"][1], _predict(model, head, on_device["val"][0], image_size), num_classes)
    return scores, val


def _counts(manifest, data: dict, num_classes: int) -> dict:
    """Per split: the manifest's rows, the decoded images used and their count per class."""
    split_of = manifest.column("split").to_pylist()
    return {s: {"rows": int(split_of.count(s)), "used": int(len(y)),
                "per_class": np.bincount(y, minlength=num_classes).tolist()} for s, (_, y) in data.items()}


def _write_results(model, head, result: dict, out_dir, result_file: str, times: tuple[float, float, float],
                   images_trained: int) -> dict:
    """Save ``model.pt``, add the model digest and timings (``times``: start, decoded, trained) and write the
    JSON; the model is saved before the JSON so the JSON never names a model that is not there."""
    t_start, t_decoded, t_trained = times
    model_path = _save(model, head, result["config"], Path(out_dir))
    result["model_digest"] = model_digest(model.cpu())
    t_end = time.perf_counter()
    result["timing"] = {
        "decode_s": t_decoded - t_start,
        "train_s": t_trained - t_decoded,
        "train_images_per_s": images_trained / max(t_trained - t_decoded, 1e-9),
        "total_s": t_end - t_start,
    }
    (Path(out_dir) / result_file).write_text(json.dumps(result, indent=2))
    return {**result, "model_path": str(model_path)}


def train_supervised(
    benchmark_root, out_dir, *, backbone: str = "resnet18", width: float = 1.0, small_stem: bool = False,
    image_size: int = 32, epochs: int = 30, steps: int | None = None, batch_size: int = 128, lr: float = 1e-3,
    weight_decay: float = 1e-6, seed: int = 0, augment: dict | None = None, device=None, progress: bool = True,
    init_model=None, backbone_lr: float | None = None, init_weights: str | Path | None = None,
) -> dict:
    """Train the backbone + a linear head with labels on ``benchmark_root``'s train split: from scratch; from a
    backbone weights file ``init_weights`` (e.g. ImageNet weights of the architecture: the transfer-learning
    reading, method ``supervised-transfer``); or fine-tuned from ``init_model`` (a :class:`ContrastiveModel` or
    saved-model path, whose architecture replaces ``backbone``, ``width`` and ``small_stem``; the caller's model
    is left unchanged). From scratch the backbone learns at ``lr`` unless ``backbone_lr`` is given, otherwise at
    ``lr / 10``; the new head at ``lr``. ``steps`` replaces ``epochs`` by the fewest epochs making that many steps.

    Writes ``out_dir/model.pt`` (loadable by :func:`raysys.models.io.load_model`) and ``supervised.json`` or
    ``fine-tune.json`` (test metrics via :func:`raysys.eval.linear.classification_metrics`, val metrics, majority
    baseline, history, timing); returns that dict plus ``model_path``. Bad arguments or a benchmark without
    train/test rows raise a one-line :class:`~raysys.errors.RaysysError` before any image is decoded.
    """
    t_start = time.perf_counter()
    aug_cfg = _check_settings(backbone, width, image_size, epochs, steps, batch_size, lr, backbone_lr, weight_decay,
                              augment)
    manifest, names = load_benchmark(benchmark_root)
    init, init_name, method, backbone_lr = _run_kind(init_model, init_weights, lr, backbone_lr)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    data, skipped = _decode_splits(manifest, image_size)
    _check_decoded(benchmark_root, data, skipped)
    if steps is not None:
        epochs = epochs_for_steps(steps, len(data["train"][1]), batch_size)
    t_decoded = time.perf_counter()

    model, head, (backbone, width, small_stem), init_digest = _prepare_model(init, init_weights, backbone, width,
                                                                             small_stem, len(names), seed, device)
    init_name = str(Path(init_weights).resolve()) if init_weights is not None else init_name
    on_device = {s: (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)) for s, (x, y) in data.items()}
    history, per_epoch = _fit(model, head, on_device, data, aug_cfg, epochs=epochs, batch_size=batch_size, lr=lr,
                              backbone_lr=backbone_lr, weight_decay=weight_decay, seed=seed, image_size=image_size,
                              desc=method, progress=progress)
    t_trained = time.perf_counter()

    config = {**_settings(backbone, width, small_stem, image_size, epochs, batch_size, lr, weight_decay, seed, aug_cfg),
              "method": method, "backbone_lr": backbone_lr, "step_budget": steps,
              **({} if init_name is None else {"init_model": init_name, "init_model_digest": init_digest})}
    scores, val_scores = _scores(model, head, data, on_device, len(names), image_size)
    result = {"method": method, "benchmark": str(Path(benchmark_root).resolve()), "class_names": names,
              "config": config, **scores, "counts": _counts(manifest, data, len(names)), "skipped": skipped,
              "epochs": epochs, "history": history, "device": str(device), **val_scores}
    images_trained = epochs * per_epoch * min(batch_size, len(data["train"][1]))
    return _write_results(model, head, result, out_dir, FINE_TUNE_FILE if method == "fine-tune" else RESULT_FILE,
                          (t_start, t_decoded, t_trained), images_trained)


def fine_tune(
    model_or_path, benchmark_root, out_dir, epochs: int = 30, *, lr: float = 1e-3, backbone_lr: float | None = None,
    image_size: int | None = None, batch_size: int = 128, weight_decay: float = 1e-6, seed: int = 0,
    augment: dict | None = None, device=None, progress: bool = True,
) -> dict:
    """Fine-tuning evaluation: :func:`train_supervised` started from a pretrained encoder (a
    :class:`ContrastiveModel` or a run folder / checkpoint / ``model.pt``), backbone unfrozen at
    ``backbone_lr`` (default ``lr / 10``), new head at ``lr``. ``image_size`` defaults to the saved run's,
    else to :data:`raysys.eval.linear.DEFAULT_IMAGE_SIZE`. Writes ``model.pt`` and ``fine-tune.json``."""
    if image_size is None:
        config = {} if isinstance(model_or_path, ContrastiveModel) else load_saved(model_or_path)[1]
        image_size = int(config.get("image_size") or DEFAULT_IMAGE_SIZE)
    return train_supervised(benchmark_root, out_dir, image_size=image_size, epochs=epochs, batch_size=batch_size,
                            lr=lr, weight_decay=weight_decay, seed=seed, augment=augment, device=device,
                            progress=progress, init_model=model_or_path, backbone_lr=backbone_lr)


def _settings(backbone, width, small_stem, image_size, epochs, batch_size, lr, weight_decay, seed, aug_cfg) -> dict:
    """The run's settings as stored in ``model.pt``'s ``config`` and in ``supervised.json``."""
    return {
        "method": "supervised", "backbone": backbone, "width": width, "small_stem": small_stem,
        "image_size": image_size, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "seed": seed, "optimizer": "adam", "schedule": "cosine",
        "loss": "cross-entropy (unweighted)", "augment": aug_cfg.to_dict(),
    }


def _save(model: ContrastiveModel, head: nn.Module, config: dict, out: Path) -> Path:
    """Write ``model.pt`` as the trainer does, plus the trained head under ``classifier``."""
    return save_model(out / MODEL_FILE, model.state_dict(), model.spec, config,
                      classifier={k: v.detach().cpu() for k, v in head.state_dict().items()})
