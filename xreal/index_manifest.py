"""Manifests built from a training index: real patients' anatomies, pathologies where that label is seen.

This is how users produce labelled augmentation sets. :func:`manifest_from_index`
draws target anatomies from a training index (CheXmask maps of real patients,
from the held-out split by default, one image per patient until each has been
used), and gives each request a label or label combination from ``targets``
and, for each label, a box drawn from where that label's boxes lie in the
index (VinDr-CXR's, say, or another index's: ``boxes_from``). Each anatomy goes
into the manifest as CheXmask-style RLE, so the manifest stands alone; its
tags record the dataset and image id it came from, and nothing else about the
patient.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from xreal.errors import XRealError
from xreal.files import resolve_under
from xreal.labels import canonical_labels, slug
from xreal.masks import read_label_map, rle_from_label_map
from xreal.training_index import read_training_index

HEALTHY = ("No Finding",)


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


def manifest_from_index(
    index_dir: str | os.PathLike[str],
    targets: Mapping[tuple[str, ...], int],
    healthy: int = 0,
    splits: tuple[str, ...] = ("test",),
    seed: int = 0,
    boxes_from: str | os.PathLike[str] | None = None,
    per_label: int | None = None,
) -> list[dict]:
    """Manifest rows: ``targets`` (labels -> images) and ``healthy`` No Finding images on drawn anatomies.

    Args:
        index_dir: the training set whose anatomies are drawn (rows with an anatomy map in ``splits``).
        targets: how many images of each label or label combination.
        healthy: how many healthy images.
        splits: the index splits anatomies may come from (held-out patients: ``test``).
        seed: makes the draw and the requests' seeds reproducible.
        boxes_from: another training index whose boxes give the pathology locations (default: this one).
        per_label: also this many images of every label that has boxes (rare labels as many as common ones).
    """
    index_dir = Path(index_dir)
    index = read_training_index(index_dir)
    pool = index[index["anatomy_path"].notna() & index["split"].isin(splits)]
    if pool.empty:
        raise XRealError(f"{index_dir}: no image with an anatomy map in split {', '.join(splits)}")
    locations = box_distribution(read_training_index(boxes_from) if boxes_from else index)
    wanted = dict(targets)
    for label in sorted(locations) if per_label else []:
        wanted[(label,)] = wanted.get((label,), 0) + per_label
    plan = [(labels, n) for labels, n in wanted.items()] + ([(HEALTHY, healthy)] if healthy else [])
    for labels, _ in plan:
        missing = [label for label in labels if label not in HEALTHY and label not in locations]
        if missing:
            where = boxes_from or index_dir
            raise XRealError(
                f"{where}: no box of {', '.join(missing)} to place it by; give --boxes-from an index with some"
            )
    rng = np.random.default_rng(seed)
    anatomies = _anatomy_order(pool, sum(n for _, n in plan), rng)
    rows, used = [], 0
    for labels, count in plan:
        for i in range(count):
            image = anatomies[used]
            used += 1
            rows.append(_request(index_dir, image, labels, i, locations, rng, seed + len(rows)))
    return rows


def _anatomy_order(pool: pd.DataFrame, needed: int, rng: np.random.Generator) -> list[pd.Series]:
    """One image per patient in random order, patients reused (in a new order) only when all have been used."""
    firsts = pool.groupby("subject_id", sort=True).head(1)
    order: list[pd.Series] = []
    while len(order) < needed:
        order += [firsts.iloc[i] for i in rng.permutation(len(firsts))]
    return order[:needed]


def _request(index_dir, image, labels, number, locations, rng, request_seed) -> dict:
    label_map = read_label_map(resolve_under(index_dir, image["anatomy_path"]))  # an index names files inside it
    boxes = []
    for label in labels:
        if label not in HEALTHY:
            x0, y0, x1, y1 = locations[label][rng.integers(len(locations[label]))].tolist()
            boxes.append({"label": label, "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1})
    return {
        "request_id": f"{'-'.join(slug(label) for label in labels)}-{number:05d}",
        "labels": list(labels),
        "num_samples": 1,
        "anatomy_rle": rle_from_label_map(label_map),
        "boxes": boxes or None,
        "seed": int(request_seed),
        "split": "synthetic",
        "tags": [f"anatomy-source={image['source']}", f"anatomy-image={image['image_id']}"],
    }
