"""Grayscale image files: 16-bit PNG in, float32 in [0, 1] out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from xreal.errors import XRealError
from xreal.files import atomic_path


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
    try:
        with Image.open(path) as img:
            mode = img.mode
            pixels = np.asarray(img)
    except (OSError, UnidentifiedImageError) as exc:
        raise XRealError(f"{path}: unreadable image ({exc})") from None
    if pixels.ndim != 2:
        raise XRealError(f"{path}: expected a grayscale image, got mode {mode!r}")
    scale = 255.0 if pixels.dtype == np.uint8 else 65535.0
    return (pixels.astype(np.float32) / scale).clip(0.0, 1.0)
