"""The generation run as plain functions: plan, run one batch, finalize. ``flows/generate.py`` orchestrates them.

- :func:`open_run` validates the manifest, pins what the run is in ``run.json``
  (refusing a changed manifest, model, judges, policy or format under an
  existing output) and reads which samples are already committed.
- :func:`plan` says which samples to draw next. A request's first round is
  its ``num_samples`` replicas; when some are rejected, the next round draws
  as many new replicas (new seeds, recorded with their round) as are still
  missing, up to the policy's ``max_rounds``. The plan depends only on what
  is committed, so a resumed run draws exactly what an uninterrupted one would.
- :func:`make_batches` groups samples that can share a sampler call.
- :func:`run_batch` samples, judges and writes one batch on a worker that keeps
  its model, judges and (for the memorisation rule) feature bank loaded
  (:func:`worker_models`, :func:`worker_bank`).
- :func:`finalize` merges the shards into the dataset and its records.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import platform
import queue
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from xreal.core.errors import XRealError
from xreal.core.files import read_json, record_digest, write_json
from xreal.core.settings import DEFAULT_SETTINGS, SamplerSettings
from xreal.judges.judging import JudgeSet, judges_digest, load_judges
from xreal.judges.memorisation import (
    BANK_RECORD,
    FeatureBank,
    bank_judges_digest,
    bank_provenance,
    load_feature_bank,
)
from xreal.manifest.schema import Request, sample_id
from xreal.model.bundle import bundle_digest, load_pipeline, read_bundle_record
from xreal.run import dataset
from xreal.run.config import (  # noqa: F401 - the run's identity and checks, re-exported where they were
    LOCK_FILE,
    PRECISIONS,
    RUN_FILE,
    RUN_FORMAT,
    Preflight,
    RunConfig,
    RunConflict,
    check_out_directory,
    preflight,
)
from xreal.run.policy import Decision, QualityPolicy


@dataclass(frozen=True)
class Sample:
    """One image to draw: a request's replica, in the round that asked for it."""

    request: Request
    replica: int
    round: int

    @property
    def sample_id(self) -> str:
        return sample_id(self.request.request_id, self.replica)

    @property
    def seed(self) -> int:
        return self.request.sample_seed(self.replica)


@dataclass
class RunState:
    config: RunConfig
    requests: list[Request]
    record: dict[str, Any]
    decisions: dict[str, str] = field(default_factory=dict)  # committed sample id -> accepted | rejected

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    def refresh(self, table: pa.Table | None = None) -> None:
        """Re-read the committed decisions (from ``table`` when the caller has just read the shards)."""
        table = table if table is not None else dataset.read_shards(self.config.out)
        if table is None:
            self.decisions = {}
        else:
            ids, decisions = table.column("sample_id").to_pylist(), table.column("decision").to_pylist()
            self.decisions = dict(zip(ids, decisions, strict=True))


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold a run directory for one writer: a second run into it meanwhile is refused, not interleaved.

    The lock is an ``flock`` on ``out/.lock``, so it dies with its process
    (a killed run leaves nothing to clean up). A directory this call created
    and nothing else wrote to is removed again.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunConflict(
            f"{out} is being written by another run ({holder}); wait for it or use another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {platform.node()} since {_now()}\n")
    handle.flush()
    try:
        yield
    finally:
        if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            (out / LOCK_FILE).unlink()
            out.rmdir()
        handle.truncate(0)  # no stale holder on display
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def open_run(config: RunConfig) -> RunState:
    """Check everything (:func:`preflight`), pin the run's identity in ``run.json``, read what is committed.

    An existing output made by another manifest, input file, model, judge set,
    policy or format is refused (:class:`RunConflict`) and left untouched.
    """
    checked = preflight(config)
    record = checked.record
    if record is None:
        record = {
            "run_format": RUN_FORMAT,
            "run_id": str(uuid.uuid4()),
            "created": _now(),
            "manifest": str(config.manifest),
            "model": str(config.model),
            "judges": config.judges_source,
            "policy": config.policy.to_dict(),
            "identity": checked.identity,
            "inputs": checked.inputs,
        }
        if config.memorisation_bank is not None:
            record["memorisation"] = bank_provenance(config.memorisation_bank)
        write_json(config.out / RUN_FILE, record)
    state = RunState(config, checked.requests, record)
    state.refresh()
    return state


