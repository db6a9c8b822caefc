"""The embedded Prefect API tied to this process, and interrupts that stop a run cleanly.

Prefect's embedded API server (``SubprocessASGIServer``) shares the caller's
process group, so a terminal's Ctrl-C kills it mid-run and the flow then
retries a dead API for minutes; and it outlives a SIGKILLed parent. Here it
runs in a session of its own and dies with this process, and SIGINT or SIGTERM
stop a run within seconds, leaving it resumable (:func:`exit_on_interrupt`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
)

from flows import EMBEDDED_STARTUP_SECONDS


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM during a run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def exit_on_interrupt(out: Path) -> Iterator[None]:
    """Make SIGINT and SIGTERM stop a run within seconds, resumable, and leave no process behind.

    Either signal raises :class:`Interrupted` in the main thread: Prefect marks the flow run Crashed,
    a local Dask cluster is closed on the way out, and the batches in flight are abandoned (they commit
    no shard, so a rerun draws them again). Then the embedded API server is stopped, one line says how
    to resume, and the process exits at once with 128 + the signal (130, 143): waiting for the threads
    still sampling could take minutes. Use it around :func:`run_generation`, in the main thread.
    """
    from prefect.exceptions import TerminationSignal

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except (KeyboardInterrupt, TerminationSignal) as exc:
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)  # the cleanup below is short; let it finish
        signum = getattr(exc, "signum", None) or getattr(exc, "signal", None) or signal.SIGINT
        stop_embedded_api()
        print(f"interrupted: {out} is resumable; rerun the same command to continue", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then send them again to the handlers they would have met.

    Around code that calls into a library which turns any exception into one of its own: prefect-dask
    serialises the run's context with pydantic on every submit, and a signal whose handler raised in there
    (Prefect's TerminationSignal, :class:`Interrupted`) came out as a PydanticSerializationError, failing
    the run instead of interrupting it. Outside the main thread, where handlers cannot be set, it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, frame: received.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            os.kill(os.getpid(), signum)


def start_embedded_api() -> None:
    """Start Prefect's embedded API server, when this process uses one, so that it ends with this process.

    Prefect's own (``SubprocessASGIServer``) shares this process's process group, so a terminal's Ctrl-C
    kills it mid-run and the flow then retries a dead API for minutes; and it outlives a SIGKILLed
    parent. This one runs in a session of its own (Ctrl-C reaches only xreal, which stops it in
    order: :func:`stop_embedded_api`, or Prefect's exit hook) and, on Linux, the kernel sends it SIGTERM
    when the thread that started it (the main thread, here) dies, however it dies.
    It gets at least :data:`~flows.EMBEDDED_STARTUP_SECONDS` to answer (more if Prefect's setting says so), also
    for callers that never ran :func:`~flows.use_project_defaults`: Prefect's default, 20 s, is not enough on a
    loaded 2-core machine.
    """
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    current = SubprocessASGIServer._instances.get(None)
    if current is not None and current.running:
        return
    SubprocessASGIServer._instances.pop(None, None)  # Prefect's clients use the instance under None
    _embedded_server_class()().start(
        timeout=max(EMBEDDED_STARTUP_SECONDS, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    )


def stop_embedded_api() -> None:
    """Stop the embedded API server this process started, if any (Prefect does it at a normal exit)."""
    server_module = sys.modules.get("prefect.server.api.server")
    server = server_module and server_module.SubprocessASGIServer._instances.get(None)
    if server is not None:
        server.stop()


@functools.cache
def _embedded_server_class():
    from prefect.server.api import server as server_module

    class EmbeddedServer(server_module.SubprocessASGIServer):
        """Prefect's server command and settings, started in its own session and bound to this process's life."""

        def _run_uvicorn_command(self):
            popen = {"start_new_session": True, "preexec_fn": _parent_death_signal()}
            real, server_module.subprocess = server_module.subprocess, _SubprocessWith(popen)
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = real

    return EmbeddedServer


class _SubprocessWith:
    """The ``subprocess`` module, with extra arguments to ``Popen``."""

    def __init__(self, popen_kwargs: dict):
        self._popen_kwargs = popen_kwargs

    def Popen(self, *args, **kwargs):
        return subprocess.Popen(*args, **kwargs, **self._popen_kwargs)

    def __getattr__(self, name):
        return getattr(subprocess, name)


_PR_SET_PDEATHSIG = 1


def _parent_death_signal():
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this thread ends (Linux), or None.

    The signal follows the creating *thread*, so only the main thread, which lives as long as the
    process, asks for it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before that took effect
            os._exit(1)

    return preexec
