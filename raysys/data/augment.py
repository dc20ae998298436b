"""Batched SimCLR / MoCo v2 two-view augmentations in plain PyTorch.

Every operation works on the whole batch ``[B, 3, H, W]`` at once with per-sample random parameters,
instead of looping a per-image transform: on a CPU-starved Ray Data worker this is what makes
``map_batches`` outrun a per-image ``DataLoader`` (see :func:`per_image_transform`, the per-image
reference used by the benchmark).

Pipeline of one view, in this fixed order (torchvision's per-image ``Compose`` uses the same order):

1. random resized crop -- per-sample box drawn with ``RandomResizedCrop`` semantics, resampled with
   :func:`torchvision.ops.roi_align`;
2. horizontal flip with ``flip_p``;
3. colour jitter with ``jitter_p``: brightness, contrast, saturation, hue, always in that order
   (torchvision's ``ColorJitter`` shuffles the order per image; a fixed order keeps the batch
   vectorised and differs only in second-order interactions);
4. grayscale with ``grayscale_p`` (ITU-R 601 luma, as torchvision);
5. Gaussian blur with ``blur_p`` (per-sample sigma, kernel ~10% of the output side as in SimCLR).

Random parameters are drawn on the generator's device (CPU by default) and then moved to the
images' device, so a seeded CPU generator gives the same views on CPU and CUDA images.

On an accelerator nothing here waits for the device (no ``nonzero``/``item``/host copies; a static check in
the tests keeps it so), and ``dtype=torch.float16`` after the crop halves the memory traffic of the rest: its
11-bit significand is finer than the 8-bit images (views within 2 grey levels of float32's, hue rotation the
largest step, 0.06 on average, no bias; tests/data/test_augment.py).

Why ``roi_align`` and not ``affine_grid`` + ``grid_sample``: roi_align takes one box per sample
natively and, with ``sampling_ratio=-1``, averages ``ceil(box_side / size)`` bilinear samples per
output pixel, i.e. it low-pass filters when the crop is larger than the output (the role of
``antialias=True``). ``grid_sample`` takes a single sample per output pixel and aliases when
downscaling, which is the common case (a 0.08-1.0 area crop of a large image to ``size``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torchvision.ops import roi_align

from raysys.errors import AugmentConfigError

# torchvision.transforms.RandomResizedCrop tries this many boxes before falling back to a centre crop.
_CROP_ATTEMPTS = 10


@dataclass
class AugmentConfig:
    """Augmentation strengths; the defaults are SimCLR's with colour strength s=0.5 (CIFAR-scale)."""

    size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    @classmethod
    def moco_v2(cls, **overrides) -> AugmentConfig:
        """MoCo v2 recipe: SimCLR jitter plus Gaussian blur with p=0.5 and a (0.2, 1.0) crop scale."""
        return cls(**{"crop_scale": (0.2, 1.0), "blur_p": 0.5, **overrides})

    def validate(self) -> AugmentConfig:
        """Raise :class:`AugmentConfigError` (a ``ValueError``) on the first invalid field; return self."""
        if not isinstance(self.size, (int, np.integer)) or isinstance(self.size, bool) or self.size < 8:
            raise AugmentConfigError(f"size must be an integer >= 8, got {self.size!r}")
        _check_range("crop_scale", self.crop_scale, low=0.0, high=1.0, low_open=True)
        _check_range("crop_ratio", self.crop_ratio, low=0.0, high=math.inf, low_open=True)
        _check_range("blur_sigma", self.blur_sigma, low=0.0, high=math.inf, low_open=True)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise AugmentConfigError(f"{name} is a probability and must lie in [0, 1], got {value!r}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value:
                raise AugmentConfigError(f"{name} must be >= 0 (0 disables it), got {value!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise AugmentConfigError(f"hue must lie in [0, 0.5] (0 disables it), got {self.hue!r}")
        return self

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> AugmentConfig:
        """Inverse of :meth:`to_dict`; rejects unknown keys and validates the result."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AugmentConfigError(f"unknown AugmentConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}).validate()


def _check_range(name: str, pair, low: float, high: float, low_open: bool) -> None:
    try:
        lo, hi = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise AugmentConfigError(f"{name} must be a (low, high) pair of numbers, got {pair!r}") from None
    low_ok = lo > low if low_open else lo >= low
    if not (low_ok and lo <= hi <= high):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise AugmentConfigError(f"{name} must satisfy low <= high within {bound}, got {pair!r}")


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel side of about 10% of the image side, at least 3 (SimCLR; 23 px for 224)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


# --------------------------------------------------------------------------------------------------
# input handling


def _as_float_nchw(images) -> torch.Tensor:
    """uint8 (or float in [0, 1]) ``[B, H, W, 3]`` / ``[B, 3, H, W]`` -> float32 ``[B, 3, H, W]`` in [0, 1]."""
    if isinstance(images, np.ndarray):
        # Ray Data hands out read-only views of Arrow buffers; torch.from_numpy warns on those (it cannot
        # keep them read-only), and copying uint8 costs far less than the float work that follows
        images = torch.from_numpy(images if images.flags.writeable else images.copy())
    x = images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if x.ndim != 4:
        raise ValueError(f"images must be a batch [B, H, W, 3] or [B, 3, H, W], got shape {tuple(x.shape)}")
    first, last = x.shape[1] == 3, x.shape[-1] == 3
    if first == last:
        raise ValueError(
            f"cannot tell the channel axis of shape {tuple(x.shape)}: need exactly one of dim 1 or dim 3 "
            "to be 3 (RGB); convert grayscale to RGB and use images larger than 3 px"
        )
    if last:
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)
    elif x.is_floating_point():
        x = x.to(torch.float32)
    else:
        raise ValueError(f"images must be uint8 (0-255) or float (0-1), got dtype {x.dtype}")
    return x.contiguous()


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, *, size=()) -> torch.Tensor:
    """``n`` (x size) float64 draws from U[low, high) on the generator's device."""
    device = generator.device if generator is not None else "cpu"
    u = torch.rand((n, *size), generator=generator, device=device, dtype=torch.float64)
    return low + (high - low) * u


# --------------------------------------------------------------------------------------------------
# the individual batched operations (explicit parameters; testable on their own)


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample crop boxes ``[B, 4]`` (x1, y1, x2, y2; integer pixel edges) with the sampling of
    ``torchvision.transforms.RandomResizedCrop.get_params``: up to 10 tries of an area fraction
    ~ U(scale) and a log-uniform aspect ratio w/h in ``ratio``, the first that fits wins; if none fits,
    a centre crop clipped to ``ratio``. All tries are drawn at once for the whole batch.
    """
    area = float(height * width)
    target = area * _uniform(batch, *scale, generator, size=(_CROP_ATTEMPTS,))
    aspect = torch.exp(_uniform(batch, math.log(ratio[0]), math.log(ratio[1]), generator, size=(_CROP_ATTEMPTS,)))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    top = torch.floor(_uniform(batch, 0.0, 1.0, generator) * (height - h + 1))
    left = torch.floor(_uniform(batch, 0.0, 1.0, generator) * (width - w + 1))

    fw, fh = _fallback_crop_size(height, width, ratio)
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    top = torch.where(found, top, float((height - fh) // 2))
    left = torch.where(found, left, float((width - fw) // 2))
    return torch.stack([left, top, left + w, top + h], dim=1)


def _fallback_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """Centre-crop size used when no random box fits (torchvision's rule)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box ``i`` of ``boxes`` ``[B, 4]`` (x1, y1, x2, y2 in pixel-edge coordinates) out of image ``i``
    of float ``x`` ``[B, C, H, W]`` and resample it to ``[B, C, size, size]``.

    ``aligned=True`` puts pixel centres at half-integers, so box (0, 0, W, H) is exactly the image;
    ``sampling_ratio=-1`` averages ceil(box side / size) samples per output pixel (anti-aliasing).
    """
    index = torch.arange(x.shape[0], device=x.device, dtype=x.dtype).unsqueeze(1)
    rois = torch.cat([index, boxes.to(device=x.device, dtype=x.dtype)], dim=1)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _per_sample(factors: torch.Tensor) -> torch.Tensor:
    return factors.reshape(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's blend ``ratio*a + (1-ratio)*b`` clamped to [0, 1], with a per-sample ratio."""
    r = _per_sample(ratio)
    return (r * a + (1.0 - r) * b).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each sample by ``shift[i]`` turns (in [-0.5, 0.5]); S and V unchanged.

    Same hue definition as torchvision (PIL's). Because S and V fix each pixel's max and min channel,
    the HSV->RGB step reduces to ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 * hue) mod 6`` and n = 5, 3, 1 for R, G, B, without building an HSV tensor.
    Branches are float masks, not ``torch.where``: a full-size boolean ``where`` is ~10x slower on CPU.
    """
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    span = maxc - minc
    inv_span = 1.0 / (span + (span == 0).to(x.dtype))  # grey pixels: numerators below are all 0
    # which channel holds the max, with torchvision's tie-break order r, g, b
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~(is_r | is_g)
    hue6 = (
        is_r.to(x.dtype) * (g - b) + is_g.to(x.dtype) * (b - r + 2 * span) + is_b.to(x.dtype) * (r - g + 4 * span)
    ) * inv_span
    # 5, 3, 1 made on the device: torch.tensor(list, device=...) would be a blocking host-to-device copy
    offsets = torch.arange(3, device=x.device, dtype=x.dtype).mul_(-2.0).add_(5.0).reshape(1, 3, 1, 1)
    # in-place from here on: fresh [B, 3, H, W] temporaries dominate the cost on CPU
    k = hue6.unsqueeze(1) + (offsets + 6.0 * shift.reshape(-1, 1, 1, 1))
    k.sub_(k.div(6.0).floor_().mul_(6.0))  # mod 6; torch.remainder is several times slower on CPU
    ramp = k.clamp_(max=4.0 - k).clamp_(0.0, 1.0)  # min(k, 4 - k) clipped to [0, 1]
    return ramp.mul_(span.unsqueeze(1)).neg_().add_(maxc.unsqueeze(1))


def color_jitter(
    x: torch.Tensor,
    brightness: torch.Tensor | None = None,
    contrast: torch.Tensor | None = None,
    saturation: torch.Tensor | None = None,
    hue: torch.Tensor | None = None,
) -> torch.Tensor:
    """Colour-jitter float ``[B, 3, H, W]`` images with explicit per-sample factors ``[B]``, in the order
    brightness, contrast, saturation, hue (``None`` skips that step). Each step equals torchvision's
    ``adjust_brightness`` / ``adjust_contrast`` / ``adjust_saturation`` / ``adjust_hue`` on one float
    image with that sample's factor.
    """
    if brightness is not None:
        x = (x * _per_sample(brightness.to(x))).clamp_(0.0, 1.0)
    if contrast is not None:
        mean = TF.rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        x = _blend(x, mean, contrast.to(x))
    if saturation is not None:
        x = _blend(x, TF.rgb_to_grayscale(x), saturation.to(x))
    if hue is not None:
        x = adjust_hue(x, hue.to(x))
    return x


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma replicated to 3 channels (torchvision's ``rgb_to_grayscale``), batched."""
    return TF.rgb_to_grayscale(x, num_output_channels=3).contiguous()


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each sample of float ``[B, C, H, W]`` with its own ``sigma[i]``: a separable Gaussian of odd
    side ``kernel_size`` and reflect padding (torchvision's ``gaussian_blur``), as one grouped conv pass
    per axis over all B*C planes.
    """
    batch, channels, height, width = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    sigma = sigma.to(x).reshape(-1, 1)
    kernel = torch.softmax(-(t**2) / (2 * sigma**2), dim=1)  # [B, k], rows sum to 1
    kernel = kernel.repeat_interleave(channels, dim=0)  # one row per (sample, channel) plane
    pad = kernel_size // 2
    planes = F.pad(x.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    groups = batch * channels
    planes = F.conv2d(planes, kernel.reshape(groups, 1, 1, kernel_size), groups=groups)
    planes = F.conv2d(planes, kernel.reshape(groups, 1, kernel_size, 1), groups=groups)
    return planes.reshape(batch, channels, height, width)


def _apply_to(x: torch.Tensor, mask: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              whole_batch: bool | None = None):
    """Replace the samples selected by ``mask`` with ``fn(x[idx], idx)`` (every op is per sample).

    On an accelerator (``whole_batch``, by default off CPU) the whole batch goes through ``fn`` and ``mask``
    picks: gathering the subset needs its indices on the host (``nonzero``), which would stall the device at
    every op of every step. On CPU only the selected samples do the work (:func:`_apply_to_subset`)."""
    if x.device.type != "cpu" if whole_batch is None else whole_batch:
        return torch.where(mask.reshape(-1, 1, 1, 1), fn(x, torch.arange(len(x), device=x.device)), x)
    return _apply_to_subset(x, mask, fn)


def _apply_to_subset(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """CPU only: ``fn`` on the selected samples alone (``nonzero`` is free there: no device to wait for)."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel():
        x[idx] = fn(x[idx], idx)
    return x


# --------------------------------------------------------------------------------------------------
# public entry points


def augment(images, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One augmented view of every image: uint8 ``[B, H, W, 3]`` or ``[B, 3, H, W]`` (numpy or torch, any
    device) -> float32 ``[B, 3, size, size]`` in [0, 1] on the images' device.

    Random draws come from ``generator`` (torch's global RNG when ``None``); every sample gets its own.
    Note: torch's global RNG starts from the same seed in every fresh process, so parallel workers
    must pass differently seeded generators or they produce identical augmentation streams.
    """
    cfg.validate()
    return _augment_float(_as_float_nchw(images), cfg, generator)


def _augment_float(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`augment` on an already converted float32 ``[B, 3, H, W]`` batch (not modified), in ``dtype`` after
    the crop."""
    batch, _, height, width = x.shape
    device = x.device

    def draw(low: float, high: float) -> torch.Tensor:
        return _uniform(batch, low, high, generator).to(device)

    def coin(p: float) -> torch.Tensor:
        return draw(0.0, 1.0) < p

    boxes = sample_crop_boxes(batch, height, width, cfg.crop_scale, cfg.crop_ratio, generator)
    x = resized_crop(x, boxes, cfg.size).to(dtype)

    flip = coin(cfg.flip_p).reshape(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)

    jitter = coin(cfg.jitter_p)
    factors = {
        name: draw(max(0.0, 1.0 - strength), 1.0 + strength) if strength > 0 else None
        for name, strength in (
            ("brightness", cfg.brightness),
            ("contrast", cfg.contrast),
            ("saturation", cfg.saturation),
        )
    }
    factors["hue"] = draw(-cfg.hue, cfg.hue) if cfg.hue > 0 else None
    if any(f is not None for f in factors.values()):
        active = {name: f for name, f in factors.items() if f is not None}
        x = _apply_to(x, jitter, lambda s, idx: color_jitter(s, **{name: f[idx] for name, f in active.items()}))

    x = _apply_to(x, coin(cfg.grayscale_p), lambda s, idx: grayscale(s))

    blur = coin(cfg.blur_p)
    sigma = draw(*cfg.blur_sigma)
    kernel_size = blur_kernel_size(cfg.size)
    return _apply_to(x, blur, lambda s, idx: gaussian_blur(s, sigma[idx], kernel_size))


def two_views(
    images, cfg: AugmentConfig, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent augmentations of the same batch (see :func:`augment`), each ``[B, 3, size, size]``, in
    ``dtype``: float32, or float16 after the crop (module docstring). The crop itself stays float32: its
    bilinear weights come from pixel coordinates, which float16 would round to 1/8 px at 224 px."""
    cfg.validate()
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    x = _as_float_nchw(images)  # convert once for both views
    return _augment_float(x, cfg, generator, dtype), _augment_float(x, cfg, generator, dtype)


def to_uint8(views: torch.Tensor) -> torch.Tensor:
    """Views in [0, 1] -> uint8 0-255, rounded: the 8-bit grid the source images came on, so a view stored or
    sent this way moves at most half a grey level (and a quarter of float32's bytes)."""
    return views.mul(255.0).round_().to(torch.uint8)


def to_float(images, size: int) -> torch.Tensor:
    """No augmentation: resize (bilinear, antialiased) to ``size`` x ``size`` and return float32
    ``[B, 3, size, size]`` in [0, 1]; for feature extraction at evaluation time. A float32 ``[B, 3, H, W]``
    input already at ``size`` is returned as is (no copy)."""
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    x = _as_float_nchw(images)
    if x.shape[-2:] == (size, size):
        return x
    return TF.resize(x, [size, size], antialias=True).clamp_(0.0, 1.0)


def per_image_transform(cfg: AugmentConfig) -> T.Compose:
    """The same augmentation as :func:`augment`, per image, with torchvision: uint8 ``[3, H, W]`` ->
    float32 ``[3, size, size]`` in [0, 1]. The reference the throughput benchmark compares against."""
    cfg.validate()
    steps = [
        T.RandomResizedCrop(cfg.size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(cfg.flip_p),
        T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p),
        T.RandomGrayscale(cfg.grayscale_p),
    ]
    if cfg.blur_p > 0:
        steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(cfg.size), cfg.blur_sigma)], p=cfg.blur_p))
    steps.append(T.ToDtype(torch.float32, scale=True))
    return T.Compose(steps)