def plan(requests: Sequence[Request], decisions: dict[str, str], max_rounds: int) -> list[Sample]:
    """The samples to draw next, given the committed decisions (see the module docstring)."""
    todo = []
    for request in requests:
        wanted, first, rounds = request.num_samples, 0, 0
        batch = range(0, wanted)
        while True:
            missing = [r for r in batch if sample_id(request.request_id, r) not in decisions]
            if missing:
                todo += [Sample(request, r, rounds) for r in missing]
                break
            first = batch.stop
            accepted = sum(decisions[sample_id(request.request_id, r)] == "accepted" for r in range(first))
            rounds += 1
            if accepted >= wanted or rounds >= max_rounds:
                break
            batch = range(first, first + wanted - accepted)
    return todo


@dataclass(frozen=True)
class Batch:
    """Samples that share one sampler call (same sampler, step grid, steps, anatomy steps, eta and guidance
    interval)."""

    name: str
    samples: tuple[Sample, ...]


def make_batches(
    samples: Sequence[Sample], batch_size: int, defaults: SamplerSettings = DEFAULT_SETTINGS
) -> list[Batch]:
    """Group samples by the settings a batch must share (the run's ``defaults`` with each row's overrides), then
    cut groups into batches of ``batch_size``."""
    if batch_size < 1:
        raise XRealError(f"batch size must be at least 1, got {batch_size}")
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        key = tuple(s.request.settings(defaults).shared_arguments().values())
        groups.setdefault(key, []).append(s)
    batches = []
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = tuple(members[start : start + batch_size])
            digest = hashlib.sha1("\n".join(s.sample_id for s in chunk).encode()).hexdigest()[:12]
            batches.append(Batch(f"round{chunk[0].round}-{chunk[0].sample_id}-{digest}", chunk))
    return batches


# --- workers ----------------------------------------------------------------------

_MODELS: dict[tuple, tuple[Any, JudgeSet, dict[str, str]]] = {}
_BANKS: dict[tuple[str, str, str | None], FeatureBank] = {}
_MODELS_LOCK = threading.Lock()


def worker_models(
    model: Path,
    judges: str,
    device: str,
    precision: str = "float32",
    policy: QualityPolicy | None = None,
    expected: dict[str, Any] | None = None,
):
    """The pipeline and judges of this process on ``device``, loaded once and kept.

    ``expected``: a run's identity; the bundle and judge set must still have
    the digests it pinned (a file edited since the run opened is refused).
    When the policy enables the memorisation rule, its feature bank is loaded
    and kept too (:func:`worker_bank`).

    Load them off the main thread: torch work on the main thread (building a
    model included) leaves an OpenMP thread team there that competes with the
    task threads' own, and batches ran about 1.6x slower here.
    """
    policy = policy or QualityPolicy()
    parts = (policy.anatomy.enabled, policy.realism.enabled)
    key = (str(model), judges, device, precision, parts)
    with _MODELS_LOCK:
        if key not in _MODELS:
            digests = {"model_digest": bundle_digest(model), "judges": judges_digest(judges, *parts)}
            pipeline = load_pipeline(
                model, device=device, dtype=torch.float64 if precision == "float64" else None, verify=False
            )
            pipeline.set_progress_bar_config(disable=True)
            loaded = load_judges(judges, device=device, anatomy=parts[0], realism=parts[1])
            _MODELS[key] = (pipeline, loaded, digests)
        pipeline, loaded, digests = _MODELS[key]
    changed = [name for name, digest in digests.items() if expected is not None and expected.get(name) != digest]
    if changed:
        what = " and ".join(
            {"model_digest": f"the model bundle {model}", "judges": f"the judge set {judges}"}[c] for c in changed
        )
        raise RunConflict(
            f"{what} changed since this run started (its digest differs from run.json's); restore it to resume, "
            "or start a new run with another --out"
        )
    if policy.memorisation.enabled and policy.memorisation.bank:
        worker_bank(Path(policy.memorisation.bank), judges, expected)
    return pipeline, loaded


