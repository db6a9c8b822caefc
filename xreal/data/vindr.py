"""VinDr-CXR's box annotations as training-index rows: classes mapped to CheXpert, readers merged per image.

VinDr-CXR ships DICOM images (``train/<image_id>.dicom``, ``test/<image_id>.dicom``)
and box tables (``annotations/annotations_train.csv``, ``annotations_test.csv``)
with one row per box: ``image_id``, ``class_name``, ``x_min``, ``y_min``,
``x_max``, ``y_max`` in pixels of the DICOM image (blank for "No finding").
Three radiologists read each training image, and the training table names the
reader of each box (``rad_id``); the test images' boxes are the consensus of
five radiologists, so the test table has no ``rad_id``. Each row of the
training index records which it holds in ``annotation``: ``readers`` or
``consensus``.

Merging: a label is positive (1) when any reader boxed a class that maps to it
and negative (0) otherwise (VinDr's readers marked every finding they saw);
every reader's box is kept. ``No Finding`` is 1 only when no reader marked
anything. Classes without a CheXpert counterpart are left out and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from xreal.core.errors import XRealError
from xreal.core.files import PathError, check_id, is_safe_id, resolve_under
from xreal.core.labels import CHEXPERT_LABELS
from xreal.data.dicom import DicomHeader, read_dicom_header
from xreal.data.training_index import TRAINING_INDEX_SCHEMA

SOURCE = "vindr-cxr"
NO_FINDING = "No finding"
# VinDr-CXR class -> CheXpert label (manifests/README.md documents it); None: no counterpart, left out
CLASS_TO_CHEXPERT: dict[str, str | None] = {
    "Aortic enlargement": "Enlarged Cardiomediastinum",
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Infiltration": "Lung Opacity",
    "Lung Opacity": "Lung Opacity",
    "ILD": "Lung Opacity",
    "Pulmonary fibrosis": "Pleural Other",  # as the CheXpert labeler files "fibrosis" (and NIH's Fibrosis here)
    "Nodule/Mass": "Lung Lesion",
    "Lung cavity": "Lung Lesion",
    "Lung cyst": "Lung Lesion",
    "Pleural effusion": "Pleural Effusion",
    "Pleural thickening": "Pleural Other",
    "Pneumothorax": "Pneumothorax",
    "Rib fracture": "Fracture",
    "Clavicle fracture": "Fracture",
    "Calcification": None,
    "Other lesion": None,
    "Emphysema": None,
    "Enlarged PA": None,
    "Mediastinal shift": None,
}
BOX_COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")  # every table has them
READER_COLUMN = "rad_id"  # the training table's: one row per reader and box; without it, the boxes are a consensus
SPLITS = {"train": "annotations_train.csv", "test": "annotations_test.csv"}


class VindrError(XRealError):
    """A VinDr-CXR table or image that cannot be used; the message names it."""


@dataclass
class VindrReport:
    images: int = 0
    boxes: int = 0
    unmapped: dict[str, int] = field(default_factory=dict)  # class -> boxes left out
    problems: list[str] = field(default_factory=list)
    missing: int = 0  # listed images without a DICOM file

    def to_text(self) -> str:
        unmapped = ", ".join(f"{k} {v}" for k, v in sorted(self.unmapped.items())) or "none"
        return (
            f"VinDr-CXR: {self.images} images, {self.boxes} boxes mapped to CheXpert labels; "
            f"classes without a CheXpert label left out: {unmapped}; {len(self.problems)} images unusable"
        )


def read_boxes(path: str | os.PathLike[str]) -> pd.DataFrame:
    """One of VinDr-CXR's annotation tables, checked: known classes, boxes inside out of order or not.

    The per-reader table (training) has a ``rad_id`` column, the consensus table (test) has none; see
    :func:`annotation_of`.
    """
    path = Path(path)
    if not path.is_file():
        raise VindrError(f"{path}: missing; it comes with VinDr-CXR (annotations/)")
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, READER_COLUMN: str, "class_name": str})
    except (ValueError, OSError) as exc:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise VindrError(f"{path}: not a readable CSV table ({exc}); it comes with VinDr-CXR (annotations/)") from None
    absent = [c for c in BOX_COLUMNS if c not in frame.columns]
    if absent:
        raise VindrError(
            f"{path}: no column {', '.join(absent)} (columns: {', '.join(map(str, frame.columns))}); it must be "
            "VinDr-CXR's annotation table as published"
        )
    unknown = ~frame["class_name"].isin([*CLASS_TO_CHEXPERT, NO_FINDING])
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise VindrError(f"{path}: line {row + 2}: class {frame['class_name'].iloc[row]!r} is not a VinDr-CXR class")
    boxed = frame["class_name"] != NO_FINDING
    coords = frame.loc[boxed, ["x_min", "y_min", "x_max", "y_max"]]
    bad = coords.isna().any(axis=1) | (coords["x_max"] <= coords["x_min"]) | (coords["y_max"] <= coords["y_min"])
    if bad.any():
        row = int(bad[bad].index[0])
        raise VindrError(f"{path}: line {row + 2}: box {coords.loc[row].tolist()} is empty or incomplete")
    return frame


def annotation_of(frame: pd.DataFrame) -> str:
    """``readers`` for a table of each reader's boxes (it names them: ``rad_id``), else ``consensus``."""
    return "readers" if READER_COLUMN in frame.columns else "consensus"


