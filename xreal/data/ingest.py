"""Real images into a training set: source rows in, resized images and anatomy maps at the training size out.

A *source index* is a training-index table whose ``image_path`` points into a
dataset's own folder (``xreal.data.mimic.mimic_index`` makes one). :func:`build_training_set`
reads each image (JPEG/PNG, or DICOM through ``xreal.data.dicom.read_dicom_image``),
resizes it to ``size`` x ``size`` (as the reference implementation does, without
keeping the aspect ratio; CheXmask masks and boxes are scaled the same way),
writes it as a 16-bit PNG with its CheXmask label map and one mask per boxed
label (the union of its boxes), and writes ``index.parquet`` last, with
paths relative to the training set. Images are processed by a pool of
processes; files already written are kept, so an interrupted run resumes, and
a rerun of a finished one writes nothing (not even the index, when unchanged).
An unreadable image or an unusable mask is reported and left out, not fatal;
so is a row whose id or path would put a file outside its folder. A run that
keeps no image at all raises :class:`IngestError` and writes no index.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image
from tqdm.auto import tqdm

from xreal.core.errors import XRealError
from xreal.core.files import check_id, is_safe_id, resolve_under
from xreal.core.images import open_image, read_image, write_png16
from xreal.core.labels import slug
from xreal.core.masks import boxes_to_mask, resize_label_map, write_mask_file
from xreal.data.chexmask import ChexmaskError, anatomy_map
from xreal.data.dicom import read_dicom_image, read_dicom_spacing
from xreal.data.training_index import INDEX_FILE, TRAINING_INDEX_SCHEMA, declared_size, write_training_index

DICOM_SUFFIXES = (".dcm", ".dicom")


class IngestError(XRealError):
    """An ingest that cannot produce a training set (nothing usable); the message says what was wrong."""


class MissingImageError(XRealError):
    """A source image the index lists but whose file is not there."""


@dataclass
class IngestReport:
    images: int = 0
    written: int = 0
    resumed: int = 0
    with_anatomy: int = 0
    problems: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        lines = [
            f"{self.images} source images: {self.written} in the training set ({self.resumed} already there), "
            f"{self.with_anatomy} with an anatomy map, {len(self.problems)} left out or without anatomy"
        ]
        lines += [f"  {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more")
        return "\n".join(lines)


def load_source_image(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A source image as float32 in [0, 1], 0 black, and its pixel spacing in mm if the file says.

    DICOM is read as displayed; JPEG or PNG as stored (no spacing).
    """
    if path.suffix.lower() in DICOM_SUFFIXES:
        image = read_dicom_image(path)
        return image.pixels, image.pixel_spacing
    if not path.is_file():
        raise XRealError(f"{path}: no such image file")
    return read_image(path), None


