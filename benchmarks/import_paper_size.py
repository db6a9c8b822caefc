"""How long ``xreal import-reference`` takes on checkpoints of the published size, and the memory it needs.

Writes a backbone and an anatomy controller with every parameter name and shape
of the reference at the paper's sizes (``tests/data/reference_paper_layout.json``,
1.67 billion numbers in the backbone with its EMA copy) filled with random
values, then runs the import as a user would, in a child process, and prints
its wall time, peak memory and the sizes of the files.

    python benchmarks/import_paper_size.py [--work DIR] [--half]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from xreal.model.bundle import reference_scheduler
from xreal.model.reference import schedule_buffers

ROOT = Path(__file__).resolve().parents[1]


def write_checkpoint(shapes: dict[str, list[int]], path: Path, extra: dict[str, torch.Tensor] | None = None) -> None:
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(tuple(s), generator=generator) * 0.02 for k, s in shapes.items()}
    state.update(extra or {})
    torch.save({"state_dict": state, "global_step": 1}, path)


def write_vocab(folder: Path, size: int = 30522) -> Path:
    """A bert-base-uncased-sized WordPiece vocabulary ([PAD] 0, specials, placeholder pieces)."""
    folder.mkdir(parents=True, exist_ok=True)
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"word{i}" for i in range(size - 5))]
    (folder / "vocab.txt").write_text("\n".join(pieces) + "\n")
    return folder


def gib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temp dir)")
    parser.add_argument("--half", action="store_true", help="import with --half")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="xreal-import-"))
    work.mkdir(parents=True, exist_ok=True)
    layout = json.loads((ROOT / "tests" / "data" / "reference_paper_layout.json").read_text())

    started = time.perf_counter()
    buffers = {k: torch.tensor(v, dtype=torch.float32) for k, v in schedule_buffers(reference_scheduler()).items()}
    shapes = {k: s for k, s in layout["backbone"].items() if k not in buffers}
    write_checkpoint(shapes, work / "backbone.pth", buffers)
    write_checkpoint(layout["anatomy_controller"], work / "anatomy_controller.pth")
    tokenizer = write_vocab(work / "bert")
    written = time.perf_counter() - started

    out = work / "bundle"
    command = [sys.executable, "-m", "xreal.cli", "import-reference", "--backbone", str(work / "backbone.pth")]
    command += ["--anatomy-controller", str(work / "anatomy_controller.pth"), "--tokenizer", str(tokenizer)]
    command += ["--out", str(out), *(["--half"] if args.half else [])]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(done.stdout + done.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(done.stdout.strip())
    print(
        f"\ncheckpoints: backbone {gib(work / 'backbone.pth'):.2f} GiB, anatomy controller "
        f"{gib(work / 'anatomy_controller.pth'):.2f} GiB (written in {written:.0f} s)\n"
        f"import: {seconds:.0f} s wall, peak memory {peak:.2f} GiB, bundle {gib(out):.2f} GiB"
        f"{' (float16)' if args.half else ' (float32)'}, {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
