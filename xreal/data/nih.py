"""NIH ChestX-ray14's tables as training-index rows: findings mapped to CheXpert labels, radiologists' boxes kept.

ChestX-ray14 (NIH Clinical Center, "ChestX-ray8" in CheXmask) ships, in its folder:

- ``Data_Entry_2017_v2020.csv`` (or the earlier ``Data_Entry_2017.csv``): one row
  per image, ``Image Index`` (``00000001_000.png``, the file name), ``Finding
  Labels`` (``|``-separated, or ``No Finding``), ``Follow-up #``, ``Patient ID``,
  ``Patient Age``, ``Patient Gender``, ``View Position`` (PA or AP), the original
  image's ``OriginalImage[Width``, ``Height]`` and its
  ``OriginalImagePixelSpacing[x``, ``y]`` in mm;
- ``BBox_List_2017.csv``: ``Image Index``, ``Finding Label``, ``Bbox [x``, ``y``,
  ``w``, ``h]`` in pixels of the published images, for about 1,000 images boxed by a
  board-certified radiologist (the label there is spelled ``Infiltrate``);
- ``train_val_list.txt`` and ``test_list.txt``: the official patient-wise split;
- the images, 1024 x 1024 8-bit PNGs resized from the originals, in
  ``images_001/images/`` ... ``images_012/images/`` (the Kaggle and NIH box
  layout) or in one flat ``images/`` folder.

The image id is the ``Image Index`` itself (a safe id: digits, ``_`` and ``.png``),
so rows join NIH's tables and CheXmask's ``ChestX-Ray8.csv`` as they are.

**Labels.** NIH's labels were text-mined from the reports (NLP, not read off the
images). Each finding maps to a CheXpert label (:data:`LABEL_TO_CHEXPERT`;
``manifests/README.md`` gives the reasons); a mapped label is 1 when a finding
mapped to it is listed (or boxed) and 0 otherwise, since NIH lists every finding
of its 14 it mined. ``No Finding`` is 1 for NIH's ``No Finding`` rows, else 0.
The CheXpert labels no NIH finding maps to (Enlarged Cardiomediastinum,
Fracture, Support Devices) stay null: NIH did not look for them. No hierarchy is
added: an image with Consolidation but no Infiltration has Lung Opacity 0, as NIH
labelled it.

**Splits.** ``train_val_list.txt`` becomes ``train`` and ``test_list.txt``
``test``. **Pixel spacing** is the original's, scaled to the published size
(original width and height over 1024).

torchxrayvision's ``NIH_Dataset`` reads the same tables but is not used here: it
needs the images in one flat folder (not ``images_NNN/images/``), keeps one image
per patient and ``PA`` only by default, matches labels by substring, reads its
own bundled copy of the tables unless told otherwise, drops the pixel spacing
and sizes and keeps the boxes only as masks drawn at load time. Importing it
also costs seconds and silences every warning of the process.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from xreal.core.errors import XRealError
from xreal.core.files import PathError, is_safe_id, missing_csv_columns, resolve_under
from xreal.core.labels import CHEXPERT_LABELS, NO_FINDING
from xreal.data.training_index import TRAINING_INDEX_SCHEMA

SOURCE = "chestx-ray14"
DATA_ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # the first found is read
BBOX_FILE = "BBox_List_2017.csv"
SPLIT_FILES = {"train": "train_val_list.txt", "test": "test_list.txt"}
PUBLISHED_SIDE = 1024  # every published PNG is 1024 x 1024
ENTRY_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Patient ID",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
BBOX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
# NIH ChestX-ray14 finding -> CheXpert label (manifests/README.md gives the reasons); None: no counterpart
LABEL_TO_CHEXPERT: dict[str, str | None] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Emphysema": None,
    "Fibrosis": "Pleural Other",  # the CheXpert labeler files "fibrosis" under Pleural Other
    "Hernia": None,
    "Infiltration": "Lung Opacity",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pleural_Thickening": "Pleural Other",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
NIH_NO_FINDING = "No Finding"
MAPPED = (NO_FINDING, *sorted({v for v in LABEL_TO_CHEXPERT.values() if v}))  # 0 or 1; the other labels null
_SPELLINGS = {  # how a finding may be written (case, '_' or ' ') -> NIH's name; BBox_List says "Infiltrate"
    **{" ".join(name.replace("_", " ").lower().split()): name for name in LABEL_TO_CHEXPERT},
    "infiltrate": "Infiltration",
    "no finding": NIH_NO_FINDING,
}
_SHOWN_MISSING = 3


class NihError(XRealError):
    """A ChestX-ray14 table or folder that cannot be used; the message names it and what to do."""


@dataclass
class NihReport:
    """What :func:`nih_index` read, kept and left out."""

    table: str = ""
    images: int = 0  # rows in the data entry table
    kept: int = 0
    not_in_splits: int = 0  # usable rows in none of the split lists read
    missing: int = 0  # kept rows whose PNG was not found
    boxes: int = 0
    unmapped: dict[str, int] = field(default_factory=dict)  # NIH finding without a CheXpert label -> images
    problems: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        unmapped = ", ".join(f"{k} {v}" for k, v in sorted(self.unmapped.items())) or "none"
        return (
            f"ChestX-ray14: {self.images} images in {self.table}, {self.kept} kept, {self.boxes} boxes; findings "
            f"without a CheXpert label (images): {unmapped}"
            + (f"; {self.not_in_splits} in no split list read" if self.not_in_splits else "")
            + (f"; {self.missing} listed images not found" if self.missing else "")
            + (f"; {len(self.problems)} problems (below)" if self.problems else "")
        )


def finding_name(text: object) -> str | None:
    """NIH's spelling of a finding (``Effusion``, ``Pleural_Thickening``, ``No Finding``), or None if it is none."""
    return _SPELLINGS.get(" ".join(str(text).replace("_", " ").lower().split())) if isinstance(text, str) else None


