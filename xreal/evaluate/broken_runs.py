"""Deliberately broken runs: the yardstick's own check.

A report is only worth something if it gets worse, in the right figure, when a
run is broken in a known way. These functions copy a finished run and break it
as a faulty model or pipeline would; the copy stays a consistent run (its sample
table and pins are rewritten to match), so only the evaluation can tell:

- :func:`shuffle_pathology_masks`: each request's pathology mask swapped for
  another request's (the images no longer follow the masks the run says
  conditioned them): the placement figures must fall;
- :func:`copy_training_images`: every accepted image replaced by a training
  image (a model that memorised): the memorisation figures must rise.

A run without anatomy control is a real run instead: the same manifest with
``anatomy_steps: 0``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from xreal.core.files import sha256_file, write_json
from xreal.core.images import read_image, write_png16
from xreal.evaluate.inputs import read_finished_run, read_training_set
from xreal.run.dataset import DATASET_FILE, SAMPLES_FILE


def _rewrite_samples(run: Path, table: pa.Table) -> None:
    """Write a changed sample table and pin it in dataset.json, as a run that was produced this way would be."""
    pq.write_table(table, run / SAMPLES_FILE)
    record = json.loads((run / DATASET_FILE).read_text())
    record.setdefault("files", {})[SAMPLES_FILE] = sha256_file(run / SAMPLES_FILE)
    write_json(run / DATASET_FILE, record)


def _set_column(table: pa.Table, name: str, values: list) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))


def shuffle_pathology_masks(run: str | os.PathLike[str], out: str | os.PathLike[str], shift: int = 3) -> Path:
    """A copy of ``run`` in which request *i* holds the pathology mask of request *i + shift* (cyclically)."""
    read_finished_run(run)
    out = Path(out)
    shutil.copytree(run, out)
    table = pq.read_table(out / SAMPLES_FILE)
    paths = table.column("pathology_mask_path").to_pylist()
    masks = sorted({p for p in paths if p})
    contents = {p: (out / p).read_bytes() for p in masks}
    for i, path in enumerate(masks):
        (out / path).write_bytes(contents[masks[(i + shift) % len(masks)]])
    hashes = {p: sha256_file(out / p) for p in masks}
    _rewrite_samples(out, _set_column(table, "pathology_mask_sha256", [hashes.get(p) if p else None for p in paths]))
    return out


def copy_training_images(
    run: str | os.PathLike[str], training_set: str | os.PathLike[str], out: str | os.PathLike[str]
) -> Path:
    """A copy of ``run`` whose accepted images are the training set's first images, one each."""
    finished = read_finished_run(run)
    training = read_training_set(training_set, "training set", finished.image_size)
    out = Path(out)
    shutil.copytree(run, out)
    table = pq.read_table(out / SAMPLES_FILE)
    hashes = table.column("image_sha256").to_pylist()
    decisions = table.column("decision").to_pylist()
    sources = iter(training.paths())
    for i, path in enumerate(table.column("image_path").to_pylist()):
        if decisions[i] == "accepted":
            write_png16(out / path, read_image(next(sources)))
            hashes[i] = sha256_file(out / path)
    _rewrite_samples(out, _set_column(table, "image_sha256", hashes))
    return out
