"""Prefect flows and tasks for xreal.

Flows decide order, fan-out, retries, caching and reporting; each task is a
thin wrapper over one function of the ``xreal`` library. The generation flow
is ``flows.generate``.
"""

import os
from pathlib import Path

EMBEDDED_STARTUP_SECONDS = 90
"""How long the embedded Prefect API gets to start: Prefect's 20 s default ran out on a loaded 2-core machine."""


def use_project_defaults() -> None:
    """Give embedded Prefect a project-chosen home unless the user chose one (or points at a server),
    and keep Dask's routine INFO logs out of the terminal.

    Call before Prefect and Dask are imported: they read these settings once.
    """
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
        os.environ["PREFECT_HOME"] = str(state / "xreal" / "prefect")
    Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # start_embedded_api gives xreal's own server this time anyway; the setting covers any server Prefect starts itself
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EMBEDDED_STARTUP_SECONDS))
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