def _read_csv(path: Path, columns: Collection[str], what: str) -> pd.DataFrame:
    if not path.is_file():
        raise NihError(f"{path}: missing; {what}")
    try:
        absent = missing_csv_columns(path, columns)
        if absent:
            raise NihError(f"{path}: no column {', '.join(absent)}; it must be ChestX-ray14's table as published")
        return pd.read_csv(path, usecols=list(columns), dtype=str, keep_default_na=False, na_filter=False)
    except (pa.ArrowInvalid, ValueError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise NihError(f"{path}: not a readable CSV table ({str(exc)[:300]})") from None


def read_data_entry(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, list[str], dict[str, int]]:
    """NIH's data entry table as index columns, the rows left out (each named by line) and unmapped findings.

    Columns returned: ``image_id``, ``subject_id``, ``view_position``, ``pixel_spacing`` (of the published
    1024 x 1024 image, or None), ``line`` and the CheXpert labels (1.0, 0.0 or NaN). A row whose ``Image Index``
    cannot be a file name, whose findings are not NIH's, or that repeats an image is left out.
    """
    path = Path(path)
    frame = _read_csv(path, ENTRY_COLUMNS, "it comes with ChestX-ray14 (Data_Entry_2017_v2020.csv)")
    problems: list[str] = []
    bad = np.zeros(len(frame), dtype=bool)

    def refuse(rows, why) -> None:
        for row in np.flatnonzero(rows & ~bad):
            problems.append(f"{path}: line {row + 2}: {why(row)}; row left out")
        bad[np.asarray(rows)] = True

    ids = frame["Image Index"].str.strip()
    refuse(~ids.map(is_safe_id).to_numpy(dtype=bool), lambda r: f"Image Index {ids.iloc[r][:80]!r} is not a usable id")
    refuse(ids.duplicated().to_numpy(), lambda r: f"image {ids.iloc[r]} listed again")
    findings = frame["Finding Labels"].str.split("|").explode()
    names = findings.map(finding_name)
    unknown = names.isna().groupby(level=0).any().to_numpy()
    refuse(
        unknown, lambda r: f"Finding Labels {frame['Finding Labels'].iloc[r][:120]!r} holds a finding NIH does not use"
    )
    healthy = names.eq(NIH_NO_FINDING)
    mixed = (healthy.groupby(level=0).any() & ~healthy.groupby(level=0).all()).to_numpy()
    refuse(
        mixed, lambda r: f"Finding Labels {frame['Finding Labels'].iloc[r][:120]!r} combine No Finding with findings"
    )
    present = pd.crosstab(names.index, names).reindex(index=frame.index, fill_value=0) > 0
    labels = {label: np.full(len(frame), np.nan, dtype=np.float32) for label in CHEXPERT_LABELS}
    for label in MAPPED:
        sources = [n for n, mapped in LABEL_TO_CHEXPERT.items() if mapped == label] or [NIH_NO_FINDING]
        columns = [n for n in sources if n in present.columns]
        labels[label] = (
            present[columns].any(axis=1).to_numpy(dtype=np.float32) if columns else np.zeros(len(frame), np.float32)
        )
    unmapped = {n: int(present.loc[~bad, n].sum()) for n, m in LABEL_TO_CHEXPERT.items() if m is None and n in present}
    keep = ~bad
    out = pd.DataFrame(
        {
            "image_id": ids.to_numpy(),
            "subject_id": _text(frame["Patient ID"]),
            "view_position": _text(frame["View Position"]),
            "pixel_spacing": _spacing(frame),
            "line": np.arange(len(frame)) + 2,
            **labels,
        }
    )[keep]
    return out.reset_index(drop=True), problems, {k: v for k, v in unmapped.items() if v}


def _or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None  # pandas may turn a None among strings into NaN


def _text(column: pd.Series) -> np.ndarray:
    """Stripped values, None for blank."""
    return np.array([value or None for value in column.str.strip()], dtype=object)


def _spacing(frame: pd.DataFrame) -> list[list[float] | None]:
    """mm between rows and between columns of the published image: the original's, times original size / 1024."""
    number = {c: pd.to_numeric(frame[c].str.strip(), errors="coerce").to_numpy(dtype=float) for c in ENTRY_COLUMNS[4:]}
    rows = number["y]"] * number["Height]"] / PUBLISHED_SIDE
    columns = number["OriginalImagePixelSpacing[x"] * number["OriginalImage[Width"] / PUBLISHED_SIDE
    usable = np.isfinite(rows) & np.isfinite(columns) & (rows > 0) & (columns > 0)
    return [[float(r), float(c)] if ok else None for r, c, ok in zip(rows, columns, usable, strict=True)]


def read_bbox_list(path: str | os.PathLike[str]) -> tuple[dict[str, list[dict]], list[str]]:
    """NIH's box table: each image's boxes (CheXpert labels; pixels of the 1024 x 1024 image, max exclusive).

    A box whose label is not NIH's, or whose numbers are not a box inside the image, is named by line and left out.
    """
    path = Path(path)
    frame = _read_csv(path, BBOX_COLUMNS, f"it comes with ChestX-ray14 ({BBOX_FILE})")
    boxes: dict[str, list[dict]] = {}
    problems = []
    xywh = np.stack([pd.to_numeric(frame[c].str.strip(), errors="coerce").to_numpy(float) for c in BBOX_COLUMNS[2:]])
    for row, (image_id, finding) in enumerate(
        zip(frame["Image Index"].str.strip(), frame["Finding Label"], strict=True)
    ):
        x, y, w, h = (float(v) for v in xywh[:, row])
        name = finding_name(finding)
        where = f"{path}: line {row + 2}"
        inside = np.isfinite(xywh[:, row]).all() and w > 0 and h > 0 and x < PUBLISHED_SIDE and y < PUBLISHED_SIDE
        if name is None or name == NIH_NO_FINDING:
            problems.append(f"{where}: Finding Label {str(finding)[:40]!r} is not an NIH finding; box left out")
        elif not (inside and x + w > 0 and y + h > 0):
            problems.append(f"{where}: box x, y, w, h {[x, y, w, h]} is empty, incomplete or outside; box left out")
        elif not is_safe_id(image_id):
            problems.append(f"{where}: Image Index {image_id[:80]!r} is not a usable id; box left out")
        elif (label := LABEL_TO_CHEXPERT[name]) is not None:
            box = {
                "label": label,
                "x_min": max(0.0, x),
                "y_min": max(0.0, y),
                "x_max": min(x + w, float(PUBLISHED_SIDE)),
                "y_max": min(y + h, float(PUBLISHED_SIDE)),
            }
            boxes.setdefault(image_id, []).append(box)
    return boxes, problems


def read_split_list(path: str | os.PathLike[str]) -> set[str]:
    """The image names of one of NIH's split lists (one a line)."""
    path = Path(path)
    if not path.is_file():
        raise NihError(
            f"{path}: missing; it comes with ChestX-ray14 next to the data entry table (train_val_list.txt, "
            "test_list.txt), or leave that split out with --split"
        )
    try:
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as exc:
        raise NihError(f"{path}: unreadable ({exc})") from None


def find_images(root: Path, names: Collection[str]) -> tuple[dict[str, str], list[str]]:
    """Where each of ``names`` lies under ``root`` (``images*/images/NAME`` or ``images*/NAME``), and problems.

    A name found in two folders is taken from the first; a folder that links out of ``root`` is not read.
    """
    wanted, found, problems = set(names), {}, []
    for folder in sorted(p for p in root.iterdir() if p.name.startswith("images") and p.is_dir()):
        inner = folder / "images" if (folder / "images").is_dir() else folder
        base = inner.relative_to(root).as_posix()
        try:
            resolve_under(root, base)  # a folder linked from outside ROOT is not read
        except PathError as exc:
            problems.append(f"{base}/: {exc}; its images are left out")
            continue
        with os.scandir(inner) as entries:
            for entry in entries:
                if entry.name in wanted:
                    if entry.name in found:
                        problems.append(f"{entry.name}: in {found[entry.name]} and {base}/; the first is used")
                    else:
                        found[entry.name] = f"{base}/{entry.name}"
    return found, problems


def nih_index(root: str | os.PathLike[str], splits: Collection[str] = ("train", "test")) -> tuple[pa.Table, NihReport]:
    """Training-index rows for the ChestX-ray14 images under ``root`` (image paths relative to it).

    ``splits``: ``train`` (``train_val_list.txt``) and ``test`` (``test_list.txt``). A bad row is reported and left
    out; listed images that are not found are counted and named by example. None left at all raises
    :class:`NihError`; so does a missing data entry table or split list.
    """
    root = Path(root)
    unknown = sorted(set(splits) - set(SPLIT_FILES))
    if unknown:
        raise NihError(f"split {', '.join(unknown)}: ChestX-ray14's are {', '.join(SPLIT_FILES)}")
    entry = next((root / n for n in DATA_ENTRY_FILES if (root / n).is_file()), None)
    if entry is None:
        raise NihError(
            f"{root}: no {' or '.join(DATA_ENTRY_FILES)}; ROOT must be the ChestX-ray14 folder as downloaded, "
            f"holding the data entry table, {', '.join(SPLIT_FILES.values())}, {BBOX_FILE} and the images*/ folders"
        )
    frame, problems, unmapped = read_data_entry(entry)
    report = NihReport(table=str(entry), images=len(frame) + len(problems), problems=problems)
    split_of: dict[str, str | None] = {}
    for split in splits:
        listed = read_split_list(root / SPLIT_FILES[split])
        for name in sorted(listed & split_of.keys()):
            report.problems.append(
                f"{name}: listed in {SPLIT_FILES[split_of[name]]} and {SPLIT_FILES[split]}; left out"
            )
            split_of[name] = None
        split_of.update({name: split for name in listed if name not in split_of})
    frame["split"] = frame["image_id"].map(split_of)
    report.not_in_splits = int(frame["split"].isna().sum())
    frame = frame[frame["split"].notna()]
    boxes: dict[str, list[dict]] = {}
    if (root / BBOX_FILE).is_file():
        boxes, box_problems = read_bbox_list(root / BBOX_FILE)
        report.problems += box_problems
    else:
        report.problems.append(f"{root / BBOX_FILE}: missing (it comes with ChestX-ray14); no boxes")
    found, folder_problems = find_images(root, frame["image_id"])
    report.problems += folder_problems
    rows, missing = [], []
    for record in frame.to_dict("records"):
        if record["image_id"] not in found:
            missing.append(record["image_id"])
            continue
        rows.append(_row(record, found[record["image_id"]], boxes.get(record["image_id"], [])))
    report.kept, report.missing = len(rows), len(missing)
    report.boxes = sum(len(r["boxes"]) for r in rows)
    report.unmapped = unmapped
    if missing:
        shown = ", ".join(missing[:_SHOWN_MISSING]) + (", ..." if len(missing) > _SHOWN_MISSING else "")
        report.problems.insert(0, f"{len(missing)} listed images not found under {root}/images*/ ({shown}); left out")
    if not rows:
        raise NihError(_nothing_usable(root, entry, splits, len(frame), report))
    return pa.Table.from_pylist(rows, schema=TRAINING_INDEX_SCHEMA), report


def _row(record: dict, image_path: str, boxes: list[dict]) -> dict:
    labels = {label: None if np.isnan(record[label]) else float(record[label]) for label in CHEXPERT_LABELS}
    for box in boxes:  # a radiologist's box is a finding, listed or not
        labels[box["label"]] = 1.0
        labels[NO_FINDING] = 0.0
    return {
        "image_id": record["image_id"],
        "image_path": image_path,
        "height": PUBLISHED_SIDE,
        "width": PUBLISHED_SIDE,
        "view_position": _or_none(record["view_position"]),
        "split": record["split"],
        "source": SOURCE,
        "subject_id": _or_none(record["subject_id"]),
        **labels,
        "boxes": boxes,
        "pixel_spacing": record["pixel_spacing"] if isinstance(record["pixel_spacing"], list) else None,
        "annotation": "readers" if boxes else None,  # one radiologist's own boxes
    }


def _nothing_usable(root: Path, entry: Path, splits: Collection[str], listed: int, report: NihReport) -> str:
    lists = ", ".join(SPLIT_FILES[s] for s in splits)
    if not listed:
        why = f"{entry} and {lists} list no usable image in common" + (
            f" (e.g. {report.problems[0]})" if report.problems else ""
        )
    else:
        why = f"none of the {listed} images the tables list was found under {root}/images*/"
    return (
        f"{why}; ROOT must be the ChestX-ray14 folder as downloaded, with the image archives unpacked into "
        "images_001/images/ ... images_012/images/ (or one images/ folder). Nothing was written."
    )
