"""The infra files say what infra/README.md says, and what can run here runs: the image's install
command and entrypoint, the deployments' entrypoint and parameters, the Kubernetes job template."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
README = (INFRA / "README.md").read_text()


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_installs_with_the_projects_own_command_and_bakes_in_no_weights():
    instructions = dockerfile_instructions()
    base = next(arg for op, arg in instructions if op == "FROM")
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    runs = [arg for op, arg in instructions if op == "RUN"]
    install = [r for r in runs if r.startswith("make install")]
    assert install == ["make install VENV=/opt/venv EXTRAS=gpu"]
    # what that command does: the same steps as `make test`'s install, with the gpu extra
    dry = subprocess.run(
        ["make", "-n", "-B", "install", "VENV=/opt/venv", "EXTRAS=gpu"], cwd=ROOT, capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    assert "pip install --quiet torch==2.14.1 torchvision==0.29.1" in dry.stdout
    assert "pip install --quiet -e '.[gpu]'" in dry.stdout

    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    volumes = json.loads(next(arg for op, arg in instructions if op == "VOLUME"))
    assert {"/models", "/weights", "/data"} <= set(volumes)
    copied = [source for op, arg in instructions if op in ("COPY", "ADD") for source in arg.split()[:-1]]
    assert {"pyproject.toml", "Makefile", "xreal", "flows"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not source.startswith(("build", ".venv", "demo-output")), source
    lines = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and all(f"!{s}" in ignore or f"!{s}/**" in ignore for s in copied)
    entrypoint = json.loads(next(arg for op, arg in instructions if op == "ENTRYPOINT"))
    assert entrypoint[-1] == "/opt/xreal/infra/entrypoint.sh" and os.access(INFRA / "entrypoint.sh", os.X_OK)


def entrypoint(models: Path, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "XREAL_MODELS_DIR": str(models)}
    env["XREAL_WEIGHTS_DIR"] = str(models.parent / "weights")
    return subprocess.run([str(INFRA / "entrypoint.sh"), *command], env=env, capture_output=True, text=True)


def test_the_entrypoint_verifies_mounted_bundles_before_running_the_command(tmp_path):
    from xreal.model.bundle import DEMO_BUNDLE

    models = tmp_path / "models"
    shutil.copytree(DEMO_BUNDLE, models / "demo")
    started = entrypoint(models, "echo", "command ran")
    assert started.returncode == 0, started.stderr
    assert f"{models / 'demo'}: model bundle ok" in started.stdout
    assert "judge set ok" in started.stdout and started.stdout.endswith("command ran\n")

    unet = next((models / "demo" / "unet").glob("*.safetensors"))
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF
    unet.write_bytes(bytes(data))
    refused = entrypoint(models, "echo", "command ran")
    assert refused.returncode != 0
    assert "command ran" not in refused.stdout
    assert unet.name in refused.stderr and "damaged" in refused.stderr


def test_compose_runs_the_server_on_postgres_and_a_gpu_worker_as_the_readme_says():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services, volumes = compose["services"], compose["volumes"]
    assert set(services) == {"postgres", "prefect-server", "worker"}
    assert set(volumes) == {"postgres-data", "xreal-models", "xreal-weights", "xreal-data"}
    for name in [*services, *volumes]:
        assert f"`{name}`" in README, name

    database = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert database.startswith("postgresql+asyncpg://") and "@postgres:5432/" in database
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "infra/Dockerfile"
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    mounts = {m.split(":")[1]: m for m in worker["volumes"]}
    assert mounts["/models"].endswith(":ro") and mounts["/weights"].endswith(":ro") and "/data" in mounts
    gpu = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    deployed = re.search(r"--name (\S+)", worker["command"][-1]).group(1)
    deployments = yaml.safe_load((INFRA / "prefect.yaml").read_text())["deployments"]
    pools = {d["name"]: d["work_pool"]["name"] for d in deployments}
    assert pools[deployed] == "xreal-process" and "--pool xreal-process" in worker["command"][-1]


def test_every_deployment_runs_the_generation_flow_with_parameters_it_accepts():
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    names = {"generate-dataset-local", "generate-dataset-nightly", "generate-dataset-docker", "generate-dataset-k8s"}
    assert names <= deployments.keys()
    pools = {d["work_pool"]["name"] for d in deployments.values()}
    assert pools == {"xreal-process", "xreal-docker", "xreal-k8s"}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for deployment in deployments.values():
            flow = load_flow_from_entrypoint(deployment["entrypoint"])
            assert flow.name == "generate-dataset"
            flow.validate_parameters({"manifest": "m.parquet", "out": "o", **deployment["parameters"]})
            assert deployment["concurrency_limit"] >= 1
    finally:
        os.chdir(cwd)
    nightly = deployments["generate-dataset-nightly"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *" and "{date}" in nightly["parameters"]["out"]
    docker = deployments["generate-dataset-docker"]["work_pool"]["job_variables"]
    assert any(v.endswith(":/models:ro") for v in docker["volumes"])
    assert docker["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]


def test_the_kubernetes_job_template_is_valid_for_prefect_and_asks_for_gpus_and_the_volumes():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    WorkPoolCreate(name="xreal-k8s", type="kubernetes", base_job_template=template)  # Prefect's own validation
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    job = apply_values(template["job_configuration"], {**defaults, "gpus": 2})["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    declared = {d["metadata"]["name"] for d in yaml.safe_load_all((INFRA / "k8s" / "volumes.yaml").read_text())}
    assert claims == {"xreal-data", "xreal-models", "xreal-weights"} and claims <= declared
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/data", "/models", "/weights"} <= mounts


def test_the_dask_recipes_give_each_worker_one_gpu_and_one_thread():
    cluster = yaml.safe_load((INFRA / "dask" / "kubernetes.yaml").read_text())
    assert cluster["kind"] == "DaskCluster"
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["args"][worker["args"].index("--nthreads") + 1] == "1"
    assert {"name": "XREAL_DEVICE", "value": "cuda:0"} in worker["env"]

    pytest.importorskip("dask_jobqueue")
    spec = importlib.util.spec_from_file_location("slurm_recipe", INFRA / "dask" / "slurm.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    slurm = recipe.slurm_cluster(partition="gpu", cores=6, venv="/shared/venv")
    try:
        script = slurm.job_script()
    finally:
        slurm.close()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --cpus-per-task=6" in script and "#SBATCH -p gpu" in script
    assert "export XREAL_DEVICE=cuda:0" in script
    assert re.search(r"/shared/venv/bin/python -m distributed.cli.dask_worker .* --nthreads 1 ", script)


def test_workers_started_from_the_recipes_keep_glibcs_malloc_defaults():
    import dask
    from distributed.nanny import _get_env_variables

    recipe = dask.config.collect(paths=[str(INFRA / "dask" / "config")], env={})
    with dask.config.set(dask.config.merge(dask.config.config, recipe)):  # as DASK_CONFIG adds it
        environ = _get_env_variables("distributed.nanny.pre-spawn-environ")
    assert "MALLOC_TRIM_THRESHOLD_" not in environ and environ["OMP_NUM_THREADS"] == "1"
    with dask.config.set({}):  # Dask's default, for contrast
        assert "MALLOC_TRIM_THRESHOLD_" in _get_env_variables("distributed.nanny.pre-spawn-environ")

    image_config = next(arg for op, arg in dockerfile_instructions() if op == "ENV" and "DASK_CONFIG=" in arg)
    assert "DASK_CONFIG=/opt/xreal/infra/dask/config" in image_config  # /opt/xreal holds the project's infra/
    worker = yaml.safe_load((INFRA / "dask" / "kubernetes.yaml").read_text())["spec"]["worker"]["spec"]
    assert {"name": "DASK_CONFIG", "value": "/opt/xreal/infra/dask/config"} in worker["containers"][0]["env"]
