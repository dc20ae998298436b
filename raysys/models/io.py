"""Model files: the one reader and writer of ``model.pt`` (weights, model spec, the run's config).

A run folder holds ``model.pt`` once it finished and ``state.pt`` checkpoints while it trains
(:mod:`raysys.distributed.worker`); every command that takes a model accepts either, or the file itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from raysys.errors import ModelFileError
from raysys.models.backbones import ContrastiveModel
from raysys.storage import atomic_local_path

MODEL_FILE, CHECKPOINT_FILE = "model.pt", "state.pt"


def save_model(path: str | Path, weights: dict, spec: dict, config: dict, **extra) -> Path:
    """Write a standalone ``model.pt`` (weights on CPU, no optimizer state) atomically; ``extra`` entries
    (e.g. ``data_position``, a classifier head) are stored beside them."""
    saved = {"model": {k: v.detach().cpu() for k, v in weights.items()}, "model_spec": spec, "config": config, **extra}
    with atomic_local_path(path) as tmp:
        torch.save(saved, tmp)
    return Path(path)


def resolve_model_file(path: str | Path) -> Path:
    """The saved-model file behind ``path``: a run folder's ``model.pt``, a checkpoint's ``state.pt``, or
    the file itself. Raises a one-line :class:`ModelFileError` when there is none."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in (MODEL_FILE, CHECKPOINT_FILE):
            if (path / name).is_file():
                return path / name
        raise ModelFileError(
            f"{path} holds neither {MODEL_FILE} (a finished run) nor {CHECKPOINT_FILE} (a checkpoint); "
            "pass a run folder, a checkpoint directory or the saved file"
        )
    raise ModelFileError(f"model path {path} does not exist; pass a run folder, a checkpoint directory or a .pt file")


def load_saved(path: str | Path) -> tuple[ContrastiveModel, dict]:
    """Rebuild the saved model (eval mode, on CPU) and return it with the run's saved config."""
    file = resolve_model_file(path)
    try:
        saved = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as exc:  # pickle, zip and weights-only errors all mean "not a saved raysys model"
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ModelFileError(f"{file} is not a readable torch file ({reason})") from None
    if not isinstance(saved, dict) or "model" not in saved or "model_spec" not in saved:
        raise ModelFileError(f"{file} is not a raysys model file: expected a dict with 'model' and 'model_spec' keys")
    model = ContrastiveModel.from_spec(saved["model_spec"])
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as exc:
        raise ModelFileError(f"{file}: weights do not fit its model_spec ({str(exc).splitlines()[0]})") from None
    return model.eval(), dict(saved.get("config") or {})


def load_model(path: str | Path) -> ContrastiveModel:
    """Load a saved :class:`ContrastiveModel` (eval mode, CPU) from a run folder, checkpoint dir or file."""
    return load_saved(path)[0]


def model_digest(model: nn.Module) -> str:
    """Short hash of every parameter and buffer of ``model`` (the backbone and its heads) and its spec.

    A superset of the backbone, so any change to what :meth:`features` computes changes the digest: it
    keys the feature cache and proves the backbone was left untouched by evaluation.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(getattr(model, "spec", None), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_folder(model_file: Path) -> Path:
    # A checkpoint's state.pt lives in a checkpoint directory inside the run folder.
    return model_file.parent.parent if model_file.name == CHECKPOINT_FILE else model_file.parent
