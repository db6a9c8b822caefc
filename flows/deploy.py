"""The generation flow as a Prefect deployment: served from this machine, and runs asked of a server.

``xreal serve`` registers the ``generate-dataset`` deployment with the
Prefect server ``PREFECT_API_URL`` names and runs its flow runs here (each in
a subprocess of its own), on this machine's devices or a Dask cluster. A cron
schedule and a cap on concurrent runs are part of the deployment.
``xreal submit`` asks the server for a run of a deployment (served here, or
declared in ``infra/prefect.yaml`` and run by a work pool's worker).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xreal.core.errors import XRealError

FLOW_NAME = "generate-dataset"
DEPLOYMENT_NAME = "generate-dataset"


def require_server(command: str) -> str:
    """The server's API URL; an error saying how to get one when only the embedded API would be used."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise XRealError(
            f"{command} needs a Prefect server (the embedded one cannot keep deployments or schedules): "
            "start one with `prefect server start` and set PREFECT_API_URL, e.g. "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (see infra/README.md)"
        )
    return url


@contextlib.contextmanager
def reaching(server: str) -> Iterator[None]:
    """Turn "the server is not there" (refused, timed out, unknown host) into one paragraph naming it."""
    import httpx

    try:
        yield
    except (httpx.TransportError, ConnectionError) as exc:
        reason = str(exc) or type(exc).__name__
        raise XRealError(
            f"cannot reach the Prefect server at {server} ({reason}): start it (`prefect server start`) "
            "or fix PREFECT_API_URL"
        ) from None


def serve_generation(
    name: str = DEPLOYMENT_NAME,
    parameters: dict[str, Any] | None = None,
    cron: str | None = None,
    limit: int = 1,
) -> None:
    """Register the deployment and run its flow runs here until interrupted.

    Args:
        name: the deployment's name (runs are asked for as ``generate-dataset/<name>``).
        parameters: defaults for the flow's parameters (a schedule needs ``manifest`` and ``out``).
        cron: a cron schedule; its runs use ``parameters``.
        limit: at most this many runs at once; more wait for a slot (``AwaitingConcurrencySlot``).
    """
    from prefect import serve

    from flows.generate import generate_dataset

    parameters = {"progress": False, **(parameters or {})}
    if cron and not {"manifest", "out"} <= parameters.keys():
        raise XRealError("a schedule needs --manifest and --out: its runs have nobody to ask")
    server = require_server("xreal serve")
    with reaching(server):
        deployment = generate_dataset.to_deployment(
            name=name,
            cron=cron,
            parameters=parameters,
            concurrency_limit=limit,
            tags=["xreal"],
            description="Generate a labelled, filtered synthetic chest X-ray dataset from a manifest.",
        )
        serve(deployment)


def submit_generation(
    deployment: str, manifest: Path, out: Path, options: dict[str, Any], wait: bool = False
) -> tuple[Any, str]:
    """Ask the server for a run of ``deployment`` on ``manifest`` into ``out``; returns the run and its UI link.

    Paths are made absolute: the run happens in another process, maybe on another machine
    that mounts the same storage.
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_UI_URL

    server = require_server("xreal submit")
    if not Path(manifest).is_file():
        raise XRealError(f"{manifest}: no such manifest file")
    parameters = {"manifest": str(Path(manifest).resolve()), "out": str(Path(out).resolve()), **options}
    if "/" not in deployment:
        deployment = f"{FLOW_NAME}/{deployment}"
    try:
        with reaching(server):
            run = run_deployment(deployment, parameters=parameters, timeout=None if wait else 0, as_subflow=False)
    except ObjectNotFound:
        raise XRealError(
            f"no deployment {deployment!r} on {server}: "
            "start `xreal serve`, or deploy infra/prefect.yaml (see infra/README.md)"
        ) from None
    ui = PREFECT_UI_URL.value() or server.removesuffix("/api")
    return run, f"{ui.rstrip('/')}/runs/flow-run/{run.id}"
