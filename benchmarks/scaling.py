"""How generation scales out: the local runner against local Dask clusters, and what orchestration costs per batch.

All in one run on this machine; each measurement is ``xreal generate`` in a
fresh process, as a user runs it (the embedded Prefect API, CPU, demo bundle).

1. Throughput. For the local runner (threads), a Dask cluster of 1 worker and
   one of 2 workers, the same manifest at N and at 2N samples. The marginal
   throughput N / (T(2N) - T(N)) cancels what a run pays once (imports, the
   API, starting the cluster, loading models on each worker, finalizing);
   printed as ratios to the local runner, with the end-to-end times.
2. Orchestration per batch. A manifest of B tiny batches (one sample, one
   DDIM step) against one of a single tiny batch: per batch,
   (T(B) - T(1) - in-task seconds / workers) / (B - 1), where the in-task
   seconds (sampling, judging, writing files) are what the shards record.
   What is left is the Prefect task engine, the runner, the progress
   artifact and the shard commit and merge.

    python benchmarks/scaling.py                              # N = 64 at 50 steps, B = 1000
    python benchmarks/scaling.py --samples 32 --tiny-batches 200   # a quicker look
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline_overhead import scaled_manifest

from xreal.manifest.schema import write_manifest
from xreal.run.dataset import shard_records

RUNNERS = {"threads": [], "dask-1": ["--dask-workers", "1"], "dask-2": ["--dask-workers", "2"]}


def generate(manifest: Path, out: Path, policy: Path, batch_size: int, runner: list[str]) -> float:
    """Seconds of one ``xreal generate`` in a fresh process."""
    command = [sys.executable, "-m", "xreal.cli", "generate", str(manifest), "--out", str(out), "--quiet"]
    command += ["--batch-size", str(batch_size), "--policy", str(policy), "--no-healthy-twins", *runner]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    return time.perf_counter() - started


def tiny_manifest(path: Path, batches: int) -> Path:
    row = {"request_id": "tiny", "labels": ["No Finding"], "num_samples": batches, "anatomy_template": "phantom-1"}
    return write_manifest([{**row, "seed": 7, "steps": 1, "anatomy_steps": 1}], path)


def in_task_seconds(out: Path) -> float:
    keys = ("sampling_s", "judging_s", "writing_s")
    return sum(record.get(k, 0.0) for record in shard_records(out).values() for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="N (a multiple of the demo's 16 requests)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per stage")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tiny-batches", type=int, default=1000, help="B (0: skip part 2)")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="xreal-scaling-"))
    policy = work / "policy.yaml"
    policy.write_text("retries: {max_rounds: 1}\n")  # the same samples every time: no redraws
    print(f"CPU: {os.cpu_count()} cores; demo bundle; each run is a fresh `xreal generate` process; work in {work}")

    if not args.skip_throughput:
        per_request = max(1, args.samples // 16)
        n = 16 * per_request
        small = scaled_manifest(work / "n.parquet", per_request, args.steps)
        large = scaled_manifest(work / "2n.parquet", 2 * per_request, args.steps)
        times: dict[str, tuple[float, float]] = {}
        for name, runner in RUNNERS.items():
            t1 = generate(small, work / f"{name}-n", policy, args.batch_size, runner)
            t2 = generate(large, work / f"{name}-2n", policy, args.batch_size, runner)
            times[name] = (t1, t2)
        print(f"\n1. Throughput: N = {n} and 2N = {2 * n} samples, {args.steps} steps per stage")
        print(f"   batch {args.batch_size}; ratios are to the local runner (threads)")
        base_marginal = n / (times["threads"][1] - times["threads"][0])
        base_end_to_end = 2 * n / times["threads"][1]
        for name, (t1, t2) in times.items():
            marginal, end_to_end = n / (t2 - t1), 2 * n / t2
            print(
                f"  {name:8s} T(N) {t1:6.1f} s  T(2N) {t2:6.1f} s"
                f"  marginal {marginal:5.2f} img/s (ratio {marginal / base_marginal:4.2f})"
                f"  end-to-end at 2N {end_to_end:5.2f} img/s (ratio {end_to_end / base_end_to_end:4.2f})"
            )

    b = args.tiny_batches
    if b < 2:
        return
    one, many = tiny_manifest(work / "tiny-1.parquet", 1), tiny_manifest(work / f"tiny-{b}.parquet", b)
    print(f"\n2. Orchestration per batch: {b} batches of one sample at one DDIM step")
    for name, runner, workers in (("threads", [], 1), ("dask-2", RUNNERS["dask-2"], 2)):
        t1 = generate(one, work / f"{name}-tiny-1", policy, 1, runner)
        tb = generate(many, work / f"{name}-tiny-{b}", policy, 1, runner)
        task = in_task_seconds(work / f"{name}-tiny-{b}")
        per_batch = (tb - t1 - task / workers) / (b - 1)
        print(
            f"  {name:8s} T(1) {t1:6.1f} s  T({b}) {tb:6.1f} s  in-task {task:6.1f} s"
            f"  orchestration {per_batch * 1000:6.1f} ms per batch"
        )


if __name__ == "__main__":
    main()
