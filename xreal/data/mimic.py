"""MIMIC-CXR-JPG's tables as training-index rows: metadata, official split and CheXpert labels, joined.

Reads the three tables PhysioNet ships with MIMIC-CXR-JPG 2.0.0, from the
dataset's root folder, without opening an image:

- ``mimic-cxr-2.0.0-metadata.csv.gz``: one row per image (``dicom_id``,
  ``subject_id``, ``study_id``, ``ViewPosition``, ``Rows``, ``Columns``, ...);
- ``mimic-cxr-2.0.0-split.csv.gz``: the official ``train``/``validate``/``test``
  split per image;
- ``mimic-cxr-2.0.0-chexpert.csv.gz``: CheXpert labeler output per study
  (``subject_id``, ``study_id`` and the 14 labels).

Images live at ``files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg`` under the root (NN:
the subject id's first two digits). Labels are kept as given: 1 positive, 0
negative, -1 uncertain, blank (null) not mentioned; what a consumer does with
-1 and null is its own policy (``manifests/README.md``). Frontal views (PA,
AP) are kept by default.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from xreal.core.errors import XRealError
from xreal.core.files import ID_PATTERN, PathError, check_id, missing_csv_columns, resolve_under
from xreal.core.images import MAX_IMAGE_SIDE
from xreal.core.labels import CHEXPERT_LABELS
from xreal.data.training_index import TRAINING_INDEX_SCHEMA, declared_size

METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT_FILE = "mimic-cxr-2.0.0-chexpert.csv.gz"
FRONTAL_VIEWS = ("PA", "AP")
SPLITS = ("train", "validate", "test")
LABEL_VALUES = (1.0, 0.0, -1.0)
SOURCE = "mimic-cxr"
REPORTS_FILE = "mimic-cxr-reports.zip"  # from MIMIC-CXR 2.0.0 (the DICOM release): files/pNN/pSUBJECT/sSTUDY.txt
_SECTION = re.compile(r"^\s*([A-Z][A-Z /&-]+):", re.MULTILINE)
_NUMBER = re.compile(r"[0-9]{1,20}")  # subject and study ids: digits only, as published
_MAX_REPORT_BYTES = 1 << 20  # a radiology report is a few kB; a larger entry is not one


class MimicError(XRealError):
    """A MIMIC-CXR table that is missing or not in the published layout; the message names the file."""


@dataclass
class MimicReport:
    """What :func:`mimic_index` read, kept and dropped."""

    images: int = 0
    kept: int = 0
    other_views: dict[str, int] = field(default_factory=dict)
    without_labels: int = 0  # studies the CheXpert table does not list: all labels null
    with_text: int | None = None  # images with report text (None: no reports given)
    problems: list[str] = field(default_factory=list)  # metadata rows left out: an unusable id or size

    def to_text(self) -> str:
        views = ", ".join(f"{view or 'none'} {n}" for view, n in sorted(self.other_views.items())) or "none"
        return (
            f"{self.images} images in the metadata, {self.kept} kept; other views left out: {views}; "
            f"{self.without_labels} kept images have no CheXpert row (labels null)"
            + (f"; {self.with_text} with report text" if self.with_text is not None else "")
            + (f"; {len(self.problems)} rows left out as unusable" if self.problems else "")
        )


def check_number(value: object, what: str) -> str:
    """``value`` if it is a MIMIC subject or study id (digits only), else a :class:`PathError` naming ``what``."""
    if not _is_number(value):
        raise PathError(f"{what} {str(value)[:80]!r} is not a MIMIC-CXR id: it must be 1-20 digits")
    return value


def image_path(subject_id: str, study_id: str, dicom_id: str, suffix: str = ".jpg") -> str:
    """Where MIMIC-CXR-JPG keeps an image (MIMIC-CXR: the DICOM, ``suffix=".dcm"``), relative to its root.

    The ids are checked (digits; :data:`xreal.core.files.ID_PATTERN`), so the path cannot leave the root.
    """
    subject_id, study_id = check_number(subject_id, "subject_id"), check_number(study_id, "study_id")
    return _image_path(subject_id, study_id, check_id(dicom_id, "dicom_id"), suffix)


def _image_path(subject_id: str, study_id: str, dicom_id: str, suffix: str) -> str:
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}{suffix}"


def read_table(path: Path, columns: dict[str, pa.DataType]) -> pd.DataFrame:
    """Read the named columns of one of the published CSV tables (gzip or not), typed."""
    if not path.is_file():
        raise MimicError(f"{path}: missing; download {path.name} from PhysioNet's MIMIC-CXR-JPG 2.0.0 into this folder")
    try:
        absent = missing_csv_columns(path, columns)
        if absent:
            raise MimicError(f"{path}: no column {', '.join(absent)}")
        table = pacsv.read_csv(
            path, convert_options=pacsv.ConvertOptions(include_columns=list(columns), column_types=columns)
        )
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        raise MimicError(f"{path}: not a readable CSV table ({exc})") from None
    return table.to_pandas()


def mimic_index(
    root: str | os.PathLike[str],
    views: tuple[str, ...] | None = FRONTAL_VIEWS,
    reports: str | os.PathLike[str] | None = None,
    dicom: bool = False,
) -> tuple[pa.Table, MimicReport]:
    """Training-index rows for the MIMIC-CXR-JPG images under ``root`` (paths relative to it).

    ``views``: the ``ViewPosition`` values to keep (None: every image). ``reports``:
    ``mimic-cxr-reports.zip`` (or its folder), whose findings and impression become ``finding``.
    ``dicom``: the images are MIMIC-CXR's DICOM files (same layout, ``.dcm``), not the JPEGs.
    """
    root = Path(root)
    ids = {"dicom_id": pa.string(), "subject_id": pa.string(), "study_id": pa.string()}
    meta = read_table(
        root / METADATA_FILE, {**ids, "ViewPosition": pa.string(), "Rows": pa.string(), "Columns": pa.string()}
    )
    split = read_table(root / SPLIT_FILE, {**ids, "split": pa.string()})
    labels = read_table(
        root / CHEXPERT_FILE,
        {"subject_id": pa.string(), "study_id": pa.string()} | {label: pa.float32() for label in CHEXPERT_LABELS},
    )
    _check_unique(meta, ["dicom_id"], root / METADATA_FILE)
    _check_unique(split, ["dicom_id"], root / SPLIT_FILE)
    _check_unique(labels, ["subject_id", "study_id"], root / CHEXPERT_FILE)
    _check_values(split, "split", SPLITS, root / SPLIT_FILE)
    for label in CHEXPERT_LABELS:
        _check_values(labels, label, LABEL_VALUES, root / CHEXPERT_FILE)

    report = MimicReport(images=len(meta))
    meta = _usable_rows(meta, root / METADATA_FILE, report.problems)
    if views is not None:
        frontal = meta["ViewPosition"].isin(views)
        report.other_views = meta.loc[~frontal, "ViewPosition"].fillna("").value_counts().to_dict()
        meta = meta[frontal]
    joined = meta.merge(split, on="dicom_id", how="left", suffixes=("", "_split"), validate="one_to_one")
    unsplit = joined["split"].isna()
    if unsplit.any():
        first = joined.loc[unsplit, "dicom_id"].iloc[0]
        raise MimicError(f"{root / SPLIT_FILE}: no split for {int(unsplit.sum())} image(s), e.g. dicom_id {first}")
    moved = (joined["subject_id"] != joined["subject_id_split"]) | (joined["study_id"] != joined["study_id_split"])
    if moved.any():
        first = joined.loc[moved, "dicom_id"].iloc[0]
        raise MimicError(f"{root / SPLIT_FILE}: dicom_id {first} has another subject or study than in {METADATA_FILE}")
    joined = joined.merge(labels, on=["subject_id", "study_id"], how="left", indicator=True, validate="many_to_one")
    report.without_labels = int((joined["_merge"] == "left_only").sum())
    report.kept = len(joined)
    if reports is not None:
        studies = list(zip(joined["subject_id"], joined["study_id"], strict=True))
        texts = read_reports(reports, set(studies))
        joined["finding"] = [texts.get(key) for key in studies]
        report.with_text = int(joined["finding"].notna().sum())
    return _as_index(joined, ".dcm" if dicom else ".jpg"), report


def _as_index(frame: pd.DataFrame, suffix: str) -> pa.Table:
    n = len(frame)
    ids = zip(frame["subject_id"], frame["study_id"], frame["dicom_id"], strict=True)
    paths = [_image_path(s, t, d, suffix) for s, t, d in ids]  # ids checked by _usable_rows
    columns = {
        "image_id": pa.array(frame["dicom_id"], pa.string()),
        "image_path": pa.array(paths, pa.string()),
        "anatomy_path": pa.nulls(n, pa.string()),
        "height": pa.array(frame["Rows"], pa.int32()),
        "width": pa.array(frame["Columns"], pa.int32()),
        "view_position": pa.array(frame["ViewPosition"], pa.string()),
        "split": pa.array(frame["split"], pa.string()),
        "source": pa.array(np.full(n, SOURCE, dtype=object), pa.string()),
        "subject_id": pa.array(frame["subject_id"], pa.string()),
        **{label: pa.array(frame[label], pa.float32(), from_pandas=True) for label in CHEXPERT_LABELS},
    }
    if "finding" in frame:
        columns["finding"] = pa.array(frame["finding"], pa.string(), from_pandas=True)
    for name in TRAINING_INDEX_SCHEMA.names:
        columns.setdefault(name, pa.nulls(n, TRAINING_INDEX_SCHEMA.field(name).type))
    return pa.table(columns, schema=TRAINING_INDEX_SCHEMA)


def _usable_rows(meta: pd.DataFrame, path: Path, problems: list[str]) -> pd.DataFrame:
    """The metadata rows whose ids can be file names and whose size xreal reads; the others named in ``problems``."""
    fast = meta["dicom_id"].str.fullmatch(ID_PATTERN.pattern, na=False)  # checked at table speed ...
    for column in ("subject_id", "study_id"):
        fast &= meta[column].str.fullmatch(_NUMBER.pattern, na=False)
    sizes = {}
    for column in ("Rows", "Columns"):
        plain = meta[column].str.fullmatch(r"[1-9][0-9]{0,3}", na=False)
        sizes[column] = np.array(pc.cast(pa.array(meta[column].where(plain, None)), pa.float64()))  # writable
        fast &= plain & (sizes[column] <= MAX_IMAGE_SIDE)
    keep = fast.to_numpy(dtype=bool).copy()
    for row in np.flatnonzero(~keep):  # ... the others one by one, with a message for each refused
        dicom, subject, study, rows, columns = (
            meta[c].iloc[row] for c in ("dicom_id", "subject_id", "study_id", "Rows", "Columns")
        )
        try:
            check_id(dicom, "dicom_id")
            check_number(subject, "subject_id")
            check_number(study, "study_id")
            sizes["Rows"][row], sizes["Columns"][row] = declared_size(rows, columns, "Rows x Columns")
        except XRealError as exc:
            problems.append(f"{path}: line {row + 2}: {exc}; row left out")
            continue
        keep[row] = True
    usable = meta[keep].copy()
    for column in ("Rows", "Columns"):
        usable[column] = sizes[column][keep].astype(np.int32)
    return usable


def _check_unique(frame: pd.DataFrame, keys: list[str], path: Path) -> None:
    repeated = frame.duplicated(keys, keep=False)
    if repeated.any():
        row = int(np.flatnonzero(repeated.to_numpy())[0])
        first = ", ".join(f"{k} {frame[k].iloc[row]}" for k in keys)
        raise MimicError(f"{path}: {first} appears more than once (line {row + 2})")


def _check_values(frame: pd.DataFrame, column: str, allowed: tuple, path: Path) -> None:
    values = frame[column]
    bad = values.notna() & ~values.isin(allowed)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        expected = ", ".join(map(str, allowed)) + (" or blank" if column in CHEXPERT_LABELS else "")
        value = values.iloc[row]
        value = value.item() if hasattr(value, "item") else value
        raise MimicError(f"{path}: line {row + 2}, column {column!r}: {value!r} is not one of {expected}")


def report_text(report: str) -> str | None:
    """The FINDINGS and IMPRESSION sections of a free-text report, joined, whitespace collapsed."""
    sections, heads = {}, list(_SECTION.finditer(report))
    for head, following in zip(heads, [*heads[1:], None], strict=True):
        body = report[head.end() : following.start() if following else len(report)]
        sections[head.group(1).strip()] = " ".join(body.split())
    text = " ".join(sections[k] for k in ("FINDINGS", "IMPRESSION") if sections.get(k))
    return text or None


def read_reports(path: str | os.PathLike[str], studies: Collection[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Report text of the given (subject_id, study_id) pairs, from ``mimic-cxr-reports.zip`` or its unzipped folder.

    Pairs that are not digit ids are skipped; in a folder, a report that resolves outside it (a link) is not read.
    """
    path = Path(path)
    names = {(s, t): f"files/p{s[:2]}/p{s}/s{t}.txt" for s, t in studies if _is_number(s) and _is_number(t)}
    texts = {}
    if path.is_dir():
        for key, name in names.items():
            try:
                report = resolve_under(path, name)
            except PathError:
                continue
            if report.is_file() and report.stat().st_size <= _MAX_REPORT_BYTES:
                texts[key] = report.read_text(errors="replace")
    elif zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                present = {
                    info.filename if info.filename.startswith("files/") else info.filename.partition("/")[2]: info
                    for info in archive.infolist()
                    if info.file_size <= _MAX_REPORT_BYTES
                }
                for key, name in names.items():
                    if name in present:
                        texts[key] = archive.read(present[name]).decode(errors="replace")
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise MimicError(f"{path}: damaged zip archive ({type(exc).__name__}: {exc})") from None
    else:
        raise MimicError(f"{path}: neither {REPORTS_FILE} nor the folder it unzips into")
    return {key: text for key, raw in texts.items() if (text := report_text(raw))}


def _is_number(value: object) -> bool:
    return isinstance(value, str) and _NUMBER.fullmatch(value) is not None