def vindr_index(
    root: str | os.PathLike[str], splits: tuple[str, ...] = ("train", "test")
) -> tuple[pa.Table, VindrReport]:
    """Training-index rows for VinDr-CXR under ``root`` (image paths relative to it; boxes in DICOM pixels).

    An image whose id cannot be a file name, or whose DICOM is missing, unreadable or of a size xreal does not
    read, is reported and left out; none usable at all raises :class:`VindrError`.
    """
    root = Path(root)
    report, rows, listed = VindrReport(), [], 0
    for split in splits:
        path = root / "annotations" / SPLITS[split]
        frame = read_boxes(path)
        annotation = annotation_of(frame)
        usable = frame["image_id"].map(is_safe_id).astype(bool)
        for line, image_id in _first_lines(frame.loc[~usable, "image_id"]):
            try:
                check_id(image_id, "image_id")
            except PathError as exc:
                report.problems.append(f"{path}: line {line}: {exc}; left out")
        for image_id, boxes in frame[usable].groupby("image_id", sort=True):
            listed += 1
            rel = f"{split}/{image_id}.dicom"
            try:
                dicom = resolve_under(root, rel)
                if not dicom.is_file():
                    report.missing += 1
                    raise VindrError(f"{dicom}: unreadable (no such DICOM file)")
                header = read_dicom_header(dicom)
            except XRealError as exc:
                report.problems.append(f"{image_id}: {exc}")
                continue
            rows.append(_merged_row(image_id, rel, split, header, boxes, report) | {"annotation": annotation})
    report.images = len(rows)
    if not rows:
        raise VindrError(_nothing_usable(root, splits, listed, report))
    return _as_table(rows), report


def _first_lines(ids: pd.Series) -> list[tuple[int, object]]:
    """(line in the CSV file, id) of the first row of each distinct id."""
    seen, found = set(), []
    for row, image_id in ids.items():
        key = repr(image_id)
        if key not in seen:
            seen.add(key)
            found.append((int(row) + 2, image_id))
    return found


def _nothing_usable(root: Path, splits: tuple[str, ...], listed: int, report: VindrReport) -> str:
    folders = " and ".join(str(root / split) for split in splits)
    tables = ", ".join(str(root / "annotations" / SPLITS[split]) for split in splits)
    if not listed:
        why = f"{tables} list no image with a usable id" + (f" (e.g. {report.problems[0]})" if report.problems else "")
    elif report.missing == listed:
        why = f"none of the {listed} images the annotation tables list was found under {folders}"
    else:
        why = f"none of the {listed} images the annotation tables list could be read, e.g. {report.problems[0]}"
    return (
        f"{why}; ROOT must be the VinDr-CXR folder, holding annotations/, train/ and test/ with the .dicom files "
        "as published. Nothing was written."
    )


def _merged_row(image_id, rel, split, header: DicomHeader, boxes, report) -> dict:
    height, width = header.rows, header.columns
    labels = dict.fromkeys(CHEXPERT_LABELS, 0.0)
    kept = []
    for box in boxes.itertuples(index=False):
        if box.class_name == NO_FINDING:
            continue
        label = CLASS_TO_CHEXPERT[box.class_name]
        if label is None:
            report.unmapped[box.class_name] = report.unmapped.get(box.class_name, 0) + 1
            continue
        labels[label] = 1.0
        x0, y0 = max(0.0, float(box.x_min)), max(0.0, float(box.y_min))
        kept.append(
            {
                "label": label,
                "x_min": x0,
                "y_min": y0,
                "x_max": min(float(box.x_max), width),
                "y_max": min(float(box.y_max), height),
            }
        )
    labels["No Finding"] = float((boxes["class_name"] == NO_FINDING).all())
    report.boxes += len(kept)
    return {
        "image_id": image_id,
        "image_path": rel,
        "height": height,
        "width": width,
        "view_position": header.view_position,
        "split": split,
        "source": SOURCE,
        "subject_id": image_id,  # VinDr-CXR publishes no patient ids
        **labels,
        "boxes": kept,
    }


def _as_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TRAINING_INDEX_SCHEMA)  # absent keys are null
