"""The generation flow on real Dask clusters: the same dataset as one process, one model per worker, dead workers."""

import json
import os
import signal
import threading
import time

import pytest
import torch
from test_generate_flow import hashes, manifest

from flows.execution import Execution, local_cluster, start_local_cluster
from xreal.core.errors import XRealError
from xreal.run.audit import audit_run

pytestmark = pytest.mark.slow

# float64 images do not depend on batch size or on the threads per process (a Dask worker on
# this machine gets one thread; the single process gets both cores), so the hashes must match.
OPTIONS = {"batch_size": 2, "precision": "float64", "policy": {"retries": {"max_rounds": 1}}, "progress": False}


@pytest.fixture(scope="module")
def reference(prefect_api, tmp_path_factory):
    """The manifest, and the dataset one process writes from it."""
    from flows.generate import run_generation

    folder = tmp_path_factory.mktemp("reference")
    path = manifest(folder / "m.parquet", samples=4, steps={"steps": 4, "anatomy_steps": 2})  # float64 is slow
    state = run_generation(path, folder / "out", **OPTIONS)
    assert state.is_completed(), state.message
    return path, hashes(folder / "out")


def test_a_local_dask_cluster_writes_the_same_dataset_as_one_process(reference, tmp_path):
    from flows.generate import run_generation

    path, expected = reference
    out = tmp_path / "out"
    state = run_generation(path, out, dask_workers=2, **OPTIONS)
    assert state.is_completed(), state.message
    assert hashes(out) == expected and len(expected) == 12
    record = json.loads((out / "dataset.json").read_text())
    assert record["execution"] == "local Dask cluster of 2 worker(s) on cpu"
    workers = record["workers"]
    assert len(workers) == 2 and sum(workers.values()) == 6  # six batches, spread over both worker processes
    assert all(not name.endswith(f":{os.getpid()}") for name in workers)
    assert audit_run(out).consistent


def test_an_existing_cluster_keeps_one_model_per_worker_and_survives_a_dead_worker(prefect_api, reference, tmp_path):
    from distributed import Client, LocalCluster

    from flows.generate import run_generation

    path, expected = reference
    out = tmp_path / "out"
    env = {"PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1"}
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, env=env, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)
        killed = []

        def kill_a_worker_mid_batch():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not killed:
                if (out / "shards").is_dir() and list((out / "shards").glob("*.parquet")):
                    busy = [address for address, keys in client.processing().items() if keys]
                    if busy:
                        os.kill(pids[busy[0]], signal.SIGKILL)
                        killed.append(pids[busy[0]])
                time.sleep(0.02)

        killer = threading.Thread(target=kill_a_worker_mid_batch, daemon=True)
        killer.start()
        state = run_generation(path, out, dask_address=cluster.scheduler_address, **OPTIONS)
        killer.join()
        assert killed, "no worker was busy to kill"
        assert state.is_completed(), state.message
        assert hashes(out) == expected  # the lost batch ran again elsewhere, to the same images
        assert audit_run(out).consistent

        from xreal.run import generation

        loaded = client.run(lambda: len(generation._MODELS))
        assert all(n <= 1 for n in loaded.values()), loaded  # one pipeline per worker process, not per task
        assert sum(json.loads((out / "dataset.json").read_text())["workers"].values()) == 6


def test_execution_choices_are_checked_and_local_clusters_get_a_device_each():
    with pytest.raises(XRealError, match="not both"):
        Execution(("cpu",), dask_workers=2, dask_address="tcp://127.0.0.1:8786")
    with pytest.raises(XRealError, match="not a number"):
        Execution(("cpu",), dask_workers=-1)
    assert Execution(("cuda:0", "cuda:1")).task_devices == ["cuda:0", "cuda:1"]
    assert Execution(("cpu",), dask_address="tcp://h:8786").task_devices is None  # the worker decides

    gpus = local_cluster(2, ["cuda:0", "cuda:1"], "http://127.0.0.1:4200/api")["cluster_kwargs"]
    assert gpus["env"]["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    if gpus["kind"] == "distributed.LocalCluster":  # dask-cuda is not installed
        assert gpus["env"]["XREAL_DEVICES"] == "cuda:0,cuda:1"
    else:
        assert gpus["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_local_workers_share_the_cores_and_keep_glibcs_malloc_defaults():
    from distributed import Client

    options = local_cluster(2, ["cpu"], "http://127.0.0.1:4200/api")
    assert options["cluster_class"] is start_local_cluster
    share = max(1, (os.cpu_count() or 1) // 2)
    with start_local_cluster(**options["cluster_kwargs"]) as cluster, Client(cluster) as client:

        def setup():
            import torch

            return os.environ.get("MALLOC_TRIM_THRESHOLD_"), torch.get_num_threads(), os.environ["XREAL_DEVICES"]

        found = client.run(setup)
    assert len(found) == 2
    assert set(found.values()) == {(None, share, "cpu")}  # Dask would set 65536 and one thread


def test_a_worker_finds_its_device(monkeypatch):
    from xreal.run import generation

    monkeypatch.delenv("XREAL_DEVICE", raising=False)
    monkeypatch.setenv("XREAL_DEVICES", "cuda:0,cuda:1")

    class Worker:
        name = 3

    monkeypatch.setattr("distributed.get_worker", lambda: Worker)
    assert generation.worker_device() == "cuda:1"  # local cluster worker 3 of 2 GPUs
    monkeypatch.setenv("XREAL_DEVICE", "cuda:7")
    assert generation.worker_device() == "cuda:7"  # set by the cluster recipe
    monkeypatch.delenv("XREAL_DEVICE")
    monkeypatch.delenv("XREAL_DEVICES")
    assert generation.worker_device() == ("cuda:0" if torch.cuda.is_available() else "cpu")
