"""Backbones (torchvision ResNets with a width multiplier), the projection head, the contrastive model,
and loading of user-supplied initial weights. Nothing is ever downloaded: all models start random
unless :func:`load_init_weights` is given a file.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from raysys.data.augment import grayscale, to_float
from raysys.errors import ModelFileError
from raysys.models.heads import build_head

log = logging.getLogger(__name__)

_ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}
_STAGE_WIDTHS = (64, 128, 256, 512)
# ImageNet statistics: the usual input normalization for ResNets; inputs arrive as [0, 1] floats.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Standardizes float images in [0, 1] ``[B, 3, S, S]`` with the ImageNet channel statistics.

    The constants are non-persistent buffers: they follow ``.to(device)`` but stay out of state dicts,
    so weight files hold only learned parameters.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, S, S], got shape {tuple(x.shape)}")
        return (x - self.mean) / self.std


class ScaledResNet(ResNet):
    """torchvision's ResNet with every stage width (and so every bottleneck width) multiplied by ``width``,
    an optional small-input stem, and ``fc`` replaced by Identity so ``forward`` returns pooled features.

    At ``width=1`` without the small stem, parameter names and shapes equal torchvision's
    ``resnet18()``/``resnet50()`` (minus ``fc``), so their state dicts load directly.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], width: float = 1.0,
                 small_stem: bool = False):
        # ResNet.__init__ hard-codes the widths 64..512, so set the attributes torchvision's _make_layer
        # reads and build the stages here; blocks, _make_layer and forward stay torchvision's.
        nn.Module.__init__(self)
        widths = [int(round(c * width)) for c in _STAGE_WIDTHS]
        if min(widths) < 1:
            raise ValueError(f"width {width} leaves a stage with no channels; use width >= {1 / 64:.4f}")
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = widths[0]
        if small_stem:  # inputs under ~96 px: keep resolution instead of dividing it by 4 in the stem
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.out_dim = widths[3] * block.expansion
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def feature_map(self, x: Tensor) -> Tensor:
        """The last stage's output ``[B, out_dim, h, w]``, before pooling (dense heads read it)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(self.feature_map(x)), 1)


def build_backbone(name: str = "resnet18", width: float = 1.0, small_stem: bool = False) -> tuple[nn.Module, int]:
    """A randomly initialized ResNet trunk returning pooled features, and its feature dimension
    (``512 * width`` for resnet18, ``2048 * width`` for resnet50)."""
    if name not in _ARCHS:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {sorted(_ARCHS)}")
    if not width > 0:
        raise ValueError(f"backbone width must be > 0, got {width}")
    block, layers = _ARCHS[name]
    net = ScaledResNet(block, layers, width=width, small_stem=small_stem)
    return net, net.out_dim


class ProjectionHead(nn.Sequential):
    """SimCLR(v2) projection head (paper Appendix A: 3 layers, 128-d output): ``layers - 1`` blocks of
    Linear -> BatchNorm -> ReLU, then a final Linear to ``out_dim``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128, layers: int = 3):
        if layers < 1:
            raise ValueError(f"projection head needs >= 1 layer, got {layers}")
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            # no bias: the following BatchNorm's shift makes it redundant
            mods += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            d = hidden_dim
        mods.append(nn.Linear(d, out_dim))
        super().__init__(*mods)