def worker_bank(folder: Path, judges: str, expected: dict[str, Any] | None = None) -> FeatureBank:
    """The memorisation rule's feature bank in this process, loaded once and kept.

    It must have been built with the judge set ``judges``, and (given a run's
    identity, ``expected``) still be the bank the run pinned.
    """
    folder = Path(folder)
    try:  # a bank rebuilt in place since this process loaded it is a new bank: keyed by its record's digest
        current = record_digest(read_json(folder / BANK_RECORD, "feature bank record"))
    except (OSError, XRealError):
        current = None  # loading says what is wrong
    key = (str(folder.resolve()), str(judges), current)
    with _MODELS_LOCK:
        if key not in _BANKS:
            _BANKS[key] = load_feature_bank(folder, bank_judges_digest(judges), str(judges))
        bank = _BANKS[key]
    if expected is not None and expected.get("memorisation_bank") != bank.digest:
        raise RunConflict(
            f"the feature bank {folder} changed since this run started (its digest differs from run.json's); "
            "restore it to resume, or start a new run with another --out"
        )
    return bank


def worker_device() -> str:
    """The device of the Dask worker this runs on.

    ``XREAL_DEVICE`` when set; else the entry of ``XREAL_DEVICES`` that the
    worker's name picks (local clusters name workers 0, 1, ...); else the
    worker's GPU (``cuda:0``: clusters give each worker one) or the CPU.
    """
    if os.environ.get("XREAL_DEVICE"):
        return os.environ["XREAL_DEVICE"]
    devices = [d for d in os.environ.get("XREAL_DEVICES", "").split(",") if d]
    if devices:
        from distributed import get_worker

        try:
            name = get_worker().name
        except ValueError:  # not on a Dask worker
            name = 0
        return devices[name % len(devices)] if isinstance(name, int) else devices[0]
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def worker_name() -> str:
    """Which process ran a batch (host and pid), for the shard's record."""
    return f"{platform.node()}:{os.getpid()}"


class DevicePool:
    """Hands each running batch a device of its own (one batch per device at a time)."""

    def __init__(self, devices: Sequence[str]):
        self.devices = list(devices)
        self._free: queue.Queue[str] = queue.Queue()
        for device in self.devices:
            self._free.put(device)

    def acquire(self) -> str:
        return self._free.get()

    def release(self, device: str) -> None:
        self._free.put(device)


_POOLS: dict[tuple[str, ...], DevicePool] = {}


def device_pool(devices: Sequence[str]) -> DevicePool:
    with _MODELS_LOCK:
        return _POOLS.setdefault(tuple(devices), DevicePool(devices))


def parse_devices(spec: str) -> list[str]:
    """``cpu``, ``cuda`` (every visible GPU), or a list like ``cuda:0,cuda:1``."""
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if devices == ["cuda"]:
        if not torch.cuda.is_available():
            raise XRealError("--device cuda: no CUDA device is visible")
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for d in devices:
        try:
            parsed = torch.device(d)
        except RuntimeError:
            raise XRealError(f"--device: {d!r} is not a device (use cpu, cuda or cuda:N)") from None
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise XRealError(f"--device {d}: CUDA is not available on this machine")
    if not devices:
        raise XRealError("--device: give at least one device")
    return devices


@dataclass
class BatchSummary:
    name: str
    device: str
    worker: str
    samples: int
    accepted: int
    rejected: int
    seconds: dict[str, float]


