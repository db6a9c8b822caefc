"""CheXmask anatomy masks for the images of a training index, above a quality threshold.

CheXmask publishes one CSV per source dataset. Each row holds an image id
(a column named after the source: ``dicom_id`` for MIMIC-CXR, ``image_id``
for VinDr-CXR, ...), the ``Right Lung``, ``Left Lung`` and ``Heart`` masks as
run-length encodings of a ``Height`` x ``Width`` image, and the reverse
classification accuracy estimates of the masks' Dice (``Dice RCA (Mean)``,
``Dice RCA (Max)``), and ``Landmarks``: a printed array, one line per point,
quoted, so a value spans many lines. The files are gigabytes of RLE text, so
they are read in blocks (cut between rows, never inside a quoted value) and only
the rows of wanted images that pass the threshold are kept.
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

from xreal.core.errors import XRealError
from xreal.core.files import missing_csv_columns
from xreal.core.masks import MaskError, label_map_from_rle
from xreal.data.training_index import declared_size

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
# Read blocks: pyarrow's streaming reader reads up to 32 blocks ahead of the parse, so the block size bounds the
# memory of reading (4 MiB blocks: about 150 MiB; 64 MiB blocks took 2 GB on a 2 GB file); a block must hold a row
BLOCK_SIZE = 4 << 20
MAX_BLOCK_SIZE = 1 << 30  # no CheXmask row comes near it: rows are tens of kB


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
    block_size: int = BLOCK_SIZE,
) -> tuple[pd.DataFrame, ChexmaskReport]:
    """The CheXmask rows of ``image_ids`` whose ``dice_column`` is at least ``min_dice``, indexed by image id.

    The file is read in blocks of ``block_size`` bytes, so memory stays bounded: some 32 blocks read ahead, and the
    rows kept (their RLE text).
    Quoted values may hold newlines (CheXmask's ``Landmarks`` are printed arrays), wherever a block ends. A block
    must hold at least one whole row: a row longer than ``block_size`` makes the read start again with larger blocks
    (up to :data:`MAX_BLOCK_SIZE`).
    """
    path = Path(path)
    columns = [id_column, *MASK_COLUMNS, "Height", "Width", *DICE_COLUMNS]
    if not path.is_file():
        raise ChexmaskError(f"{path}: no such CheXmask file")
    if dice_column not in DICE_COLUMNS:
        raise ChexmaskError(f"quality column {dice_column!r}: choose one of {', '.join(DICE_COLUMNS)}")
    try:
        missing = missing_csv_columns(path, columns)
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        raise ChexmaskError(
            f"{path}: cannot read ({_short(exc)}); it must be CheXmask's CSV file as published"
        ) from None
    if missing:
        raise ChexmaskError(f"{path}: not a CheXmask table (no column {', '.join(missing)})")
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    while True:
        try:
            return _read_blocks(path, wanted, columns, id_column, min_dice, dice_column, block_size)
        except _RowTooLong as exc:
            if block_size >= MAX_BLOCK_SIZE:
                raise ChexmaskError(
                    f"{path}: the row after row {exc.rows_read} is longer than {MAX_BLOCK_SIZE >> 20} MiB, or a quote "
                    "is never closed: not a CheXmask row (CheXmask rows are tens of kB); check the file is CheXmask's "
                    "CSV as published, downloaded whole. Nothing was written."
                ) from None
            block_size = min(block_size * 8, MAX_BLOCK_SIZE)


class _RowTooLong(Exception):
    def __init__(self, rows_read: int):
        self.rows_read = rows_read


def _read_blocks(
    path: Path, wanted: pa.Array, columns: list[str], id_column: str, min_dice: float, dice_column: str, block_size: int
) -> tuple[pd.DataFrame, ChexmaskReport]:
    types = {
        id_column: pa.string(),
        **{c: pa.string() for c in MASK_COLUMNS},
        "Height": pa.string(),  # checked per row by anatomy_map: one bad size must not stop the whole file
        "Width": pa.string(),
        **{c: pa.float64() for c in DICE_COLUMNS},
    }
    report, parts, last = ChexmaskReport(), [], None
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=block_size),
            # quoted values span lines (Landmarks); the chunker then cuts blocks between rows, never inside a value
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(include_columns=columns, column_types=types),
        )
        for batch in reader:
            report.rows_read += batch.num_rows
            last = batch.column(id_column)[-1].as_py() if batch.num_rows else last
            batch = batch.filter(pc.is_in(batch.column(id_column), value_set=wanted))
            good = pc.fill_null(pc.greater_equal(batch.column(dice_column), min_dice), False)
            report.below_threshold += batch.num_rows - pc.sum(good).as_py() if batch.num_rows else 0
            parts.append(batch.filter(good).to_pandas())
    except pa.ArrowException as exc:
        if "straddl" in str(exc):  # a row longer than a block
            raise _RowTooLong(report.rows_read) from None
        raise ChexmaskError(
            f"{path}: unreadable after {report.rows_read} rows{_last(id_column, last)} ({_short(exc)}); the file may "
            "be truncated or not CheXmask's CSV as published: download it again. Nothing was written."
        ) from None
    except OSError as exc:
        raise ChexmaskError(
            f"{path}: cannot read after {report.rows_read} rows{_last(id_column, last)} ({_short(exc)})"
        ) from None
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    repeated = frame[id_column].duplicated()
    if repeated.any():
        raise ChexmaskError(f"{path}: image {frame.loc[repeated, id_column].iloc[0]} has more than one row")
    frame = frame.set_index(id_column)
    report.kept = len(frame)
    report.without_mask = len(wanted) - report.kept - report.below_threshold
    return frame, report


def _last(id_column: str, last: object) -> str:
    return f" (the last one read: {id_column} {str(last)[:80]!r})" if last is not None else ""


def _short(exc: BaseException, limit: int = 300) -> str:
    """An exception's message, cut: pyarrow quotes whole rows, and a CheXmask row is tens of kB of RLE."""
    text = str(exc)
    return text if len(text) <= limit else f"{text[:limit]}..."


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