class ContrastiveModel(nn.Module):
    """Backbone + head. Takes float images in [0, 1] ``[B, 3, S, S]`` and normalizes them itself;
    ``forward`` returns ``(h, z)``: pooled backbone features and the head's output. The head is the
    contrastive projection head, or a pretext task's (``head``, a :func:`raysys.models.heads.build_head`
    spec); ``gray_input`` makes the model see only luminance (colorization), at evaluation too. ``spec``
    holds the constructor arguments so a checkpoint can rebuild the model with :meth:`from_spec`."""

    def __init__(self, backbone_name: str = "resnet18", width: float = 1.0, small_stem: bool = False,
                 proj_dim: int = 128, proj_layers: int = 3, head: dict | None = None, gray_input: bool = False):
        super().__init__()
        self.spec = dict(backbone_name=backbone_name, width=width, small_stem=small_stem,
                         proj_dim=proj_dim, proj_layers=proj_layers)
        if head is not None or gray_input:  # absent from contrastive specs, so their saved form is unchanged
            self.spec |= dict(head=head, gray_input=gray_input)
        self.backbone, self.feature_dim = build_backbone(backbone_name, width, small_stem)
        # "projector" names every head, so weight files keep one layout whatever the method
        self.projector = (ProjectionHead(self.feature_dim, self.feature_dim, proj_dim, proj_layers) if head is None
                          else build_head(head, self.feature_dim))
        self.gray_input = gray_input
        self.normalize = Normalize()

    @classmethod
    def from_spec(cls, spec: dict) -> "ContrastiveModel":
        """Rebuild a model from its ``spec`` (e.g. stored in a checkpoint)."""
        unknown = set(spec) - {"backbone_name", "width", "small_stem", "proj_dim", "proj_layers", "head", "gray_input"}
        if unknown:
            raise ModelFileError(f"model spec has unknown keys {sorted(unknown)}; was it written by another version?")
        return cls(**spec)

    def _input(self, x: Tensor) -> Tensor:
        return self.normalize(grayscale(x) if self.gray_input else x)

    def features(self, x: Tensor) -> Tensor:
        """Backbone features ``[B, feature_dim]`` of images in [0, 1]."""
        return self.backbone(self._input(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if getattr(self.projector, "spatial", False):
            fmap = self.backbone.feature_map(self._input(x))
            return fmap.mean((2, 3)), self.projector(fmap)
        h = self.features(x)
        return h, self.projector(h)


class LoadReport(NamedTuple):
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]  # present in both, different shapes: left at their current values


def _unwrap_state_dict(obj, path) -> dict:
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ModelFileError(f"{path}: expected a state dict of tensors (or a dict with a 'model'/'state_dict' entry)")
    return obj


def _best_renaming(keys: list[str], target: set[str]) -> dict[str, str]:
    """Map file keys to model keys, trying the usual prefix differences (DDP's 'module.', a full model's
    'backbone.' loaded into a bare backbone or the reverse) and keeping the one that matches most."""
    best: dict[str, str] = {k: k for k in keys}
    best_hits = len(target.intersection(keys))
    for strip in ("module.", "backbone.", "module.backbone.", ""):
        for add in ("", "backbone."):
            names = {k: add + k[len(strip):] if k.startswith(strip) else k for k in keys}
            hits = len(target.intersection(names.values()))
            if hits > best_hits:
                best, best_hits = names, hits
    return best


def load_init_weights(model: nn.Module, path) -> LoadReport:
    """Load user-supplied initial weights from ``path`` into ``model`` (a ContrastiveModel or a backbone).

    The file holds a state dict, or a dict with a ``model``/``state_dict`` entry, read with
    ``torch.load(weights_only=True)``. Parameters absent from the file, extra file entries and
    shape mismatches are skipped and logged; raises ValueError when no parameter matches at all.
    """
    obj = torch.load(path, weights_only=True, map_location="cpu")
    state = _unwrap_state_dict(obj, path)
    own = model.state_dict()
    renamed = _best_renaming(list(state), set(own))
    matched = {renamed[k]: v for k, v in state.items() if renamed[k] in own}
    mismatched = sorted(k for k, v in matched.items() if v.shape != own[k].shape)
    loadable = {k: v for k, v in matched.items() if k not in mismatched}
    if not loadable:
        raise ModelFileError(f"{path}: none of its {len(state)} entries match the model "
                         f"(file has e.g. {list(state)[:2]}, model expects e.g. {list(own)[:2]}); "
                         f"pass weights saved from the same architecture and width")
    model.load_state_dict(loadable, strict=False)
    report = LoadReport(loaded=sorted(loadable), missing=sorted(set(own) - set(loadable)),
                        unexpected=sorted(k for k in state if renamed[k] not in own), mismatched=mismatched)
    log.info("loaded %d tensors from %s", len(report.loaded), path)
    if report.missing or report.unexpected or report.mismatched:
        log.warning("init weights %s: %d missing (e.g. %s), %d unexpected (e.g. %s), %d shape-mismatched (e.g. %s)",
                    path, len(report.missing), report.missing[:3], len(report.unexpected),
                    report.unexpected[:3], len(report.mismatched), report.mismatched[:3])
    return report


def embed(model: nn.Module, images: np.ndarray, batch_size: int, device, on_batch=None) -> np.ndarray:
    """``model.features`` of uint8 ``[N, S, S, 3]`` images, batch by batch: ``float32 [N, D]``. The one
    embedding loop of the linear probe, the texture encoder and the clustering step's actors; the caller
    sets eval and inference mode. ``on_batch(n)`` is told each batch's size (a progress bar)."""
    size = images.shape[1]
    out = []
    for start in range(0, max(len(images), 1), batch_size):  # N = 0: one empty batch still gives the width
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)  # uint8: 4x fewer bytes
        out.append(model.features(to_float(x, size)).flatten(1).float().cpu().numpy())
        if on_batch is not None:
            on_batch(len(x))
    return np.concatenate(out)
