"""The pretrained encoder for other tools: the backbone without its head, exported and loaded back.

Every format holds the same module, the ResNet trunk of :mod:`raysys.models.backbones`: it takes images
already preprocessed the torchvision way (RGB in [0, 1] resized to ``image_size``, then standardized with
the ImageNet mean and std; luminance first for a ``grayscale`` encoder) and returns pooled features
``[B, D]``. Each file carries that preprocessing and the architecture:

* ``torchvision``: a plain state dict (``torch.save``) that a standard ResNet-18/50 loads strictly once its
  classifier is dropped (``m = torchvision.models.resnet50(); m.fc = torch.nn.Identity()``); narrow and
  small-stem backbones are built with :func:`raysys.models.build_backbone`. The facts, and the line that
  builds the matching module, are in the JSON sidecar ``FILE.json``;
* ``safetensors``: the same tensors, the facts in the file's metadata;
* ``onnx``: the traced graph (batch size free), the facts in its ``metadata_props``;
* ``torchscript``: ``torch.jit.load``-able, the facts in its extra file ``raysys.json``.

:func:`load_encoder` reads any of them, or a run folder / saved ``model.pt``, and returns the module and its
:class:`Preprocessing`.
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from raysys.data.augment import grayscale
from raysys.errors import ConfigError, ModelFileError
from raysys.models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from raysys.models.io import load_saved
from raysys.storage import atomic_local_path

FORMATS = ("torchvision", "safetensors", "onnx", "torchscript")
META_KEY = "raysys"  # the facts' key in each format's metadata (and the TorchScript extra file's stem)
SIDECAR_SUFFIX = ".json"
FORMAT_VERSION = 1
MAX_EXPORT_ERROR = 1e-4  # what an export may differ from the model by, on random input
_EXTRA_DEPS = "pip install 'raysys[export]'"


@dataclass(frozen=True)
class Preprocessing:
    """What an exported encoder expects: ``image_size`` px RGB in [0, 1], (luminance if ``grayscale``),
    then ``(x - mean) / std`` per channel. Calling it applies the last two steps to float ``[B, 3, S, S]``."""

    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    grayscale: bool = False

    def __call__(self, images: Tensor) -> Tensor:
        x = grayscale(images) if self.grayscale else images
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]), bool(d["grayscale"]))


# ----------------------------------------------------------------------------- what a file says about itself


def _facts(model, image_size: int) -> dict:
    """Architecture, preprocessing and the line that builds the matching module, stored in every format."""
    spec = model.spec
    arch = {k: spec[k] for k in ("backbone_name", "width", "small_stem")} | {"feature_dim": model.feature_dim}
    pre = Preprocessing(int(image_size), grayscale=bool(spec.get("gray_input", False)))
    return {"format_version": FORMAT_VERSION, "architecture": arch, "preprocessing": asdict(pre),
            "build": build_recipe(arch)}


def build_recipe(arch: dict) -> str:
    """Python that builds the module a ``torchvision`` export loads into (strictly)."""
    name, width, small = arch["backbone_name"], arch["width"], arch["small_stem"]
    if width == 1 and not small:
        return f"m = torchvision.models.{name}(); m.fc = torch.nn.Identity(); m.load_state_dict(torch.load(FILE))"
    return (f"m = raysys.models.build_backbone({name!r}, width={width}, small_stem={small})[0]; "
            "m.load_state_dict(torch.load(FILE))  # narrow or small-stem: no torchvision constructor builds it")


def _parse_facts(text: str | bytes, where) -> dict:
    try:
        facts = json.loads(text)
        Preprocessing.from_dict(facts["preprocessing"])
        facts["architecture"]["backbone_name"]
    except (ValueError, KeyError, TypeError):
        raise ModelFileError(f"{where} does not hold raysys encoder metadata; export the file with "
                             "`raysys export RUN_DIR --format ...`") from None
    return facts


def _backbone(facts: dict, state: dict, where) -> nn.Module:
    arch = facts["architecture"]
    net, _ = build_backbone(arch["backbone_name"], arch["width"], arch["small_stem"])
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{where}: weights do not fit its architecture ({str(exc).splitlines()[0]})") from None
    return net.eval()


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"this format needs the {module} package; {_EXTRA_DEPS}") from None


def sidecar_path(file) -> Path:
    """The JSON sidecar of a ``torchvision`` export: ``FILE.json``."""
    return Path(str(file) + SIDECAR_SUFFIX)


# ----------------------------------------------------------------------------- writers


def _write_torchvision(net: nn.Module, facts: dict, out: Path) -> None:
    with atomic_local_path(out) as tmp:
        torch.save(net.state_dict(), tmp)
    with atomic_local_path(sidecar_path(out)) as tmp:
        Path(tmp).write_text(json.dumps(facts, indent=1) + "\n")


def _write_safetensors(net: nn.Module, facts: dict, out: Path) -> None:
    st = _need("safetensors.torch")
    with atomic_local_path(out) as tmp:
        st.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp,
                     metadata={META_KEY: json.dumps(facts)})


def _write_onnx(net: nn.Module, facts: dict, out: Path) -> None:
    _need("onnxscript")  # the torch.export-based exporter's backend
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines narrate every optimizer pass
        logging.getLogger(name).setLevel(logging.WARNING)
    size = facts["preprocessing"]["image_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (torch.rand(2, 3, size, size),), dynamo=True, verbose=False,
                                    input_names=["images"], output_names=["features"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.model.metadata_props[META_KEY] = json.dumps(facts)
    with atomic_local_path(out) as tmp:
        program.save(tmp)


def _write_torchscript(net: nn.Module, facts: dict, out: Path) -> None:
    with _quiet_jit(), atomic_local_path(out) as tmp:
        torch.jit.save(torch.jit.script(net), tmp, _extra_files={f"{META_KEY}.json": json.dumps(facts)})


@contextmanager
def _quiet_jit():
    """torch.jit warns it is deprecated; TorchScript is still what C++ (libtorch) and older tools load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


