"""Does the yardstick move where it should? The demo run beside three deliberately broken runs.

Evaluates (``xreal evaluate``) the demo run (``make demo``: demo-output/dataset) and:
- control off: the demo manifest generated again with ``anatomy_steps: 0`` (no anatomy control), with the
  demo run's sampler options (``make demo``: ``--speed fast``);
- shuffled masks: the demo run with its pathology masks moved between requests;
- copies: the demo run with every accepted image replaced by a training image;
all against the demo model's training phantoms (seed 11) with held-out phantoms (seed 12) for tau, and prints
the headline figures side by side. Each broken run must be clearly worse in its own figure.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from xreal.evaluate.broken_runs import copy_training_images, shuffle_pathology_masks
from xreal.evaluate.report import evaluate_run
from xreal.manifest.schema import write_manifest

ROOT = Path(__file__).resolve().parents[1]


def fmt(entry) -> str:
    if entry is None or entry.get("value") is None:
        return "-"
    if entry.get("low") is None:
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=ROOT / "demo-output" / "dataset")
    parser.add_argument("--reference", type=Path, default=ROOT / "build" / "demo-phantom")
    parser.add_argument("--test", type=Path, default=ROOT / "build" / "held-out-phantom")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "evaluation-sanity")
    parser.add_argument(
        "--sampler-options",
        nargs="*",
        default=["--speed", "fast"],
        help="xreal generate's sampler options for the control-off run: those the demo run used (make demo's)",
    )
    args = parser.parse_args()

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    manifest = pd.read_parquet(ROOT / "manifests" / "demo.parquet")
    manifest["anatomy_steps"] = 0
    off_manifest = write_manifest(manifest, args.work / "control-off.parquet")
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "xreal.cli",
            "generate",
            str(off_manifest),
            "--out",
            str(args.work / "control-off"),
            "--keep-rejected",
            "--quiet",
            *args.sampler_options,
        ],
        check=True,
    )
    print(f"control-off run generated in {time.perf_counter() - started:.0f} s")
    runs = {
        "demo": args.run,
        "control off": args.work / "control-off",
        "shuffled masks": shuffle_pathology_masks(args.run, args.work / "shuffled-masks"),
        "copies": copy_training_images(args.run, args.reference, args.work / "copies"),
    }
    reports = {}
    for name, run in runs.items():
        started = time.perf_counter()
        reports[name] = evaluate_run(
            run, args.reference, args.work / f"report-{name.replace(' ', '-')}", test=args.test, progress=False
        )
        print(f"{name}: evaluated in {time.perf_counter() - started:.0f} s")

    rows = {
        "Fréchet distance": lambda r: fmt(r["fidelity"]["synthetic"]["frechet"]),
        "  real vs real": lambda r: fmt(r["fidelity"]["real_vs_real"]["frechet"]),
        "KID": lambda r: fmt(r["fidelity"]["synthetic"]["kid"]),
        "precision": lambda r: f"{r['fidelity']['synthetic']['prdc']['precision']:.3f}",
        "recall": lambda r: f"{r['fidelity']['synthetic']['prdc']['recall']:.3f}",
        "density": lambda r: f"{r['fidelity']['synthetic']['prdc']['density']:.3f}",
        "coverage": lambda r: f"{r['fidelity']['synthetic']['prdc']['coverage']:.3f}",
        "MS-SSIM within request": lambda r: fmt(r["diversity"]["within_request"]),
        "MS-SSIM across requests": lambda r: fmt(r["diversity"]["across_requests"]),
        "  real pairs": lambda r: fmt(r["diversity"]["real_pairs"]),
    }
    for subset in ("accepted", "all_draws"):
        rows |= {
            f"[{subset}] anatomy Dice": lambda r, s=subset: fmt(r["control"][s]["anatomy_dice"]),
            f"[{subset}]   random pairing": lambda r, s=subset: fmt(r["control"][s]["anatomy_dice_random_pairing"]),
            f"[{subset}]   recovered": lambda r, s=subset: f"{r['control'][s]['anatomy_recovered']:.3f}",
            f"[{subset}] change inside mask": lambda r, s=subset: fmt(r["control"][s]["inside_mask"]),
            f"[{subset}] within one latent cell": lambda r, s=subset: fmt(r["control"][s]["within_latent_cell"]),
            f"[{subset}] label hit rate (mean)": lambda r, s=subset: f"{r['control'][s]['hit_rate_mean']:.3f}",
        }
    rows |= {
        "likely copies (>= tau)": lambda r: fmt(r["memorisation"]["rate"]),
        "  tau": lambda r: f"{r['memorisation']['tau']:.4f}",
        "pixel-space copies": lambda r: fmt(r["memorisation"]["pixel_rate"]),
        "accepted images": lambda r: str(r["run"]["accepted"]),
    }
    names = list(reports)
    print("\n| figure | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, get in rows.items():
        cells = []
        for name in names:
            try:
                cells.append(get(reports[name]))
            except (KeyError, TypeError):
                cells.append("-")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nper label (demo, accepted | all draws): hit rate, twin called positive, AUROC, change inside mask")
    for label, entry in reports["demo"]["control"]["all_draws"]["per_label"].items():
        accepted = reports["demo"]["control"]["accepted"]["per_label"].get(label, {})
        print(
            f"  {label:18s} hit {fmt(accepted.get('hit_rate'))} | {fmt(entry.get('hit_rate'))}; "
            f"twin {fmt(entry.get('twin_positive_rate'))}; AUROC {fmt(entry.get('auroc'))}; "
            f"inside {fmt(entry.get('inside_mask'))}"
        )
    for name, report in reports.items():
        for warning in report["warnings"]:
            print(f"warning ({name}): {warning}")


if __name__ == "__main__":
    main()
