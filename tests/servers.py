"""Real servers for tests: a Prefect server (SQLite or PostgreSQL) and a PostgreSQL cluster, on free loopback ports."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text() if log else ''}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout} s:\n{log.read_text() if log else ''}")


def stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, with its children."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def start(command: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def client_env(url: str, home: Path) -> dict:
    """The environment that points a Prefect client (``xreal``, ``prefect``) at the server ``url``.

    Runners (``xreal serve``) and workers it starts ask for runs each second rather than Prefect's 10: a test waits
    for the run it just submitted."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
    return env


@contextlib.contextmanager
def prefect_server(home: Path, database_url: str | None = None) -> Iterator[dict]:
    """``prefect server start`` on a free port; yields the environment that points a client at it."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}",
    }
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    process = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}/api"
    try:
        healthy = lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200  # noqa: E731
        wait_for(healthy, "prefect server", 180, process, log)
        yield client_env(url, home / "client")
    finally:
        stop(process)


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server programs, if installed."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


@contextlib.contextmanager
def postgres(database: str = "prefect") -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free port (as user postgres when run as root); yields its asyncpg URL."""
    bin_dir = postgres_bin()
    assert bin_dir is not None
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="xreal-pg-"))
    data, log = folder / "data", folder / "postgres.log"
    if as_owner:
        shutil.chown(folder, "postgres")
    port = free_port()

    def run(*command):
        subprocess.run([*as_owner, *command], check=True, capture_output=True, cwd=folder)

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder}"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{database}"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)
