"""The exported encoder, every format read back by the line ``raysys export`` prints for its own tool
(torchvision, safetensors, onnxruntime, torch.jit) and by ``raysys.load_encoder``, against the run's model; its
``preprocess`` against the run's evaluation on image files; bad input as one-line errors."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import safetensors
import torch
from PIL import Image

import raysys
from raysys.cli import main as raysys_main
from raysys.errors import ConfigError
from raysys.eval.features import frozen, path_features
from raysys.models import ContrastiveModel
from raysys.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from raysys.models.export import PREPROCESS_INPUT, export_encoder, sidecar_path
from raysys.models.io import save_model

torch.set_num_threads(1)
TOLERANCE = 1e-4  # the bound on an export's difference from the model


def _run(folder, spec: dict, image_size: int):
    """A run folder whose model has non-trivial batch-norm statistics (eval-mode BN must be exported too)."""
    torch.manual_seed(0)
    model = ContrastiveModel(**spec)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    save_model(folder / "model.pt", model.state_dict(), model.spec, {"image_size": image_size})
    return folder, model.eval()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke preset's encoder: a narrow ResNet-18 with the small stem, at 16 px."""
    return _run(tmp_path_factory.mktemp("smoke-run"), dict(backbone_name="resnet18", width=0.125, small_stem=True), 16)


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _normalized(x: torch.Tensor) -> torch.Tensor:
    """The documented preprocessing, written out independently of raysys."""
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _export(capsys, run, fmt: str, out) -> dict[str, str]:
    """``raysys export`` as a user runs it; the Python of each ``load it with TOOL: ...`` line it prints, by tool."""
    assert raysys_main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    return dict(line.removeprefix("load it with ").split(": ", 1) for line in lines if line.startswith("load it with "))


def _run_line(line: str, **names) -> torch.Tensor:
    """The ``features`` a printed line gives, pasted into a Python that holds only ``names``."""
    with torch.inference_mode():
        exec(line, names)
    return torch.as_tensor(names["features"])


def _stored_facts(fmt: str, file) -> dict:
    """What the file says about itself, read with its format's own tool."""
    if fmt == "torchvision":
        return json.loads(Path(f"{file}.json").read_text())
    if fmt == "safetensors":
        with safetensors.safe_open(str(file), framework="pt") as f:
            return json.loads(f.metadata()["raysys"])
    if fmt == "onnx":
        return json.loads({p.key: p.value for p in onnx.load(str(file)).metadata_props}["raysys"])
    extra = {"raysys.json": ""}
    torch.jit.load(str(file), _extra_files=extra)
    return json.loads(extra["raysys.json"])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt,tool,call", [
    ("torchvision", "torchvision", "torch.load("), ("safetensors", "safetensors", "safetensors.torch.load_file("),
    ("onnx", "onnxruntime", "onnxruntime.InferenceSession("), ("torchscript", "torch.jit", "torch.jit.load("),
])
def test_each_format_loads_back_to_the_models_features(smoke_run, tmp_path, capsys, fmt, tool, call):
    """Beside the raysys line, ``raysys export`` prints the line that loads the file with its format's tool (a
    narrow small-stem ResNet here: built by raysys); each, pasted, gives the model's features, and the file's
    own metadata holds that line and what ``preprocess`` takes."""
    run, model = smoke_run
    out = tmp_path / f"encoder.{fmt}"
    lines = _export(capsys, run, fmt, out)  # exits 0 only within the tolerance on random input
    assert set(lines) == {"raysys", tool} and f"{call}{str(out)!r}" in lines[tool]
    x = _images(5, 16)  # a batch size the export never saw
    eight_bit = (x * 255).round().byte()
    with torch.inference_mode():
        want, want_8bit = model.features(x), model.features(eight_bit / 255)
        encoder, pre = raysys.load_encoder(out)
        assert isinstance(encoder, torch.nn.Module) and pre.image_size == 16 and not pre.grayscale
        torch.testing.assert_close(encoder(pre(x)), want, atol=TOLERANCE, rtol=0)
        if fmt == "onnx":  # Ray ships encoders to actors by pickling them
            torch.testing.assert_close(pickle.loads(pickle.dumps(encoder))(pre(x)), want, atol=TOLERANCE, rtol=0)
    native_x = _normalized(x).numpy() if fmt == "onnx" else _normalized(x)
    torch.testing.assert_close(_run_line(lines[tool], x=native_x), want, atol=TOLERANCE, rtol=0)
    pil = [Image.fromarray(a) for a in eight_bit.permute(0, 2, 3, 1).numpy()]
    torch.testing.assert_close(_run_line(lines["raysys"], images=pil), want_8bit, atol=TOLERANCE, rtol=0)
    facts = _stored_facts(fmt, out)
    assert facts["load"] == lines[tool].split("  # ")[0].replace(repr(str(out)), "FILE")
    assert facts["preprocess_input"].startswith(PREPROCESS_INPUT)


