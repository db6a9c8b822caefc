"""The generation flow behind a real Prefect server: served with `xreal serve`, or deployed from
infra/prefect.yaml to a process worker with the server on PostgreSQL, as infra/README.md says."""

import asyncio
import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from servers import BIN, client_env, postgres, postgres_bin, prefect_server, start, stop, wait_for
from test_generate_flow import manifest

from xreal.run.audit import audit_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "2", "--speed", "fast"]  # the demo bundle draws its findings at the fast preset


def api(env: dict, path: str) -> dict:
    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/{path}", timeout=10) as response:
        return json.load(response)


def command(env: dict, *args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def submit(env: dict, path: Path, out: Path, deployment: str) -> subprocess.CompletedProcess:
    args = ["submit", str(path), "--out", str(out), "--deployment", deployment, *FAST, "--wait"]
    return command(env, str(BIN / "xreal"), *args)


def run_id(output: str) -> str:
    return re.search(r"flow run ([0-9a-f-]{36})", output).group(1)


def assert_complete_dataset(out: Path) -> None:
    report = audit_run(out)
    assert report.consistent, report.to_text()
    decisions = pq.read_table(out / "samples.parquet").column("decision").to_pylist()
    assert decisions.count("accepted") == 6  # every request filled, within the policy's redraws


def test_xreal_serve_runs_submitted_runs_on_its_schedule_and_one_writer_per_directory(prefect_api, tmp_path):
    path = manifest(tmp_path / "m.parquet")
    env = client_env(prefect_api, tmp_path / "client")  # the session's server: a real one, on SQLite
    log = tmp_path / "serve.log"
    schedule = ["--cron", "0 3 * * *", "--manifest", str(path), "--out", str(tmp_path / "nightly" / "{date}")]
    served = start([str(BIN / "xreal"), "serve", "--name", "gen", "--limit", "2", *schedule], env, log, tmp_path)
    try:
        wait_for(lambda: api(env, "deployments/name/generate-dataset/gen"), "xreal serve", 120, served, log)
        deployment = api(env, "deployments/name/generate-dataset/gen")
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
        assert deployment["global_concurrency_limit"]["limit"] == 2
        assert deployment["parameters"]["out"].endswith("nightly/{date}")

        out = tmp_path / "out"
        result = submit(env, path, out, "gen")
        assert result.returncode == 0, result.stdout + result.stderr + log.read_text()
        assert "Completed" in result.stdout
        run = api(env, f"flow_runs/{run_id(result.stdout)}")
        assert run["state_type"] == "COMPLETED" and run["parameters"]["out"] == str(out)
        assert_complete_dataset(out)
        assert json.loads((out / "dataset.json").read_text())["flow_run_id"] == run["id"]
        missing = submit(env, path, tmp_path / "elsewhere", "no-such-deployment")
        assert missing.returncode == 2 and "no deployment 'generate-dataset/no-such-deployment'" in missing.stderr

        # Two runs at once into one directory: one writes it, the other is refused (or finds it done).
        twin = tmp_path / "twin"
        args = ["submit", str(path), "--out", str(twin), "--deployment", "gen", *FAST, "--wait"]
        both = [subprocess.Popen([str(BIN / "xreal"), *args], env=env, stdout=subprocess.PIPE, text=True)]
        both.append(subprocess.Popen([str(BIN / "xreal"), *args], env=env, stdout=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=300)[0] for p in both]
        states = [api(env, f"flow_runs/{run_id(o)}")["state"] for o in outputs]
        assert any(s["type"] == "COMPLETED" for s in states), outputs
        for state in states:
            if state["type"] != "COMPLETED":
                assert "is being written by another run" in state["message"], state
        assert_complete_dataset(twin)
    finally:
        stop(served)


@pytest.mark.skipif(postgres_bin() is None, reason="Debian's postgresql package is not installed")
def test_infra_readme_path_a_process_worker_and_a_server_on_postgres(tmp_path):
    path = manifest(tmp_path / "m.parquet")
    with postgres() as database, prefect_server(tmp_path / "prefect", database) as env:
        env["XREAL_PROJECT_DIR"] = str(ROOT)
        prefect = str(BIN / "prefect")
        created = command(env, prefect, "work-pool", "create", "xreal-process", "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        deploy = ["--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--name", "generate-dataset-local"]
        deployed = command(env, prefect, *deploy)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        deployment = api(env, "deployments/name/generate-dataset/generate-dataset-local")
        assert deployment["work_pool_name"] == "xreal-process"
        assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)

        log = tmp_path / "worker.log"
        worker = start([prefect, "worker", "start", "--pool", "xreal-process"], env, log, tmp_path)
        try:
            out = tmp_path / "out"
            result = submit(env, path, out, "generate-dataset-local")
            assert result.returncode == 0, result.stdout + result.stderr + log.read_text()
            assert_complete_dataset(out)
        finally:
            stop(worker)

        async def completed_runs_in_postgres() -> int:
            import asyncpg

            connection = await asyncpg.connect(database.replace("postgresql+asyncpg", "postgresql"))
            try:
                return await connection.fetchval("select count(*) from flow_run where state_type = 'COMPLETED'")
            finally:
                await connection.close()

        assert asyncio.run(completed_runs_in_postgres()) == 1
