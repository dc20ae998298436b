"""Batched augmentations against independent references (torchvision per-image ops, hand formulas)."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T1
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from raysys.data.augment import (
    AugmentConfig,
    AugmentConfigError,
    augment,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    per_image_transform,
    sample_crop_boxes,
    to_float,
    two_views,
)

torch.set_num_threads(1)

# every random step switched off: the view is a plain resize
OFF = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def noise(b=4, h=64, w=64, seed=0, high=256):
    """Random uint8 images, channels-last (as decoded by the pipeline)."""
    return torch.randint(0, high, (b, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def smooth(b=4, h=64, w=64, seed=0):
    """Smooth uint8 images (upsampled low-res noise): resamplers with different kernels agree on them."""
    low = torch.rand(b, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    up = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return (up * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def as_float_nchw(images):
    return images.permute(0, 3, 1, 2).float() / 255


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [16, 32])
def test_shapes_dtypes_range_for_both_layouts(size):
    images = noise(3, 40, 40)
    cfg = AugmentConfig.moco_v2(size=size)
    last = two_views(images, cfg, seeded(1))
    first = two_views(images.permute(0, 3, 1, 2), cfg, seeded(1))
    from_numpy = two_views(images.numpy(), cfg, seeded(1))
    for views in (last, first, from_numpy):
        for v in views:
            assert v.shape == (3, 3, size, size) and v.dtype == torch.float32
            assert v.min() >= 0.0 and v.max() <= 1.0
    # the layout only changes how the input is read, not the result
    for a, b, c in zip(last, first, from_numpy):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)


def test_read_only_numpy_batches_are_accepted_without_warnings():
    array = noise(2, 16, 16).numpy()
    array.flags.writeable = False  # as Ray Data's zero-copy numpy batches
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        views = two_views(array, AugmentConfig(size=8), seeded())
        assert views[0].shape == (2, 3, 8, 8)
        assert to_float(array, 16).shape == (2, 3, 16, 16)


def test_empty_batch_gives_empty_views():
    views = two_views(noise(0, 16, 16), AugmentConfig.moco_v2(size=8), seeded())
    assert views[0].shape == views[1].shape == (0, 3, 8, 8)


def test_views_differ_and_calls_draw_fresh_randomness():
    images = noise(8)
    cfg = AugmentConfig()
    v1, v2 = two_views(images, cfg)
    assert all(not torch.allclose(a, b) for a, b in zip(v1, v2))
    again, _ = two_views(images, cfg)
    assert not torch.allclose(v1, again)


def test_samples_draw_independently():
    images = noise(1).expand(16, -1, -1, -1)  # one image repeated
    out = augment(images, AugmentConfig(), seeded(2))
    flat = out.flatten(1)
    distinct = {tuple(row[:8].tolist()) for row in flat}
    assert len(distinct) == 16


def test_fixed_seed_is_deterministic():
    images = noise(6)
    cfg = AugmentConfig.moco_v2()
    a = two_views(images, cfg, seeded(7))
    b = two_views(images, cfg, seeded(7))
    c = two_views(images, cfg, seeded(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# ---------------------------------------------------------------------------------------------- resize / flip


def test_no_randomness_at_native_size_is_the_input_exactly():
    images = noise(3, 32, 32)
    out = augment(images, AugmentConfig(size=32, **OFF), seeded())
    torch.testing.assert_close(out, as_float_nchw(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw", [(64, 64), (48, 48), (20, 20)])
def test_no_randomness_equals_plain_resize(hw):
    images = smooth(4, *hw)
    out = augment(images, AugmentConfig(size=32, **OFF), seeded())
    reference = TF.resize(as_float_nchw(images), [32, 32], antialias=True)
    assert (out - reference).abs().max() < 0.02
    assert (out - reference).abs().mean() < 0.003


def test_downscaling_is_antialiased():
    # i.i.d. noise shrunk 4x: averaging the 4x4 block under each output pixel (roi_align's adaptive
    # sampling) divides the variance by 16, torchvision's antialias=True triangle filter by ~36, while one
    # bilinear sample per output pixel (aliasing, antialias=False) only divides it by 4
    x = as_float_nchw(noise(2, 128, 128))
    out = augment(x, AugmentConfig(size=32, **OFF), seeded())
    assert out.var() < x.var() / 10
    assert TF.resize(x, [32, 32], antialias=False).var() > x.var() / 10  # the check can tell the two apart


def test_flip_p1_equals_flipped_resize():
    images = smooth(4, 48, 48)
    cfg = AugmentConfig(size=32, **{**OFF, "flip_p": 1.0})
    out = augment(images, cfg, seeded())
    plain = augment(images, AugmentConfig(size=32, **OFF), seeded())
    torch.testing.assert_close(out, plain.flip(-1), rtol=0, atol=1e-6)
    reference = TF.horizontal_flip(TF.resize(as_float_nchw(images), [32, 32], antialias=True))
    assert (out - reference).abs().max() < 0.02


def test_flip_half_the_samples():
    images = noise(1, 16, 16).expand(400, -1, -1, -1)
    out = augment(images, AugmentConfig(size=16, **{**OFF, "flip_p": 0.5}), seeded(3))
    base = as_float_nchw(images[:1])
    flipped = torch.isclose(out, base.flip(-1), atol=1e-6).flatten(1).all(1)
    unflipped = torch.isclose(out, base, atol=1e-6).flatten(1).all(1)
    assert torch.all(flipped ^ unflipped)
    assert abs(flipped.sum().item() - 200) < 4 * math.sqrt(400 * 0.25)


# ---------------------------------------------------------------------------------------------- grayscale


def test_grayscale_p1_is_itu601_luma():
    images = noise(5, 32, 32)
    out = augment(images, AugmentConfig(size=32, **{**OFF, "grayscale_p": 1.0}), seeded())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    rgb = images.double() / 255
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    torch.testing.assert_close(out[:, 0].double(), luma, rtol=0, atol=2e-4)


def test_grayscale_fraction_is_binomial():
    n, p = 2000, 0.2
    images = noise(n, 8, 8)
    out = augment(images, AugmentConfig(size=8, **{**OFF, "grayscale_p": p}), seeded(4))
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert abs(gray.sum().item() - n * p) < 4 * math.sqrt(n * p * (1 - p))


# ---------------------------------------------------------------------------------------------- crop


def decode_boxes(out, scale_x, scale_y):
    """Recover each sample's crop box from an output whose channel 0 is ``scale_x * x`` and channel 1 is
    ``scale_y * y`` (in /255 units): on a linear ramp every resampler returns the ramp at the output
    pixel centre, ``x1 + (c + 0.5) * w / S - 0.5``; fit a line over interior columns (the border ones
    clamp at the image edge)."""
    size = out.shape[-1]
    c = torch.arange(1, size - 1, dtype=torch.float64)
    design = torch.stack([torch.ones_like(c), (c + 0.5) / size], dim=1)

    def fit(profiles, scale):
        coords = profiles.double() * 255 / scale  # [B, len(c)] pixel-centre coordinates
        sol = torch.linalg.lstsq(design, coords.T).solution  # rows: start - 0.5, extent
        return sol[0] + 0.5, sol[1]

    x1, w = fit(out[:, 0, size // 2, 1:-1], scale_x)
    y1, h = fit(out[:, 1, 1:-1, size // 2], scale_y)
    return x1, y1, w, h


def test_crop_boxes_lie_in_configured_ranges():
    height, width, n = 48, 80, 300
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([xs * 3, ys * 5, torch.zeros_like(xs)], dim=-1).to(torch.uint8)
    scale, ratio = (0.2, 0.5), (0.5, 2.0)
    cfg = AugmentConfig(size=16, crop_scale=scale, crop_ratio=ratio, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    out = augment(image.expand(n, -1, -1, -1), cfg, seeded(5))
    x1, y1, w, h = decode_boxes(out, 3, 5)

    for v in (x1, y1, w, h):  # torchvision rounds boxes to whole pixels
        assert (v - v.round()).abs().max() < 1e-2
    x1, y1, w, h = x1.round(), y1.round(), w.round(), h.round()
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x1 + w <= width).all() and (y1 + h <= height).all()
    # w = round(sqrt(area * r)), h = round(sqrt(area / r)): undo the rounding with +-0.5 intervals
    area = width * height
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * area).all() and ((w - 0.5) * (h - 0.5) <= scale[1] * area).all()
    assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all() and ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
    fraction = w * h / area
    assert fraction.min() < 0.23 and fraction.max() > 0.47  # the whole range is used
    assert len(set(zip(x1.tolist(), y1.tolist()))) > n // 2  # positions vary
    # offsets are uniform over every position that fits, both extremes included (~1/20 chance per sample)
    narrow, short = w < width, h < height
    assert (x1[narrow] == 0).any() and (x1 + w == width)[narrow].any()
    assert (y1[short] == 0).any() and (y1 + h == height)[short].any()


@pytest.mark.parametrize("ratio", [(3.0, 4.0), (0.2, 0.25), (1.0, 1.0)])
def test_crop_fallback_matches_torchvision(ratio):
    # no random box can fit -> torchvision's centre crop clipped to the ratio range
    height, width = 30, 50  # 50 / 3 and 30 * 0.25 are not whole: exercises torchvision's rounding
    boxes = sample_crop_boxes(5, height, width, scale=(1.0, 1.0), ratio=ratio, generator=seeded())
    if ratio == (1.0, 1.0):  # 1500 px at ratio 1 is 39x39 > 30 rows: never fits either
        assert height < round(math.sqrt(height * width))
    i, j, h, w = T1.RandomResizedCrop.get_params(torch.zeros(3, height, width), scale=[1.0, 1.0], ratio=list(ratio))
    expected = torch.tensor([j, i, j + w, i + h], dtype=boxes.dtype).expand(5, -1)
    torch.testing.assert_close(boxes, expected)


# ---------------------------------------------------------------------------------------------- colour jitter


def test_brightness_alone_scales_each_sample():
    b = 0.4
    images = noise(64, 16, 16, high=181)  # 180 * 1.4 < 255: no clamping
    cfg = AugmentConfig(size=16, **{**OFF, "jitter_p": 1.0}, brightness=b, contrast=0, saturation=0, hue=0)
    out = augment(images, cfg, seeded(6)).double()
    base = as_float_nchw(images).double()
    factor = (out * base).sum((1, 2, 3)) / (base * base).sum((1, 2, 3))  # least-squares per-sample scale
    torch.testing.assert_close(out, factor.view(-1, 1, 1, 1) * base, rtol=0, atol=1e-6)
    assert (factor >= 1 - b - 1e-6).all() and (factor <= 1 + b + 1e-6).all()
    assert factor.std() > 0.15  # per sample, ~uniform over [0.6, 1.4] (std 0.23)


def test_saturation_zero_is_gray_and_hue_zero_is_identity():
    x = as_float_nchw(noise(4, 16, 16))
    gray = color_jitter(x, saturation=torch.zeros(4))
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(gray[:, c], luma, rtol=0, atol=2e-4)
    torch.testing.assert_close(color_jitter(x, hue=torch.zeros(4)), x, rtol=0, atol=1e-6)


def test_jitter_matches_torchvision_functional_ops():
    # include many exact ties between channels (quantised levels) and grey pixels, which hit the hue branches
    levels = torch.tensor([0, 37, 128, 200, 255], dtype=torch.uint8)
    idx = torch.randint(0, 5, (6, 12, 12, 3), generator=seeded(9))
    x = torch.cat([as_float_nchw(levels[idx]), as_float_nchw(noise(6, 12, 12))])
    gen = seeded(10)
    n = x.shape[0]
    bright, contrast, sat = (torch.empty(n).uniform_(0.2, 1.8, generator=gen) for _ in range(3))
    hue = torch.empty(n).uniform_(-0.5, 0.5, generator=gen)
    hue[:2] = torch.tensor([-0.5, 0.5])
    out = color_jitter(x, bright, contrast, sat, hue)
    for i in range(n):
        ref = TF.adjust_brightness(x[i], bright[i].item())
        ref = TF.adjust_contrast(ref, contrast[i].item())
        ref = TF.adjust_saturation(ref, sat[i].item())
        ref = TF.adjust_hue(ref, hue[i].item())
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- blur


def test_blur_keeps_constants_and_lowers_noise_variance():
    constant = torch.full((4, 32, 32, 3), 91, dtype=torch.uint8)
    cfg = AugmentConfig(size=32, **OFF, blur_p=1.0)
    torch.testing.assert_close(augment(constant, cfg, seeded()), as_float_nchw(constant), rtol=0, atol=1e-6)
    images = noise(4, 32, 32)
    # sigma near 0.1 is almost a delta kernel; sigma >= 1 must visibly smooth i.i.d. noise
    blurred = augment(images, AugmentConfig(size=32, **OFF, blur_p=1.0, blur_sigma=(1.0, 2.0)), seeded())
    assert (blurred.var(dim=(2, 3)) < 0.5 * as_float_nchw(images).var(dim=(2, 3))).all()


def test_blur_matches_torchvision_gaussian_blur_per_sample():
    x = as_float_nchw(noise(5, 20, 20))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    k = blur_kernel_size(64)
    out = gaussian_blur(x, sigma, k)
    for i in range(5):
        ref = TF.gaussian_blur(x[i], [k, k], [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)


def test_blur_kernel_size_is_odd_tenth():
    assert [blur_kernel_size(s) for s in (8, 32, 64, 224)] == [3, 3, 7, 23]


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad",
    [
        dict(size=4),
        dict(size=32.0),
        dict(crop_scale=(0.0, 1.0)),
        dict(crop_scale=(0.5, 1.2)),
        dict(crop_scale=(0.9, 0.5)),
        dict(crop_ratio=(-1.0, 2.0)),
        dict(crop_ratio=(2.0,)),
        dict(flip_p=1.5),
        dict(jitter_p=-0.1),
        dict(grayscale_p=2),
        dict(blur_p=-1),
        dict(brightness=-0.1),
        dict(hue=0.6),
        dict(blur_sigma=(0.0, 1.0)),
    ],
)
def test_validate_raises_one_line_value_errors(bad):
    with pytest.raises(ValueError) as info:
        AugmentConfig(**bad).validate()
    assert isinstance(info.value, AugmentConfigError)
    assert "\n" not in str(info.value) and next(iter(bad)) in str(info.value)
    with pytest.raises(AugmentConfigError):  # checked before any work
        augment(noise(1), AugmentConfig(**bad))


def test_config_json_round_trip_and_presets():
    for cfg in (AugmentConfig(), AugmentConfig.moco_v2(size=64)):
        back = AugmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and isinstance(back.crop_scale, tuple)
    moco = AugmentConfig.moco_v2()
    assert moco.blur_p == 0.5 and AugmentConfig().blur_p == 0.0
    with pytest.raises(AugmentConfigError, match="unknown"):
        AugmentConfig.from_dict({"size": 32, "colour": 1})
    with pytest.raises(AugmentConfigError):
        AugmentConfig.from_dict({"size": 2})


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(8, 8, 3, dtype=torch.uint8),
        torch.zeros(2, 8, 8, 1, dtype=torch.uint8),
        torch.zeros(2, 3, 8, 3, dtype=torch.uint8),
        torch.zeros(2, 8, 8, 3, dtype=torch.int32),
    ],
)
def test_bad_images_raise(images):
    with pytest.raises(ValueError):
        augment(images, AugmentConfig(size=8))
    with pytest.raises(ValueError):
        to_float(images, 8)


# ---------------------------------------------------------------------------------------------- eval / reference


def test_to_float_is_a_plain_resize():
    images = noise(3, 48, 48)
    out = to_float(images, 32)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, TF.resize(as_float_nchw(images), [32, 32], antialias=True).clamp(0, 1))
    torch.testing.assert_close(to_float(images.permute(0, 3, 1, 2), 48), as_float_nchw(images))


def test_per_image_transform_matches_config():
    image = smooth(1, 48, 48)[0].permute(2, 0, 1)
    out = per_image_transform(AugmentConfig.moco_v2())(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() <= out.max() <= 1
    steps = per_image_transform(AugmentConfig.moco_v2()).transforms
    assert any(isinstance(s, T.RandomApply) and isinstance(s.transforms[0], T.GaussianBlur) for s in steps)
    assert not any(isinstance(s, T.RandomApply) and isinstance(s.transforms[0], T.GaussianBlur)
                   for s in per_image_transform(AugmentConfig()).transforms)
    # with all randomness off both paths are the same resize
    plain = per_image_transform(AugmentConfig(size=32, **OFF))(image)
    batched = augment(image.unsqueeze(0), AugmentConfig(size=32, **OFF))[0]
    assert (plain - batched).abs().max() < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_for_the_same_seed():
    images = noise(8)
    cfg = AugmentConfig.moco_v2()
    cpu = two_views(images, cfg, seeded(11))
    gpu = two_views(images.cuda(), cfg, seeded(11))
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda"
        torch.testing.assert_close(a, b.cpu(), rtol=0, atol=1e-4)


def test_whole_batch_selection_equals_the_subset_path(monkeypatch):
    """The accelerator path (every sample through each op, the coin picks: no host sync) gives the views the CPU
    path (only the selected samples) gives for the same seed."""
    import functools

    from raysys.data import augment as aug

    images = torch.randint(0, 256, (16, 24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig(size=16, blur_p=0.5)  # jitter, grayscale and blur all on, each for some samples
    subset = aug.two_views(images, cfg, torch.Generator().manual_seed(3))
    monkeypatch.setattr(aug, "_apply_to", functools.partial(aug._apply_to, whole_batch=True))
    whole = aug.two_views(images, cfg, torch.Generator().manual_seed(3))
    for a, b in zip(subset, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ no host syncs, half precision

# Calls that make the host wait for the device: reading a value back, or a blocking host-to-device copy
# (torch.tensor(list, device=...)); bool()/int()/float() of a tensor expression does the same implicitly.
SYNC_METHODS = {"nonzero", "item", "tolist", "cpu", "numpy", "synchronize"}
# _apply_to calls it only for CPU tensors (no device to wait for); the whole-batch test below checks that
CPU_ONLY = {"_apply_to_subset"}


def host_syncs(source: str, roots: tuple[str, ...]) -> list[str]:
    """Host-synchronising calls in the module-level functions reachable from ``roots`` in ``source`` (calls to
    other module functions followed; CPU_ONLY not): ``function:line call`` for each."""
    import ast

    functions = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    seen, todo, found = set(), list(roots), []
    while todo:
        name = todo.pop()
        if name in seen or name in CPU_ONLY or name not in functions:
            continue
        seen.add(name)
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Name):
                todo.append(node.id)  # called, or passed on (a lambda's body is walked here already)
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            tensor_arg = node.args and any(isinstance(part, ast.Subscript) or (isinstance(part, ast.Call) and isinstance(
                part.func, ast.Attribute)) for part in ast.walk(node.args[0]))  # int(x.sum()), not int(round(w / h))
            if ((isinstance(func, ast.Attribute) and func.attr in SYNC_METHODS)
                    or (isinstance(func, ast.Attribute) and func.attr == "tensor" and any(k.arg == "device" for k in node.keywords))
                    or (isinstance(func, ast.Name) and (func.id == "bool" or func.id in ("int", "float") and tensor_arg))):
                found.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    return found


def test_static_check_finds_host_syncs():
    """The scanner itself: it follows calls and flags each kind of sync (so its silence below means something)."""
    source = ("def root(x):\n    return helper(x) + int(x.sum()) + float(2 * 3) + int(round(len(x) / 2))\n"
              "def helper(x):\n    y = torch.tensor([1.0], device=x.device)\n    return x[x.nonzero()] + bool(x) + x.max().item()\n"
              "def _apply_to_subset(x):\n    return x.nonzero()\n")
    found = host_syncs(source, ("root",))
    assert [f.split(" ")[0] for f in found] == ["root:2", "helper:4", "helper:5", "helper:5", "helper:5"], found


def test_augmentation_hot_path_has_no_host_sync():
    from pathlib import Path

    from raysys.data import augment as aug

    assert host_syncs(Path(aug.__file__).read_text(), ("two_views", "augment", "to_uint8")) == []


def test_whole_batch_path_never_gathers_a_subset(monkeypatch):
    """Off CPU the optional ops run on the whole batch: the CPU-only subset path (its nonzero) is never called."""
    import functools

    from raysys.data import augment as aug

    def refuse(*_):
        raise AssertionError("the subset path (nonzero: a host sync) ran on the whole-batch path")

    monkeypatch.setattr(aug, "_apply_to_subset", refuse)
    monkeypatch.setattr(aug, "_apply_to", functools.partial(aug._apply_to, whole_batch=True))
    aug.two_views(noise(8, 24, 24), AugmentConfig(size=16, jitter_p=1.0, grayscale_p=1.0, blur_p=1.0), seeded(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_never_wait_for_the_device():
    """On CUDA, with the random stream on the device (as the worker draws it), making views does nothing that
    synchronises with the host: torch raises on any such call in sync debug mode "error"."""
    images = noise(16).cuda()
    generator = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for dtype in (torch.float32, torch.float16):
            two_views(images, AugmentConfig.moco_v2(size=32), generator, dtype=dtype)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_half_precision_views_match_float32():
    """float16 after the crop (what the worker uses on a GPU) against float32 on the same draws: every pixel within
    3 grey levels (hue rotation is the largest step), no bias in the mean beyond 0.05 grey levels, and the views'
    spread the same to within the largest pixel difference's share of it."""
    images = noise(64, 48, 48, seed=4)
    cfg = AugmentConfig.moco_v2(size=32, crop_scale=(0.08, 1.0))  # every op, blur included
    full = two_views(images, cfg, seeded(5))
    half = two_views(images, cfg, seeded(5), dtype=torch.float16)
    for a, b in zip(full, half):
        assert b.dtype == torch.float16
        diff = b.float() - a
        assert diff.abs().max() <= 3 / 255, diff.abs().max() * 255
        assert diff.mean().abs() <= 0.05 / 255, diff.mean() * 255
        assert (b.float().std() - a.std()).abs() <= diff.abs().mean(), (b.float().std(), a.std())


def test_uint8_views_round_to_the_nearest_grey_level():
    from raysys.data.augment import to_uint8

    views = torch.rand(4, 3, 8, 8, generator=seeded(2))
    views[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5 / 255 - 1e-4])
    quantized = to_uint8(views)
    assert quantized.dtype == torch.uint8 and quantized[0, 0, 0, :3].tolist() == [0, 255, 0]
    assert (quantized.float() / 255 - views).abs().max() <= 0.5 / 255 + 1e-7