@pytest.fixture(scope="module")
def standard_run(ray_session, tmp_path_factory):
    """The smallest real pretraining run with the standard stem at torchvision's width (one optimizer step)."""
    out = tmp_path_factory.mktemp("standard-run") / "run"
    argv = ["pretrain", "--preset", "smoke", "--stem", "standard", "--width", "1", "--max-steps", "1",
            "--batch-size", "8", "--no-eval", "--knn-monitor", "none", "--out", str(out)]
    assert raysys_main(argv) == 0
    return out


_NO_RAYSYS = """
import json, sys
import torch

lines, x = json.loads(sys.argv[1]), torch.load(sys.argv[2])
features = []
for line in lines:  # each pasted into a Python that holds only x
    names = {"x": x}
    with torch.inference_mode():
        exec(line, names)
    features.append(names["features"])
assert "raysys" not in sys.modules, "the printed line needed raysys"
torch.save(features, sys.argv[3])
"""


def test_standard_stem_run_loads_strictly_into_torchvision_without_raysys(standard_run, tmp_path, capsys):
    """``raysys pretrain --stem standard --width 1``, then the torchvision and safetensors exports: the lines they
    print load them strictly into ``torchvision.models.resnet18()`` in a Python that never imports raysys, and
    give raysys's features."""
    lines, files = [], {"torchvision": tmp_path / "resnet18.pt", "safetensors": tmp_path / "resnet18.safetensors"}
    for fmt, file in files.items():
        weights = "torch.load" if fmt == "torchvision" else "safetensors.torch.load_file"
        imports = "torch, torchvision" if fmt == "torchvision" else "safetensors.torch, torch, torchvision"
        line = _export(capsys, standard_run, fmt, file)[fmt].split("  # ")[0]
        assert line == (f"import {imports}; m = torchvision.models.resnet18(); m.fc = torch.nn.Identity(); "
                        f"m.load_state_dict({weights}({str(file)!r})); m.eval(); features = m(x)")
        lines.append(line)
    arch = _stored_facts("torchvision", files["torchvision"])["architecture"]
    assert arch == {"backbone_name": "resnet18", "width": 1.0, "small_stem": False, "feature_dim": 512}

    images = _images(3, 16)
    torch.save(_normalized(images), tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", _NO_RAYSYS, json.dumps(lines), str(tmp_path / "x.pt"),
                           str(tmp_path / "features.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    encoder, pre = raysys.load_encoder(standard_run)
    with torch.inference_mode():
        want = encoder(pre(images))
    for got in torch.load(tmp_path / "features.pt"):
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


def _image_files(folder) -> tuple[list, Path]:
    """Images as a user has them: PNGs larger than the encoder's 16 px and not square, in RGB, gray and RGBA
    (half transparent), one RGB PNG already at 16 px; and a JPEG over twice the size (decoded at reduced scale)."""
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (23, 37, 3)), rng.integers(0, 256, (23, 37)), rng.integers(0, 256, (23, 37, 4)),
              rng.integers(0, 256, (16, 16, 3))]
    pngs = []
    for name, a in zip(("rgb", "gray", "rgba", "rgb16"), arrays):
        pngs.append(folder / f"{name}.png")
        Image.fromarray(a.astype(np.uint8)).save(pngs[-1])
    jpeg = folder / "frame.jpg"
    smooth = np.linspace(0, 255, 64)[:, None, None] * rng.uniform(0.3, 1.0, (1, 64, 3))
    Image.fromarray(smooth.astype(np.uint8)).save(jpeg, quality=90)
    return pngs, jpeg


