"""Export a finished run in the layout CheXGenBench reads, to compute its leaderboard figures elsewhere.

CheXGenBench (Dutt et al. 2025, github.com/Raman1121/CheXGenBench) scores a
generator from a CSV of prompts and image file names plus a folder of images:

- ``metrics/fid.py`` (``scripts/image_quality_metrics.sh``: FID and KID on
  InceptionV3 and RadDINO, precision/recall/density/coverage) reads
  ``--synthetic_csv`` (default ``assets/CSV/prompt_INFO.csv``), joins its
  ``img_savename`` column to ``--synthetic_img_dir`` (default
  ``assets/synthetic_images/``), opens each file with PIL, converts it to RGB,
  resizes it to 299 px and casts it to 8 bits;
- ``metrics/img_text_alignment_scores.py`` reads ``annotated_prompt`` and
  ``synthetic_filename``;
- ``Downstream/Classification/downstream_classification.py`` (``all_synthetic``)
  reads ``synthetic_filename`` and ``chexpert_labels``, a Python dict literal of
  the 14 CheXpert labels in MIMIC-CXR's (alphabetical) order.

:func:`export_chexgenbench` writes ``images/<sample_id>.png`` (8-bit grayscale,
``size`` px, default 512: the resolution the benchmark's generators sample at;
the benchmark resizes to 299 itself), ``prompt_INFO.csv`` with all those
columns, and a ``README.md`` that says how to run the benchmark on it and what
the figures mean for a run that did not come from the benchmark's prompts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from xreal.core.files import atomic_directory, atomic_path
from xreal.core.images import MAX_IMAGE_SIDE, read_image
from xreal.core.labels import CHEXPERT_LABELS, NO_FINDING, prompt_for
from xreal.evaluate.inputs import EvaluationError, FinishedRun, read_finished_run

CSV_FILE = "prompt_INFO.csv"  # the name CheXGenBench's scripts look for under assets/CSV/
IMAGES = "images"
DEFAULT_SIZE = 512
REPOSITORY = "https://github.com/Raman1121/CheXGenBench"
# MIMIC-CXR's label order, the key order of CheXGenBench's ``chexpert_labels`` dicts (its MIMIC_PATHOLOGIES).
MIMIC_LABEL_ORDER: tuple[str, ...] = tuple(sorted(CHEXPERT_LABELS))
COLUMNS = (
    "img_savename",  # metrics/fid.py: the image file, relative to the images folder
    "synthetic_filename",  # img_text_alignment_scores.py, downstream_classification.py: the same file
    "prompt",  # the README's prompt column
    "annotated_prompt",  # the scripts' default prompt column: the same text
    "xreal_prompt",  # the text the model was conditioned on (empty for No Finding)
    "chexpert_labels",  # {label: 1.0 | 0.0} for all 14 labels, MIMIC order, as a Python literal
    "labels",  # the sample's positive labels joined by "|"
    "sample_id",
    "request_id",
    "seed",
)


def export_chexgenbench(
    run: str | os.PathLike[str], out: str | os.PathLike[str], size: int | None = DEFAULT_SIZE
) -> Path:
    """Write the accepted images of finished ``run`` and their prompts into ``out`` for CheXGenBench; return ``out``.

    ``size``: the side of the written PNGs (bicubic when growing, box filter when
    shrinking); ``None`` keeps the run's size, so pixels equal the run's images
    rounded to 8 bits. ``out`` must not exist or be empty; it appears complete
    or not at all. Rejected samples are never exported.
    """
    out = Path(out)
    if size is not None and not (1 <= int(size) <= MAX_IMAGE_SIDE):
        raise EvaluationError(f"--size must be between 1 and {MAX_IMAGE_SIDE} px, got {size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvaluationError(f"{out}: already exists and is not an empty folder; choose a new --out")
    finished = read_finished_run(run)
    accepted = finished.samples[finished.samples["decision"] == "accepted"]
    accepted = accepted[accepted["image_path"].notna() | _column(accepted, "dicom_path").notna()]
    if accepted.empty:
        raise EvaluationError(f"{finished.root}: no accepted sample has an image file to export")
    rows = []
    with atomic_directory(out) as staging:
        (staging / IMAGES).mkdir()
        for row in accepted.sort_values("sample_id").to_dict("records"):
            name = f"{row['sample_id']}.png"
            write_png8(staging / IMAGES / name, _resized(_sample_pixels(finished, row), size))
            rows.append(_csv_row(row, name))
        table = pd.DataFrame(rows, columns=list(COLUMNS))
        with atomic_path(staging / CSV_FILE) as tmp:
            table.to_csv(tmp, index=False)
        with atomic_path(staging / "README.md") as tmp:
            tmp.write_text(_readme(finished, out, len(table), size))
    return out


def write_png8(path: Path, image: np.ndarray) -> Path:
    """A float image in [0, 1] as an 8-bit grayscale PNG (rounded to the nearest of 256 levels)."""
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return path


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series(None, index=frame.index, dtype=object)


def _sample_pixels(finished: FinishedRun, row: dict) -> np.ndarray:
    """A sample's image in [0, 1]: its PNG, else its DICOM (a run written with --format dicom)."""
    if isinstance(row.get("image_path"), str):
        return read_image(finished.path(row["image_path"]))
    from xreal.data.dicom import read_dicom_pixels

    return read_dicom_pixels(finished.path(row["dicom_path"])).astype(np.float32) / 65535.0


