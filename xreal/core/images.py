"""Grayscale image files: 16-bit PNG in, float32 in [0, 1] out; image sizes bounded before anything is decoded."""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from xreal.core.errors import XRealError
from xreal.core.files import atomic_path

# The largest image side xreal reads or allocates (declared sizes in manifests, tables and file headers included):
# above any chest radiograph detector (about 4,300 px), far below what would exhaust memory.
MAX_IMAGE_SIDE = 8192


def check_image_size(height: int, width: int, where: str) -> None:
    """Refuse a declared image size that is not positive or exceeds :data:`MAX_IMAGE_SIDE`, naming ``where``."""
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (height, width)):
        raise XRealError(f"{where}: image size {height!r}x{width!r} is not a pair of whole numbers")
    if height < 1 or width < 1:
        raise XRealError(f"{where}: image size {height}x{width} is not positive")
    if height > MAX_IMAGE_SIDE or width > MAX_IMAGE_SIDE:
        raise XRealError(
            f"{where}: image size {height}x{width} exceeds the {MAX_IMAGE_SIDE} px per side xreal reads; "
            "resize it first (or the size is wrong)"
        )


@contextlib.contextmanager
def open_image(path: str | os.PathLike[str], what: str = "image") -> Iterator[Image.Image]:
    """Open an image file with PIL, its header's size checked before any pixel is decoded.

    A file PIL cannot parse, one that claims a huge size (a decompression bomb)
    or a truncated one raises :class:`XRealError` naming the file.
    """
    try:
        with Image.open(path) as img:
            check_image_size(img.height, img.width, f"{path}: {what}")
            yield img
    except XRealError:
        raise
    except Image.DecompressionBombError as exc:
        raise XRealError(
            f"{path}: {what} claims more pixels than xreal reads, {MAX_IMAGE_SIDE} px per side ({exc})"
        ) from None
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as exc:
        raise XRealError(f"{path}: unreadable {what} ({type(exc).__name__}: {exc})") from None


def to_uint16(image: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] (clipped) as the 16-bit values xreal stores."""
    return np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)


def write_png16(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a 2-D float image in [0, 1] as a 16-bit grayscale PNG, atomically."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise XRealError(f"{path}: expected a 2-D grayscale image, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise XRealError(f"{path}: image holds NaN or infinite values")
    pixels = to_uint16(image)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return Path(path)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an 8- or 16-bit grayscale PNG/JPEG as float32 in [0, 1]."""
    with open_image(path) as img:
        mode = img.mode
        pixels = np.asarray(img)
    if pixels.ndim != 2:
        raise XRealError(f"{path}: expected a grayscale image, got mode {mode!r}")
    scale = 255.0 if pixels.dtype == np.uint8 else 65535.0
    return (pixels.astype(np.float32) / scale).clip(0.0, 1.0)
