"""CheXmask anatomy masks for the images of a training index, above a quality threshold.

CheXmask publishes one CSV per source dataset. Each row holds an image id
(a column named after the source: ``dicom_id`` for MIMIC-CXR, ``image_id``
for VinDr-CXR, ...), the ``Right Lung``, ``Left Lung`` and ``Heart`` masks as
run-length encodings of a ``Height`` x ``Width`` image, and the reverse
classification accuracy estimates of the masks' Dice (``Dice RCA (Mean)``,
``Dice RCA (Max)``). The files are gigabytes of RLE text, so they are read in
blocks and only the rows of wanted images that pass the threshold are kept.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from xreal.errors import XRealError
from xreal.files import missing_csv_columns
from xreal.masks import MaskError, label_map_from_rle
from xreal.training_index import declared_size

ID_COLUMNS = {
    "mimic-cxr": "dicom_id",
    "vindr-cxr": "image_id",
    "chexpert": "Path",
    "chestx-ray8": "Image Index",
    "padchest": "ImageID",
}
MASK_COLUMNS = ("Right Lung", "Left Lung", "Heart")
DICE_COLUMNS = ("Dice RCA (Mean)", "Dice RCA (Max)")
DEFAULT_MIN_DICE = 0.7  # on Dice RCA (Mean); CheXmask's authors call masks above it good


class ChexmaskError(XRealError):
    """A CheXmask file or row that cannot be used; the message names it."""


@dataclass
class ChexmaskReport:
    rows_read: int = 0
    kept: int = 0
    below_threshold: int = 0
    without_mask: int = 0  # wanted images the file has no row for

    def to_text(self) -> str:
        return (
            f"CheXmask: {self.rows_read} rows read, {self.kept} masks kept, {self.below_threshold} below the "
            f"quality threshold, {self.without_mask} images without a mask"
        )


def read_chexmask(
    path: str | os.PathLike[str],
    image_ids: Collection[str],
    id_column: str = ID_COLUMNS["mimic-cxr"],
    min_dice: float = DEFAULT_MIN_DICE,
    dice_column: str = DICE_COLUMNS[0],
    block_size: int = 64 << 20,
) -> tuple[pd.DataFrame, ChexmaskReport]:
    """The CheXmask rows of ``image_ids`` whose ``dice_column`` is at least ``min_dice``, indexed by image id."""
    path = Path(path)
    columns = [id_column, *MASK_COLUMNS, "Height", "Width", *DICE_COLUMNS]
    if not path.is_file():
        raise ChexmaskError(f"{path}: no such CheXmask file")
    if dice_column not in DICE_COLUMNS:
        raise ChexmaskError(f"quality column {dice_column!r}: choose one of {', '.join(DICE_COLUMNS)}")
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    types = {
        id_column: pa.string(),
        **{c: pa.string() for c in MASK_COLUMNS},
        "Height": pa.string(),  # checked per row by anatomy_map: one bad size must not stop the whole file
        "Width": pa.string(),
        **{c: pa.float64() for c in DICE_COLUMNS},
    }
    try:
        missing = missing_csv_columns(path, columns)
        if missing:
            raise ChexmaskError(f"{path}: not a CheXmask table (no column {', '.join(missing)})")
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=block_size),
            convert_options=pacsv.ConvertOptions(include_columns=columns, column_types=types),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise ChexmaskError(f"{path}: cannot read ({exc})") from None
    report, parts = ChexmaskReport(), []
    try:
        for batch in reader:
            report.rows_read += batch.num_rows
            batch = batch.filter(pc.is_in(batch.column(id_column), value_set=wanted))
            good = pc.fill_null(pc.greater_equal(batch.column(dice_column), min_dice), False)
            report.below_threshold += batch.num_rows - pc.sum(good).as_py() if batch.num_rows else 0
            parts.append(batch.filter(good).to_pandas())
    except pa.ArrowException as exc:
        raise ChexmaskError(f"{path}: unreadable after {report.rows_read} rows ({exc})") from None
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    repeated = frame[id_column].duplicated()
    if repeated.any():
        raise ChexmaskError(f"{path}: image {frame.loc[repeated, id_column].iloc[0]} has more than one row")
    frame = frame.set_index(id_column)
    report.kept = len(frame)
    report.without_mask = len(wanted) - report.kept - report.below_threshold
    return frame, report


def anatomy_map(row: pd.Series, image_height: int, image_width: int, where: str) -> np.ndarray:
    """The label map of one CheXmask row, checked against the image it belongs to (its size before decoding)."""
    try:
        height, width = declared_size(row["Height"], row["Width"], f"{where}: CheXmask Height x Width")
    except XRealError as exc:
        raise ChexmaskError(f"{exc}; the mask is not decoded") from None
    if abs(height / width - image_height / image_width) > 0.02 * (image_height / image_width):
        raise ChexmaskError(
            f"{where}: CheXmask mask is {height}x{width} but the image is {image_height}x{image_width} "
            "(another shape: not this image's mask)"
        )
    try:
        return label_map_from_rle(row["Right Lung"], row["Left Lung"], row["Heart"], height, width)
    except MaskError as exc:
        raise ChexmaskError(f"{where}: CheXmask {exc}") from None
    except Exception as exc:  # untrusted RLE text: whatever else its parsing raises, this row's mask is unusable
        raise ChexmaskError(f"{where}: CheXmask RLE unusable ({type(exc).__name__}: {exc})") from None
