"""A Dask cluster of GPU workers as SLURM jobs, for ``xreal generate --dask-address``.

Run it on a login node (it hosts the scheduler and stays in the foreground):

    pip install 'xreal[slurm]'          # dask-jobqueue
    python infra/dask/slurm.py --jobs 8 --partition gpu --account my-lab
    # prints: scheduler at tcp://10.0.0.5:8786
    xreal generate big.parquet --out /shared/runs/big --dask-address tcp://10.0.0.5:8786

Each job asks for one GPU and runs one worker with one thread: the worker sees
its GPU as cuda:0 (``XREAL_DEVICE``), runs one batch at a time and keeps its
model loaded across runs. Its nanny keeps glibc's malloc defaults
(``infra/dask/config``). Paths must be on storage every node mounts. Workers
report to the Prefect server in ``PREFECT_API_URL``, which must be reachable
from the compute nodes. ``--print-script`` shows the job script without submitting.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def slurm_cluster(
    partition: str | None = None,
    account: str | None = None,
    cores: int = 8,
    memory: str = "64GB",
    walltime: str = "08:00:00",
    venv: str | None = None,
):
    """A ``dask_jobqueue.SLURMCluster`` whose jobs are one single-threaded worker on one GPU (no jobs yet)."""
    from dask_jobqueue import SLURMCluster

    config = Path(__file__).resolve().parent / "config"  # on shared storage, like the project
    prologue = ["export XREAL_DEVICE=cuda:0", f"export DASK_CONFIG={config}"]
    if os.environ.get("PREFECT_API_URL"):
        prologue.append(f"export PREFECT_API_URL={os.environ['PREFECT_API_URL']}")
    return SLURMCluster(
        queue=partition,
        account=account,
        cores=1,  # worker threads: one batch at a time on the GPU
        job_cpu=cores,  # cores booked for the job: torch's CPU work (judging, writing) uses them
        processes=1,
        memory=memory,
        walltime=walltime,
        job_extra_directives=["--gres=gpu:1"],
        job_script_prologue=prologue,
        python=f"{venv}/bin/python" if venv else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="GPU workers to start (one SLURM job each)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--cores", type=int, default=8, help="CPU cores per job (data loading, judging)")
    parser.add_argument("--memory", default="64GB")
    parser.add_argument("--walltime", default="08:00:00")
    parser.add_argument("--venv", help="virtual environment with xreal installed, on shared storage")
    parser.add_argument("--print-script", action="store_true", help="print the job script and exit")
    args = parser.parse_args()
    cluster = slurm_cluster(args.partition, args.account, args.cores, args.memory, args.walltime, args.venv)
    if args.print_script:
        print(cluster.job_script())
        cluster.close()
        return
    cluster.scale(jobs=args.jobs)
    print(f"scheduler at {cluster.scheduler_address}; dashboard {cluster.dashboard_link}; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
