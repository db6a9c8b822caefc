"""The generation run as a Prefect flow: manifest in, labelled and filtered dataset out.

Each batch is one task that samples, judges and writes its shard on a device
of its own and returns a small summary; images never travel through Prefect.
A batch that fails after its retries does not stop the others; the run then
ends Failed with a summary of what to rerun (the same command resumes).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run, task_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Completed, Failed
from tqdm.auto import tqdm

from flows.embedded import signals_held, start_embedded_api
from flows.execution import Execution
from xreal.core.errors import XRealError
from xreal.core.settings import DEFAULT_SETTINGS
from xreal.model.bundle import DEMO_BUNDLE
from xreal.run import generation
from xreal.run.dataset import label_table_markdown
from xreal.run.generation import Batch, BatchSummary, RunConfig, RunSummary
from xreal.run.policy import QualityPolicy


def _not_a_user_error(task, task_run, state) -> bool:
    """Retry a batch unless what stopped it needs the user (a full disk stays full on a retry)."""
    return not isinstance(state.data, XRealError)


@task(
    task_run_name="{batch.name}",
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=_not_a_user_error,
    cache_policy=NO_CACHE,  # the committed shards on disk are the cache: a rerun plans only what is missing
)
def generate_batch(config: RunConfig, batch: Batch, devices: list[str] | None, run_id: str):
    """Sample, judge and write one batch: on a free one of ``devices``, or (None) on this Dask worker's device.

    Returns its :class:`BatchSummary`; or a Failed state carrying the :class:`XRealError` when the
    input or the machine needs fixing (a full or read-only disk): no retry, no traceback.
    """
    try:
        if devices is None:
            return generation.run_batch(config, batch, generation.worker_device(), run_id)
        pool = generation.device_pool(devices)
        device = pool.acquire()
        try:
            return generation.run_batch(config, batch, device, run_id)
        finally:
            pool.release(device)
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise  # maybe passing: retried
        error = user_error(exc)
    except XRealError as exc:
        error = exc
    _USER_ERROR_RUNS.add(str(task_run.get_id()))
    return Failed(message=str(error), data=error)


def _draw_rounds(config, state, batch_size, execution, runner, progress, logger) -> tuple[list, list[str]]:
    """Draw what the plan asks for, round after round, until the requests are full or out of rounds.

    Stops after a round in which a batch failed: redraws depend on that round's results.
    """
    max_rounds = config.policy.retries.max_rounds
    todo = generation.plan(state.requests, state.decisions, max_rounds)
    total = len(todo)
    progress_id = create_progress_artifact(progress=0.0, key="generation-progress", description="samples drawn")
    summaries: list[BatchSummary] = []
    failed: list[str] = []
    done = [0]
    with tqdm(total=total, unit="img", desc="generating", disable=not progress) as bar:
        while todo and not failed:
            batches = generation.make_batches(todo, batch_size, config.sampler)
            logger.info("round of %d samples in %d batches on %s", len(todo), len(batches), execution.describe())
            results, failed, errors = _run_round(
                config, batches, execution, runner, state.run_id, bar, progress_id, done, total, logger
            )
            if errors:  # the others would meet it too: stop with it, the committed shards are kept
                raise errors[0]
            summaries += results
            state.refresh()
            todo = generation.plan(state.requests, state.decisions, max_rounds)
            if todo and not failed:
                total += len(todo)
                bar.total = total
                bar.refresh()
    update_progress_artifact(progress_id, progress=100.0)
    return summaries, failed


def _run_round(config, batches, execution, runner, run_id, bar, progress_id, done, total, logger) -> tuple:
    """Run one round's batches; returns their summaries, the names of the failed ones and the user errors met."""
    devices = execution.task_devices
    with signals_held():  # a Ctrl-C or SIGTERM mid-submit interrupts the run, after the submits
        futures = {
            runner.submit(generate_batch, {"config": config, "batch": b, "devices": devices, "run_id": run_id}): b
            for b in batches
        }
    summaries, failed, errors = [], [], []
    for future in as_completed(list(futures)):
        batch = futures[future]
        try:
            summary = future.result()
        except XRealError as exc:  # reported once, by the flow's end
            failed.append(batch.name)
            errors.append(exc)
        except Exception as exc:  # the batch failed after its retries; its siblings go on
            failed.append(batch.name)
            logger.error("%s failed after retries: %s", batch.name, exc)
        else:
            summaries.append(summary)
            logger.info(
                "%s: %d accepted, %d rejected on %s of %s (%.1f s)",
                batch.name,
                summary.accepted,
                summary.rejected,
                summary.device,
                summary.worker,
                sum(summary.seconds.values()),
            )
        done[0] += len(batch.samples)
        bar.update(len(batch.samples))
        update_progress_artifact(progress_id, progress=min(100.0, 100.0 * done[0] / max(total, 1)))
    return summaries, failed, errors