def run_batch(config: RunConfig, batch: Batch, device: str, run_id: str) -> BatchSummary:
    """Sample, judge and write one batch; returns a small summary (images stay on disk)."""
    pinned = read_json(config.out / RUN_FILE, "run record", keys=("identity",))["identity"]
    pipeline, judges = worker_models(
        config.model, config.judges_source, device, config.precision, config.policy, expected=pinned
    )
    bank = worker_bank(config.memorisation_bank, config.judges_source, pinned) if config.memorisation_bank else None
    size = pipeline.config.image_size
    samples = batch.samples
    started = time.perf_counter()
    anatomy = [s.request.anatomy_map(size) for s in samples]
    masks = [s.request.pathology_mask(a.shape) for s, a in zip(samples, anatomy, strict=True)]
    settings = [s.request.settings(config.sampler) for s in samples]
    autocast = torch.bfloat16 if config.precision == "bfloat16" else None
    output = pipeline(
        anatomy,
        [list(s.request.labels) for s in samples],
        seeds=[s.seed for s in samples],
        pathology_masks=masks,
        **settings[0].shared_arguments(),  # make_batches grouped the samples by these
        soft_scale=[x.soft_scale for x in settings],
        guidance_scale=[x.guidance_scale for x in settings],
        autocast_dtype=autocast,
    )
    sampled = time.perf_counter()
    scores = judges.score(output.images, np.stack([pipeline.conditioning_anatomy(a) for a in anatomy]), masks)
    nearest: list[str | None] = [None] * len(samples)
    if bank is not None:  # the nearest training image's id is named in a near-copy reason; the table is numeric
        nearest, similarity = bank.nearest(judges.features(output.images))
        for row, value in zip(scores, similarity, strict=True):
            row["memorisation_similarity"] = float(value)
    decisions = [
        storable(
            config.policy.decide(
                {**row, "memorisation_nearest": near} if near is not None else row,
                s.request.labels,
                judges.labels,
                judges.realism_threshold,
                bank.tau if bank is not None else None,
            ),
            image,
        )
        for row, near, s, image in zip(scores, nearest, samples, output.images, strict=True)
    ]
    judged = time.perf_counter()
    generated = [
        dataset.GeneratedSample(
            sample_id=s.sample_id,
            request_id=s.request.request_id,
            replica=s.replica,
            round=s.round,
            seed=s.seed,
            labels=s.request.labels,
            boxes=dataset.boxes_for(s.request.labels, s.request.normalized_boxes(), m, size),
            anatomy_source=s.request.anatomy.key,
            split=s.request.split,
            tags=s.request.tags,
            settings={  # the finding table is the run record's; each sample keeps the scale it took from it
                **{k: v for k, v in x.to_dict().items() if k != "finding_guidance"},
                "guidance_scale": x.guidance_scale if s.request.has_pathology else 1.0,
                "unet_evaluations": x.unet_evaluations(s.request.has_pathology),
            },
            image=image,
            healthy=healthy if has else None,
            anatomy=pipeline.conditioning_anatomy(a),
            pathology=pipeline.conditioning_mask(m) if m is not None else None,
            scores=row,
            accepted=d.accepted,
            reason=d.reason,
        )
        for s, x, image, healthy, has, a, m, row, d in zip(
            samples,
            settings,
            output.images,
            output.healthy_images,
            output.has_pathology,
            anatomy,
            masks,
            scores,
            decisions,
            strict=True,
        )
    ]
    options = dataset.WriteOptions(
        formats=config.formats,
        keep_rejected=config.keep_rejected,
        healthy_twins=config.healthy_twins,
        dataset_id=run_id,
        model_note=f"xreal bundle {config.model.name} ({pipeline.config.preset} preset)",
    )
    timings = {"sampling_s": sampled - started, "judging_s": judged - sampled}
    worker = worker_name()
    dataset.write_shard(config.out, batch.name, generated, options, {**timings, "device": device, "worker": worker})
    timings["writing_s"] = time.perf_counter() - judged
    accepted = sum(d.accepted for d in decisions)
    return BatchSummary(batch.name, device, worker, len(samples), accepted, len(samples) - accepted, timings)


# --- finishing --------------------------------------------------------------------


