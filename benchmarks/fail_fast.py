"""Seconds from `xreal generate` starting to its refusal, for inputs it must refuse before Prefect starts.

Each case runs the real command in a fresh process (as a user would) and is
timed beside `xreal manifest validate` on a valid manifest, the fastest thing
the command line does, so the ratio says what the refusal costs beyond
starting Python. Goal (issue 13): every refusal under 5 s on 2 cores.

    .venv/bin/python benchmarks/fail_fast.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xreal.core.records import DEMO_BUNDLE
from xreal.manifest.schema import write_manifest
from xreal.run.generation import run_lock

XREAL = [sys.executable, "-m", "xreal.cli"]


def timed(args: list[str], env: dict) -> tuple[float, int, str]:
    started = time.perf_counter()
    done = subprocess.run([*XREAL, *args], env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - started, done.returncode, (done.stdout + done.stderr).strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each case; the median is printed.")
    options = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="xreal-fail-fast-"))
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    good = write_manifest(
        [{"request_id": "ok", "labels": ["No Finding"], "num_samples": 1, "anatomy_template": "phantom-1"}],
        tmp / "good.parquet",
    )
    bad = write_manifest(
        [{"request_id": "ok", "labels": ["Broken Heart"], "num_samples": 1, "anatomy_template": "phantom-1"}],
        tmp / "bad.parquet",
    )
    (tmp / "policy.yaml").write_text("classifier: {present: 2}\n")
    tampered = tmp / "tampered"
    shutil.copytree(DEMO_BUNDLE, tampered)
    weights = tampered / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")

    cases = {
        "manifest validate (valid; baseline)": ["manifest", "validate", str(good)],
        "invalid manifest": ["generate", str(bad), "--out", str(tmp / "a")],
        "locked --out": ["generate", str(good), "--out", str(tmp / "locked")],
        "bad policy": ["generate", str(good), "--out", str(tmp / "b"), "--policy", str(tmp / "policy.yaml")],
        "tampered bundle": ["generate", str(good), "--out", str(tmp / "c"), "--model", str(tampered)],
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    last: dict[str, tuple[int, str]] = {}
    with run_lock(tmp / "locked"):
        for _ in range(options.repeat):  # interleaved: the machine's noise hits every case alike
            for name, args in cases.items():
                elapsed, code, line = timed(args, env)
                seconds[name].append(elapsed)
                last[name] = (code, line)
    base = statistics.median(seconds["manifest validate (valid; baseline)"])
    print(f"{'case':<38} {'median s':>9} {'x validate':>11} {'exit':>5}  last line")
    for name, values in seconds.items():
        code, line = last[name]
        median = statistics.median(values)
        print(f"{name:<38} {median:>9.2f} {median / base:>10.2f}x {code:>5}  {line[:90]}")
    worst = max(
        statistics.median(v) for name, v in seconds.items() if name.startswith(("invalid", "locked", "bad", "t"))
    )
    print(f"\nslowest refusal {worst:.2f} s (goal: under 5 s); {os.cpu_count()} cores")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