def _resized(image: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or image.shape == (size, size):
        return image
    grow = size > max(image.shape)
    resample = Image.Resampling.BICUBIC if grow else Image.Resampling.BOX
    resized = Image.fromarray(np.asarray(image, dtype=np.float32)).resize((size, size), resample)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _csv_row(row: dict, name: str) -> dict:
    labels = [label for label in CHEXPERT_LABELS if label in set(row["labels"])]
    xreal_prompt = prompt_for(labels)
    text = xreal_prompt or NO_FINDING  # the benchmark's text encoders need a non-empty prompt
    chexpert = {label: float(row[label] == 1.0) for label in MIMIC_LABEL_ORDER}
    return {
        "img_savename": name,
        "synthetic_filename": name,
        "prompt": text,
        "annotated_prompt": text,
        "xreal_prompt": xreal_prompt,
        "chexpert_labels": repr(chexpert),
        "labels": "|".join(labels),
        "sample_id": row["sample_id"],
        "request_id": row["request_id"],
        "seed": int(row["seed"]),
    }


def _readme(finished: FinishedRun, out: Path, count: int, size: int | None) -> str:
    run_id = finished.record.get("run_id", "?")
    manifest = (finished.record.get("manifest") or {}).get("path", "?")
    shown_size = f"{size} x {size} px" if size else f"{finished.image_size} x {finished.image_size} px (the run's size)"
    return f"""# CheXGenBench export of xreal run `{finished.root.name}`

**Every image here is synthetic**, generated by xreal (run id `{run_id}`, manifest `{manifest}`,
`samples.parquet` sha256 `{finished.samples_sha256[:16]}…`). {count} accepted images; rejected ones are not exported.

- `images/<sample_id>.png`: 8-bit grayscale PNG, {shown_size}. CheXGenBench converts each image to RGB,
  resizes it to 299 px and casts it to 8 bits itself.
- `{CSV_FILE}`: one row per image. `img_savename` and `synthetic_filename` (the file, relative to `images/`),
  `prompt` and `annotated_prompt` (the label names the image was asked to show, "No Finding" for a healthy
  image), `xreal_prompt` (the model's own conditioning text, empty for No Finding), `chexpert_labels` (the 14
  CheXpert labels in MIMIC-CXR order as a Python dict literal, 1.0 or 0.0, as the benchmark's classification
  script reads them), `labels`, `sample_id`, `request_id`, `seed`.

## Running the benchmark (on a machine with a GPU and MIMIC-CXR-JPG)

```
git clone {REPOSITORY} && cd CheXGenBench
pip install -r requirements.txt                    # in its own environment
mkdir -p assets/CSV assets/synthetic_images
cp {out}/{CSV_FILE} assets/CSV/
cp {out}/{IMAGES}/*.png assets/synthetic_images/
# in scripts/image_quality_metrics.sh set REAL_IMG_DIR (your mimic-cxr-jpg/2.0.0 folder) and
# EXTRA_INFO=xreal-{finished.root.name}, and add: export SYNTHETIC_PROMPT_COL=annotated_prompt
./scripts/image_quality_metrics.sh                 # -> Results/image_generation_metrics.csv
```

`Results/image_generation_metrics.csv` then holds FID and KID (InceptionV3 and RadDINO) and precision, recall,
density and coverage (k = 5, RadDINO features); the leaderboard ranks by FID (RadDino). For downstream
classification set `TRAIN_CSV` to this `{CSV_FILE}`, `SYNTHETIC_IMG_DIR` to this `images/` folder and
`TRAINING_SETTING=all_synthetic` in `Downstream/Classification/scripts/run_training_inference.sh`. The
benchmark's privacy script samples its own images from a diffusers pipeline it loads; it does not read this
export.

## What the figures mean

The benchmark compares these images with the real images of its MIMIC-CXR test split
(`MIMIC_Splits/LLAVARAD_ANNOTATIONS_TEST.csv`), prompted by that split's LLaVA-Rad reports. An xreal run
generates what its manifest asked for, conditioned on CheXpert labels and anatomy masks, not on those report
prompts: its figures are comparable with the leaderboard only when the manifest was built from that test split
(one request per test image, with its labels and anatomy) and the model was trained on MIMIC-CXR. Otherwise the
numbers measure the distance to MIMIC-CXR's test images of a different set of requests: useful to compare xreal
runs with each other, not to rank xreal among the benchmark's generators. Phantom images (the demo bundle) are
not chest radiographs; their scores say nothing about real-image fidelity.
"""
