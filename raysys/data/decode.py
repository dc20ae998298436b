"""Decode image bytes to fixed-size RGB arrays, turning every odd input into RGB or a clear error.

Plain PIL + numpy (no Ray): the Ray Data pipeline, the evaluation's feature extraction and an exported encoder's
preprocessing (:mod:`raysys.models.export`) all call it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from raysys.errors import DecodeError

# Modes PIL uses for 16/32-bit single-channel images (16-bit PNG and TIFF rover products).
_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


# Source modes worth telling the user about: the conversion to 8-bit RGB loses information.
CONVERTED_MODES = _HIGH_BIT_MODES | {"CMYK", "RGBA", "LA", "PA"}


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _HIGH_BIT_MODES:
        # Scale the full 16-bit range to 8 bits instead of letting PIL clip at 255 (all-white images).
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 / 65535.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black so transparent regions do not take arbitrary colour values.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")  # covers L, P, CMYK, YCbCr


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode ``data`` to a ``uint8 [size, size, 3]`` RGB array (aspect not kept, as the benchmarks do).

    Raises :class:`DecodeError` with the reason for empty, truncated or non-image bytes.
    """
    return decode(data, size)[0]


def decode(data: bytes, size: int) -> tuple[np.ndarray, str]:
    """Like :func:`decode_image`, also returning the source's PIL mode (e.g. ``CMYK``, ``I;16``)."""
    if not data:
        raise DecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger than size
            img.load()  # forces a full decode so truncation is detected here, not later
            mode = img.mode
            rgb = _to_rgb(img)
    except UnidentifiedImageError:
        raise DecodeError("not an image file") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated streams, broken headers
        raise DecodeError(f"corrupt image ({exc})") from None
    return np.asarray(_resized(rgb, size), dtype=np.uint8), mode


def rgb_array(img: Image.Image, size: int) -> np.ndarray:
    """A PIL image as :func:`decode_image` turns a file into: ``uint8 [size, size, 3]`` RGB, by the same mode
    conversion and resize. A JPEG not yet loaded (as ``Image.open`` returns it) is decoded from its file, so it
    gets the reduced-scale decode too; the caller's image is left as it was."""
    if img.format == "JPEG" and img.tile and getattr(img, "filename", ""):
        with open(img.filename, "rb") as f:
            return decode_image(f.read(), size)
    return np.asarray(_resized(_to_rgb(img), size), dtype=np.uint8)


def _resized(rgb: Image.Image, size: int) -> Image.Image:
    if rgb.size == (size, size):
        return rgb
    return rgb.resize((size, size), Image.BILINEAR, reducing_gap=3.0)


def load_images(paths: list[str], size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Read and decode ``paths``.

    Returns the stacked good images, the positions in ``paths`` they came from, and ``(path, reason)``
    for each file that could not be decoded.
    """
    good, kept, bad = [], [], []
    for i, path in enumerate(paths):
        try:
            with open(path, "rb") as f:
                good.append(decode_image(f.read(), size))
            kept.append(i)
        except (DecodeError, OSError) as exc:
            bad.append((path, str(exc)))
    images = np.stack(good) if good else np.zeros((0, size, size, 3), np.uint8)
    return images, np.asarray(kept, dtype=np.int64), bad