def test_preprocess_gives_the_evaluations_features_whatever_the_input(smoke_run, tmp_path):
    """The reference: the evaluation's own feature code (:func:`path_features`, PIL decoding and resizing) on the
    files; preprocess on each file as PIL images, numpy arrays, uint8 and float tensors, batches and lists."""
    run, model = smoke_run
    pngs, jpeg = _image_files(tmp_path)
    paths = [*pngs, jpeg]
    with frozen(model, torch.device("cpu")):
        want, kept, bad = path_features(model, [str(p) for p in paths], 16, batch_size=8, device="cpu", workers=1)
    assert kept.tolist() == [0, 1, 2, 3, 4] and not bad
    want = torch.from_numpy(want)
    encoder, pre = raysys.load_encoder(run)

    def features(images):
        with torch.inference_mode():
            return encoder(pre(images))

    def close(got, rows):
        torch.testing.assert_close(got, want[rows], atol=1e-5, rtol=0)

    close(features([Image.open(p) for p in paths]), [0, 1, 2, 3, 4])
    close(features(paths), [0, 1, 2, 3, 4])
    opened = Image.open(jpeg)  # the evaluation decodes it at reduced scale, without changing the user's image
    close(features(opened), [4])
    assert opened.size == (64, 64) and np.asarray(opened).shape == (64, 64, 3)
    for i, path in enumerate(pngs):
        a = np.asarray(Image.open(path))  # [H, W] gray, [H, W, 3] or [H, W, 4]
        t = torch.from_numpy(a.copy()).reshape(*a.shape[:2], -1).permute(2, 0, 1)  # [C, H, W]
        for images in (Image.open(path), str(path), a, a / 255.0, t, t.float() / 255, t[None], t[None].double() / 255):
            close(features(images), [i])
    rgb = np.stack([np.asarray(Image.open(pngs[0]))] * 2)  # [N, H, W, 3]
    close(features(rgb), [0, 0])
    close(features(rgb.astype(np.float32) / 255), [0, 0])


@pytest.mark.parametrize("images,words", [
    (torch.zeros(16, 16, 3, dtype=torch.uint8), "a tensor of shape (16, 16, 3)"),
    (np.zeros((3, 16, 16), np.uint8), "a numpy array of shape (3, 16, 16)"),
    (torch.zeros(2, 5, 16, 16), "a tensor of shape (2, 5, 16, 16)"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.int64), "a torch.int64 tensor"),
    (np.zeros((16, 16), np.uint16), "a numpy uint16 array"),
    (torch.full((3, 16, 16), 255.0), "float images with values in [255, 255]"),
    (torch.full((3, 16, 16), float("nan")), "float images with values in [nan, nan]"),
    ([], "an empty list"),
    ({"image": 0}, "a dict"),
    ("no-such-image.png", "the path no-such-image.png, which cannot be read"),
    (__file__, f"the path {__file__}, which is no image (not an image file)"),
])
def test_preprocess_rejects_other_input_in_one_line(smoke_run, images, words):
    _, pre = raysys.load_encoder(smoke_run[0])
    with pytest.raises(ConfigError) as err:
        pre(images)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"preprocess got {words}") and PREPROCESS_INPUT in message


def test_run_folder_and_grayscale_encoder(tmp_path):
    """A colorization encoder sees luminance: its preprocessing says so, and applying it reproduces the model."""
    spec = dict(backbone_name="resnet18", width=0.125, small_stem=True,
                head={"kind": "dense", "classes": 4, "scale": 1}, gray_input=True)
    run, model = _run(tmp_path / "run", spec, 16)
    encoder, pre = raysys.load_encoder(run)
    assert pre.grayscale
    x = _images(3, 16)
    with torch.inference_mode():
        np.testing.assert_allclose(encoder(pre(x)).numpy(), model.features(x).numpy(), atol=TOLERANCE)


@pytest.mark.parametrize("argv,words", [
    (["export", "{tmp}/no-such-run", "--format", "onnx", "--out", "{tmp}/e.onnx"], "does not exist"),
    (["export", "{run}", "--format", "keras", "--out", "{tmp}/e.h5"], "unknown export format 'keras'"),
])
def test_bad_input_is_one_line(smoke_run, tmp_path, capsys, argv, words):
    argv = [a.format(tmp=tmp_path, run=smoke_run[0]) for a in argv]
    assert raysys_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not list(tmp_path.iterdir())


def test_torchvision_file_without_its_sidecar(smoke_run, tmp_path):
    out = tmp_path / "e.pt"
    export_encoder(smoke_run[0], "torchvision", out)
    sidecar_path(out).unlink()
    with pytest.raises(raysys.errors.ModelFileError, match="has no sidecar e.pt.json"):
        raysys.load_encoder(out)
