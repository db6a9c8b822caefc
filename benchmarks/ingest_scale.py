"""Reading MIMIC-CXR-JPG's tables at full size: rows per second and peak memory, metadata only.

Writes the three published tables at MIMIC-CXR-JPG 2.0.0's size (377,110 images
of 227,835 studies of 65,379 subjects, random ids and labels, gzip CSV as
PhysioNet ships them), then joins them into training-index rows with
``xreal.data.mimic.mimic_index`` in a fresh process. Prints seconds, rows/s and the
peak resident memory of that process, next to the peak of a process that only
imports the same modules (so the difference is what the join costs).

    python benchmarks/ingest_scale.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from xreal.core.labels import CHEXPERT_LABELS
from xreal.data.mimic import CHEXPERT_FILE, METADATA_FILE, SPLIT_FILE

CHILD = """
import resource, sys, time
from xreal.data.mimic import mimic_index
started = time.perf_counter()
if sys.argv[1] != "-":
    table, report = mimic_index(sys.argv[1])
    import pyarrow.parquet as pq
    pq.write_table(table, sys.argv[2])
    print(table.num_rows, report.to_text(), sep="\\n")
print(time.perf_counter() - started)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_fixture(root: Path, images: int, studies: int, subjects: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    subject_ids = np.sort(rng.choice(np.arange(10_000_000, 20_000_000), subjects, replace=False))
    study_subject = np.sort(rng.integers(0, subjects, studies))
    study_ids = rng.choice(np.arange(50_000_000, 60_000_000), studies, replace=False)
    image_study = np.sort(np.concatenate([np.arange(studies), rng.integers(0, studies, images - studies)]))
    dicom_ids = [f"{a:08x}-{b:08x}-{c:08x}-{d:08x}-{e:08x}" for a, b, c, d, e in rng.integers(0, 2**32, (images, 5))]
    subject_of_image = subject_ids[study_subject[image_study]]
    views = rng.choice(["PA", "AP", "LATERAL", "LL", ""], images, p=[0.25, 0.4, 0.3, 0.04, 0.01])
    meta = pd.DataFrame(
        {
            "dicom_id": dicom_ids,
            "subject_id": subject_of_image,
            "study_id": study_ids[image_study],
            "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
            "ViewPosition": views,
            "Rows": rng.integers(2000, 3100, images),
            "Columns": rng.integers(2000, 3100, images),
            "StudyDate": 21800506,
            "StudyTime": 213014.531,
            "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
            "ViewCodeSequence_CodeMeaning": "postero-anterior",
            "PatientOrientationCodeSequence_CodeMeaning": "Erect",
        }
    )
    meta.to_csv(root / METADATA_FILE, index=False, compression="gzip")
    split = rng.choice(["train", "validate", "test"], subjects, p=[0.98, 0.01, 0.01])[study_subject[image_study]]
    pd.DataFrame(
        {"dicom_id": dicom_ids, "study_id": study_ids[image_study], "subject_id": subject_of_image, "split": split}
    ).to_csv(root / SPLIT_FILE, index=False, compression="gzip")
    labels = {"subject_id": subject_ids[study_subject], "study_id": study_ids}
    for label in CHEXPERT_LABELS:
        labels[label] = rng.choice([1.0, 0.0, -1.0, np.nan], studies, p=[0.1, 0.1, 0.05, 0.75])
    pd.DataFrame(labels).to_csv(root / CHEXPERT_FILE, index=False, compression="gzip")


def child(*args: str) -> list[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True
    ).stdout.split("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=377_110)
    parser.add_argument("--studies", type=int, default=227_835)
    parser.add_argument("--subjects", type=int, default=65_379)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="xreal-ingest-"))
    started = time.perf_counter()
    write_fixture(root, args.images, args.studies, args.subjects)
    sizes = {p.name: p.stat().st_size / 1e6 for p in root.glob("*.csv.gz")}
    print(
        f"fixture in {root} ({time.perf_counter() - started:.1f} s): "
        + ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items())
    )

    *_, base_rss = [line for line in child("-") if line]
    rows, report, seconds, rss = [line for line in child(str(root), str(root / "index.parquet")) if line]
    print(report)
    print(f"{int(rows)} index rows from {args.images} metadata rows in {float(seconds):.2f} s")
    print(f"  {args.images / float(seconds):,.0f} metadata rows/s")
    print(f"  peak RSS {int(rss) / 1024:.0f} MiB (a process that only imports: {int(base_rss) / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
