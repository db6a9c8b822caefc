"""Reading a CheXmask CSV at the size of the published files: rows per second and peak memory.

Streams a CheXmask-shaped CSV to disk (2 GB by default, in chunks): the published columns
(``dicom_id``, ``Dice RCA (Mean)``, ``Dice RCA (Max)``, ``Landmarks`` as a printed array over many
lines, ``Left Lung``, ``Right Lung``, ``Heart`` as RLE of lungs and heart in 900-1200 px images,
``Height``, ``Width``), about 20 kB a row as in the real files. Then reads it with
``xreal.data.chexmask.read_chexmask`` in a fresh process, for a share of the ids (``--wanted``, plus ids
the file lacks), and prints seconds, rows/s, MB/s and that process's peak resident memory, next to
the peak of a process that only imports the same modules. The rows kept stay in memory (their RLE
text): the peak grows by about their size over the reading's own, which stays bounded by a few blocks.
The file is written in a temporary folder that is deleted at the end.

    python benchmarks/chexmask_scale.py [--size-gb 2] [--wanted 0.1] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xreal.core.masks import rle_encode

COLUMNS = "dicom_id,Dice RCA (Mean),Dice RCA (Max),Landmarks,Left Lung,Right Lung,Heart,Height,Width"
TEMPLATES = 24  # distinct anatomies; rows cycle through them with their own ids and scores

CHILD = """
import resource, sys, time
from xreal.data.chexmask import read_chexmask
started = time.perf_counter()
if sys.argv[1] != "-":
    wanted = open(sys.argv[2]).read().split()
    masks, report = read_chexmask(sys.argv[1], wanted, min_dice=0.0)
    kept = sum(masks[c].str.len().sum() for c in ("Left Lung", "Right Lung", "Heart"))
    print(report.rows_read, report.kept, report.without_mask, kept, report.to_text(), sep="\\n")
print(time.perf_counter() - started)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def ellipse(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.ogrid[:height, :width]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def template(rng: np.random.Generator) -> str:
    """The ``Landmarks,Left Lung,Right Lung,Heart,Height,Width`` part of a row: one anatomy at full resolution."""
    height, width = int(rng.integers(900, 1200)), int(rng.integers(900, 1200))
    ry, rx = height * rng.uniform(0.3, 0.36), width * rng.uniform(0.15, 0.19)
    right = ellipse(height, width, height * 0.48, width * 0.3, ry, rx)
    left = ellipse(height, width, height * 0.48, width * 0.7, ry, rx)
    heart = ellipse(height, width, height * 0.62, width * 0.55, height * 0.14, width * 0.16)
    points = rng.uniform(0, min(height, width), (120, 2)).round(0)
    landmarks = np.array2string(points, threshold=10**6, precision=0, floatmode="fixed")  # one line per point
    return f'"{landmarks}",{rle_encode(left)},{rle_encode(right)},{rle_encode(heart)},{height},{width}'


def write_fixture(path: Path, size: int, seed: int = 0, chunk: int = 16 << 20) -> list[str]:
    """A CheXmask-shaped CSV of about ``size`` bytes, written in chunks; returns its ids."""
    rng = np.random.default_rng(seed)
    tails = [template(rng) for _ in range(TEMPLATES)]
    ids, written, buffer, buffered = [], 0, [], 0
    with open(path, "w", newline="") as f:
        f.write(COLUMNS + "\n")
        while written < size:
            image_id = f"{rng.integers(0, 2**63):016x}-{len(ids):08d}"
            mean = rng.uniform(0.4, 0.95)
            line = f"{image_id},{mean:.6f},{min(1.0, mean + 0.03):.6f},{tails[len(ids) % TEMPLATES]}\n"
            ids.append(image_id)
            buffer.append(line)
            buffered += len(line)
            if buffered >= chunk:
                f.write("".join(buffer))
                written += buffered
                buffer, buffered = [], 0
        f.write("".join(buffer))
    return ids


def child(*args: str) -> list[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True
    ).stdout.split("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of the CSV to write and read")
    parser.add_argument("--wanted", type=float, default=0.1, help="share of the file's ids to ask for")
    parser.add_argument("--tmp", default=None, help="folder for the temporary file (default: the system's)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="xreal-chexmask-", dir=args.tmp) as tmp:
        path = Path(tmp) / "MIMIC-CXR-JPG.csv"
        started = time.perf_counter()
        ids = write_fixture(path, int(args.size_gb * 1e9))
        size = path.stat().st_size
        print(
            f"wrote {len(ids):,} rows, {size / 1e9:.2f} GB ({size / len(ids) / 1e3:.1f} kB a row) "
            f"in {time.perf_counter() - started:.1f} s"
        )
        rng = np.random.default_rng(1)
        wanted = list(rng.choice(ids, int(len(ids) * args.wanted), replace=False)) + [f"absent-{i}" for i in range(100)]
        (Path(tmp) / "wanted.txt").write_text("\n".join(wanted))

        *_, base_rss = [line for line in child("-") if line]
        rows, kept, without, kept_bytes, report, seconds, rss = [
            line for line in child(str(path), str(Path(tmp) / "wanted.txt")) if line
        ]
        seconds = float(seconds)
        print(report)
        print(
            f"read {int(rows):,} rows in {seconds:.1f} s: {int(rows) / seconds:,.0f} rows/s, "
            f"{size / seconds / 1e6:.0f} MB/s"
        )
        print(
            f"  {int(kept):,} rows kept ({int(kept_bytes) / 2**20:.0f} MiB of RLE), {int(without)} ids not in the file"
        )
        print(f"  peak RSS {int(rss) / 1024:.0f} MiB (a process that only imports: {int(base_rss) / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
