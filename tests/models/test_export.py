"""The exported encoder, every format read back by its own tool (torchvision, safetensors, onnxruntime,
torch.jit) and by ``raysys.load_encoder``, against the run's model; bad input as one-line errors."""

import json
import pickle

import numpy as np
import pytest
import torch
import torchvision

import raysys
from raysys.cli import main as raysys_main
from raysys.models import ContrastiveModel, build_backbone
from raysys.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from raysys.models.export import FORMATS, export_encoder, sidecar_path
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


def _native(fmt: str, file, arch: dict):
    """The exported file loaded by the tool of its format, never by raysys's loader: a features function."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(file)).eval()
    if fmt == "safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, weights_only=True)
    net = build_backbone(arch["backbone_name"], arch["width"], arch["small_stem"])[0]
    net.load_state_dict(state)  # strict
    return net.eval()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_back_to_the_models_features(smoke_run, tmp_path, fmt):
    run, model = smoke_run
    out = tmp_path / f"encoder.{fmt}"
    facts, error = export_encoder(run, fmt, out)
    assert error <= TOLERANCE and facts["preprocessing"]["image_size"] == 16
    x = _images(5, 16)  # a batch size the export never saw
    with torch.inference_mode():
        want = model.features(x)
        encoder, pre = raysys.load_encoder(out)
        assert isinstance(encoder, torch.nn.Module) and pre.image_size == 16 and not pre.grayscale
        torch.testing.assert_close(encoder(pre(x)), want, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(_native(fmt, out, facts["architecture"])(_normalized(x)), want, atol=TOLERANCE, rtol=0)
        if fmt == "onnx":  # Ray ships encoders to actors by pickling them
            torch.testing.assert_close(pickle.loads(pickle.dumps(encoder))(pre(x)), want, atol=TOLERANCE, rtol=0)


def test_standard_stem_loads_strictly_into_torchvision(tmp_path):
    run, model = _run(tmp_path / "run", dict(backbone_name="resnet18"), 64)
    out = tmp_path / "resnet18.pt"
    facts, _ = export_encoder(run, "torchvision", out)
    assert json.loads(sidecar_path(out).read_text())["build"].startswith("m = torchvision.models.resnet18()")
    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(torch.load(out, weights_only=True))  # strict
    x = _images(2, 64)
    with torch.inference_mode():
        torch.testing.assert_close(tv.eval()(_normalized(x)), model.features(x), atol=TOLERANCE, rtol=0)


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
