"""The generation flow end to end on the demo bundle, on a real (embedded) Prefect API."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from xreal.core.settings import SPEEDS
from xreal.manifest.schema import write_manifest
from xreal.run.audit import audit_run
from xreal.run.dataset import XRealDataset

pytestmark = pytest.mark.slow

FAST = {"steps": SPEEDS["fast"].steps, "anatomy_steps": SPEEDS["fast"].anatomy_steps}


def xreal(*args) -> Result:
    """``xreal ARGS`` in this process, on the session's Prefect API: for the runs a test does not kill, which a new
    interpreter would spend 15-20 s importing torch, diffusers and Prefect for."""
    from xreal.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def manifest(path, samples=2, steps=FAST):
    rows = [
        {
            "request_id": "cardio",
            "labels": ["Cardiomegaly"],
            "num_samples": samples,
            "anatomy_template": "phantom-1",
            "boxes": [{"label": None, "x_min": 0.36, "y_min": 0.44, "x_max": 0.69, "y_max": 0.69}],
            "seed": 1,
            **steps,
        },
        {
            "request_id": "effusion",
            "labels": ["Pleural Effusion"],
            "num_samples": samples,
            "anatomy_template": "phantom-2",
            "boxes": [{"label": None, "x_min": 0.09, "y_min": 0.73, "x_max": 0.27, "y_max": 0.84}],
            "seed": 2,
            **steps,
        },
        {
            "request_id": "healthy",
            "labels": ["No Finding"],
            "num_samples": samples,
            "anatomy_template": "phantom-1",
            "seed": 1,
            **steps,
        },
    ]
    return write_manifest(rows, path)


def hashes(out):
    table = pq.read_table(out / "samples.parquet")
    return dict(zip(table.column("sample_id").to_pylist(), table.column("content_sha256").to_pylist(), strict=True))


def test_flow_writes_a_filtered_dataset_that_the_audit_accepts(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.generate import run_generation

    out = tmp_path / "out"
    state = run_generation(manifest(tmp_path / "m.parquet"), out, batch_size=4, progress=False)
    assert state.is_completed(), state.message
    report = audit_run(out)
    assert report.consistent, report.to_text()
    table = pq.read_table(out / "samples.parquet").to_pandas()
    requested = {"cardio", "effusion", "healthy"}
    assert set(table.request_id) == requested
    accepted = table[table.decision == "accepted"].groupby("request_id").size().to_dict()
    assert all(accepted.get(r, 0) <= 2 for r in requested)
    rounds = table.groupby("request_id")["round"].max().to_dict()
    for rid in requested:  # a request short after round 0 was redrawn
        if (table[(table.request_id == rid) & (table["round"] == 0)].decision == "rejected").any():
            assert rounds[rid] >= 1 or accepted.get(rid, 0) == 2
    assert (out / "preview.png").is_file() and (out / "README.md").is_file()

    dataset = XRealDataset(out)
    assert len(dataset) == int((table.decision == "accepted").sum())

    async def artifacts():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    import asyncio

    assert {"generation-labels", "generation-summary", "generation-progress"} <= asyncio.run(artifacts())

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = run_generation(manifest(tmp_path / "m.parquet"), out, batch_size=4, progress=False)
    assert again.is_completed()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before  # a finished run is a no-op


# The stochastic sampler, which draws fresh noise at every step, is the hard case; every sampler's batch invariance
# is checked in the pipeline (test_samplers), and the run batches and resumes alike for every sampler.
def test_images_do_not_depend_on_batch_size_or_on_a_resume(prefect_api, tmp_path, monkeypatch):
    """float64: one image per batch, and four per batch with a batch that fails until a rerun resumes it, write
    the same images (content hashes), and the samples record the sampler."""
    from flows.generate import run_generation
    from xreal.run import generation

    path = manifest(tmp_path / "m.parquet")
    options = dict(precision="float64", policy={"retries": {"max_rounds": 1}}, progress=False)
    sampler = "dpmsolver++-sde"
    options["sampler"] = {"sampler": sampler}
    state = run_generation(path, tmp_path / "bs1", batch_size=1, **options)
    assert state.is_completed(), state.message

    real_run_batch = generation.run_batch

    def fails_on_effusion(config, batch, device, run_id):
        if any(s.request.request_id == "effusion" for s in batch.samples):
            raise OSError("disk went away")
        return real_run_batch(config, batch, device, run_id)

    monkeypatch.setattr(generation, "run_batch", fails_on_effusion)
    assert run_generation(path, tmp_path / "bs4", batch_size=4, **options).is_failed()
    monkeypatch.setattr(generation, "run_batch", real_run_batch)
    assert run_generation(path, tmp_path / "bs4", batch_size=4, **options).is_completed()

    one, four = hashes(tmp_path / "bs1"), hashes(tmp_path / "bs4")
    assert len(one) == 6 and one == four
    table = pq.read_table(tmp_path / "bs4" / "samples.parquet").to_pandas()
    steps = FAST["steps"]
    assert set(table["sampler"]) == {sampler} and set(table["steps"]) == {steps}
    # stage 1 only for No Finding; stage 2 guided at every step
    assert dict(zip(table["request_id"], table["unet_evaluations"], strict=True)) == {
        "cardio": 3 * steps, "effusion": 3 * steps, "healthy": steps
    }  # fmt: skip


def test_a_killed_run_resumes_to_exactly_the_requested_samples(prefect_api, tmp_path):
    path = manifest(tmp_path / "m.parquet", samples=4, steps={"steps": 30, "anatomy_steps": 15})
    out = tmp_path / "out"
    args = ["generate", path, "--out", out, "--batch-size", "2", "--quiet", "--policy", no_redraws(tmp_path)]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    command = [sys.executable, "-m", "xreal.cli", *map(str, args)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shards = out / "shards"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if shards.is_dir() and len(list(shards.glob("*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stdout.read().decode()  # still running: kill it mid-run
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(list(shards.glob("*.parquet")))
    assert 2 <= committed < 6 and not (out / "samples.parquet").exists()

    finished = xreal(*args)
    assert finished.exit_code == 0, finished.output
    table = pq.read_table(out / "samples.parquet")
    ids = table.column("sample_id").to_pylist()
    assert sorted(ids) == sorted(f"{r}-r{i:04d}" for r in ("cardio", "effusion", "healthy") for i in range(4))
    assert audit_run(out).consistent

    again = xreal(*args)
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output


def no_redraws(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("retries: {max_rounds: 1}\n")
    return path


def test_a_failing_batch_does_not_stop_the_others_and_a_rerun_completes(prefect_api, tmp_path, monkeypatch):
    from flows.generate import run_generation
    from xreal.run import generation

    real_run_batch = generation.run_batch
    attempts = []

    def flaky(config, batch, device, run_id):
        if any(s.request.request_id == "effusion" for s in batch.samples):
            attempts.append(batch.name)
            raise OSError("disk went away")
        return real_run_batch(config, batch, device, run_id)

    monkeypatch.setattr(generation, "run_batch", flaky)
    path, out = manifest(tmp_path / "m.parquet"), tmp_path / "out"
    state = run_generation(path, out, batch_size=2, progress=False, policy={"retries": {"max_rounds": 1}})
    assert state.is_failed()
    assert len(attempts) == 3  # the task ran once and was retried twice
    assert "1 batch(es) failed" in state.message and "Rerun the same command to resume" in state.message
    done = set(pq.read_table(out / "samples.parquet").column("request_id").to_pylist())
    assert done == {"cardio", "healthy"}  # the other batches finished and were kept

    monkeypatch.setattr(generation, "run_batch", real_run_batch)
    state = run_generation(path, out, batch_size=2, progress=False, policy={"retries": {"max_rounds": 1}})
    assert state.is_completed(), state.message
    assert len(pq.read_table(out / "samples.parquet")) == 6 and audit_run(out).consistent


def test_generate_names_a_missing_judge_weight_file_and_writes_nothing(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setenv("XREAL_WEIGHTS_DIR", str(tmp_path / "empty-cache"))
    policy = tmp_path / "policy.yaml"
    policy.write_text("judges: torchxrayvision\n")
    out = tmp_path / "out"
    result = xreal("generate", manifest(tmp_path / "m.parquet"), "--out", out, "--policy", policy, "--quiet")
    assert result.exit_code == 2, result.output
    assert "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121" in result.output
    assert str(tmp_path / "empty-cache") in result.output and "xreal weights fetch" in result.output
    assert not out.exists()


def test_date_in_the_run_directory_becomes_the_runs_scheduled_date(prefect_api):
    import datetime
    from pathlib import Path

    from prefect import flow

    from flows.generate import run_directory

    @flow
    def scheduled_run():
        return run_directory("/data/nightly/{date}"), run_directory("/data/fixed")

    before = datetime.datetime.now(datetime.UTC).date()
    dated, fixed = scheduled_run()
    after = datetime.datetime.now(datetime.UTC).date()
    assert dated in {Path(f"/data/nightly/{day:%Y-%m-%d}") for day in (before, after)}
    assert fixed == Path("/data/fixed")