@flow(name="generate-dataset", log_prints=True)
def generate_dataset(
    manifest: Path,
    out: Path,
    model: Path = DEMO_BUNDLE,
    batch_size: int = 16,
    devices: list[str] | None = None,
    policy: str | dict | None = None,
    formats: str = "png",
    keep_rejected: bool = False,
    healthy_twins: bool = True,
    precision: str = "float32",
    root: Path | None = None,
    progress: bool = True,
    dask_workers: int = 0,
    dask_address: str | None = None,
    sampler: dict | None = None,
):
    """Generate the labelled, filtered dataset a manifest asks for into ``out`` (resuming what is there).

    Args:
        manifest: the Parquet manifest of requests.
        out: the run directory; rerunning into it resumes, a finished run is a no-op. ``{date}`` in
            it becomes the run's scheduled date (for schedules).
        model: the model bundle (the bundled demo model by default).
        batch_size: samples per sampler call (and per task).
        devices: where batches run, one batch per device at a time (default ``["cpu"]``); with
            ``dask_workers``, the devices the local cluster's workers share out.
        policy: a policy YAML file or its content as a dict (:class:`QualityPolicy`; None: the defaults).
        formats: ``png``, ``dicom`` or ``both``.
        keep_rejected: also write rejected images (under ``rejected/``).
        healthy_twins: keep the stage-1 healthy twin of each pathology image.
        precision: ``float32``; ``float64`` for images identical bit for bit at any batch size;
            ``bfloat16`` autocast on GPUs.
        root: the folder manifest paths may point into (default: the manifest's folder).
        progress: show a progress bar in the terminal.
        dask_workers: run the batches on a local Dask cluster of this many worker processes.
        dask_address: run the batches on the Dask cluster whose scheduler is at this address.
        sampler: the run's sampler settings over the reference's (``SamplerSettings`` fields, e.g.
            ``{"sampler": "dpmsolver++", "steps": 10, "anatomy_steps": 5}``); a manifest row's own columns win.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    try:
        execution = Execution(tuple(generation.parse_devices(",".join(devices or ["cpu"]))), dask_workers, dask_address)
        execution.check_scheduler()
        config = RunConfig(
            manifest=Path(manifest),
            out=run_directory(out),
            model=Path(model),
            policy=load_policy(policy),
            formats=formats,
            keep_rejected=keep_rejected,
            healthy_twins=healthy_twins,
            precision=precision,
            root=Path(root) if root else None,
            sampler=DEFAULT_SETTINGS.with_overrides(**(sampler or {})),
        )
        return _generate(config, execution, batch_size, progress, started, logger)
    except (XRealError, OSError) as exc:
        # The input or the machine needs fixing: a Failed state with the one paragraph that says so, which
        # the CLI prints (exit 2); raising would have Prefect log a traceback and the message twice.
        error = user_error(exc)
        _USER_ERROR_RUNS.add(str(flow_run.get_id()))
        return Failed(message=str(error), data=error)


def _generate(config: RunConfig, execution: Execution, batch_size: int, progress: bool, started: float, logger):
    if execution.dask_address and not PREFECT_API_URL.value():
        logger.warning(
            "the workers at %s cannot report to this process's embedded Prefect API: they record their "
            "tasks in an API of their own; set PREFECT_API_URL to a server to see them with the run",
            execution.dask_address,
        )
    with generation.run_lock(config.out):  # one writer per run directory
        state = generation.open_run(config)
        finished = generation.finished_summary(state)
        if finished is not None:
            message = f"{config.out}: this run is already complete; nothing to do\n{describe(finished)}"
            logger.info(message)
            return Completed(message=message, data=summary_dict(finished))
        with contextlib.ExitStack() as stack:
            runner = stack.enter_context(execution.start_task_runner())
            summaries, failed = _draw_rounds(config, state, batch_size, execution, runner, progress, logger)
        summary = generation.finalize(
            state,
            execution=execution.describe(),
            flow_run_id=flow_run.get_id(),
            wall_seconds=time.perf_counter() - started,
            failed_batches=failed,
        )
        _report(summary, summaries)
        message = describe(summary)
        logger.info(message)
        if failed:
            return Failed(message=message, data=summary_dict(summary))
        return Completed(message=message, data=summary_dict(summary))


# OS errors that the machine, not the run, must have fixed: retrying a batch does not help.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})

_ADVICE = {
    errno.ENOSPC: "free some space there (or use another --out)",
    errno.EDQUOT: "free some space there or raise the quota (or use another --out)",
    errno.EROFS: "use a writable --out",
    errno.EACCES: "check its permissions (or use another --out)",
    errno.EPERM: "check its permissions (or use another --out)",
    errno.ENOTDIR: "a file is in the way: move it (or use another --out)",
    errno.EEXIST: "something is in the way: move it (or use another --out)",
}


def user_error(exc: XRealError | OSError) -> XRealError:
    """``exc`` as the one paragraph the CLI prints: an :class:`OSError` names its file and what to do."""
    if isinstance(exc, XRealError):
        return exc
    what = exc.strerror or str(exc) or type(exc).__name__
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    advice = _ADVICE.get(exc.errno, "fix that")
    text = f"{what}: {where}" if where else what
    return XRealError(f"{text}; {advice}, then rerun the same command (finished samples are kept)")


def run_directory(out: str | Path) -> Path:
    """``out``, with ``{date}`` replaced by the run's scheduled date: a schedule writes a new dataset each time."""
    if "{date}" not in str(out):
        return Path(out)
    return Path(str(out).replace("{date}", flow_run.get_scheduled_start_time().strftime("%Y-%m-%d")))


