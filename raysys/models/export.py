"""The pretrained encoder for other tools: the backbone without its head, exported and loaded back.

Every format holds the same module, the ResNet trunk of :mod:`raysys.models.backbones`: it takes images
already preprocessed the torchvision way (RGB in [0, 1] resized to ``image_size``, then standardized with
the ImageNet mean and std; luminance first for a ``grayscale`` encoder) and returns pooled features
``[B, D]``. Each file carries that preprocessing, the architecture and the line that loads it with the
format's own tool (:func:`load_line`, also printed by ``raysys export``):

* ``torchvision``: a plain state dict (``torch.save``) that a standard ResNet-18/50 loads strictly once its
  classifier is dropped (``m = torchvision.models.resnet50(); m.fc = torch.nn.Identity()``); narrow and
  small-stem backbones are built with :func:`raysys.models.build_backbone`. The facts are in the JSON
  sidecar ``FILE.json``;
* ``safetensors``: the same tensors (``safetensors.torch.load_file``, into torchvision's module where the
  architecture is standard), the facts in the file's metadata;
* ``onnx``: the traced graph (batch size free, input ``images``), the facts in its ``metadata_props``;
* ``torchscript``: ``torch.jit.load``-able, the facts in its extra file ``raysys.json``.

:func:`load_encoder` reads any of them, or a run folder / saved ``model.pt``, and returns the module and its
:class:`Preprocessing`, which takes images as people have them (tensors, arrays, PIL images, paths; any size)
and makes the encoder's input from them the way the run's evaluation did.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from raysys.data.augment import grayscale
from raysys.data.decode import decode_image, rgb_array
from raysys.errors import ConfigError, DecodeError, ModelFileError
from raysys.models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from raysys.models.io import load_saved
from raysys.storage import atomic_local_path

FORMATS = ("torchvision", "safetensors", "onnx", "torchscript")
META_KEY = "raysys"  # the facts' key in each format's metadata (and the TorchScript extra file's stem)
SIDECAR_SUFFIX = ".json"
FORMAT_VERSION = 1
MAX_EXPORT_ERROR = 1e-4  # what an export may differ from the model by, on random input
_EXTRA_DEPS = "pip install 'raysys[export]'"


# What Preprocessing takes (stored in every export too): in memory, the torchvision (tensors) and numpy/PIL
# (arrays) channel orders; C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA.
PREPROCESS_INPUT = ("uint8 (0-255) or float (0-1) images: torch tensors [H, W], [C, H, W] or [B, C, H, W], numpy "
                    "arrays [H, W], [H, W, C] or [N, H, W, C], PIL images or image file paths, or a list of these; "
                    "C is 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)")


@dataclass(frozen=True)
class Preprocessing:
    """What an exported encoder expects: ``image_size`` px RGB in [0, 1], (luminance if ``grayscale``),
    then ``(x - mean) / std`` per channel. Calling it on :data:`PREPROCESS_INPUT` returns that, float32
    ``[B, 3, S, S]`` on the input tensor's device, made the way the run's evaluation made its inputs from
    files. (Pixels of a JPEG over twice ``image_size`` decoded in full differ slightly from the evaluation's
    reduced-scale decode: pass the path, or the image as ``PIL.Image.open`` returns it.)"""

    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    grayscale: bool = False

    def __call__(self, images) -> Tensor:
        x = _unit_rgb(images, self.image_size)
        x = grayscale(x) if self.grayscale else x
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]), bool(d["grayscale"]))


def _unit_rgb(images, size: int) -> Tensor:
    """float32 ``[B, 3, size, size]`` RGB in [0, 1]: a file decoded as the evaluation decodes its files, an image
    in memory converted and resized by the same code (:func:`raysys.data.decode.rgb_array`)."""
    if isinstance(images, (str, os.PathLike)):
        return _from_file(Path(images), size)
    if isinstance(images, Image.Image):
        return _from_uint8_hwc(rgb_array(images, size))
    if isinstance(images, (list, tuple)):
        if not images:
            raise _bad_input("an empty list")
        return torch.cat([_unit_rgb(image, size) for image in images])
    if isinstance(images, np.ndarray):
        return _from_nchw(_numpy_nchw(images), size)
    if isinstance(images, Tensor):
        return _from_nchw(_tensor_nchw(images), size)
    raise _bad_input(f"a {type(images).__name__}")


def _bad_input(got: str) -> ConfigError:
    return ConfigError(f"preprocess got {got}; it takes {PREPROCESS_INPUT}")


def _from_file(path: Path, size: int) -> Tensor:
    try:
        return _from_uint8_hwc(decode_image(path.read_bytes(), size))
    except OSError as exc:
        raise _bad_input(f"the path {path}, which cannot be read ({exc.strerror})") from None
    except DecodeError as exc:
        raise _bad_input(f"the path {path}, which is no image ({exc})") from None


def _from_uint8_hwc(rgb: np.ndarray) -> Tensor:
    return torch.tensor(rgb).permute(2, 0, 1)[None].float().div_(255.0)


def _numpy_nchw(a: np.ndarray) -> Tensor:
    native = a.dtype.newbyteorder("=")  # e.g. FITS data are big-endian
    if native not in (np.uint8, np.float16, np.float32, np.float64):
        raise _bad_input(f"a numpy {a.dtype} array")
    batch = a[None, ..., None] if a.ndim == 2 else a[None] if a.ndim == 3 else a
    if batch.ndim != 4 or batch.shape[-1] not in (1, 2, 3, 4):
        raise _bad_input(f"a numpy array of shape {a.shape} (numpy and PIL put channels last)")
    return torch.from_numpy(np.array(batch, dtype=native)).permute(0, 3, 1, 2)  # a copy: PIL's arrays are read-only


def _tensor_nchw(x: Tensor) -> Tensor:
    batch = x[None, None] if x.ndim == 2 else x[None] if x.ndim == 3 else x
    if batch.ndim != 4 or batch.shape[1] not in (1, 2, 3, 4):
        raise _bad_input(f"a tensor of shape {tuple(x.shape)} (torchvision puts channels first; "
                         "for [H, W, C] pass x.permute(2, 0, 1))")
    return batch


def _from_nchw(x: Tensor, size: int) -> Tensor:
    """``[B, C, H, W]`` uint8 or float in [0, 1] -> float32 RGB ``[B, 3, size, size]``."""
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise _bad_input(f"a {x.dtype} tensor")
    if not len(x):
        return torch.zeros((0, 3, size, size), device=x.device)
    if x.dtype == torch.uint8:
        unit = x.float().div_(255.0)
    else:
        unit = x.float()
        lo, hi = torch.aminmax(unit)
        if not (0 <= lo and hi <= 1):  # NaN too
            raise _bad_input(f"float images with values in [{lo:.3g}, {hi:.3g}] (0-255 data: divide by 255 or "
                             "pass uint8; already normalized: pass the images before normalizing)")
    if x.shape[1] in (1, 3) and x.shape[-2:] == (size, size):  # nothing to convert: used as is, like to_float
        return unit.expand(-1, 3, -1, -1)
    # Else as a decoded file: 8-bit (float rounds to it, as 16-bit files do), the decoder's conversion and resize
    eight_bit = x if x.dtype == torch.uint8 else unit.mul(255.0).round_().to(torch.uint8)
    hwc = eight_bit.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    images = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in hwc]  # mode L, LA, RGB or RGBA
    return torch.cat([_from_uint8_hwc(rgb_array(img, size)) for img in images]).to(x.device)


# ----------------------------------------------------------------------------- what a file says about itself


def _facts(model, image_size: int, fmt: str) -> dict:
    """Architecture, preprocessing, what ``preprocess`` takes and the lines that load the file (in its format's
    tool, and in raysys), stored in every format."""
    spec = model.spec
    arch = {k: spec[k] for k in ("backbone_name", "width", "small_stem")} | {"feature_dim": model.feature_dim}
    pre = Preprocessing(int(image_size), grayscale=bool(spec.get("gray_input", False)))
    return {"format_version": FORMAT_VERSION, "architecture": arch, "preprocessing": asdict(pre),
            "load": load_line(fmt, arch), "load_raysys": raysys_line(),
            "preprocess_input": f"{PREPROCESS_INPUT}; at any size (resized to image_size as the run's evaluation "
                                "resized its images)"}


TOOLS = {"torchvision": "torchvision", "safetensors": "safetensors", "onnx": "onnxruntime", "torchscript": "torch.jit"}
ONNX_INPUT = "images"  # the exported graph's input name


def raysys_line(file: str = "FILE") -> str:
    """Python that loads any export (or a run folder) with raysys and gives the ``features`` of ``images``."""
    return f"import raysys; encoder, preprocess = raysys.load_encoder({file}); features = encoder(preprocess(images))"


def load_line(fmt: str, arch: dict, file: str = "FILE") -> str:
    """Python, imports included, that loads a ``fmt`` export at ``file`` with that format's own tool into ``m``
    and gives the ``features`` of ``x``: images preprocessed as the file's ``preprocessing`` says, float32
    ``[B, 3, S, S]`` (a numpy array for onnxruntime). The torch formats load strictly."""
    if fmt == "onnx":
        return (f"import onnxruntime; m = onnxruntime.InferenceSession({file}, providers=['CPUExecutionProvider']); "
                f"features = m.run(None, {{{ONNX_INPUT!r}: x}})[0]")
    if fmt == "torchscript":
        return f"import torch; m = torch.jit.load({file}); features = m(x)"
    name, width, small = arch["backbone_name"], arch["width"], arch["small_stem"]
    if width == 1 and not small:
        imports, build = "torch, torchvision", f"m = torchvision.models.{name}(); m.fc = torch.nn.Identity()"
    else:  # no torchvision constructor builds a narrow or small-stem ResNet
        imports = "torch, raysys.models"
        build = f"m = raysys.models.build_backbone({name!r}, width={width!r}, small_stem={small})[0]"
    weights = f"torch.load({file})"
    if fmt == "safetensors":
        imports, weights = f"safetensors.torch, {imports}", f"safetensors.torch.load_file({file})"
    return f"import {imports}; {build}; m.load_state_dict({weights}); m.eval(); features = m(x)"


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
                                    input_names=[ONNX_INPUT], output_names=["features"],
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
    facts = _facts(model, size, fmt)
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
    run's backbone features of ``images`` (:data:`PREPROCESS_INPUT`), as its evaluation would have."""
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
    """``raysys export``: write the encoder, check it against the model, print how to load it (raysys and the
    format's own tool)."""
    facts, error = export_encoder(args.model, args.format, args.out, args.image_size)
    arch, pre = facts["architecture"], facts["preprocessing"]
    size, file = pre["image_size"], repr(str(args.out))
    print(f"wrote {args.out} ({args.format}): {arch['backbone_name']} width {arch['width']:g}"
          f"{', small stem' if arch['small_stem'] else ''}, {arch['feature_dim']}-d features; "
          f"max |difference| from the run's model on random input {error:.1e}")
    print(f"load it with raysys: {raysys_line(file)}  # images: uint8 or float tensors, numpy arrays, "
          "PIL images or paths, any size")
    x = "a float32 numpy array" if args.format == "onnx" else "a float32 tensor"
    print(f"load it with {TOOLS[args.format]}: {load_line(args.format, arch, file)}  # x: {x} [B, 3, {size}, "
          f"{size}], RGB in [0, 1]{' (luminance in all three)' if pre['grayscale'] else ''} normalized with mean "
          f"{pre['mean']} and std {pre['std']}")
    return 0
