"""Validate and expand a 1,000,000-row manifest; print seconds and peak RSS.

Goal (issue 2): under 30 s and 2 GB on a 2-core machine. The manifest is built
in a child process, so the peak RSS printed is that of validation and
expansion alone. Usage: ``python benchmarks/manifest_scale.py [--rows N]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from xreal.core.labels import CHEXPERT_LABELS, NO_FINDING
from xreal.core.masks import rle_from_label_map, write_mask_file
from xreal.manifest.schema import MANIFEST_SCHEMA, SAMPLE_SCHEMA, expand_manifest, manifest_table, validate_manifest

CHUNK = 100_000


def _anatomy_map(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label_map = np.zeros((256, 256), dtype=np.uint8)
    top, bottom = 40 + rng.integers(0, 10), 190 + rng.integers(0, 10)
    label_map[top:bottom, 30:120] = 1
    label_map[top:bottom, 136:226] = 2
    label_map[120:bottom, 110 : 170 + rng.integers(0, 30)] = 3
    return label_map


def build(path: Path, rows: int) -> None:
    """A realistic mix: 90% templates, 5% RLE (100 anatomies), 5% label-map files (100 files)."""
    folder = path.parent
    rles = [rle_from_label_map(_anatomy_map(i)) for i in range(100)]
    for i in range(100):
        write_mask_file(folder / "anatomy" / f"{i:03d}.png", _anatomy_map(i))
        lesion = np.zeros((256, 256), dtype=bool)
        lesion[60 + i : 90 + i, 50:80] = True
        write_mask_file(folder / "lesions" / f"{i:03d}.png", lesion)
    pathologies = [label for label in CHEXPERT_LABELS if label != NO_FINDING]
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, MANIFEST_SCHEMA) as writer:
        for start in range(0, rows, CHUNK):
            records = []
            for i in range(start, min(rows, start + CHUNK)):
                kind = i % 20
                healthy = i % 4 == 0
                labels = [NO_FINDING] if healthy else list(rng.choice(pathologies, size=1 + i % 2, replace=False))
                row = {
                    "request_id": f"req-{i:07d}",
                    "labels": labels,
                    "num_samples": 1 + i % 3,
                    "split": ("train", "validate", "test")[i % 3],
                }
                if kind == 0:
                    row["anatomy_rle"] = rles[i % 100]
                elif kind == 1:
                    row["anatomy_path"] = f"anatomy/{i % 100:03d}.png"
                else:
                    row["anatomy_template"] = f"phantom-{i % 5000}"
                if not healthy:
                    if kind == 1:
                        row["pathology_mask_path"] = f"lesions/{i % 100:03d}.png"
                    else:
                        x = float(rng.uniform(0.1, 0.5))
                        row["boxes"] = [{"label": None, "x_min": x, "y_min": 0.3, "x_max": x + 0.2, "y_max": 0.6}]
                if i % 7 == 0:
                    row["seed"] = i
                if i % 11 == 0:
                    row["steps"], row["guidance_scale"] = 50, 5.0
                records.append(row)
            writer.write_table(manifest_table(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.parquet"
        t0 = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(target=build, args=(path, args.rows))
        child.start()
        child.join()
        assert child.exitcode == 0, "building the manifest failed"
        built = time.perf_counter() - t0
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        t0 = time.perf_counter()
        report = validate_manifest(path)
        validated = time.perf_counter() - t0
        assert report.ok, report.summary()

        t0 = time.perf_counter()
        samples = 0
        with pq.ParquetWriter(Path(tmp) / "samples.parquet", SAMPLE_SCHEMA) as writer:
            for batch in expand_manifest(path, validate=False):  # validated just above
                writer.write_batch(batch)
                samples += batch.num_rows
        expanded = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    total = validated + expanded
    print(f"manifest rows         {args.rows:>12,}  (built in {built:.1f} s)")
    print(f"samples               {samples:>12,}")
    print(f"validate              {validated:>10.1f} s  ({args.rows / validated:,.0f} rows/s)")
    print(f"expand (to Parquet)   {expanded:>10.1f} s  ({samples / expanded:,.0f} samples/s)")
    print(f"validate + expand     {total:>10.1f} s  goal < 30 s: {'met' if total < 30 else 'NOT met'}")
    print(
        f"peak RSS              {peak:>10.0f} MB (after imports {rss_before:.0f} MB)  goal < 2048 MB: "
        f"{'met' if peak < 2048 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
