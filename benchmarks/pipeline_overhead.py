"""What the generation flow costs on top of the work it orchestrates.

Measures, in one run on the same machine, each side in a fresh Python process
timed from its start (imports and model loading count on both sides):
(a) a script that loads the demo model and judges and samples and judges the
manifest's samples by calling them directly, batch after batch, writing
nothing; (b) ``xreal generate`` on the same manifest, batch size and device:
the Prefect flow on the embedded API (its start included), planning, writing
PNGs, masks, shards, the dataset card and the records. The two alternate
(direct, flow, flow, direct). Prints the wall times, their ratio (goal: at
most 1.15), and the judges' share of the direct run.

    python benchmarks/pipeline_overhead.py            # 256 demo samples, 100 DDIM steps per stage
    python benchmarks/pipeline_overhead.py --samples-per-request 2 --steps 20   # a quick look
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from xreal.manifest.schema import load_requests, write_manifest
from xreal.model.bundle import DEMO_BUNDLE
from xreal.run.generation import RunConfig, make_batches, plan, worker_models
from xreal.run.policy import QualityPolicy

DEMO = Path(__file__).resolve().parent.parent / "manifests" / "demo.parquet"


def scaled_manifest(path: Path, samples_per_request: int, steps: int | None) -> Path:
    rows = pq.read_table(DEMO).to_pylist()
    for row in rows:
        row["num_samples"] = samples_per_request
        if steps:
            row["steps"], row["anatomy_steps"] = steps, steps // 2
    return write_manifest(rows, path)


def direct_run(manifest: Path, batch_size: int) -> float:
    """Sampling and judging only, as a script would call them; returns the seconds spent judging."""
    config = RunConfig(manifest=manifest, out=Path(tempfile.mkdtemp()))
    pipeline, judges = worker_models(DEMO_BUNDLE, config.judges_source, "cpu")
    requests = load_requests(manifest)
    policy = QualityPolicy()
    judging = 0.0
    for batch in make_batches(plan(requests, {}, 1), batch_size):
        samples = batch.samples
        size = pipeline.config.image_size
        anatomy = [s.request.anatomy_map(size) for s in samples]
        masks = [s.request.pathology_mask(a.shape) for s, a in zip(samples, anatomy, strict=True)]
        settings = samples[0].request.settings()
        out = pipeline(
            anatomy,
            [list(s.request.labels) for s in samples],
            seeds=[s.seed for s in samples],
            pathology_masks=masks,
            num_inference_steps=settings.steps,
            anatomy_steps=settings.anatomy_steps,
            soft_scale=[s.request.settings().soft_scale for s in samples],
            guidance_scale=[s.request.settings().guidance_scale for s in samples],
        )
        judged = time.perf_counter()
        rows = judges.score(out.images, anatomy, masks)
        for row, s in zip(rows, samples, strict=True):
            policy.decide(row, s.request.labels, judges.labels, judges.realism_threshold)
        judging += time.perf_counter() - judged
    return judging


def direct(manifest: Path, batch_size: int) -> tuple[float, float]:
    """(wall seconds, judging seconds) of :func:`direct_run` in a fresh process."""
    command = [sys.executable, __file__, "--direct-run", str(manifest), "--batch-size", str(batch_size)]
    started = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, float(result.stdout.strip().splitlines()[-1])


def flow(manifest: Path, batch_size: int, out: Path, policy: Path) -> float:
    """``xreal generate`` in a fresh process, as a user runs it."""
    command = [sys.executable, "-m", "xreal.cli", "generate", str(manifest), "--out", str(out)]
    command += ["--batch-size", str(batch_size), "--quiet", "--policy", str(policy)]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    return time.perf_counter() - started


def rounded(values: list[float]) -> list[float]:
    return [round(v, 1) for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples-per-request", type=int, default=16, help="16 x 16 demo requests = 256 samples")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps per stage (default: the manifest's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved (direct, flow, flow, direct)")
    parser.add_argument("--direct-run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_run:
        print(direct_run(args.direct_run, args.batch_size))
        return

    work = Path(tempfile.mkdtemp(prefix="xreal-overhead-"))
    manifest = scaled_manifest(work / "manifest.parquet", args.samples_per_request, args.steps)
    policy = work / "policy.yaml"
    policy.write_text("retries: {max_rounds: 1}\n")  # the same samples on both sides: no redraws
    samples = len(plan(load_requests(manifest), {}, 1))

    direct_runs, flow_runs, judging = [], [], []
    order = ["direct", "flow", "flow", "direct"][: 2 * args.repeats] if args.repeats <= 2 else ["direct", "flow"] * 3
    for i, kind in enumerate(order):
        if kind == "direct":
            seconds, judging_s = direct(manifest, args.batch_size)
            direct_runs.append(seconds)
            judging.append(judging_s)
        else:
            out = work / f"run{i}"
            flow_runs.append(flow(manifest, args.batch_size, out, policy))
            assert len(pq.read_table(out / "samples.parquet")) == samples

    direct_s, flow_s = sum(direct_runs) / len(direct_runs), sum(flow_runs) / len(flow_runs)
    print(f"{samples} demo samples, batch {args.batch_size}, CPU ({os.cpu_count()} cores), runs in order {order}")
    print(
        f"  direct sampling + judging : {direct_s:7.1f} s  ({samples / direct_s:.2f} img/s) runs {rounded(direct_runs)}"
    )
    print(f"  xreal generate (flow)     : {flow_s:7.1f} s  ({samples / flow_s:.2f} img/s) runs {rounded(flow_runs)}")
    print(f"  ratio flow / direct       : {flow_s / direct_s:7.3f}  (goal <= 1.15)")
    print(f"  judges' share of direct   : {sum(judging) / sum(direct_runs):7.1%}")


if __name__ == "__main__":
    main()
