"""Audit a run directory: every file against its hash, every sample against the manifest, counts per label.

``xreal audit run DIR`` prints :meth:`RunAudit.to_text` (or ``--json``) and
exits 0 when the directory is consistent, 1 otherwise. A request that fell
short after the policy's redraws is reported, not an inconsistency.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from xreal.core.errors import XRealError
from xreal.core.files import PathError, read_json, resolve_under, sha256_file
from xreal.core.labels import CHEXPERT_LABELS
from xreal.manifest.schema import load_requests, sample_id
from xreal.run import dataset
from xreal.run.generation import RUN_FILE

MAX_LISTED = 20


@dataclass
class RunAudit:
    out: Path
    problems: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    changed_files: list[str] = field(default_factory=list)
    unexpected_files: list[str] = field(default_factory=list)
    counts: dataset.Tally | None = None
    samples: int = 0
    files_checked: int = 0

    @property
    def consistent(self) -> bool:
        return not (self.problems or self.missing_files or self.changed_files or self.unexpected_files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "consistent": self.consistent,
            "samples": self.samples,
            "files_checked": self.files_checked,
            "problems": self.problems,
            "missing_files": self.missing_files,
            "changed_files": self.changed_files,
            "unexpected_files": self.unexpected_files,
            "counts": self.counts.to_dict() if self.counts else None,
        }

    def to_text(self) -> str:
        lines = [f"Run {self.out}: {'consistent' if self.consistent else 'NOT consistent'}"]
        lines.append(f"  {self.samples} samples, {self.files_checked} files checked against their sha256")
        for title, items in (
            ("problems", self.problems),
            ("missing files", self.missing_files),
            ("files that do not match their sha256", self.changed_files),
            ("unexpected files", self.unexpected_files),
        ):
            if items:
                lines.append(f"\n{title} ({len(items)}):")
                lines += [f"  {item}" for item in items[:MAX_LISTED]]
                if len(items) > MAX_LISTED:
                    lines.append(f"  ... and {len(items) - MAX_LISTED} more")
        if self.counts is not None:
            c = self.counts
            lines.append(f"\n{c.requested} requested, {c.accepted} accepted, {c.rejected} rejected, {c.short} short\n")
            lines.append(f"  {'label':<28} {'requested':>9} {'accepted':>9} {'rejected':>9} {'short':>6}")
            for label, v in c.per_label.items():
                lines.append(f"  {label:<28} {v.requested:>9} {v.accepted:>9} {v.rejected:>9} {v.short:>6}")
            if c.short_requests:
                lines.append(f"\nrequests short after redraws ({len(c.short_requests)}):")
                for rid, v in list(c.short_requests.items())[:MAX_LISTED]:
                    lines.append(f"  {rid}: {v['accepted']} of {v['requested']} accepted from {v['drawn']} drawn")
        return "\n".join(lines)


def audit_run(out: str | os.PathLike[str], manifest: str | os.PathLike[str] | None = None) -> RunAudit:
    """Check a finished run directory; ``manifest`` overrides the path recorded in ``dataset.json``."""
    out = Path(out)
    report = RunAudit(out)
    record_path = out / dataset.DATASET_FILE
    samples_path = out / dataset.SAMPLES_FILE
    for path in (out / RUN_FILE, record_path, samples_path):
        if not path.is_file():
            report.problems.append(f"{path.name} is missing (not a finished xreal run; rerun `xreal generate`)")
    if report.problems:
        return report
    try:
        record = read_json(record_path, "dataset record", keys=("manifest", "counts"))
        table = pq.read_table(samples_path)
    except (XRealError, OSError, pa.ArrowInvalid) as exc:
        report.problems.append(f"{exc}; rerun `xreal generate` to write the records again")
        return report
    rows = table.to_pylist()
    report.samples = len(rows)
    _check_pinned_records(out, record, report)
    _check_against_shards(out, table, report)
    _check_rows(rows, report)

    for row in rows:
        for column, hash_column in dataset.FILE_COLUMNS:
            relative = row.get(column)
            if not relative:
                continue
            report.files_checked += 1
            try:
                path = resolve_under(out, relative)
            except PathError as exc:
                report.problems.append(f"sample {row['sample_id']}: {column} {exc}")
                continue
            if not path.is_file():
                report.missing_files.append(f"{relative} (sample {row['sample_id']})")
            elif sha256_file(path) != row[hash_column]:
                report.changed_files.append(f"{relative} (sample {row['sample_id']})")
    report.unexpected_files = [p.relative_to(out).as_posix() for p in dataset.stray_files(out, table)]

    ids = [r["sample_id"] for r in rows]
    if len(set(ids)) != len(ids):
        report.problems.append(f"{len(ids) - len(set(ids))} sample id(s) appear more than once")

    manifest_path = Path(manifest) if manifest else Path(record["manifest"]["path"])
    if not manifest_path.is_file():
        report.problems.append(f"manifest {manifest_path} not found; pass --manifest to check samples against it")
        return report
    if sha256_file(manifest_path) != record["manifest"]["sha256"]:
        report.problems.append(f"manifest {manifest_path} is not the one this run was made from (sha256 differs)")
        return report
    requests = {r.request_id: r for r in load_requests(manifest_path)}
    for row in rows:
        where = f"sample {row['sample_id']}"
        request = requests.get(row["request_id"])
        if request is None:
            report.problems.append(f"{where}: request {row['request_id']!r} is not in the manifest")
            continue
        if row["sample_id"] != sample_id(request.request_id, row["replica"]):
            report.problems.append(f"{where}: id does not match request {request.request_id} replica {row['replica']}")
        if row["seed"] != request.sample_seed(row["replica"]):
            report.problems.append(f"{where}: seed {row['seed']} is not the manifest's seed for its replica")
        if tuple(row["labels"]) != request.labels:
            report.problems.append(f"{where}: labels {row['labels']} differ from the request's {list(request.labels)}")
        if row["decision"] not in ("accepted", "rejected"):
            report.problems.append(f"{where}: decision {row['decision']!r} is neither accepted nor rejected")
        if row["decision"] == "accepted" and not (row["image_path"] or row["dicom_path"]):
            report.problems.append(f"{where}: accepted but has no image file")
    accepted: dict[str, int] = {}
    for row in rows:
        if row["decision"] == "accepted":
            accepted[row["request_id"]] = accepted.get(row["request_id"], 0) + 1
    for rid, n in accepted.items():
        if rid in requests and n > requests[rid].num_samples:
            report.problems.append(
                f"request {rid}: {n} accepted samples, more than the {requests[rid].num_samples} asked"
            )
    report.counts = dataset.tally(list(requests.values()), table)
    recorded = record.get("counts", {})
    if recorded and (recorded.get("accepted"), recorded.get("rejected")) != (
        report.counts.accepted,
        report.counts.rejected,
    ):
        report.problems.append(
            f"dataset.json counts ({recorded.get('accepted')} accepted, {recorded.get('rejected')} rejected) "
            f"differ from samples.parquet ({report.counts.accepted}, {report.counts.rejected})"
        )
    return report


def _check_pinned_records(out: Path, record: dict[str, Any], report: RunAudit) -> None:
    """The files finalize wrote (table, card, preview, HF metadata) and the shards, against dataset.json."""
    files, shards = record.get("files"), record.get("shards")
    if not isinstance(files, dict) or not isinstance(shards, dict):
        report.problems.append(
            f"{dataset.DATASET_FILE} pins no files (written by an older xreal, or edited); "
            "rerun `xreal generate` to finalize the run again"
        )
        return
    for name in (dataset.SAMPLES_FILE, dataset.CARD_FILE):
        if name not in files:
            report.problems.append(f"{dataset.DATASET_FILE} does not pin {name}")
    for folder, pinned in (("", files), (f"{dataset.SHARDS}/", shards)):
        for name, digest in pinned.items():
            report.files_checked += 1
            path = out / folder / name
            if not path.is_file():
                report.missing_files.append(f"{folder}{name} (pinned in {dataset.DATASET_FILE})")
            elif sha256_file(path) != digest:
                report.changed_files.append(f"{folder}{name} (pinned in {dataset.DATASET_FILE})")
    unpinned = [p.name for p in dataset.shard_paths(out) if p.name not in shards]
    report.unexpected_files += [f"{dataset.SHARDS}/{name}" for name in unpinned]
    card = out / dataset.CARD_FILE
    if card.is_file() and "every image in this folder is synthetic" not in card.read_text(errors="replace").lower():
        report.problems.append(f"{dataset.CARD_FILE} does not say that every image is synthetic")


def _check_against_shards(out: Path, table: pa.Table, report: RunAudit) -> None:
    """Every column of every row of samples.parquet against the shard that committed it."""
    try:
        shards = dataset.read_shards(out)
    except XRealError as exc:
        report.problems.append(str(exc))
        return
    if shards is None:
        report.problems.append("no shard to check samples.parquet against")
        return
    committed = {row["sample_id"]: row for row in shards.to_pylist()}
    listed = set()
    for row in table.to_pylist():
        listed.add(row["sample_id"])
        original = committed.get(row["sample_id"])
        if original is None:
            report.problems.append(f"sample {row['sample_id']}: in samples.parquet but in no shard")
            continue
        differ = sorted(k for k in row.keys() | original.keys() if not _same(row.get(k), original.get(k)))
        if differ:
            report.problems.append(
                f"sample {row['sample_id']}: {', '.join(differ[:8])} differ from shards/{original['shard']}.parquet"
            )
    for sid in sorted(committed.keys() - listed)[:MAX_LISTED]:
        report.problems.append(f"sample {sid}: committed in a shard but missing from samples.parquet")


def _same(a: Any, b: Any) -> bool:
    def missing(value: Any) -> bool:
        return value is None or (isinstance(value, float) and value != value)

    return (missing(a) and missing(b)) or a == b  # a score not computed is null or NaN (after pandas)


def _check_rows(rows: list[dict[str, Any]], report: RunAudit) -> None:
    """What each row says about itself: label columns agree with its labels, files sit where its decision says."""
    for row in rows:
        where = f"sample {row['sample_id']}"
        wrong = [label for label in CHEXPERT_LABELS if row.get(label) != float(label in row["labels"])]
        if wrong:
            report.problems.append(f"{where}: label column(s) {', '.join(wrong)} disagree with its labels")
        folders = {"accepted": ("images", "dicom"), "rejected": ("rejected",)}.get(row["decision"], ())
        for column in ("image_path", "dicom_path"):
            if row.get(column) and row[column].split("/")[0] not in folders:
                report.problems.append(f"{where}: {row['decision']} but its {column} is {row[column]}")
