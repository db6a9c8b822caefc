"""What an evaluation reads: a finished run and training sets, checked first, then streamed in batches.

Images are never all held at once: :func:`image_batches` reads a list of
files batch by batch, and the report keeps features (a few hundred floats an
image), not pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from xreal.core.errors import XRealError
from xreal.core.files import PathError, read_json, resolve_under, sha256_file
from xreal.core.images import read_image
from xreal.core.labels import CHEXPERT_LABELS, NO_FINDING
from xreal.data.training_index import INDEX_FILE, read_training_index
from xreal.run.dataset import DATASET_FILE, SAMPLES_FILE


class EvaluationError(XRealError):
    """An evaluation that cannot run on these inputs: the message names what is wrong and where."""


@dataclass
class FinishedRun:
    """A finished generation run: its record, its sample table and where its files are."""

    root: Path
    record: dict[str, Any]
    samples: pd.DataFrame  # every sample row, accepted and rejected
    samples_sha256: str

    @property
    def image_size(self) -> int:
        return int(self.record["model"]["image_size"])

    @property
    def judges_source(self) -> str | None:
        return (self.record.get("judges") or {}).get("source")

    @property
    def labels(self) -> list[str]:
        """The labels the run asked for, in CheXpert order (No Finding last)."""
        asked = {label for labels in self.samples["labels"] for label in labels}
        return [label for label in CHEXPERT_LABELS if label in asked and label != NO_FINDING] + (
            [NO_FINDING] if NO_FINDING in asked else []
        )

    def path(self, relative: str) -> Path:
        return resolve_under(self.root, relative)


@dataclass
class TrainingSet:
    """A training set folder (``index.parquet`` and its files), as a reference of real images."""

    root: Path
    frame: pd.DataFrame
    index_sha256: str
    option: str  # the command-line option that named it, for messages

    @property
    def image_size(self) -> int:
        return int(self.frame["height"].iloc[0])

    def positives(self, label: str) -> np.ndarray:
        """Rows showing ``label`` (1.0); unknown (-1 or blank) counts as not shown."""
        return (self.frame[label].fillna(0.0).to_numpy() == 1.0) if label in self.frame else np.zeros(len(self), bool)

    def paths(self, rows: Sequence[int] | None = None) -> list[Path]:
        frame = self.frame if rows is None else self.frame.iloc[list(rows)]
        return [self.resolve(p) for p in frame["image_path"]]

    def resolve(self, relative: str) -> Path:
        try:
            return resolve_under(self.root, relative)
        except PathError as exc:
            raise EvaluationError(f"{self.root / INDEX_FILE} ({self.option}): {exc}") from None

    def __len__(self) -> int:
        return len(self.frame)


def read_finished_run(run: str | os.PathLike[str]) -> FinishedRun:
    """A run that ``xreal generate`` finished; anything else is refused with what to do."""
    root = Path(run)
    if not root.is_dir():
        raise EvaluationError(f"{root}: no such run directory")
    record_path, samples_path = root / DATASET_FILE, root / SAMPLES_FILE
    if not record_path.is_file() or not samples_path.is_file():
        missing = DATASET_FILE if not record_path.is_file() else SAMPLES_FILE
        raise EvaluationError(
            f"{root}: not a finished xreal run ({missing} is missing); finish it with `xreal generate` "
            "(the same command resumes it), then evaluate"
        )
    record = read_json(record_path, "dataset record", keys=("model", "counts"))
    if not isinstance(record.get("model"), dict) or "image_size" not in record["model"]:
        raise EvaluationError(f"{record_path}: damaged dataset record: no model image_size")
    samples_sha256 = sha256_file(samples_path)
    pinned = (record.get("files") or {}).get(SAMPLES_FILE)
    if pinned is not None and pinned != samples_sha256:
        raise EvaluationError(
            f"{samples_path}: changed since the run finished (its sha256 is not the one {DATASET_FILE} pins); "
            "`xreal audit run` says what differs"
        )
    try:
        samples = pq.read_table(samples_path).to_pandas()
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{samples_path}: cannot read the sample table ({exc})") from None
    if not (samples["decision"] == "accepted").any():
        raise EvaluationError(f"{root}: the run accepted no image; there is nothing to evaluate")
    return FinishedRun(root, record, samples.reset_index(drop=True), samples_sha256)


def read_training_set(folder: str | os.PathLike[str], option: str, image_size: int | None = None) -> TrainingSet:
    """A training set folder named by ``option`` (e.g. ``--reference``); its images must be ``image_size`` square."""
    root = Path(folder)
    index = root / INDEX_FILE if root.is_dir() else root
    if root.is_file():
        root = root.parent
    if not index.is_file():
        raise EvaluationError(
            f"{option} {folder}: no {INDEX_FILE} there; a training set is a folder written by `xreal phantom` "
            "or `xreal ingest`"
        )
    frame = read_training_index(index).reset_index(drop=True)
    if frame.empty:
        raise EvaluationError(f"{option} {index}: the training set has no images")
    sizes = sorted({(int(h), int(w)) for h, w in zip(frame["height"], frame["width"], strict=True)})
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:5])
        raise EvaluationError(f"{option} {index}: images of several sizes ({shown}); evaluate against one size")
    if image_size is not None and sizes[0] != (image_size, image_size):
        raise EvaluationError(
            f"{option} {index}: its images are {sizes[0][0]}x{sizes[0][1]} px but the run's are "
            f"{image_size}x{image_size}; evaluate against a training set of the run's size "
            f"(`xreal phantom --size {image_size}` or `xreal ingest ... --size {image_size}`)"
        )
    return TrainingSet(root, frame, sha256_file(index), option)


def image_batches(paths: Sequence[Path], batch_size: int = 256, size: int | None = None) -> Iterator[np.ndarray]:
    """Images ``[B, H, W]`` in [0, 1], read ``batch_size`` files at a time (resized to ``size`` when given)."""
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start : start + batch_size]:
            try:
                image = read_image(path)
            except (OSError, XRealError) as exc:
                raise EvaluationError(f"{path}: cannot read this image ({exc})") from None
            batch.append(image)
        if size is not None:
            batch = [resize_image(image, size) for image in batch]
        yield np.stack(batch)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """A square grayscale image resized to ``size`` (area when shrinking, bilinear when growing)."""
    if image.shape == (size, size):
        return image
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    mode = "area" if image.shape[-1] > size else "bilinear"
    return F.interpolate(tensor, size=(size, size), mode=mode)[0, 0].numpy()


def describe(path: Path, sha256: str, **extra: Any) -> dict[str, Any]:
    """What a report records about one of its inputs."""
    return {"path": str(path.resolve()), "sha256": sha256, **extra}


def as_json(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into plain JSON values (NaN as null)."""
    return json.loads(json.dumps(value, default=_plain), parse_constant=lambda _: None)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
