"""Radiologists' annotations shipped with torchxrayvision: where pathologies lie, without a single image.

The torchxrayvision wheel carries, in ``torchxrayvision/data/``, the annotation
tables of four public chest X-ray collections. They say where radiologists saw
each finding, which is all :mod:`xreal.manifest.from_index` needs to place
pathologies on real anatomies:

============  ===========================================  ========================================
source        file                                         what it holds
============  ===========================================  ========================================
``nih``       ``BBox_List_2017.csv.gz``                    NIH ChestX-ray14 boxes (x, y, w, h) on
                                                           1024 x 1024 images, 984 boxes
``rsna``      ``kaggle_stage_2_train_labels.csv.zip``      RSNA Pneumonia Detection Challenge boxes
                                                           (x, y, width, height; ``Target`` 1) on
                                                           1024 x 1024 images
``vindr``     ``vinbigdata-train.csv.gz``                  VinDr-CXR training boxes (Kaggle
                                                           challenge table; x/y min/max per reader),
                                                           no image sizes (see :func:`vindr_boxes`)
``siim``      ``siim-pneumothorax-train-rle.csv.gz``       SIIM-ACR pneumothorax masks, Kaggle RLE
                                                           on 1024 x 1024 images (``-1``: none)
============  ===========================================  ========================================

Each reader returns the same frame (:data:`FRAME_COLUMNS`), one row per box or
mask: ``label`` (a CheXpert label), the box ``x_min, y_min, x_max, y_max`` as
fractions of the image (max exclusive; for a mask, its bounding box),
``mask_rle`` (SIIM's encoding, see :func:`decode_siim_rle`; null for a box),
``height`` and ``width`` (the frame the annotation was drawn on, pixels),
``source`` and ``image_id``. Labels are mapped to CheXpert's vocabulary as
``manifests/README.md`` documents. Tables are read from the installed package
when first asked for and kept in memory for the process; nothing is written.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from xreal.core.errors import XRealError
from xreal.data.nih import LABEL_TO_CHEXPERT
from xreal.data.vindr import CLASS_TO_CHEXPERT, NO_FINDING

PREFIX = "xrv:"
FRAME_COLUMNS = ("label", "x_min", "y_min", "x_max", "y_max", "mask_rle", "height", "width", "source", "image_id")
SIIM_SIDE = 1024  # SIIM-ACR's images and RLE are 1024 x 1024 (torchxrayvision decodes them at that size too)
NIH_SIDE = 1024  # ChestX-ray14's PNGs
RSNA_SIDE = 1024  # RSNA's DICOMs are ChestX-ray14 images, 1024 x 1024

# NIH ChestX-ray14 "Finding Label" -> CheXpert
# NIH's box labels are its findings (the box table spells Infiltration "Infiltrate"): xreal.nih's mapping
NIH_TO_CHEXPERT: dict[str, str] = {
    **{finding: label for finding, label in LABEL_TO_CHEXPERT.items() if label},
    "Infiltrate": LABEL_TO_CHEXPERT["Infiltration"],
}
# RSNA's boxes are its "Lung Opacity" class (Target 1): opacities the radiologists judged suspicious for
# pneumonia. Each box locates both labels (torchxrayvision's RSNA dataset gives the same mask to both).
RSNA_LABELS: tuple[str, ...] = ("Lung Opacity", "Pneumonia")


class AnnotationError(XRealError):
    """An unknown source, a missing or malformed shipped table; the message names it."""


@dataclass(frozen=True)
class Source:
    name: str
    file: str
    title: str
    reader: Callable[[], pd.DataFrame]
    masks: bool  # rows carry a pathology mask (mask_rle), not only a box


def data_dir() -> Path:
    """torchxrayvision's ``data`` folder, found without importing the package (its import is slow and noisy)."""
    try:
        spec = importlib.util.find_spec("torchxrayvision")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise AnnotationError(
            "torchxrayvision is not installed: the shipped annotations (xrv:...) come with it "
            "(pip install torchxrayvision)"
        )
    return Path(spec.origin).parent / "data"


