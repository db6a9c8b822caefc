"""What a manifest asks for, at a glance: counts, anatomy statistics, duplicates, cost."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from xreal.core.errors import MaskError
from xreal.core.labels import CHEXPERT_LABELS, NO_FINDING, Anatomy
from xreal.core.masks import (
    boxes_to_mask,
    read_binary_mask,
    resize_label_map,
    resize_mask,
)
from xreal.manifest.schema import ManifestIssue, Request, iter_requests, open_manifest
from xreal.phantom.anatomy import anatomy_stats

GRID = 64  # resolution at which locations are compared
TEMPLATE_SIZE = 128  # resolution at which templates are measured
MAX_MEASURED_ANATOMIES = 2000
MAX_GROUP_FOR_PAIRS = 50
NEAR_IDENTICAL_IOU = 0.9
FILE_COLUMNS = ("anatomy_path", "pathology_mask_path")


@dataclass
class AuditReport:
    """Everything ``xreal manifest audit`` prints; ``to_dict`` is its ``--json`` form."""

    manifest: str
    rows: int
    valid_rows: int = 0
    samples: int = 0
    unet_evaluations: int = 0
    per_label: dict[str, dict[str, int]] = field(default_factory=dict)
    per_combination: list[dict[str, Any]] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)
    anatomy_sources: dict[str, int] = field(default_factory=dict)
    unique_anatomies: int = 0
    measured_anatomies: int = 0
    anatomy: dict[str, dict[str, float]] = field(default_factory=dict)
    enlarged_hearts: int = 0
    pathology_requests_with_healthy_twin: int = 0
    duplicates: list[list[str]] = field(default_factory=list)
    near_identical: list[dict[str, Any]] = field(default_factory=list)
    locations_outside_thorax: list[str] = field(default_factory=list)
    unresolved_files: list[str] = field(default_factory=list)
    issue_count: int = 0
    issues: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        return _render_text(self)


def audit_manifest(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> AuditReport:
    """Audit a manifest. Rows with problems are counted as issues and left out of the statistics."""
    parquet, _ = open_manifest(path)
    report = AuditReport(manifest=str(path), rows=parquet.metadata.num_rows)
    requests: list[Request] = []
    for valid, issues in iter_requests(path, root):
        requests.extend(valid)
        _note_issues(report, issues)
    report.valid_rows = len(requests)
    _count(report, requests)
    anatomies = _measure_anatomies(report, requests)
    _check_locations(report, requests, anatomies)
    return report


def _note_issues(report: AuditReport, issues: list[ManifestIssue]) -> None:
    report.issue_count += len(issues)
    for issue in issues:
        if len(report.issues) < 50:
            report.issues.append(str(issue))
        if issue.column in FILE_COLUMNS and len(report.unresolved_files) < 200:
            report.unresolved_files.append(str(issue))


def _count(report: AuditReport, requests: list[Request]) -> None:
    label_requests: Counter[str] = Counter()
    label_samples: Counter[str] = Counter()
    combos: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0])
    splits: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for request in requests:
        n = request.num_samples
        report.samples += n
        report.unet_evaluations += n * request.settings().unet_evaluations(request.has_pathology)
        for label in request.labels:
            label_requests[label] += 1
            label_samples[label] += n
        combos[request.labels][0] += 1
        combos[request.labels][1] += n
        splits[request.split or "(none)"] += n
        sources[request.anatomy.kind] += 1
    report.per_label = {
        label: {"requests": label_requests[label], "samples": label_samples[label]}
        for label in CHEXPERT_LABELS
        if label_requests[label]
    }
    report.per_combination = [
        {"labels": " + ".join(labels), "requests": r, "samples": s}
        for labels, (r, s) in sorted(combos.items(), key=lambda kv: -kv[1][1])
    ]
    report.splits = dict(splits)
    report.anatomy_sources = dict(sources)


def _measure_anatomies(report: AuditReport, requests: list[Request]) -> dict[str, np.ndarray]:
    """Label maps at the comparison grid, keyed by anatomy; fills the anatomy statistics."""
    first: dict[str, Request] = {}
    for request in requests:
        first.setdefault(request.anatomy.key, request)
    report.unique_anatomies = len(first)
    grids: dict[str, np.ndarray] = {}
    stats = []
    for key, request in list(first.items())[:MAX_MEASURED_ANATOMIES]:
        try:
            label_map = request.anatomy_map(TEMPLATE_SIZE)
        except MaskError as exc:
            report.unresolved_files.append(f"request {request.request_id!r}: {exc}")
            continue
        stats.append(anatomy_stats(label_map))
        grids[key] = resize_label_map(label_map, GRID)
    report.measured_anatomies = len(stats)
    if stats:
        for name in ("right_lung_area", "left_lung_area", "heart_area", "cardiothoracic_ratio"):
            values = np.array([getattr(s, name) for s in stats])
            report.anatomy[name] = {
                "min": round(float(values.min()), 3),
                "median": round(float(np.median(values)), 3),
                "max": round(float(values.max()), 3),
            }
        report.enlarged_hearts = sum(s.cardiothoracic_ratio > 0.5 for s in stats)
    return grids


def _location_grid(request: Request) -> np.ndarray | None:
    if request.pathology_mask_path is not None:
        return resize_mask(read_binary_mask(request.pathology_mask_path), GRID, rule="majority")
    if not request.boxes:
        return None
    return boxes_to_mask([coords for _, coords in request.normalized_boxes()], GRID, GRID, units="normalized")


def _check_locations(report: AuditReport, requests: list[Request], anatomies: dict[str, np.ndarray]) -> None:
    exact: dict[tuple, list[str]] = defaultdict(list)
    by_anatomy_labels: dict[tuple, list[tuple[str, np.ndarray]]] = defaultdict(list)
    for request in requests:
        location_key = (
            str(request.pathology_mask_path),
            tuple((*b.coords, b.label) for b in request.boxes),
            request.box_units if request.boxes else None,
        )
        content = (
            request.anatomy.key,
            request.labels,
            location_key,
            tuple(sorted(request.overrides.items())),
            request.seed,
        )
        exact[content].append(request.request_id)
        if not request.has_pathology:
            continue
        try:
            grid = _location_grid(request)
        except MaskError:
            continue
        anatomy = anatomies.get(request.anatomy.key)
        if grid is not None and anatomy is not None:
            thorax = anatomy != Anatomy.BACKGROUND
            if grid.sum() and (grid & thorax).sum() / grid.sum() < 0.5:
                report.locations_outside_thorax.append(request.request_id)
        if grid is not None:
            by_anatomy_labels[(request.anatomy.key, request.labels)].append((request.request_id, grid))
    healthy = {r.anatomy.key for r in requests if not r.has_pathology}
    report.pathology_requests_with_healthy_twin = sum(r.has_pathology and r.anatomy.key in healthy for r in requests)
    report.duplicates = [ids for ids in exact.values() if len(ids) > 1]
    duplicated = {i for ids in report.duplicates for i in ids[1:]}
    for group in by_anatomy_labels.values():
        group = [(rid, grid) for rid, grid in group if rid not in duplicated]
        if not 1 < len(group) <= MAX_GROUP_FOR_PAIRS:
            continue
        for i, (id_a, a) in enumerate(group):
            for id_b, b in group[i + 1 :]:
                union = (a | b).sum()
                iou = float((a & b).sum() / union) if union else 1.0
                if iou >= NEAR_IDENTICAL_IOU:
                    report.near_identical.append({"requests": [id_a, id_b], "location_iou": round(iou, 3)})


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  "
            + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _render_text(r: AuditReport) -> str:
    out = [f"Manifest {r.manifest}"]
    out.append(
        f"  {r.rows:,} rows, {r.valid_rows:,} valid; {r.samples:,} samples requested; "
        f"{r.unet_evaluations:,} UNet evaluations"
        + (f" ({r.unet_evaluations / r.samples:.0f} per sample)" if r.samples else "")
    )
    if r.per_label:
        out += ["", "Requested images per label"]
        out.append(
            _table(["label", "requests", "samples"], [[k, v["requests"], v["samples"]] for k, v in r.per_label.items()])
        )
    if r.per_combination:
        out += ["", "Label combinations"]
        out.append(
            _table(
                ["labels", "requests", "samples"],
                [[c["labels"], c["requests"], c["samples"]] for c in r.per_combination],
            )
        )
    if r.splits:
        out += ["", "Samples per split: " + ", ".join(f"{k} {v:,}" for k, v in sorted(r.splits.items()))]
    out += ["", "Anatomy"]
    out.append(
        f"  sources: {', '.join(f'{k} {v:,}' for k, v in sorted(r.anatomy_sources.items())) or 'none'}; "
        f"{r.unique_anatomies:,} distinct anatomies, {r.measured_anatomies:,} measured"
    )
    if r.anatomy:
        out.append(
            _table(
                ["measure", "min", "median", "max"],
                [[k.replace("_", " "), v["min"], v["median"], v["max"]] for k, v in r.anatomy.items()],
            )
        )
        out.append(f"  anatomies with cardiothoracic ratio > 0.5: {r.enlarged_hearts:,} of {r.measured_anatomies:,}")
    pathology_requests = r.valid_rows - r.per_label.get(NO_FINDING, {}).get("requests", 0)
    out.append(
        f"  pathology requests with a healthy twin (No Finding on the same anatomy): "
        f"{r.pathology_requests_with_healthy_twin:,} of {pathology_requests:,}"
    )
    out += ["", "Checks"]
    out.append(f"  duplicate requests: {len(r.duplicates)} group(s)")
    out += [f"    {', '.join(ids)}" for ids in r.duplicates[:10]]
    out.append(
        f"  near-identical requests (same anatomy and labels, location IoU >= {NEAR_IDENTICAL_IOU}): "
        f"{len(r.near_identical)}"
    )
    out += [f"    {' ~ '.join(p['requests'])} (IoU {p['location_iou']})" for p in r.near_identical[:10]]
    out.append(f"  pathology locations mostly outside the lungs and heart: {len(r.locations_outside_thorax)}")
    out += [f"    {rid}" for rid in r.locations_outside_thorax[:10]]
    out.append(f"  unresolved files: {len(r.unresolved_files)}")
    out += [f"    {f}" for f in r.unresolved_files[:10]]
    out.append(
        f"  rows with problems: {r.issue_count:,}"
        + (" (run `xreal manifest validate` for all)" if r.issue_count else "")
    )
    return "\n".join(out)
