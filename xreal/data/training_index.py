"""The training index: one Parquet table describing a labelled chest X-ray training set.

The phantom writes it; `xreal ingest mimic | vindr` (MIMIC-CXR, CheXmask, VinDr-CXR) write the
same layout, so training code reads one format. The columns are
documented in ``manifests/README.md`` (section "Training index").
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from xreal.core.errors import XRealError
from xreal.core.files import PathError, atomic_path, resolve_under
from xreal.core.images import check_image_size, write_png16
from xreal.core.labels import CHEXPERT_LABELS, slug
from xreal.core.masks import write_mask_file

TRAINING_INDEX_VERSION = "1"
INDEX_FILE = "index.parquet"
OPTIONAL_COLUMNS = ("pixel_spacing", "annotation")  # added to version 1 later: null when reading older files
ANNOTATIONS = ("consensus", "readers")  # values of ``annotation``: whose boxes ``boxes`` holds
_WHOLE = re.compile(r"\s*([+-]?[0-9]{1,30})(\.0*)?\s*")

BOX_TYPE = pa.struct(
    [
        ("label", pa.string()),
        ("x_min", pa.float32()),
        ("y_min", pa.float32()),
        ("x_max", pa.float32()),
        ("y_max", pa.float32()),
    ]
)
PATHOLOGY_MASK_TYPE = pa.struct([("label", pa.string()), ("path", pa.string())])

TRAINING_INDEX_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("anatomy_path", pa.string()),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("view_position", pa.string()),
        pa.field("split", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("subject_id", pa.string()),
        *[pa.field(label, pa.float32()) for label in CHEXPERT_LABELS],
        pa.field("pathology_masks", pa.list_(PATHOLOGY_MASK_TYPE)),
        pa.field("boxes", pa.list_(BOX_TYPE)),
        pa.field("finding", pa.string()),
        pa.field("pixel_spacing", pa.list_(pa.float32())),  # mm between rows, columns of the index's image
        pa.field("annotation", pa.string()),  # "consensus" or "readers": whose boxes; null without radiologists' boxes
    ],
    metadata={"xreal.schema": "training-index", "xreal.schema_version": TRAINING_INDEX_VERSION},
)


def declared_size(height: object, width: object, where: str) -> tuple[int, int]:
    """A size a table or header declares (ints, whole floats or digit strings) as ints, refused unless readable.

    Anything else (blank, negative, fractional, text, or above :data:`xreal.core.images.MAX_IMAGE_SIDE`) raises
    :class:`XRealError` naming ``where``, before any pixel buffer of that size is made.
    """
    values = (_whole(height), _whole(width))
    if values[0] is None or values[1] is None:
        shown = f"{str(height)[:20]!r}x{str(width)[:20]!r}"
        raise XRealError(f"{where}: image size {shown} is not a whole number of pixels")
    check_image_size(values[0], values[1], where)
    return values[0], values[1]


def _whole(value: object) -> int | None:
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str) and (match := _WHOLE.fullmatch(value)):
        return int(match.group(1))
    return None


def write_training_index(
    rows: list[dict] | pd.DataFrame, path: str | os.PathLike[str], if_changed: bool = False
) -> Path:
    """Write rows (dicts with the schema's columns) as a training index, atomically.

    The optional columns (:data:`OPTIONAL_COLUMNS`, added to version 1 later) may be left out: they are null.
    ``if_changed``: leave an index already at ``path`` with the same rows and schema as it is (a rerun writes nothing).
    """
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame.from_records(rows)
    absent = [name for name in OPTIONAL_COLUMNS if name not in frame.columns]
    if absent:
        frame = frame.assign(**dict.fromkeys(absent, None))
    missing = [name for name in TRAINING_INDEX_SCHEMA.names if name not in frame.columns]
    if missing:
        raise XRealError(f"training index rows lack columns: {', '.join(missing)}")
    table = pa.Table.from_pandas(frame[TRAINING_INDEX_SCHEMA.names], schema=TRAINING_INDEX_SCHEMA, preserve_index=False)
    if if_changed and _same_table(path, table):
        return Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def _same_table(path: str | os.PathLike[str], table: pa.Table) -> bool:
    """Whether the Parquet file at ``path`` holds ``table``: its columns, rows and xreal tags; False if unreadable."""
    try:
        written = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return False
    return written.equals(table) and _tags(written) == _tags(table)


def _tags(table: pa.Table) -> dict[bytes, bytes]:
    return {k: v for k, v in (table.schema.metadata or {}).items() if k.startswith(b"xreal.")}


def read_training_index(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a training index, checking that it is one and of a version this code reads."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_FILE
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise XRealError(f"{path}: cannot read training index ({exc})") from None
    meta = table.schema.metadata or {}
    kind = meta.get(b"xreal.schema", b"").decode()
    version = meta.get(b"xreal.schema_version", b"").decode()
    if kind != "training-index":
        raise XRealError(f"{path}: not an xreal training index (schema tag {kind or 'missing'!r})")
    if version != TRAINING_INDEX_VERSION:
        raise XRealError(f"{path}: training index version {version!r}; this xreal reads {TRAINING_INDEX_VERSION!r}")
    for field in TRAINING_INDEX_SCHEMA:  # columns added to version 1 later are optional: null in older files
        if field.name not in table.column_names and field.name in OPTIONAL_COLUMNS:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.to_pandas()


def split_for(subject_id: str, fractions: tuple[float, float] = (0.8, 0.1)) -> str:
    """A stable train/validate/test split from a subject id (same subject, same split)."""
    digest = hashlib.blake2b(subject_id.encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    train, validate = fractions
    return "train" if u < train else "validate" if u < train + validate else "test"


def write_phantom_training_set(
    out: str | os.PathLike[str],
    count: int,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    chunk: int = 256,
    progress: bool = False,
) -> Path:
    """Render ``count`` phantom cases into ``out`` as a training set; return the index path.

    Layout: ``images/<id>.png`` (16-bit), ``anatomy/<id>.png`` (label map),
    ``pathology/<id>_<label>.png`` (binary masks) and ``index.parquet``. The
    index is written last, so a folder with an index is complete.
    """
    from xreal.phantom import renderer as phantom

    if count < 1:
        raise XRealError(f"--count must be at least 1, got {count}")
    out = Path(out)
    index_path = out / INDEX_FILE
    if index_path.exists() and not overwrite:
        raise XRealError(f"{index_path} already exists; choose another --out or pass --overwrite")
    rows = []
    bar = tqdm(total=count, desc="phantom", unit="img", disable=not progress)
    for start in range(0, count, chunk):
        batch = phantom.generate(min(chunk, count - start), size=size, seed=seed, start=start)
        for case in (batch[i] for i in range(len(batch))):
            image_id = f"phantom-{seed}-{case.index:06d}"
            write_png16(out / "images" / f"{image_id}.png", case.image)
            write_mask_file(out / "anatomy" / f"{image_id}.png", case.anatomy)
            masks = []
            for label, mask in case.pathology_masks.items():
                rel = f"pathology/{image_id}_{slug(label)}.png"
                write_mask_file(out / rel, mask)
                masks.append({"label": label, "path": rel})
            row: dict = {
                "image_id": image_id,
                "image_path": f"images/{image_id}.png",
                "anatomy_path": f"anatomy/{image_id}.png",
                "height": size,
                "width": size,
                "view_position": "PA",
                "split": split_for(image_id),
                "source": "phantom",
                "subject_id": image_id,
                "pathology_masks": masks,
                "boxes": [
                    {"label": label, "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1}
                    for label, x0, y0, x1, y1 in case.boxes
                ],
                "finding": case.finding,
                "pixel_spacing": None,
                "annotation": None,  # the phantom's boxes are its ground truth, not radiologists'
            }
            row.update({label: float(label in case.labels) for label in CHEXPERT_LABELS})
            rows.append(row)
        bar.update(len(batch))
    bar.close()
    stale = _listed_files(index_path) - {path for row in rows for path in _row_files(row)}
    write_training_index(rows, index_path)
    for path in stale:
        try:  # the old index is only trusted to name files inside the training set
            resolve_under(out, path).unlink(missing_ok=True)
        except (PathError, IsADirectoryError):
            continue
    return index_path


def _row_files(row: dict) -> list[str]:
    masks = row.get("pathology_masks")
    return [row["image_path"], row["anatomy_path"], *(m["path"] for m in (masks if masks is not None else []))]


def _listed_files(index_path: Path) -> set[str]:
    """Files an existing index lists (none if there is no readable index)."""
    try:
        frame = read_training_index(index_path)
    except XRealError:
        return set()
    return {path for row in frame.to_dict("records") for path in _row_files(row) if isinstance(path, str) and path}
