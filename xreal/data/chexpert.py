"""CheXpert's label tables as training-index rows, and CheXmask's CheXpert masks joined to them.

CheXpert-v1.0 (and its small-image variant CheXpert-v1.0-small) ships, in its
folder, ``train.csv`` and ``valid.csv``: one row per image with ``Path``
(``CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg``, relative to the
folder *above* the dataset's; ``CheXpert-v1.0-small/...`` in the small variant),
``Sex``, ``Age``, ``Frontal/Lateral``, ``AP/PA`` and the 14 CheXpert labels.
The tables give no image size, so each kept image's JPEG header is read (not
its pixels).

- **Labels are kept as given**, as for MIMIC-CXR: 1 positive, 0 negative, -1
  uncertain, blank (null) not mentioned. ``valid.csv`` holds three radiologists'
  majority vote (0 or 1) rather than the labeler's output.
- **Views**: ``view_position`` is the ``AP/PA`` value of a frontal image (``AP``,
  ``PA``, rarely ``LL`` or ``RL``) and ``LATERAL`` for a lateral one; frontal
  ``PA`` and ``AP`` are kept by default.
- **Splits**: ``train`` stays ``train``, ``valid`` becomes ``validate`` (the
  index's vocabulary; CheXpert's patients do not cross them).
- **Ids**: ``Path`` holds slashes, so the image id is made from it
  (``patient00001_study1_view1_frontal``, unique and stable) and the subject id
  is the patient (``patient00001``).

CheXmask's ``CheXpert.csv`` names images by ``Path`` too, with or without the
dataset folder in front, computed on the original (full-size) images:
:func:`read_chexpert_masks` matches them by the part from ``train/`` or
``valid/`` on, so the small variant joins as well. Its masks are in the
original image's ``Height`` x ``Width``; the small images keep the aspect ratio,
which is what :func:`xreal.data.chexmask.anatomy_map` checks, and the mask is decoded
at its own size and resized to the training size like the image.

torchxrayvision's ``CheX_Dataset`` reads the same tables but is not used here:
it changes the labels (-1 becomes NaN, and every pathology of a ``No Finding``
image is set to 0), drops ``No Finding``, keeps one image per patient and ``PA``
only by default, strips the path prefix without checking the rest, and raises
unless the table's file name contains ``train`` or ``valid``. Importing it also
costs seconds and silences every warning of the process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from xreal.core.errors import XRealError
from xreal.core.files import PathError, missing_csv_columns, resolve_under
from xreal.core.images import open_image
from xreal.core.labels import CHEXPERT_LABELS
from xreal.data.chexmask import ID_COLUMNS, ChexmaskError, ChexmaskReport, read_chexmask
from xreal.data.training_index import TRAINING_INDEX_SCHEMA

SOURCE = "chexpert"
DATASET_FOLDERS = ("CheXpert-v1.0", "CheXpert-v1.0-small")
TABLES = {"train": "train.csv", "valid": "valid.csv"}
SPLITS = {"train": "train", "valid": "validate"}  # CheXpert's split -> the training index's
FRONTAL_VIEWS = ("PA", "AP")
LATERAL = "LATERAL"
LABEL_VALUES = (1.0, 0.0, -1.0)
COLUMNS = ("Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS)  # what is read; Sex and Age are not used
CHEXMASK_PREFIXES = ("", "/", *(f"{folder}/" for folder in DATASET_FOLDERS))  # how CheXmask's Path may start
_PATH = re.compile(
    r"(?:(?P<top>[A-Za-z0-9][A-Za-z0-9._-]{0,63})/)?"
    r"(?P<tail>(?P<split>train|valid)/(?P<patient>patient[0-9]{1,12})/(?P<study>study[0-9]{1,12})/"
    r"(?P<view>view[0-9]{1,12}_(?:frontal|lateral))\.jpg)"
)
_TAIL = re.compile(
    r"(?:^|/)((?:train|valid)/patient[0-9]{1,12}/study[0-9]{1,12}/view[0-9]{1,12}_(?:frontal|lateral)\.jpg)$"
)
_SHOWN_MISSING = 3


class ChexpertError(XRealError):
    """A CheXpert table or folder that cannot be used; the message names it and what to do."""


@dataclass
class ChexpertReport:
    """What :func:`chexpert_index` read, kept and left out."""

    images: int = 0  # rows in the tables read
    kept: int = 0
    other_views: dict[str, int] = field(default_factory=dict)
    missing: int = 0  # kept rows whose JPEG is not there
    problems: list[str] = field(default_factory=list)  # rows or images left out, each named

    def to_text(self) -> str:
        views = ", ".join(f"{view or 'none'} {n}" for view, n in sorted(self.other_views.items())) or "none"
        return (
            f"CheXpert: {self.images} images in the tables, {self.kept} kept; other views left out: {views}"
            + (f"; {self.missing} listed images not found" if self.missing else "")
            + (f"; {len(self.problems)} problems (below)" if self.problems else "")
        )


def dataset_folder(root: str | os.PathLike[str]) -> tuple[Path, str]:
    """The CheXpert folder (holding ``train.csv``, ``valid.csv``) and its path relative to ``root``.

    ``root`` may be that folder or the folder above it (which the tables' ``Path`` values are relative to).
    """
    root = Path(root)
    if any((root / name).is_file() for name in TABLES.values()):
        return root, ""
    found = [name for name in DATASET_FOLDERS if any((root / name / t).is_file() for t in TABLES.values())]
    if len(found) == 1:
        return root / found[0], f"{found[0]}/"
    if found:
        raise ChexpertError(
            f"{root}: holds both {' and '.join(found)}; give the one to ingest as ROOT (e.g. {root / found[0]})"
        )
    raise ChexpertError(
        f"{root}: no train.csv or valid.csv here or in {' or '.join(DATASET_FOLDERS)}/; ROOT must be the "
        "CheXpert-v1.0 (or CheXpert-v1.0-small) folder as unzipped, holding train.csv, valid.csv, train/ and valid/"
    )


def read_chexpert_table(path: str | os.PathLike[str], split: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One of CheXpert's tables as index columns (labels as given), and the rows left out, each named by line.

    ``split``: the split the table is (``train`` or ``valid``); a row whose ``Path`` lies in another is left out.
    The columns returned: ``image_id``, ``rel`` (the path from ``train/`` or ``valid/`` on), ``subject_id``,
    ``view_position``, ``split`` (the index's name) and the 14 labels (float32; NaN for blank).
    """
    path = Path(path)
    if not path.is_file():
        raise ChexpertError(
            f"{path}: missing; it comes with CheXpert-v1.0 (train.csv, valid.csv in the dataset folder)"
            + (f", or leave that split out (--split {'valid' if split == 'train' else 'train'})" if split else "")
        )
    try:
        absent = missing_csv_columns(path, COLUMNS)
        if absent:
            raise ChexpertError(f"{path}: no column {', '.join(absent)}; it must be CheXpert's table as published")
        frame = pd.read_csv(path, usecols=list(COLUMNS), dtype=str, keep_default_na=False, na_filter=False)
    except (pa.ArrowInvalid, ValueError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise ChexpertError(f"{path}: not a readable CSV table ({str(exc)[:300]})") from None
    labels = {label: _label_values(frame[label], label, path) for label in CHEXPERT_LABELS}
    groups = frame["Path"].str.strip().str.extract(f"^{_PATH.pattern}$")  # NaN where the whole value does not match
    matched = groups["tail"].notna().to_numpy()
    usable = matched & (groups["split"].eq(split).to_numpy() if split else True)
    problems = []
    for row in np.flatnonzero(~usable):
        value = str(frame["Path"].iloc[row])[:120]
        why = (
            f"lies in {groups['split'].iloc[row]}/, not in this table's {split}/"
            if matched[row]
            else "is not a CheXpert image path (train|valid/patientN/studyN/viewN_frontal|lateral.jpg)"
        )
        problems.append(f"{path}: line {row + 2}: Path {value!r} {why}; row left out")
    groups, frame = groups[usable], frame[usable]
    frontal = frame["Frontal/Lateral"].str.strip()
    view = np.where(
        frontal.eq("Frontal"), frame["AP/PA"].str.strip(), np.where(frontal.eq("Lateral"), LATERAL, "")
    ).astype(object)
    view[view == ""] = None
    out = pd.DataFrame(
        {
            "image_id": (groups["patient"] + "_" + groups["study"] + "_" + groups["view"]).to_numpy(),
            "rel": groups["tail"].to_numpy(),
            "subject_id": groups["patient"].to_numpy(),
            "view_position": view,
            "split": groups["split"].map(SPLITS).to_numpy(),
            "line": np.flatnonzero(usable) + 2,
            **{label: values[usable] for label, values in labels.items()},
        }
    )
    return out, problems


def _label_values(column: pd.Series, label: str, path: Path) -> np.ndarray:
    """A label column as float32 (NaN for blank); any other value than 1, 0, -1 or blank stops, naming the line."""
    text = column.str.strip()
    values = pd.to_numeric(text, errors="coerce")
    bad = (text != "") & ~values.isin(LABEL_VALUES)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ChexpertError(
            f"{path}: line {row + 2}, column {label!r}: {text.iloc[row][:40]!r} is not one of 1.0, 0.0, -1.0 or "
            "blank; it must be CheXpert's table as published"
        )
    return values.to_numpy(dtype=np.float32)


def chexpert_index(
    root: str | os.PathLike[str],
    views: Collection[str] | None = FRONTAL_VIEWS,
    splits: Collection[str] = ("train", "valid"),
    threads: int | None = None,
) -> tuple[pa.Table, ChexpertReport]:
    """Training-index rows for the CheXpert images under ``root`` (image paths relative to ``root``).

    ``root``: the CheXpert-v1.0 or CheXpert-v1.0-small folder, or the folder above it. ``views``: the
    ``view_position`` values to keep (None: all). ``splits``: CheXpert's (``train``, ``valid``). Each kept image's
    JPEG header gives its size (``threads`` at a time); a row with an unusable path, a repeated image or an image
    that is missing or unreadable is reported and left out. No image left at all raises :class:`ChexpertError`.
    """
    folder, prefix = dataset_folder(root)
    unknown = sorted(set(splits) - set(TABLES))
    if unknown:
        raise ChexpertError(f"split {', '.join(unknown)}: CheXpert's are {', '.join(TABLES)}")
    report, frames = ChexpertReport(), []
    for split in splits:
        frame, problems = read_chexpert_table(folder / TABLES[split], split)
        report.images += len(frame) + len(problems)
        report.problems += problems
        frames.append(frame.assign(table=TABLES[split]))
    frame = pd.concat(frames, ignore_index=True)
    repeated = frame["image_id"].duplicated()
    for row in frame[repeated].itertuples():
        report.problems.append(f"{folder / row.table}: line {row.line}: image {row.rel} listed again; row left out")
    frame = frame[~repeated]
    if views is not None:
        keep = frame["view_position"].isin(list(views))
        report.other_views = frame.loc[~keep, "view_position"].fillna("").value_counts().to_dict()
        frame = frame[keep]
    sizes = _image_sizes(folder, frame["rel"].tolist(), threads)
    found = np.array([size is not None for size, _ in sizes], dtype=bool)
    missing = []
    for image_id, (size, problem) in zip(frame["image_id"], sizes, strict=True):
        if size is None and problem is None:
            missing.append(image_id)
        elif size is None:
            report.problems.append(f"{image_id}: {problem}; left out")
    report.missing, report.kept = len(missing), int(found.sum())
    if missing:
        shown = ", ".join(missing[:_SHOWN_MISSING]) + (", ..." if len(missing) > _SHOWN_MISSING else "")
        report.problems.insert(0, f"{len(missing)} listed images not found under {folder} ({shown}); left out")
    if not found.any():
        raise ChexpertError(_nothing_usable(folder, splits, len(frame), report))
    return _as_table(frame[found], prefix, [size for size, _ in sizes if size is not None]), report


def _as_table(frame: pd.DataFrame, prefix: str, sizes: list[tuple[int, int]]) -> pa.Table:
    n = len(frame)
    columns = {
        "image_id": pa.array(frame["image_id"], pa.string()),
        "image_path": pa.array(prefix + frame["rel"], pa.string()),
        "height": pa.array([h for h, _ in sizes], pa.int32()),
        "width": pa.array([w for _, w in sizes], pa.int32()),
        "view_position": pa.array(frame["view_position"], pa.string(), from_pandas=True),
        "split": pa.array(frame["split"], pa.string()),
        "source": pa.array([SOURCE] * n, pa.string()),
        "subject_id": pa.array(frame["subject_id"], pa.string()),
        **{label: pa.array(frame[label].to_numpy(), pa.float32(), from_pandas=True) for label in CHEXPERT_LABELS},
    }
    for name in TRAINING_INDEX_SCHEMA.names:  # masks, boxes, finding, spacing: none in CheXpert
        columns.setdefault(name, pa.nulls(n, TRAINING_INDEX_SCHEMA.field(name).type))
    return pa.table(columns, schema=TRAINING_INDEX_SCHEMA)


def _image_sizes(folder: Path, rels: list[str], threads: int | None) -> list[tuple[tuple[int, int] | None, str | None]]:
    """(height, width) of each JPEG from its header, or None and why (None: the file is missing)."""
    if not rels:
        return []
    workers = threads or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # header reads wait on the disk, not the CPU
        return list(pool.map(partial(_image_size, folder.resolve()), rels))


def _image_size(folder: Path, rel: str) -> tuple[tuple[int, int] | None, str | None]:
    try:
        path = resolve_under(folder, rel)  # links are followed: one out of the dataset's folder is not read
    except PathError as exc:
        return None, str(exc)
    if not path.is_file():
        return None, None
    try:
        with open_image(path, "CheXpert image") as image:
            return (image.height, image.width), None
    except XRealError as exc:
        return None, str(exc)


def _nothing_usable(folder: Path, splits: Collection[str], listed: int, report: ChexpertReport) -> str:
    folders = " and ".join(str(folder / split) for split in splits)
    if not listed:
        why = (
            f"the tables list no usable image of the views kept ({report.to_text()}); check --views and the rows "
            "named above"
        )
    elif report.missing == listed:
        why = f"none of the {listed} images the tables list was found under {folders}"
    else:
        why = f"none of the {listed} images the tables list could be read, e.g. {report.problems[-1]}"
    return (
        f"{why}; ROOT must be the CheXpert-v1.0 (or CheXpert-v1.0-small) folder as unzipped, holding train.csv, "
        "valid.csv, train/ and valid/ with the JPEG files. Nothing was written."
    )


def chexmask_aliases(source: pa.Table) -> dict[str, str]:
    """Every ``Path`` CheXmask may give each image of ``source``, to the image's id."""
    aliases = {}
    for image_id, image_path in zip(
        source.column("image_id").to_pylist(), source.column("image_path").to_pylist(), strict=True
    ):
        match = _TAIL.search(image_path or "")
        if match:
            aliases.update(dict.fromkeys((p + match.group(1) for p in CHEXMASK_PREFIXES), image_id))
    return aliases


def read_chexpert_masks(
    path: str | os.PathLike[str], source: pa.Table, min_dice: float
) -> tuple[pd.DataFrame, ChexmaskReport]:
    """CheXmask's ``CheXpert.csv`` rows for the images of ``source``, indexed by their image ids.

    CheXmask's ``Path`` is matched from ``train/`` or ``valid/`` on, whatever folder name comes first (none,
    ``CheXpert-v1.0/`` or ``CheXpert-v1.0-small/``), so masks join the full-size and the small variant alike.
    """
    aliases = chexmask_aliases(source)
    frame, report = read_chexmask(path, aliases, id_column=ID_COLUMNS["chexpert"], min_dice=min_dice)
    ids = frame.index.map(aliases)
    twice = ids.duplicated(keep=False)
    if twice.any():
        first = ids[twice][0]
        named = " and ".join(repr(p) for p in frame.index[ids == first][:2])
        raise ChexmaskError(f"{path}: image {first} has more than one row (Path {named})")
    frame.index = ids
    report.without_mask = max(0, source.num_rows - report.kept - report.below_threshold)  # per image, not per alias
    return frame, report
