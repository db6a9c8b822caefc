"""Manifests built from a training index: real patients' anatomies, pathologies where that label is seen.

This is how users produce labelled augmentation sets. :func:`manifest_from_index`
draws target anatomies from a training index (CheXmask maps of real patients,
from the held-out split by default, one image per patient until each has been
used), and gives each request a label or label combination from ``targets``
and, for each label, a box drawn from where that label's boxes lie in the
index (VinDr-CXR's, say, or another index's: ``boxes_from``), or in a table of
radiologists' annotations shipped with torchxrayvision (``boxes_from="xrv:nih"``,
``xrv:rsna``, ``xrv:vindr``, ``xrv:siim``: :mod:`xreal.manifest.annotations`). With
``masks_from="xrv:siim"`` a label that table annotates (Pneumothorax) is placed
by a real annotated mask instead, resized to the anatomy; the mask goes with the
row as an array (``pathology_mask``) until :func:`write_index_manifest` writes
it as a PNG beside the manifest. Each anatomy goes into the manifest as
CheXmask-style RLE, so the manifest stands alone; its tags record the dataset
and image id it came from (and the annotated image a mask came from), and
nothing else about the patient.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from xreal.core.errors import XRealError
from xreal.core.files import atomic_directory, resolve_under
from xreal.core.labels import canonical_labels, slug
from xreal.core.masks import boxes_to_mask, read_label_map, resize_mask, rle_from_label_map, write_mask_file
from xreal.data.training_index import read_training_index
from xreal.manifest import annotations
from xreal.manifest.schema import write_manifest

HEALTHY = ("No Finding",)
MASK_KEY = "pathology_mask"  # a row's mask array, until write_index_manifest writes it


def parse_target(text: str) -> tuple[tuple[str, ...], int]:
    """``"Pleural Effusion+Edema=200"`` -> ((labels), count)."""
    labels, sep, count = text.rpartition("=")
    if not sep or not count.strip().isdigit() or int(count) < 1:
        raise XRealError(f"target {text!r}: write LABEL[+LABEL...]=COUNT, e.g. 'Cardiomegaly=500'")
    return canonical_labels(label.strip() for label in labels.split("+")), int(count)


def box_distribution(index: pd.DataFrame) -> dict[str, np.ndarray]:
    """Every box of the index per label, as fractions of its image: label -> array of (x0, y0, x1, y1)."""
    found: dict[str, list] = {}
    for boxes, height, width in zip(index["boxes"], index["height"], index["width"], strict=True):
        for box in boxes if boxes is not None else []:
            found.setdefault(box["label"], []).append(
                (box["x_min"] / width, box["y_min"] / height, box["x_max"] / width, box["y_max"] / height)
            )
    return {label: np.clip(np.array(v, dtype=np.float64), 0.0, 1.0) for label, v in found.items()}


@dataclass(frozen=True)
class _MaskSource:
    """A shipped table of annotated masks: draws one annotated image's mask for a label."""

    name: str  # xrv:siim
    masks: dict[str, list[str]]  # image id -> its encoded regions
    images: dict[str, list[str]]  # label -> image ids annotated with it, sorted
    height: int
    width: int

    @property
    def labels(self) -> set[str]:
        return set(self.images)

    def draw(self, label: str, shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """A random annotated image's mask of ``label`` (all its regions), resized to ``shape``; and its id."""
        ids = self.images[label]
        image_id = ids[rng.integers(len(ids))]
        mask = np.zeros((self.height, self.width), dtype=bool)
        for rle in self.masks[image_id]:
            mask |= annotations.decode_siim_rle(rle, self.height, self.width)
        return resize_mask(mask, shape, rule="any"), image_id  # "any": a thin pleural rim never vanishes


def _mask_tables() -> str:
    return ", ".join(annotations.PREFIX + s.name for s in annotations.SOURCES.values() if s.masks)


def _mask_source(masks_from: str | None) -> _MaskSource | None:
    if masks_from is None:
        return None
    if not annotations.is_annotation_source(masks_from):
        raise XRealError(
            f"--masks-from {masks_from!r}: give a table of annotated masks shipped with torchxrayvision "
            f"({_mask_tables()})"
        )
    source = annotations.source(masks_from)
    if not source.masks:
        raise XRealError(
            f"{masks_from} holds boxes, not masks: use it with --boxes-from; --masks-from takes {_mask_tables()}"
        )
    frame = source.reader()
    masks = frame.groupby("image_id", sort=True)["mask_rle"].agg(list).to_dict()
    images = {str(k): sorted(v.unique()) for k, v in frame.groupby("label", sort=True)["image_id"]}
    height, width = int(frame["height"].iloc[0]), int(frame["width"].iloc[0])
    return _MaskSource(annotations.PREFIX + source.name, masks, images, height, width)


def _locations(boxes_from: str | os.PathLike[str] | None, index: pd.DataFrame) -> dict[str, np.ndarray]:
    if annotations.is_annotation_source(boxes_from):
        return annotations.box_locations(annotations.read_annotations(boxes_from))
    return box_distribution(read_training_index(boxes_from) if boxes_from else index)


def manifest_from_index(
    index_dir: str | os.PathLike[str],
    targets: Mapping[tuple[str, ...], int],
    healthy: int = 0,
    splits: tuple[str, ...] = ("test",),
    seed: int = 0,
    boxes_from: str | os.PathLike[str] | None = None,
    per_label: int | None = None,
    masks_from: str | None = None,
) -> list[dict]:
    """Manifest rows: ``targets`` (labels -> images) and ``healthy`` No Finding images on drawn anatomies.

    Args:
        index_dir: the training set whose anatomies are drawn (rows with an anatomy map in ``splits``).
        targets: how many images of each label or label combination.
        healthy: how many healthy images.
        splits: the index splits anatomies may come from (held-out patients: ``test``).
        seed: makes the draw and the requests' seeds reproducible.
        boxes_from: another training index whose boxes give the pathology locations (default: this one), or a
            table shipped with torchxrayvision: ``"xrv:nih"``, ``"xrv:rsna"``, ``"xrv:vindr"``, ``"xrv:siim"``.
        per_label: also this many images of every label that has boxes (rare labels as many as common ones).
        masks_from: ``"xrv:siim"``: the labels it annotates (Pneumothorax) are placed by a real annotated mask,
            resized to the anatomy, under the row's ``pathology_mask`` key (the row's other labels' boxes join
            that mask: a row has one location). Write such rows with :func:`write_index_manifest`.
    """
    index_dir = Path(index_dir)
    index = read_training_index(index_dir)
    pool = index[index["anatomy_path"].notna() & index["split"].isin(splits)]
    if pool.empty:
        raise XRealError(f"{index_dir}: no image with an anatomy map in split {', '.join(splits)}")
    locations = _locations(boxes_from, index)
    masks = _mask_source(masks_from)
    mask_labels = masks.labels if masks else set()
    wanted = dict(targets)
    for label in sorted(set(locations) | mask_labels) if per_label else []:
        wanted[(label,)] = wanted.get((label,), 0) + per_label
    plan = [(labels, n) for labels, n in wanted.items()] + ([(HEALTHY, healthy)] if healthy else [])
    for labels, _ in plan:
        missing = [label for label in labels if label not in (*HEALTHY, *locations, *mask_labels)]
        if missing:
            raise XRealError(_nothing_to_place(missing, boxes_from or index_dir, locations))
    if masks and not any(mask_labels.intersection(labels) for labels, _ in plan):
        raise XRealError(
            f"--masks-from {masks_from} annotates {', '.join(sorted(mask_labels))} only, and no request asks for "
            f"it; add e.g. --target {sorted(mask_labels)[0]}=N, or leave --masks-from out"
        )
    rng = np.random.default_rng(seed)
    anatomies = _anatomy_order(pool, sum(n for _, n in plan), rng)
    rows, used = [], 0
    for labels, count in plan:
        for i in range(count):
            image = anatomies[used]
            used += 1
            rows.append(_request(index_dir, image, labels, i, locations, rng, seed + len(rows), masks))
    return rows


def _nothing_to_place(missing: list[str], where, locations: Mapping[str, np.ndarray]) -> str:
    if annotations.is_annotation_source(where):
        return (
            f"{where}: no box of {', '.join(missing)} to place it by: its radiologists annotated "
            f"{', '.join(sorted(locations))}; choose another --boxes-from"
            + (f" (or --masks-from {_mask_tables()} for the labels it annotates)" if "Pneumothorax" in missing else "")
        )
    return f"{where}: no box of {', '.join(missing)} to place it by; give --boxes-from an index with some"


def _anatomy_order(pool: pd.DataFrame, needed: int, rng: np.random.Generator) -> list[pd.Series]:
    """One image per patient in random order, patients reused (in a new order) only when all have been used."""
    firsts = pool.groupby("subject_id", sort=True).head(1)
    order: list[pd.Series] = []
    while len(order) < needed:
        order += [firsts.iloc[i] for i in rng.permutation(len(firsts))]
    return order[:needed]


def _request(index_dir, image, labels, number, locations, rng, request_seed, masks=None) -> dict:
    label_map = read_label_map(resolve_under(index_dir, image["anatomy_path"]))  # an index names files inside it
    boxes, mask = [], None
    tags = [f"anatomy-source={image['source']}", f"anatomy-image={image['image_id']}"]
    for label in labels:
        if label in HEALTHY:
            continue
        if masks is not None and label in masks.labels:
            drawn, annotated = masks.draw(label, label_map.shape, rng)
            mask = drawn if mask is None else mask | drawn
            tags.append(f"pathology-mask={masks.name}:{annotated}")
        else:
            x0, y0, x1, y1 = locations[label][rng.integers(len(locations[label]))].tolist()
            boxes.append({"label": label, "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1})
    if mask is not None and boxes:  # a row gives a mask or boxes: the other labels' boxes join the mask
        coords = [(b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in boxes]
        mask = mask | boxes_to_mask(coords, *label_map.shape, units="normalized")
        boxes = []
    row = {
        "request_id": f"{'-'.join(slug(label) for label in labels)}-{number:05d}",
        "labels": list(labels),
        "num_samples": 1,
        "anatomy_rle": rle_from_label_map(label_map),
        "boxes": boxes or None,
        "seed": int(request_seed),
        "split": "synthetic",
        "tags": tags,
    }
    if mask is not None:
        row[MASK_KEY] = mask
    return row


def mask_folder(manifest: str | os.PathLike[str]) -> Path:
    """Where :func:`write_index_manifest` puts a manifest's pathology masks: ``<stem>-masks/`` beside it."""
    manifest = Path(manifest)
    return manifest.parent / f"{manifest.stem}-masks"


def write_index_manifest(rows: Sequence[dict], out: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """Write :func:`manifest_from_index` rows as the manifest ``out``; return it and its mask folder (or None).

    Rows with a mask array get ``pathology_mask_path`` ``<stem>-masks/<request_id>.png``, relative to the
    manifest (so it stays under the manifest's root). The folder is written whole, then replaces the one a
    previous manifest of that name wrote; a folder of that name holding anything but PNG files is refused.
    """
    out = Path(out)
    folder = mask_folder(out)
    with_masks = [row for row in rows if row.get(MASK_KEY) is not None]
    if with_masks:
        stranger = folder.exists() and (
            not folder.is_dir() or any(not (p.is_file() and p.suffix == ".png") for p in folder.iterdir())
        )
        if stranger:
            raise XRealError(f"{folder}: exists and holds more than pathology masks; move it or choose another --out")
        with atomic_directory(folder) as staging:
            for row in with_masks:
                write_mask_file(staging / f"{row['request_id']}.png", row[MASK_KEY])
            if folder.is_dir():
                shutil.rmtree(folder)  # the previous manifest's masks, replaced by the complete new set
    masked = {row["request_id"] for row in with_masks}
    manifest_rows = []
    for row in rows:
        row = {key: value for key, value in row.items() if key != MASK_KEY}
        if row["request_id"] in masked:
            row["pathology_mask_path"] = f"{folder.name}/{row['request_id']}.png"
        manifest_rows.append(row)
    write_manifest(manifest_rows, out)
    return out, folder if with_masks else None