_WRITERS = {"torchvision": _write_torchvision, "safetensors": _write_safetensors, "onnx": _write_onnx,
            "torchscript": _write_torchscript}


def export_encoder(model_path, fmt: str, out, image_size: int | None = None) -> tuple[dict, float]:
    """Write the backbone of the saved model at ``model_path`` (run folder, checkpoint, ``model.pt``) to
    ``out`` in ``fmt``, read it back with :func:`load_encoder` and compare its features with the model's on
    random input. Returns the file's facts and that largest absolute difference. ``image_size`` defaults to
    the run's."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; pass a file name, e.g. {out / ('encoder.' + fmt)}")
    model, config = load_saved(model_path)
    size = image_size or config.get("image_size")
    if not size:
        raise ConfigError(f"{model_path}: its saved config has no image_size; pass --image-size")
    facts = _facts(model, size)
    _WRITERS[fmt](model.backbone.eval(), facts, out)
    return facts, export_error(model, out, size)


def export_error(model, file, image_size: int) -> float:
    """Largest absolute difference between ``model.features`` and the encoder loaded from ``file`` (after its
    preprocessing) on 4 random images; raises if above :data:`MAX_EXPORT_ERROR` (an exporter bug)."""
    x = torch.rand(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    encoder, pre = load_encoder(file)
    with torch.inference_mode():
        error = (encoder(pre(x)) - model.eval().features(x)).abs().max().item()
    if not error <= MAX_EXPORT_ERROR:
        raise RuntimeError(f"{file} differs from the model by {error:.2e} (> {MAX_EXPORT_ERROR:g}) on random input")
    return error


# ----------------------------------------------------------------------------- readers


class OnnxEncoder(nn.Module):
    """An ONNX encoder run by onnxruntime behind the ``nn.Module`` interface (float tensors in, features out
    on the input's device). Picklable (e.g. to Ray actors): the session is rebuilt from the model bytes."""

    def __init__(self, model_bytes: bytes):
        super().__init__()
        self.model_bytes, self._session = model_bytes, None

    def session(self):
        if self._session is None:
            ort = _need("onnxruntime")
            self._session = ort.InferenceSession(self.model_bytes, providers=ort.get_available_providers())
        return self._session

    def forward(self, x: Tensor) -> Tensor:
        session = self.session()
        out = session.run(None, {session.get_inputs()[0].name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(np.asarray(out)).to(x.device)

    def __getstate__(self):
        return {**self.__dict__, "_session": None}


def _load_run(path) -> tuple[nn.Module, Preprocessing]:
    model, config = load_saved(path)
    if not config.get("image_size"):
        raise ModelFileError(f"{path}: its saved config has no image_size; export it with --image-size")
    return model.backbone.eval(), Preprocessing(int(config["image_size"]), grayscale=model.gray_input)


def _load_onnx(path: Path) -> tuple[nn.Module, Preprocessing]:
    encoder = OnnxEncoder(path.read_bytes())
    try:
        meta = encoder.session().get_modelmeta().custom_metadata_map
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for unreadable models
        raise ModelFileError(f"{path} is not a readable ONNX model ({str(exc).splitlines()[0]})") from None
    return encoder, Preprocessing.from_dict(_parse_facts(meta.get(META_KEY, ""), path)["preprocessing"])


def _load_safetensors(path: Path) -> tuple[nn.Module, Preprocessing]:
    safetensors = _need("safetensors")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError or OSError
        raise ModelFileError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    facts = _parse_facts(meta.get(META_KEY, ""), path)
    return _backbone(facts, state, path), Preprocessing.from_dict(facts["preprocessing"])


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def _load_torchscript(path: Path) -> tuple[nn.Module, Preprocessing]:
    extra = {f"{META_KEY}.json": ""}
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), Preprocessing.from_dict(_parse_facts(extra[f"{META_KEY}.json"], path)["preprocessing"])


def _load_torch_file(path: Path) -> tuple[nn.Module, Preprocessing]:
    """A saved raysys model (``model.pt``, ``state.pt``) or a ``torchvision`` export with its sidecar."""
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - pickle, zip and weights-only errors all mean "not ours"
        raise ModelFileError(f"{path} is not a model file raysys reads (a run's model.pt or a file written by "
                             f"raysys export: {', '.join(FORMATS)}); {type(exc).__name__}") from None
    if isinstance(saved, dict) and "model_spec" in saved:
        return _load_run(path)
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise ModelFileError(f"{path} has no sidecar {sidecar.name} (architecture and preprocessing, written beside "
                             "it by raysys export); export it again or copy the sidecar along")
    facts = _parse_facts(sidecar.read_text(), sidecar)
    if not isinstance(saved, dict) or not all(isinstance(v, Tensor) for v in saved.values()):
        raise ModelFileError(f"{path} is not a state dict of tensors; export it again with --format torchvision")
    return _backbone(facts, saved, path), Preprocessing.from_dict(facts["preprocessing"])


def load_encoder(path) -> tuple[nn.Module, Preprocessing]:
    """The encoder (eval mode, CPU) and its preprocessing from a run folder, a checkpoint, a ``model.pt`` or a
    file written by :func:`export_encoder` in any format. ``encoder(preprocessing(images))`` gives the
    run's backbone features of float images ``[B, 3, S, S]`` in [0, 1] at ``preprocessing.image_size``."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model path {path} does not exist; pass a run folder, a model.pt or a file "
                             "written by raysys export")
    if path.is_dir():
        return _load_run(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _load_onnx(path)
    if suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_torchscript(path) if _is_torchscript(path) else _load_torch_file(path)


# ----------------------------------------------------------------------------- command line


def configure_parser(p):
    """Options of ``raysys export``."""
    p.add_argument("model", help="run folder, checkpoint folder or model.pt")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="the file to write (torchvision: also FILE.json beside it)")
    p.add_argument("--image-size", type=int, help="input size the file records (default: the run's)")
    return p


def run(args) -> int:
    """``raysys export``: write the encoder, check it against the model, print how to load it."""
    facts, error = export_encoder(args.model, args.format, args.out, args.image_size)
    arch, pre = facts["architecture"], facts["preprocessing"]
    print(f"wrote {args.out} ({args.format}): {arch['backbone_name']} width {arch['width']:g}"
          f"{', small stem' if arch['small_stem'] else ''}, {arch['feature_dim']}-d features; "
          f"max |difference| from the run's model on random input {error:.1e}")
    print(f"input: RGB in [0, 1] at {pre['image_size']} px{', as luminance' if pre['grayscale'] else ''}, "
          f"normalized with mean {pre['mean']} and std {pre['std']}")
    print("load it with raysys.load_encoder(FILE) -> (module, preprocessing)"
          + (f", or: {facts['build']}" if args.format == "torchvision" else ""))
    return 0
