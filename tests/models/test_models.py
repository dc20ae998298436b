"""Backbones, projection head, ContrastiveModel, init-weight loading: checked against torchvision itself."""

import pytest
import torch
import torchvision
from torch import nn

from raysys.models import (
    ContrastiveModel,
    ProjectionHead,
    build_backbone,
    load_init_weights,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("name,base_dim", [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("width", [1.0, 0.25])
@pytest.mark.parametrize("small_stem,size", [(False, 64), (True, 32)])
def test_backbone_feature_shapes(name, base_dim, width, small_stem, size):
    net, dim = build_backbone(name, width, small_stem)
    assert dim == int(base_dim * width)
    with torch.no_grad():
        out = net.eval()(torch.rand(2, 3, size, size))
    assert out.shape == (2, dim)


@pytest.mark.parametrize("small_stem,size,expected", [(False, 64, 16), (True, 32, 32)])
def test_stem_resolution(small_stem, size, expected):
    """The small stem (3x3 stride 1, no max-pool) keeps full resolution into layer1; the standard one divides by 4."""
    net, _ = build_backbone("resnet18", 0.25, small_stem)
    seen = {}

    def record(module, inputs, output):
        seen["hw"] = output.shape[-2:]

    net.layer1.register_forward_hook(record)
    with torch.no_grad():
        net.eval()(torch.rand(1, 3, size, size))
    assert tuple(seen["hw"]) == (expected, expected)
    assert isinstance(net.maxpool, nn.Identity) == small_stem
    assert net.conv1.kernel_size == ((3, 3) if small_stem else (7, 7))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_width_one_matches_torchvision(name):
    """At width 1 the trunk has torchvision's exact parameter names and shapes (fc dropped)."""
    ref = getattr(torchvision.models, name)(weights=None)
    net, _ = build_backbone(name)
    expected = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in net.state_dict().items()} == expected
    assert count_parameters(net) == count_parameters(ref) - ref.fc.weight.numel() - ref.fc.bias.numel()


def test_parameter_count_scales_with_width_squared():
    full = count_parameters(build_backbone("resnet18", 1.0)[0])
    half = count_parameters(build_backbone("resnet18", 0.5)[0])
    quarter = count_parameters(build_backbone("resnet18", 0.25)[0])
    assert half / full == pytest.approx(0.25, abs=0.01)
    assert quarter / full == pytest.approx(1 / 16, abs=0.005)


def test_bottleneck_widths_scale():
    net, _ = build_backbone("resnet50", 0.25)
    block = net.layer1[0]
    assert (block.conv1.out_channels, block.conv2.out_channels, block.conv3.out_channels) == (16, 16, 64)


def test_bad_backbone_arguments():
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", width=0.0)


def test_projection_head_structure():
    head = ProjectionHead(64, 32, out_dim=128, layers=3)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 32), (32, 128)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head) == 2
    assert isinstance(head[-1], nn.Linear)
    assert head(torch.randn(4, 64)).shape == (4, 128)
    with pytest.raises(ValueError):
        ProjectionHead(64, 32, layers=0)


def test_model_normalizes_inputs_and_returns_h_z():
    model = ContrastiveModel("resnet18", 0.25, small_stem=True).eval()
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        h, z = model(x)
        torch.testing.assert_close(h, model.backbone((x - mean) / std))
        torch.testing.assert_close(z, model.projector(h))
        torch.testing.assert_close(model.features(x), h)
    assert h.shape == (3, 128) and z.shape == (3, 128)
    with pytest.raises(ValueError, match="3, S, S"):
        model(torch.rand(3, 1, 32, 32))


def test_from_spec_round_trip():
    model = ContrastiveModel("resnet18", 0.25, small_stem=True, proj_dim=64, proj_layers=2).eval()
    clone = ContrastiveModel.from_spec(dict(model.spec)).eval()
    assert clone.spec == model.spec
    clone.load_state_dict(model.state_dict())  # strict: identical architecture
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone(x)[1], model(x)[1])
    assert clone(x)[1].shape == (2, 64)
    with pytest.raises(ValueError, match="unknown keys"):
        ContrastiveModel.from_spec({**model.spec, "depth": 3})


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_init_weights_round_trip(tmp_path):
    src = ContrastiveModel("resnet18", 0.25, small_stem=True)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)
    dst = ContrastiveModel("resnet18", 0.25, small_stem=True)
    assert not _same_state(src, dst)
    report = load_init_weights(dst, path)
    assert _same_state(src, dst)
    assert not report.missing and not report.unexpected and not report.mismatched


def test_load_init_weights_prefixes_and_partial(tmp_path):
    src = ContrastiveModel("resnet18", 0.25, small_stem=True)
    # a bare-backbone file into a full model: projector reported missing
    torch.save(src.backbone.state_dict(), tmp_path / "bb.pt")
    dst = ContrastiveModel("resnet18", 0.25, small_stem=True)
    report = load_init_weights(dst, tmp_path / "bb.pt")
    assert _same_state(src.backbone, dst.backbone)
    assert report.missing and all(k.startswith("projector.") for k in report.missing)
    # a DDP-wrapped full model ("module." prefix) into a bare backbone: projector reported unexpected
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "ddp.pt")
    bare, _ = build_backbone("resnet18", 0.25, small_stem=True)
    report = load_init_weights(bare, tmp_path / "ddp.pt")
    assert _same_state(src.backbone, bare)
    assert report.unexpected and all(k.startswith("module.projector.") for k in report.unexpected)
    # another width: same names, other shapes -> reported mismatched, left untouched
    other = ContrastiveModel("resnet18", 0.5, small_stem=True)
    before = other.backbone.conv1.weight.clone()
    torch.save(src.state_dict(), tmp_path / "w25.pt")
    report = load_init_weights(other, tmp_path / "w25.pt")
    assert "backbone.conv1.weight" in report.mismatched
    assert torch.equal(other.backbone.conv1.weight, before)


def test_load_init_weights_errors(tmp_path):
    model = ContrastiveModel("resnet18", 0.25, small_stem=True)
    torch.save({"encoder.foo.weight": torch.zeros(3)}, tmp_path / "alien.pt")
    with pytest.raises(ValueError, match="none of its 1 entries match"):
        load_init_weights(model, tmp_path / "alien.pt")
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict"):
        load_init_weights(model, tmp_path / "list.pt")


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
