"""Where a run's batches execute: threads on this machine's devices, or a Dask cluster.

- Threads (the default): one batch per device at a time in this process; the
  models stay loaded in it.
- A local Dask cluster (``dask_workers=N``): N worker processes on this
  machine, one batch each at a time. With GPUs, one worker per GPU
  (dask-cuda's ``LocalCUDACluster`` when it is installed, else each worker
  takes the device its name picks from ``XREAL_DEVICES``). On CPUs the cores
  are shared out among the workers.
- An existing Dask cluster (``dask_address="tcp://..."``): its workers pick
  their own device (:func:`xreal.run.generation.worker_device`) and keep their
  models loaded across runs. Start them with ``--nthreads 1`` so a worker
  runs one batch at a time.

A worker that dies loses only the batch it was running: Dask runs that batch
again on another worker, and the shard it never committed is written there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from xreal.core.errors import XRealError


@dataclass(frozen=True)
class Execution:
    """How a run executes its batches (see the module docstring)."""

    devices: tuple[str, ...] = ("cpu",)
    dask_workers: int = 0
    dask_address: str | None = None

    def __post_init__(self):
        if self.dask_workers < 0:
            raise XRealError(f"dask workers: {self.dask_workers} is not a number of workers")
        if self.dask_workers and self.dask_address:
            raise XRealError("give either a number of local Dask workers or the address of a Dask scheduler, not both")
        if not self.devices:
            raise XRealError("devices: give at least one device")

    @property
    def on_dask(self) -> bool:
        return bool(self.dask_workers or self.dask_address)

    @property
    def task_devices(self) -> list[str] | None:
        """What each batch task is told to run on: the device list for threads; None on Dask (the worker decides)."""
        return None if self.on_dask else list(self.devices)

    def describe(self) -> str:
        if self.dask_address:
            return f"Dask cluster at {self.dask_address}"
        if self.dask_workers:
            return f"local Dask cluster of {self.dask_workers} worker(s) on {', '.join(self.devices)}"
        return f"threads on {', '.join(self.devices)}"

    def check_scheduler(self, timeout: float = 5.0) -> None:
        """Refuse a Dask scheduler address that nothing answers at: in seconds, with the address named,
        rather than after Dask's 30 s connect timeout."""
        if not self.dask_address:
            return
        from distributed.comm.addressing import get_address_host_port

        try:
            host, port = get_address_host_port(self.dask_address)
        except ValueError:
            return  # not host:port (inproc://, ucx://...): Dask says what it makes of it
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            raise self.unreachable(exc) from None

    def unreachable(self, exc: BaseException) -> XRealError:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return XRealError(
            f"cannot reach the Dask scheduler at {self.dask_address} ({reason}): start it (`dask scheduler`, or "
            "see infra/README.md) and its workers, or fix --dask-address"
        )

    @contextlib.contextmanager
    def start_task_runner(self) -> Iterator[TaskRunner]:
        """:meth:`task_runner`, started; a scheduler that cannot be reached is named in an :class:`XRealError`."""
        runner = self.task_runner()
        try:
            runner.__enter__()
        except OSError as exc:
            if not self.dask_address:
                raise
            raise self.unreachable(exc) from exc
        with contextlib.ExitStack() as stack:
            stack.push(runner)  # exits it
            yield runner

    def task_runner(self) -> TaskRunner:
        """A fresh, unstarted Prefect task runner for this execution."""
        if not self.on_dask:
            return InterruptibleThreadPoolTaskRunner(max_workers=len(self.devices))
        from prefect_dask import DaskTaskRunner

        if self.dask_address:
            return DaskTaskRunner(address=self.dask_address)
        return DaskTaskRunner(**local_cluster(self.dask_workers, list(self.devices), _api_url()))


class InterruptibleThreadPoolTaskRunner(ThreadPoolTaskRunner):
    """Prefect's thread pool, except that an interrupt (Ctrl-C, SIGTERM) does not wait for the batches in flight.

    Prefect's pool waits for them on exit, which can take minutes; a batch cut short commits no shard (they
    are written atomically), so a rerun draws it again. The threads left running end with the process
    (``xreal generate`` exits at once after an interrupt).
    """

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception) and self._executor is not None:
            for event in self._cancel_events.values():
                event.set()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        super().__exit__(exc_type, exc_value, traceback)


def local_cluster(workers: int, devices: list[str], api_url: str) -> dict:
    """``DaskTaskRunner`` arguments for a cluster of ``workers`` processes on this machine's ``devices``.

    The workers report to the Prefect API at ``api_url`` (the embedded one
    included), instead of each starting an embedded API of its own, and share
    the CPU cores out among themselves.
    """
    cuda = [d for d in devices if d.startswith("cuda")]
    share = str(max(1, (os.cpu_count() or 1) // workers))
    env = {"PREFECT_API_URL": api_url, "DASK_LOGGING__DISTRIBUTED": "warning"}
    env |= {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share, "OPENBLAS_NUM_THREADS": share}
    kwargs = {"n_workers": workers, "threads_per_worker": 1, "env": env}
    if cuda and importlib.util.find_spec("dask_cuda") is not None:
        visible = ",".join(d.partition(":")[2] or "0" for d in cuda)
        kwargs |= {"kind": "dask_cuda.LocalCUDACluster", "CUDA_VISIBLE_DEVICES": visible}
    else:
        env["XREAL_DEVICES"] = ",".join(devices)
        kwargs |= {"kind": "distributed.LocalCluster", "processes": True}
    return {"cluster_class": start_local_cluster, "cluster_kwargs": kwargs}


# Dask gives its worker processes MALLOC_TRIM_THRESHOLD_=65536. Setting it turns off glibc's adaptive mmap
# threshold, so torch's large CPU buffers go back to the kernel after every use: the demo sampler ran 3-4x
# slower in such a worker. Workers started here keep glibc's defaults; infra/dask/config does the same for
# clusters started elsewhere.
WORKER_DASK_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
DASK_MALLOC_TRIM = "65536"


def start_local_cluster(kind: str = "distributed.LocalCluster", **kwargs):
    """Start a local Dask cluster of class ``kind`` (a qualified name) whose workers suit torch."""
    import dask
    from prefect.utilities.importtools import from_qualified_name

    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == DASK_MALLOC_TRIM:
        # left by a Dask nanny started earlier in this process (nannies copy their settings into
        # os.environ), where it would win over the setting above
        del os.environ["MALLOC_TRIM_THRESHOLD_"]
    with dask.config.set(WORKER_DASK_CONFIG):
        return from_qualified_name(kind)(**kwargs)


def _api_url() -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)
