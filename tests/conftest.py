"""Shared fixtures: small label maps and manifests written the way users write them."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from flows import use_project_defaults  # imports no Prefect: its settings apply

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: the cores are shared out, as Dask workers share them
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_name] = str(_share)  # before torch is imported here, and for every process a test starts
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="xreal-test-prefect-")  # never the user's Prefect database
os.environ.pop("PREFECT_API_URL", None)
# The settings `xreal` commands run with, for the runs tests start in this process: among them the embedded
# server's 90 s to start, where Prefect's own 20 s failed a run on a loaded 2-core machine.
use_project_defaults()


# The files whose tests take longest (over 40 s on 2 cores, by `pytest --durations`), longest first.
LONGEST_FILES = [
    "test_server.py", "test_dask.py", "test_reference_import.py", "test_signals.py", "test_generate_flow.py",
    "test_evaluate.py", "test_judging.py", "test_utility.py", "test_tampering.py",
]  # fmt: skip


def pytest_collection_modifyitems(config, items):
    """The longest files run first: under ``pytest -n`` (``make test``) the many quick ones come last and even out
    when the workers finish. Every other file, and the tests within each file, keep their order."""
    first = {name: rank for rank, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


@pytest.fixture(scope="session")
def prefect_api():
    """One embedded Prefect API for the whole session (it takes 15-25 s to start); yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def box_label_map(height: int = 64, width: int = 64, heart_width: int = 16) -> np.ndarray:
    """A label map of rectangles: lungs at the sides, heart in between (right of centre)."""
    label_map = np.zeros((height, width), dtype=np.uint8)
    top, bottom = height // 8, height * 3 // 4
    label_map[top:bottom, width // 8 : width // 2 - 2] = 1
    label_map[top:bottom, width // 2 + 2 : width * 7 // 8] = 2
    centre = width // 2 + width // 16
    label_map[height // 2 : bottom, centre - heart_width // 2 : centre + heart_width // 2] = 3
    return label_map


@pytest.fixture
def label_map() -> np.ndarray:
    return box_label_map()


@pytest.fixture(scope="session")
def pipe():
    """The bundled demo pipeline, loaded once (calls leave its own scheduler untouched)."""
    from xreal.model.bundle import load_pipeline

    pipeline = load_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