def _table_path(file: str) -> Path:
    path = data_dir() / file
    if not path.is_file():
        raise AnnotationError(f"{path}: not found; this torchxrayvision does not ship {file}")
    return path


def _read_csv(file: str, columns: tuple[str, ...], **kwargs) -> pd.DataFrame:
    path = _table_path(file)
    try:
        table = pd.read_csv(path, **kwargs)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise AnnotationError(f"{path}: unreadable table ({exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise AnnotationError(f"{path}: lacks column(s) {', '.join(missing)}")
    return table


def _boxes_frame(
    path_name: str,
    labels: pd.Series,
    image_ids: pd.Series,
    corners: tuple[pd.Series, pd.Series, pd.Series, pd.Series],
    height: float,
    width: float,
    source: str,
) -> pd.DataFrame:
    x0, y0, x1, y1 = (pd.to_numeric(c, errors="coerce").to_numpy(dtype=np.float64) for c in corners)
    bad = ~np.isfinite(x0 + y0 + x1 + y1) | (x1 <= x0) | (y1 <= y0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AnnotationError(
            f"{path_name}: {int(bad.sum())} box(es) are not finite or have no area, e.g. of image "
            f"{image_ids.iloc[i]}: {(x0[i], y0[i], x1[i], y1[i])}"
        )
    frame = pd.DataFrame(
        {
            "label": labels.to_numpy(dtype=object),
            "x_min": np.clip(x0 / width, 0.0, 1.0),
            "y_min": np.clip(y0 / height, 0.0, 1.0),
            "x_max": np.clip(x1 / width, 0.0, 1.0),
            "y_max": np.clip(y1 / height, 0.0, 1.0),
            "mask_rle": None,
            "height": round(height),
            "width": round(width),
            "source": source,
            "image_id": image_ids.astype(str).to_numpy(dtype=object),
        }
    )
    keep = (frame.x_max > frame.x_min) & (frame.y_max > frame.y_min)  # a box wholly outside the frame
    return frame[keep].reset_index(drop=True)


def _mapped(path_name: str, classes: pd.Series, mapping: dict[str, str | None]) -> pd.Series:
    unknown = sorted(set(classes) - set(mapping))
    if unknown:
        raise AnnotationError(
            f"{path_name}: class(es) xreal has no CheXpert mapping for: {', '.join(map(str, unknown))}"
        )
    return classes.map(mapping)


@functools.cache
def _nih() -> pd.DataFrame:
    file = "BBox_List_2017.csv.gz"
    # the header reads "Image Index,Finding Label,Bbox [x,y,w,h],,," : six names for the first six columns
    table = _read_csv(file, ("Image Index", "Finding Label"))
    if table.shape[1] < 6:
        raise AnnotationError(f"{_table_path(file)}: expected Image Index, Finding Label, x, y, w, h")
    x, y, w, h = (table.iloc[:, i] for i in range(2, 6))
    x, y, w, h = (pd.to_numeric(v, errors="coerce") for v in (x, y, w, h))
    labels = _mapped(file, table["Finding Label"].astype(str).str.strip(), NIH_TO_CHEXPERT)
    return _boxes_frame(file, labels, table["Image Index"], (x, y, x + w, y + h), NIH_SIDE, NIH_SIDE, "nih")


@functools.cache
def _rsna() -> pd.DataFrame:
    file = "kaggle_stage_2_train_labels.csv.zip"
    table = _read_csv(file, ("patientId", "x", "y", "width", "height", "Target"))
    boxed = table[table["Target"] == 1]
    frames = []
    for label in RSNA_LABELS:
        labels = pd.Series(label, index=boxed.index)
        x, y = boxed["x"], boxed["y"]
        corners = (x, y, x + boxed["width"], y + boxed["height"])
        frames.append(_boxes_frame(file, labels, boxed["patientId"], corners, RSNA_SIDE, RSNA_SIDE, "rsna"))
    return pd.concat(frames, ignore_index=True)


@functools.cache
def _vindr() -> pd.DataFrame:
    file = "vinbigdata-train.csv.gz"
    table = _read_csv(file, ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max"))
    boxed = table[table["class_name"] != NO_FINDING]
    labels = _mapped(file, boxed["class_name"].astype(str), CLASS_TO_CHEXPERT)
    boxed, labels = boxed[labels.notna()], labels[labels.notna()]  # classes without a CheXpert label
    corners = tuple(boxed[c] for c in ("x_min", "y_min", "x_max", "y_max"))
    # No image sizes in the table: one frame that holds every box of the table (see vindr_boxes)
    width = float(pd.to_numeric(table["x_max"], errors="coerce").max())
    height = float(pd.to_numeric(table["y_max"], errors="coerce").max())
    if not (np.isfinite(width) and np.isfinite(height)):
        raise AnnotationError(f"{_table_path(file)}: no box coordinates")
    return _boxes_frame(file, labels, boxed["image_id"], corners, height, width, "vindr")


def _siim_runs(rle: str, height: int, width: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """SIIM's relative RLE -> absolute run starts and exclusive ends in column-major pixel order."""
    try:
        values = np.array(rle.split(), dtype=np.int64)
    except (ValueError, OverflowError, AttributeError):
        raise AnnotationError(f"{where}: RLE holds something other than integers: {str(rle)[:40]!r}") from None
    if values.size == 0 or values.size % 2:
        raise AnnotationError(f"{where}: RLE must be 'gap length' pairs, got {values.size} values")
    gaps, lengths = values[0::2], values[1::2]
    if (gaps < 0).any() or (lengths < 1).any():
        raise AnnotationError(f"{where}: RLE gaps must be >= 0 and lengths >= 1")
    ends = np.cumsum(gaps + lengths)
    if ends[-1] > height * width:
        raise AnnotationError(f"{where}: RLE runs past the {height}x{width} image (pixel {ends[-1]})")
    return ends - lengths, ends


def decode_siim_rle(rle: str, height: int = SIIM_SIDE, width: int = SIIM_SIDE) -> np.ndarray:
    """Decode one SIIM-ACR (Kaggle) RLE into a ``(height, width)`` bool mask.

    The encoding is *relative* ("gap length" pairs: each run starts ``gap``
    pixels after the previous one ended, the first after pixel 0) over the image
    flattened **column by column** (Fortran order), as SIIM's sample code and
    torchxrayvision's ``SIIM_Pneumothorax_Dataset`` read it.
    """
    starts, ends = _siim_runs(rle, height, width, "SIIM mask")
    flat = np.zeros(height * width, dtype=bool)
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):  # a few hundred runs: faster than cumsum
        flat[start:end] = True
    return np.ascontiguousarray(flat.reshape((height, width), order="F"))


@functools.cache
def _siim() -> pd.DataFrame:
    file = "siim-pneumothorax-train-rle.csv.gz"
    table = _read_csv(file, ("ImageId", "EncodedPixels"), dtype=str)
    rles = table["EncodedPixels"].fillna("").str.strip()
    positive = table[(rles != "-1") & (rles != "")]
    rows = []
    side = SIIM_SIDE
    for image_id, rle in zip(positive["ImageId"].str.strip(), rles[positive.index], strict=True):
        starts, ends = _siim_runs(rle, side, side, f"{file}: image {image_id}")
        c0, c1 = starts // side, (ends - 1) // side  # column-major: pixel p is at column p // H, row p % H
        one_column = c0 == c1
        r0 = np.where(one_column, starts % side, 0)
        r1 = np.where(one_column, (ends - 1) % side, side - 1)
        rows.append(
            (
                "Pneumothorax",
                c0.min() / side,
                r0.min() / side,
                (c1.max() + 1) / side,
                (r1.max() + 1) / side,
                rle,
                side,
                side,
                "siim",
                image_id,
            )
        )
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


def nih_boxes() -> pd.DataFrame:
    """NIH ChestX-ray14's boxes (``BBox_List_2017.csv.gz``), normalised by the images' 1024 x 1024."""
    return _nih().copy()


def rsna_boxes() -> pd.DataFrame:
    """RSNA Pneumonia's boxes (``Target`` 1), normalised by 1024 x 1024; each box once per :data:`RSNA_LABELS`."""
    return _rsna().copy()


def vindr_boxes() -> pd.DataFrame:
    """VinDr-CXR's training boxes (the Kaggle challenge's table), every reader's box, classes mapped to CheXpert.

    The table has no image sizes, and VinDr-CXR's DICOMs vary in size. Boxes
    are normalised by one frame for the whole table: the largest ``x_max`` and
    ``y_max`` it holds (3131 x 3384 px in torchxrayvision 1.5.7), so every box
    lies in [0, 1] unclipped. For an image smaller than that frame, boxes come
    out smaller and nearer the top-left corner than they were (on the table,
    VinDr's median Cardiomegaly box centre lands at x 0.45 where NIH's is at
    0.57). For exact positions, ingest VinDr-CXR itself (``xreal ingest
    vindr``: sizes from the DICOM headers) and give that training set to
    ``--boxes-from``.
    """
    return _vindr().copy()


def siim_masks() -> pd.DataFrame:
    """SIIM-ACR's pneumothorax annotations: one row per encoded region (an image may have several).

    ``mask_rle`` is SIIM's RLE (:func:`decode_siim_rle`), the box its bounding
    box. Images marked ``-1`` (no pneumothorax) are left out.
    """
    return _siim().copy()


SOURCES: dict[str, Source] = {
    "nih": Source("nih", "BBox_List_2017.csv.gz", "NIH ChestX-ray14 boxes", nih_boxes, masks=False),
    "rsna": Source(
        "rsna", "kaggle_stage_2_train_labels.csv.zip", "RSNA Pneumonia Detection Challenge boxes", rsna_boxes, False
    ),
    "vindr": Source("vindr", "vinbigdata-train.csv.gz", "VinDr-CXR training boxes", vindr_boxes, masks=False),
    "siim": Source("siim", "siim-pneumothorax-train-rle.csv.gz", "SIIM-ACR pneumothorax masks", siim_masks, masks=True),
}


def is_annotation_source(text: object) -> bool:
    """Whether ``text`` names a shipped table (``xrv:NAME``) rather than a folder."""
    return isinstance(text, str) and text.startswith(PREFIX)


def source(name: str) -> Source:
    """The shipped table ``xrv:NAME`` (or ``NAME``); an unknown name is one clear error."""
    key = (name[len(PREFIX) :] if name.startswith(PREFIX) else name).lower()
    if key not in SOURCES:
        known = ", ".join(PREFIX + k for k in SOURCES)
        raise AnnotationError(f"{name!r}: no such shipped annotation table; choose one of {known}")
    return SOURCES[key]


def read_annotations(name: str) -> pd.DataFrame:
    """The uniform frame (:data:`FRAME_COLUMNS`) of ``xrv:NAME``."""
    return source(name).reader()


def image_mask(frame: pd.DataFrame, image_id: str) -> np.ndarray:
    """The union of one image's annotated masks in ``frame`` (a :func:`siim_masks` frame), at its own size."""
    rows = frame[(frame["image_id"] == image_id) & frame["mask_rle"].notna()]
    if rows.empty:
        raise AnnotationError(f"image {image_id!r} has no annotated mask")
    height, width = int(rows["height"].iloc[0]), int(rows["width"].iloc[0])
    mask = np.zeros((height, width), dtype=bool)
    for rle in rows["mask_rle"]:
        mask |= decode_siim_rle(rle, height, width)
    return mask


def box_locations(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Every box of ``frame`` per label: label -> array of normalised (x0, y0, x1, y1)."""
    coords = ["x_min", "y_min", "x_max", "y_max"]
    return {str(label): group[coords].to_numpy(dtype=np.float64) for label, group in frame.groupby("label", sort=True)}