def source_spacing(path: Path) -> tuple[float, float] | None:
    """The pixel spacing a source file records (DICOM headers only), without reading its pixels."""
    return read_dicom_spacing(path) if path.suffix.lower() in DICOM_SUFFIXES else None


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` with an antialiasing filter (area-like when shrinking)."""
    resized = Image.fromarray(np.asarray(image, dtype=np.float32), mode="F").resize((size, size), Image.BOX)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def scaled_boxes(boxes: list[dict], height: int, width: int, size: int) -> list[dict]:
    """Boxes in pixels of a ``height`` x ``width`` image, in pixels of the ``size`` x ``size`` training image."""
    sx, sy = size / width, size / height
    return [
        {
            "label": b["label"],
            "x_min": b["x_min"] * sx,
            "y_min": b["y_min"] * sy,
            "x_max": b["x_max"] * sx,
            "y_max": b["y_max"] * sy,
        }
        for b in boxes
    ]


def _pathology_files(image_id: str, boxes: list[dict]) -> dict[str, str]:
    return {label: f"pathology/{image_id}_{slug(label)}.png" for label in sorted({b["label"] for b in boxes})}


def _ingest_one(task: tuple) -> tuple[dict | None, str | None, bool, bool]:
    """Write one image, its anatomy map and its pathology masks.

    Returns its row, a problem, whether it was resumed and whether its source file is missing. Every id and
    path is checked first, so nothing is read from outside ``root`` or written outside ``out``.
    """
    row, root, out, size, mask = task
    image_id = row.get("image_id")
    shown = image_id if is_safe_id(image_id) else repr(str(image_id)[:80])
    try:
        check_id(image_id, "image_id")
        height, width = declared_size(row.get("height"), row.get("width"), "the index's height x width")
        if not isinstance(row.get("image_path"), str):
            raise XRealError(f"image_path {row.get('image_path')!r} is not a path")
        source = resolve_under(root, row["image_path"])
        image_rel, anatomy_rel = f"images/{image_id}.png", f"anatomy/{image_id}.png"
        try:
            boxes = scaled_boxes(row.get("boxes") or [], height, width, size)
        except (TypeError, KeyError) as exc:
            raise XRealError(f"unusable boxes in the index ({type(exc).__name__}: {exc})") from None
        pathology = _pathology_files(image_id, boxes)
        target = {rel: resolve_under(out, rel) for rel in [image_rel, anatomy_rel, *pathology.values()]}
        # what an earlier run wrote is kept: the image at this size and its pathology masks; the anatomy map is
        # made from the mask and the index's size alone, so a missing one (a mask rejected then, or new since) is
        # retried without touching the image, and a rejected mask leaves a rerun writing nothing
        done = all(target[rel].is_file() for rel in [image_rel, *pathology.values()])
        done = done and _png_size(target[image_rel]) == (size, size)
        problem, spacing = None, source_spacing(source) if done else None
        if not done:
            image, spacing = _load(source)
            if image.shape != (height, width):
                raise XRealError(f"the image is {image.shape[0]}x{image.shape[1]}, the index says {height}x{width}")
        resumed = done
        if mask is not None and not (done and target[anatomy_rel].is_file()):
            try:
                label_map = anatomy_map(mask, height, width, where=f"{image_id}")
                write_mask_file(target[anatomy_rel], resize_label_map(label_map, (size, size)))
                resumed = False
            except ChexmaskError as exc:
                problem, mask = str(exc), None
        if not done:
            for label, rel in pathology.items():
                boxed = [_xyxy(b) for b in boxes if b["label"] == label]
                write_mask_file(target[rel], boxes_to_mask(boxed, size, size))
            write_png16(target[image_rel], resize_image(image, size))
    except MissingImageError as exc:
        return None, f"{shown}: {exc}", False, True
    except XRealError as exc:  # DicomError, ChexmaskError, PathError and unreadable files among them
        return None, f"{shown}: {exc}; left out", False, False
    new = dict(row, image_path=image_rel, anatomy_path=anatomy_rel if mask is not None else None, boxes=boxes)
    new.update(height=size, width=size, pathology_masks=[{"label": k, "path": v} for k, v in pathology.items()])
    spacing = spacing or row.get("pixel_spacing")  # the file's (DICOM), else the table's (NIH), at source size
    if spacing is not None:  # the resized image's spacing
        new["pixel_spacing"] = [spacing[0] * height / size, spacing[1] * width / size]
    return new, problem, resumed, False


def _load(source: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """:func:`load_source_image`, any failure to decode an untrusted file turned into an error naming it."""
    if not source.is_file():
        raise MissingImageError(f"{source}: no such image file")
    try:
        return load_source_image(source)
    except XRealError:
        raise
    except Exception as exc:  # image decoders raise many kinds on damaged files; one must not stop the run
        raise XRealError(f"{source}: unreadable image ({type(exc).__name__}: {exc})") from None


def _png_size(path: Path) -> tuple[int, int] | None:
    """The size of an image already written (a rerun with another --size redoes it), reading its header only."""
    try:
        with open_image(path, "training image") as image:
            return image.size
    except XRealError:
        return None


def _xyxy(box: dict) -> tuple[float, float, float, float]:
    return box["x_min"], box["y_min"], box["x_max"], box["y_max"]


def build_training_set(
    source: pa.Table,
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    size: int = 256,
    masks: pd.DataFrame | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[Path, IngestReport]:
    """Write the images of ``source`` (paths relative to ``root``) into a training set at ``out``.

    Args:
        source: source-index rows (the training-index schema).
        root: the folder the source's image paths are relative to.
        out: the training set folder; rerunning into it resumes.
        size: the training resolution (square).
        masks: CheXmask rows indexed by image id (:func:`xreal.data.chexmask.read_chexmask`); None: no anatomy.
        workers: processes (default: every core; 1: in this process).
        progress: show a progress bar.
    """
    if size < 16:
        raise XRealError(f"--size {size}: too small for a chest X-ray (at least 16)")
    root, out = Path(root), Path(out)
    rows = source.to_pylist()
    tasks = [
        (
            row,
            root,
            out,
            size,
            masks.loc[row["image_id"]] if masks is not None and row["image_id"] in masks.index else None,
        )
        for row in rows
    ]
    report = IngestReport(images=len(rows))
    if not rows:
        raise IngestError(f"no image to ingest from {root}: the source lists none; nothing was written")
    kept, missing = [], 0
    workers = workers or os.cpu_count() or 1
    with (
        ProcessPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext() as pool,
        tqdm(total=len(tasks), unit="img", desc="ingest", disable=not progress) as bar,
    ):
        chunksize = max(1, min(64, len(tasks) // (8 * workers) or 1))
        results = pool.map(_ingest_one, tasks, chunksize=chunksize) if pool else map(_ingest_one, tasks)
        for new, problem, resumed, absent in results:
            bar.update()
            missing += absent
            if problem:
                report.problems.append(problem)
            if new is None:
                continue
            kept.append(new)
            report.written += 1
            report.resumed += resumed
            report.with_anatomy += new["anatomy_path"] is not None
    if not kept:
        raise IngestError(_nothing_ingested(rows, root, missing, report))
    if masks is not None:
        report.problems += [
            f"{r['image_id']}: no CheXmask mask (or below the quality threshold)"
            for r in rows
            if r["image_id"] not in masks.index
        ]
    frame = pd.DataFrame.from_records(kept, columns=TRAINING_INDEX_SCHEMA.names)
    return write_training_index(frame, out / INDEX_FILE, if_changed=True), report  # a rerun writes nothing


def _nothing_ingested(rows: list[dict], root: Path, missing: int, report: IngestReport) -> str:
    """Why a run kept no image, in one paragraph saying what to check."""
    if missing == len(rows):
        tops = sorted({Path(r["image_path"]).parts[0] for r in rows if Path(r["image_path"]).parts})
        where = " or ".join(str(root / top) for top in tops) or str(root)
        return (
            f"none of the {len(rows)} images listed was found under {where} (e.g. {root / rows[0]['image_path']}); "
            "ROOT must be the dataset's folder with its image files as published (for MIMIC-CXR, --dicom if they "
            "are .dcm). No index was written."
        )
    return (
        f"none of the {len(rows)} images listed could be ingested ({missing} not found, the others unusable), "
        f"e.g. {report.problems[0]}. No index was written."
    )
