"""Anatomy label maps and pathology masks: file I/O, CheXmask RLE, boxes, resizing.

Two kinds of mask travel through the project:

- an *anatomy label map*: a 2-D ``uint8`` array of :class:`~xreal.core.labels.Anatomy`
  ids (0 background, 1 right lung, 2 left lung, 3 heart), stored as an 8-bit
  PNG holding the ids themselves, or as ``.npy``;
- a *pathology mask*: a 2-D ``bool`` array, stored as a PNG with two values
  (0 and 1, 255 or 65535) or as ``.npy``.

Every reader validates what it reads and raises :class:`~xreal.core.errors.MaskError`
naming the file and the problem.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from xreal.core.errors import MaskError, XRealError
from xreal.core.files import atomic_path
from xreal.core.images import MAX_IMAGE_SIDE, check_image_size, open_image
from xreal.core.labels import ANATOMY_IDS, Anatomy

Size = int | tuple[int, int]
Box = Sequence[float]
BoxUnits = Literal["pixel", "normalized"]
MASK_SUFFIXES = (".png", ".npy")


def _hw(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise MaskError(f"mask size must be positive, got {size!r}")
    return int(h), int(w)


# --- files -------------------------------------------------------------------


def read_mask_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a single-channel PNG (8 or 16 bit) or ``.npy`` file as a 2-D integer array."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MASK_SUFFIXES:
        raise MaskError(f"{path}: unsupported mask format {suffix!r}; use one of {', '.join(MASK_SUFFIXES)}")
    if not path.is_file():
        raise MaskError(f"{path}: mask file not found")
    try:
        if suffix == ".npy":
            header = np.load(path, mmap_mode="r", allow_pickle=False)  # the shape, before anything is read
            if header.ndim == 2:
                check_image_size(*header.shape, str(path))
            array = np.array(header)
        else:
            with open_image(path, "mask file") as img:
                if img.mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L"):
                    raise MaskError(f"{path}: expected a single-channel 8/16-bit PNG, got mode {img.mode!r}")
                array = np.asarray(img)
    except MaskError:
        raise
    except XRealError as exc:
        raise MaskError(str(exc)) from None
    except (OSError, ValueError, EOFError, UnidentifiedImageError) as exc:
        raise MaskError(f"{path}: unreadable mask file ({exc})") from None
    if array.ndim != 2:
        raise MaskError(f"{path}: expected a 2-D mask, got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
            raise MaskError(f"{path}: mask must hold integers, got dtype {array.dtype}")
        if not np.all(array == np.round(array)):
            raise MaskError(f"{path}: mask holds fractional values; expected integer ids or a binary mask")
        array = array.astype(np.int64)
    return array


def write_mask_file(path: str | os.PathLike[str], mask: np.ndarray) -> Path:
    """Write a label map or binary mask atomically as PNG or ``.npy`` (by suffix).

    Binary masks are written as 0/255 PNGs; integer maps keep their values
    (8-bit when they fit, else 16-bit).
    """
    path = Path(path)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MaskError(f"{path}: expected a 2-D mask, got shape {mask.shape}")
    suffix = path.suffix.lower()
    if suffix not in MASK_SUFFIXES:
        raise MaskError(f"{path}: unsupported mask format {suffix!r}; use one of {', '.join(MASK_SUFFIXES)}")
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, mask, allow_pickle=False)
        else:
            if mask.dtype == bool:
                array = mask.astype(np.uint8) * 255
            elif mask.min(initial=0) < 0 or mask.max(initial=0) > 65535:
                raise MaskError(f"{path}: values outside 0..65535 cannot be stored as PNG")
            elif mask.max(initial=0) <= 255:
                array = mask.astype(np.uint8)
            else:
                array = mask.astype(np.uint16)
            Image.fromarray(array).save(tmp, format="PNG")
    return path


# --- validation --------------------------------------------------------------


def check_label_map(label_map: np.ndarray, where: str = "label map") -> np.ndarray:
    """Validate an anatomy label map and return it as ``uint8``.

    Values must be :class:`~xreal.core.labels.Anatomy` ids, and both lungs and the
    heart must be present.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise MaskError(f"{where}: expected a 2-D label map, got shape {label_map.shape}")
    values = set(np.unique(label_map).tolist())
    unknown = sorted(values - ANATOMY_IDS)
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:8])
        raise MaskError(
            f"{where}: values {shown} are not anatomy ids; expected 0 background, 1 right lung, 2 left lung, 3 heart"
        )
    missing = [a.name.lower().replace("_", " ") for a in Anatomy if a and a not in values]
    if missing:
        raise MaskError(f"{where}: the label map has no {', no '.join(missing)}")
    return label_map.astype(np.uint8)