def load_policy(policy: str | Path | dict | None) -> QualityPolicy:
    if policy is None:
        return QualityPolicy()
    if isinstance(policy, dict):
        return QualityPolicy.from_dict(policy)
    return QualityPolicy.from_yaml(policy)


def run_generation(manifest: Path, out: Path, devices: list[str] | None = None, **options):
    """Run :func:`generate_dataset` in this process; returns the flow run's final state.

    Prefect's embedded API takes seconds to start: it starts while the model and
    judges load onto each local device in the background, which the batches then
    reuse (Dask workers load their own copy on their first batch). The embedded API
    is tied to this process (:func:`start_embedded_api`).
    """
    devices = devices or ["cpu"]
    model = Path(options.get("model") or DEMO_BUNDLE)
    policy = load_policy(options.get("policy"))
    judges = RunConfig(Path(manifest), Path(out), model=model, policy=policy).judges_source
    precision = options.get("precision", "float32")
    dask_workers, dask_address = options.get("dask_workers") or 0, options.get("dask_address")
    Execution(tuple(devices), dask_workers, dask_address).check_scheduler()  # before seconds of start-up
    pool = ThreadPoolExecutor(max_workers=2)  # not the main thread: see generation.worker_models
    try:
        loaded = [
            pool.submit(generation.worker_models, model, judges, device, precision, policy)
            for device in ([] if dask_workers or dask_address else devices)
        ]
        start_embedded_api()  # on the main thread: see start_embedded_api
        for future in loaded:
            future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # an interrupt does not wait for models still loading
        raise
    pool.shutdown()
    _quiet_repeats_on_the_terminal()
    return generate_dataset(manifest=manifest, out=out, devices=devices, return_state=True, **options)


# Runs (flow and task run ids) that ended with a user error: the CLI prints that error as its one paragraph.
_USER_ERROR_RUNS: set[str] = set()


class _NoRepeatOfUserErrors(logging.Filter):
    """Keeps Prefect's ``Finished in state Failed('<paragraph>')`` of a run stopped by a user error off the
    terminal, where the CLI prints the paragraph itself next (the API's logs keep the line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        run = getattr(record, "task_run_id", None) or getattr(record, "flow_run_id", None)
        return not (
            str(run) in _USER_ERROR_RUNS and isinstance(record.msg, str) and record.msg.startswith("Finished in state")
        )


def _quiet_repeats_on_the_terminal() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _NoRepeatOfUserErrors) for f in handler.filters
        ):
            handler.addFilter(_NoRepeatOfUserErrors())


def summary_dict(summary: RunSummary) -> dict:
    return {"out": str(summary.out), "counts": summary.counts.to_dict(), "failed_batches": summary.failed_batches}


def describe(summary: RunSummary) -> str:
    """The run's end in words: counts, shortfalls, failures and how to resume."""
    c = summary.counts
    lines = [
        f"{summary.out}: {c.accepted} of {c.requested} requested images accepted, {c.rejected} rejected"
        + (f", {c.short} short" if c.short else "")
    ]
    if c.short_requests and not summary.failed_batches:
        worst = sorted(c.short_requests.items(), key=lambda kv: kv[1]["accepted"] - kv[1]["requested"])[:5]
        lines.append(
            "short after the policy's redraws: "
            + ", ".join(f"{rid} ({v['accepted']}/{v['requested']} from {v['drawn']} drawn)" for rid, v in worst)
            + (" ..." if len(c.short_requests) > 5 else "")
        )
    if summary.failed_batches:
        lines.append(
            f"{len(summary.failed_batches)} batch(es) failed: {', '.join(summary.failed_batches[:5])}"
            + (" ..." if len(summary.failed_batches) > 5 else "")
            + ". Rerun the same command to resume; finished samples are kept."
        )
    return "\n".join(lines)


def _report(summary: RunSummary, batches: list[BatchSummary]) -> None:
    counts = summary.counts
    create_table_artifact(
        key="generation-labels",
        table=[{"label": label, **asdict(c)} for label, c in counts.per_label.items()],
        description="Images per label: requested, accepted, rejected, short",
    )
    timing = {
        k: round(sum(b.seconds.get(k, 0.0) for b in batches), 2) for k in ("sampling_s", "judging_s", "writing_s")
    }
    create_markdown_artifact(
        key="generation-summary",
        markdown=f"# {summary.out}\n\n{describe(summary)}\n\n{label_table_markdown(counts)}\n\n"
        f"This run: {len(batches)} batches, seconds {timing}.\n",
        description="Generation run summary",
    )