def storable(decision: Decision, image: np.ndarray) -> Decision:
    """An image with NaN or infinite pixels cannot be stored, whatever the policy says: it is rejected."""
    if np.isfinite(image).all():
        return decision
    reasons = ["NaN or infinite pixels: not stored"] + ([] if decision.accepted else [decision.reason])
    return Decision(False, "; ".join(reasons))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("xreal", "torch", "diffusers", "prefect", "torchxrayvision", "pydicom", "numpy", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the xreal source tree, with ``-dirty`` when it has changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


@dataclass
class RunSummary:
    out: Path
    counts: dataset.Tally
    failed_batches: list[str]
    record: dict[str, Any]


def finished_summary(state: RunState) -> RunSummary | None:
    """The summary of a run that is already complete and finalized (nothing to draw, records current), else None."""
    out = state.config.out
    record_path, samples_path = out / dataset.DATASET_FILE, out / dataset.SAMPLES_FILE
    if plan(state.requests, state.decisions, state.config.policy.retries.max_rounds):
        return None
    if not (record_path.is_file() and samples_path.is_file()):
        return None
    try:
        record = read_json(record_path, "dataset record", keys=("complete", "files"))
    except XRealError:
        return None  # finalize writes it again
    if not record["complete"] or record["files"] != dataset.pinned_files(out):
        return None  # a finalize that did not finish, or derived files edited since: finalize writes them again
    if pq.read_metadata(samples_path).num_rows != len(state.decisions):
        return None
    table = pq.read_table(samples_path, columns=["request_id", "decision", "reason"])
    return RunSummary(out, dataset.tally(state.requests, table), [], record)


def finalize(
    state: RunState,
    execution: str = "threads on cpu",
    flow_run_id: str | None = None,
    wall_seconds: float | None = None,
    failed_batches: Sequence[str] = (),
) -> RunSummary:
    """Merge the shards into ``samples.parquet``; write the card, the preview, HF metadata and, last, ``dataset.json``.

    ``dataset.json`` is the completion marker: it is written after every file
    it pins (with their sha256), so a crash anywhere in here leaves a run that
    the next rerun finalizes again.
    """
    config, out = state.config, state.config.out
    table = dataset.read_shards(out)
    for path in dataset.stray_files(out, table):
        path.unlink()
    counts = dataset.tally(state.requests, table)
    shards = dataset.shard_records(out).values()
    bundle = read_bundle_record(config.model)
    state.refresh(table)
    judges_kind = "torchxrayvision" if config.judges_source == "torchxrayvision" else "phantom"
    record = {
        "dataset_format": 1,
        "run_id": state.run_id,
        "created": state.record["created"],
        "finalized": _now(),
        "complete": not failed_batches and not plan(state.requests, state.decisions, config.policy.retries.max_rounds),
        "manifest": {
            "path": str(config.manifest),
            "sha256": state.record["identity"]["manifest_sha256"],
            "requests": len(state.requests),
        },
        "model": {
            "path": str(config.model),
            "digest": state.record["identity"]["model_digest"],  # of the bundle's whole record: xreal verify --run
            "preset": bundle["preset"]["name"],
            "image_size": bundle["image_size"],
            "files": bundle["files"],
            **{k: bundle["training"][k] for k in ("source", "licence") if k in bundle.get("training", {})},
        },
        "judges": {
            "kind": judges_kind,
            "source": config.judges_source,
            "digest": state.record["identity"]["judges"],
            "files": config.judge_files,
        },
        "memorisation": state.record.get("memorisation"),  # the feature bank: path, digest, tau, count
        "inputs": state.record.get("inputs", {}),
        "policy": config.policy.to_dict(),
        "policy_digest": config.policy.digest(),
        "sampler_defaults": config.sampler.to_dict(),  # the run's; a manifest row's own columns win
        "precision": config.precision,
        "formats": config.formats,
        "software": software_versions(),
        "git_commit": git_commit(),
        "execution": execution,
        "devices": sorted({r["device"] for r in shards if "device" in r}),
        "workers": dict(Counter(r["worker"] for r in shards if "worker" in r)),
        "flow_run_id": flow_run_id,
        "timings": {**dataset.shard_timings(out), "last_run_wall_s": wall_seconds},
        "counts": counts.to_dict(),
        "failed_batches": list(failed_batches),
    }
    if table is not None:
        dataset.write_samples(out, table)
        dataset.write_hf_metadata(out, table)
        dataset.write_preview(out, table)
    dataset.write_card(out, record, counts)
    record["shards"] = dataset.shard_hashes(out)
    record["files"] = dataset.pinned_files(out)
    write_json(out / dataset.DATASET_FILE, record)  # last: the run is finalized once this exists
    return RunSummary(out, counts, list(failed_batches), record)