def check_binary_mask(mask: np.ndarray, where: str = "pathology mask") -> np.ndarray:
    """Validate a two-valued pathology mask (0 and one positive value) and return it as ``bool``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MaskError(f"{where}: expected a 2-D mask, got shape {mask.shape}")
    if mask.dtype == bool:
        binary = mask
    else:
        values = np.unique(mask)
        if len(values) > 2 or values[0] < 0 or (len(values) == 2 and values[0] != 0):
            shown = ", ".join(str(v) for v in values[:6].tolist()) + (", ..." if len(values) > 6 else "")
            raise MaskError(f"{where}: a pathology mask must be binary (0 and one positive value), found {shown}")
        binary = mask > 0
    if not binary.any():
        raise MaskError(f"{where}: the pathology mask is empty (no positive pixel)")
    return binary


def read_label_map(path: str | os.PathLike[str]) -> np.ndarray:
    """Read and validate an anatomy label map file."""
    return check_label_map(read_mask_file(path), where=str(path))


def read_binary_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read and validate a pathology mask file."""
    return check_binary_mask(read_mask_file(path), where=str(path))


# --- CheXmask run-length encoding -----------------------------------------------


_RLE_NUMBER = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only ('²'.isdigit() is True), and within int64


def _rle_runs(rle: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check an RLE string; return 0-indexed run starts and exclusive ends."""
    if height < 1 or width < 1:
        raise MaskError(f"RLE: height and width must be positive, got {height}x{width}")
    if max(height, width) > MAX_IMAGE_SIDE:
        raise MaskError(f"RLE: {height}x{width} exceeds the {MAX_IMAGE_SIDE} px per side xreal reads")
    if not isinstance(rle, str):
        raise MaskError(f"RLE: expected a string of 'start length' pairs, got {type(rle).__name__}")
    tokens = rle.split()
    if len(tokens) % 2:
        raise MaskError(f"RLE: odd number of values ({len(tokens)}); expected 'start length' pairs")
    bad = next((t for t in tokens if not _RLE_NUMBER.fullmatch(t)), None)
    if bad is not None:
        raise MaskError(f"RLE: {bad[:24]!r} is not an integer (of at most 18 digits)")
    pairs = np.array(tokens, dtype=np.int64).reshape(-1, 2)
    starts, lengths = pairs[:, 0], pairs[:, 1]
    ends = starts - 1 + lengths
    bad = np.flatnonzero((starts < 1) | (lengths < 1))
    if bad.size:
        i = int(bad[0])
        raise MaskError(f"RLE: run {i + 1} has start {starts[i]} and length {lengths[i]}; both must be >= 1")
    unsorted = np.flatnonzero(starts[1:] <= ends[:-1])
    if unsorted.size:
        i = int(unsorted[0]) + 1
        raise MaskError(f"RLE: run {i + 1} starts at {starts[i]}, before the previous run ended; runs must be sorted")
    total = height * width
    if ends.size and ends[-1] > total:
        raise MaskError(f"RLE: the last run ends at pixel {ends[-1]}, beyond the {height}x{width} image ({total})")
    return starts - 1, ends


def check_rle(rle: str, height: int, width: int) -> int:
    """Check an RLE string without decoding it; return the number of pixels it covers."""
    starts, ends = _rle_runs(rle, height, width)
    return int((ends - starts).sum())


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode a CheXmask run-length encoding into a ``(height, width)`` bool mask.

    The encoding is a space-separated list of ``start length`` pairs over the
    image flattened in row-major order, with 1-indexed starts.
    """
    starts, ends = _rle_runs(rle, height, width)
    edges = np.zeros(height * width + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    return (np.cumsum(edges[:-1]) > 0).reshape(height, width)


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D bool mask as a CheXmask run-length string (row-major, 1-indexed)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MaskError(f"RLE: expected a 2-D mask, got shape {mask.shape}")
    flat = np.concatenate([[False], mask.reshape(-1).astype(bool), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts.tolist(), ends.tolist(), strict=True))


def label_map_from_rle(right_lung: str, left_lung: str, heart: str, height: int, width: int) -> np.ndarray:
    """Combine CheXmask's three RLE columns into one label map (heart over lungs)."""
    try:
        check_image_size(height, width, "RLE anatomy")  # before the array is allocated
    except XRealError as exc:
        raise MaskError(str(exc)) from None
    label_map = np.zeros((height, width), dtype=np.uint8)
    for anatomy, rle in ((Anatomy.RIGHT_LUNG, right_lung), (Anatomy.LEFT_LUNG, left_lung), (Anatomy.HEART, heart)):
        try:
            label_map[rle_decode(rle, height, width)] = anatomy
        except MaskError as exc:
            raise MaskError(f"{anatomy.name.lower().replace('_', ' ')} {exc}") from None
    return check_label_map(label_map, where="RLE anatomy")


def rle_from_label_map(label_map: np.ndarray) -> dict[str, str | int]:
    """The CheXmask-style encoding of a label map (the heart is encoded on its own)."""
    label_map = check_label_map(label_map)
    height, width = label_map.shape
    return {
        "right_lung": rle_encode(label_map == Anatomy.RIGHT_LUNG),
        "left_lung": rle_encode(label_map == Anatomy.LEFT_LUNG),
        "heart": rle_encode(label_map == Anatomy.HEART),
        "height": height,
        "width": width,
    }


# --- boxes ---------------------------------------------------------------------


def check_box(box: Box, height: int, width: int, units: BoxUnits = "pixel", where: str = "box") -> None:
    """Raise :class:`MaskError` unless ``box = (x_min, y_min, x_max, y_max)`` is a valid box in the image."""
    if len(box) != 4:
        raise MaskError(f"{where}: expected (x_min, y_min, x_max, y_max), got {len(box)} values")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise MaskError(f"{where}: coordinates must be finite numbers, got {tuple(box)}")
    if x1 <= x0 or y1 <= y0:
        raise MaskError(f"{where}: x_max must exceed x_min and y_max exceed y_min, got {tuple(box)}")
    limit_x, limit_y = (1.0, 1.0) if units == "normalized" else (float(width), float(height))
    if x0 < 0 or y0 < 0 or x1 > limit_x or y1 > limit_y:
        extent = "[0, 1]" if units == "normalized" else f"the {width}x{height} image"
        raise MaskError(f"{where}: {tuple(box)} lies outside {extent}")


def boxes_to_mask(boxes: Iterable[Box], height: int, width: int, units: BoxUnits = "pixel") -> np.ndarray:
    """Rasterise boxes into a ``(height, width)`` bool mask.

    A pixel is inside when the box touches it, so small boxes never vanish.
    ``units="normalized"`` takes coordinates as fractions of the image width
    and height.
    """
    if units not in ("pixel", "normalized"):
        raise MaskError(f"box units must be 'pixel' or 'normalized', got {units!r}")
    mask = np.zeros((height, width), dtype=bool)
    for number, box in enumerate(boxes, 1):
        check_box(box, height, width, units, where=f"box {number}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if units == "normalized":
            x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
        c0, c1 = int(np.floor(x0)), max(int(np.ceil(x1)), int(np.floor(x0)) + 1)
        r0, r1 = int(np.floor(y0)), max(int(np.ceil(y1)), int(np.floor(y0)) + 1)
        mask[r0 : min(r1, height), c0 : min(c1, width)] = True
    return mask


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The pixel bounding box ``(x_min, y_min, x_max, y_max)`` of a mask (max exclusive), or None if empty."""
    rows = np.flatnonzero(np.any(mask, axis=1))
    cols = np.flatnonzero(np.any(mask, axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# --- resizing ------------------------------------------------------------------


def _nearest_index(source: int, target: int) -> np.ndarray:
    return np.minimum(((np.arange(target) + 0.5) * source / target).astype(np.int64), source - 1)


def resize_label_map(label_map: np.ndarray, size: Size) -> np.ndarray:
    """Resize a label map by nearest-neighbour sampling: no label is ever invented."""
    label_map = np.asarray(label_map)
    h, w = _hw(size)
    return label_map[np.ix_(_nearest_index(label_map.shape[0], h), _nearest_index(label_map.shape[1], w))]


def area_fraction(mask: np.ndarray, size: Size) -> np.ndarray:
    """Fraction of each target pixel covered by a binary mask (area resampling)."""
    h, w = _hw(size)
    image = Image.fromarray(np.asarray(mask, dtype=np.float32), mode="F")
    return np.asarray(image.resize((w, h), resample=Image.Resampling.BOX), dtype=np.float32)


def resize_mask(mask: np.ndarray, size: Size, rule: Literal["any", "majority"] = "any") -> np.ndarray:
    """Resize a binary mask, e.g. to latent size.

    ``rule="any"`` marks a target pixel when any part of it is covered, so a
    small lesion keeps a region to be generated in; ``"majority"`` needs half.
    """
    fraction = area_fraction(mask, size)
    if rule == "any":
        return fraction > 1e-6
    if rule == "majority":
        return fraction >= 0.5
    raise MaskError(f"resize rule must be 'any' or 'majority', got {rule!r}")


def soft_latent_mask(mask: np.ndarray, size: Size, soft_scale: float = 0.2) -> np.ndarray:
    """The method's soft latent mask: 1 where ``mask > 0`` (resized), ``soft_scale`` elsewhere."""
    if not 0.0 <= soft_scale <= 1.0 or not np.isfinite(soft_scale):
        raise MaskError(f"soft_scale must lie in [0, 1], got {soft_scale}")
    inside = resize_mask(np.asarray(mask) > 0, size)
    return np.where(inside, np.float32(1.0), np.float32(soft_scale))
