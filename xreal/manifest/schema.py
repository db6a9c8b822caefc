"""The manifest contract: a Parquet table with one row per generation request.

A row names a target anatomy (a label-map file, a CheXmask-style RLE or a
built-in template), the CheXpert labels to generate, where the pathology goes
(a mask file or boxes), how many samples, and optional seeds, sampler
overrides and pass-through metadata. The columns and rules are documented in
``manifests/README.md``; :data:`MANIFEST_SCHEMA` is the machine-readable form.

Manifests are read in record batches, so validation and expansion of millions
of rows run in bounded memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xreal.core.errors import LabelError, ManifestError, MaskError, XRealError
from xreal.core.files import ID_RULE, PathError, atomic_path, is_safe_id, resolve_under, sha256_file
from xreal.core.images import check_image_size
from xreal.core.labels import NO_FINDING, canonical_label, canonical_labels
from xreal.core.masks import (
    boxes_to_mask,
    check_box,
    check_rle,
    label_map_from_rle,
    read_binary_mask,
    read_label_map,
)
from xreal.core.settings import DEFAULT_SETTINGS, MAX_GUIDANCE, SamplerSettings
from xreal.phantom.templates import template_label_map, template_seed

MANIFEST_VERSION = "1"
VERSION_KEY = b"xreal.manifest_version"
MAX_SAMPLES_PER_REQUEST = 100_000
MAX_STEPS = 1000
BATCH_ROWS = 65_536

BOX_TYPE = pa.struct(
    [
        ("label", pa.string()),
        ("x_min", pa.float64()),
        ("y_min", pa.float64()),
        ("x_max", pa.float64()),
        ("y_max", pa.float64()),
    ]
)
ANATOMY_RLE_TYPE = pa.struct(
    [
        ("right_lung", pa.string()),
        ("left_lung", pa.string()),
        ("heart", pa.string()),
        ("height", pa.int64()),
        ("width", pa.int64()),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("num_samples", pa.int64()),
        pa.field("anatomy_path", pa.string()),
        pa.field("anatomy_rle", ANATOMY_RLE_TYPE),
        pa.field("anatomy_template", pa.string()),
        pa.field("pathology_mask_path", pa.string()),
        pa.field("boxes", pa.list_(BOX_TYPE)),
        pa.field("box_units", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("steps", pa.int64()),
        pa.field("anatomy_steps", pa.int64()),
        pa.field("guidance_scale", pa.float64()),
        pa.field("soft_scale", pa.float64()),
        pa.field("split", pa.string()),
        pa.field("tags", pa.list_(pa.string())),
    ],
    metadata={VERSION_KEY: MANIFEST_VERSION.encode()},
)
REQUIRED_COLUMNS = ("request_id", "labels", "num_samples")
ANATOMY_COLUMNS = ("anatomy_path", "anatomy_rle", "anatomy_template")
OVERRIDE_COLUMNS = ("steps", "anatomy_steps", "guidance_scale", "soft_scale")

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("request_id", pa.string()),
        pa.field("replica", pa.int64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
    ]
)


# --- what a valid row becomes ---------------------------------------------------


@dataclass(frozen=True)
class AnatomySource:
    """Exactly one of a label-map path (resolved), an RLE dict, or a template name."""

    kind: str  # "path" | "rle" | "template"
    value: Any
    shape: tuple[int, int] | None  # None for templates, which render at any size
    sha256: str | None = None  # of the file, once a run has pinned it (:func:`pin_inputs`)

    @property
    def key(self) -> str:
        """A string that is equal for equal anatomies (for grouping and duplicates)."""
        if self.kind == "rle":
            v = self.value
            digest = hashlib.sha1(f"{v['right_lung']}|{v['left_lung']}|{v['heart']}".encode()).hexdigest()[:16]
            return f"rle:{v['height']}x{v['width']}:{digest}"
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True)
class Box:
    """A pathology box; ``label=None`` means it locates every label of its request."""

    label: str | None
    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @property
    def coords(self) -> tuple[float, float, float, float]:
        return (self.x_min, self.y_min, self.x_max, self.y_max)


@dataclass(frozen=True)
class Request:
    """One validated manifest row."""

    row: int
    request_id: str
    labels: tuple[str, ...]
    num_samples: int
    anatomy: AnatomySource
    pathology_mask_path: Path | None = None
    boxes: tuple[Box, ...] = ()
    box_units: str = "normalized"
    seed: int | None = None
    overrides: dict[str, float | int] = field(default_factory=dict)
    split: str | None = None
    tags: tuple[str, ...] = ()
    pathology_mask_sha256: str | None = None  # once a run has pinned the file (:func:`pin_inputs`)

    @property
    def has_pathology(self) -> bool:
        return self.labels != (NO_FINDING,)

    def settings(self, defaults: SamplerSettings = DEFAULT_SETTINGS) -> SamplerSettings:
        """The sampler settings for this request: defaults with the row's overrides, guided as its findings ask
        (``SamplerSettings.for_labels``; a row's own guidance scale wins)."""
        return defaults.with_overrides(**self.overrides).for_labels(self.labels)

    def anatomy_map(self, size: int) -> np.ndarray:
        """The requested anatomy label map: a file or RLE at its own size, a template rendered at ``size``."""
        source = self.anatomy
        if source.kind == "path":
            return read_label_map(_pinned(source.value, source.sha256, "anatomy"))
        if source.kind == "rle":
            v = source.value
            return label_map_from_rle(v["right_lung"], v["left_lung"], v["heart"], v["height"], v["width"])
        return template_label_map(source.value, size)

    def normalized_boxes(self) -> list[tuple[str | None, tuple[float, float, float, float]]]:
        """``(label, (x_min, y_min, x_max, y_max))`` per box, as fractions of the image."""
        if self.box_units == "normalized":
            return [(b.label, b.coords) for b in self.boxes]
        height, width = self.anatomy.shape
        return [(b.label, (b.x_min / width, b.y_min / height, b.x_max / width, b.y_max / height)) for b in self.boxes]

    def pathology_mask(self, shape: tuple[int, int]) -> np.ndarray | None:
        """Where the pathology goes, as a bool mask of ``shape`` (None for a healthy request).

        A mask file is used as it is (validation checked it matches its
        anatomy); boxes are rasterised at ``shape``.
        """
        if not self.has_pathology:
            return None
        if self.pathology_mask_path is not None:
            return read_binary_mask(_pinned(self.pathology_mask_path, self.pathology_mask_sha256, "pathology mask"))
        return boxes_to_mask([coords for _, coords in self.normalized_boxes()], *shape, units="normalized")

    def sample_seed(self, replica: int) -> int:
        """The seed of one replica: ``seed + replica`` when the row gives a seed, else derived."""
        if self.seed is not None:
            return (self.seed + replica) % (1 << 63)
        return derive_seed(self.request_id, replica)


class InputChanged(XRealError):
    """A file a run pinned (an anatomy or mask the manifest names) changed while the run was open."""


def _pinned(path: Path, sha256: str | None, what: str) -> Path:
    if sha256 is not None and sha256_file(path) != sha256:
        raise InputChanged(
            f"{path}: this {what} file changed since the run started (its sha256 differs from the one the run "
            "pinned); restore it to resume, or start a new run with another --out"
        )
    return path


def pin_inputs(requests: Sequence[Request], root: Path) -> tuple[list[Request], dict[str, str]]:
    """The requests with the sha256 of every file they name, and those files (relative to ``root``) -> sha256.

    Everything a run reads besides the manifest is hashed when the run opens;
    a file that changes afterwards is refused when a batch reads it.
    """
    hashes: dict[Path, str] = {}

    def pin(path: Path) -> str:
        if path not in hashes:
            hashes[path] = sha256_file(path)
        return hashes[path]

    pinned = []
    for r in requests:
        changes: dict[str, Any] = {}
        if r.anatomy.kind == "path":
            changes["anatomy"] = dataclasses.replace(r.anatomy, sha256=pin(r.anatomy.value))
        if r.pathology_mask_path is not None:
            changes["pathology_mask_sha256"] = pin(r.pathology_mask_path)
        pinned.append(dataclasses.replace(r, **changes) if changes else r)
    files = {path.relative_to(root).as_posix(): digest for path, digest in sorted(hashes.items())}
    return pinned, files


def derive_seed(request_id: str, replica: int) -> int:
    """A stable 63-bit seed from the request id and replica number."""
    digest = hashlib.blake2b(f"{request_id}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def sample_id(request_id: str, replica: int) -> str:
    """The stable id of one sample: ``<request_id>-r<replica>`` (at least 4 digits)."""
    return f"{request_id}-r{replica:04d}"


# --- problems ---------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestIssue:
    """One problem: ``row`` is 0-based (as in pandas); None for whole-column problems."""

    row: int | None
    request_id: str | None
    column: str | None
    reason: str

    def __str__(self) -> str:
        where = [f"row {self.row}" if self.row is not None else "all rows"]
        if self.request_id:
            where.append(f"request {self.request_id!r}")
        if self.column:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.reason}"


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_manifest`. ``issues`` holds at most ``max_issues`` entries."""

    path: Path
    root: Path
    version: str
    rows: int = 0
    valid_rows: int = 0
    samples: int = 0
    issues: list[ManifestIssue] = field(default_factory=list)
    issue_count: int = 0

    @property
    def ok(self) -> bool:
        return self.issue_count == 0

    def summary(self) -> str:
        if self.ok:
            return f"{self.path}: valid manifest, {self.rows} requests, {self.samples} samples"
        shown = "\n".join(f"  {issue}" for issue in self.issues)
        more = self.issue_count - len(self.issues)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        return f"{self.path}: {self.issue_count} problem(s) in {self.rows} rows\n{shown}{tail}"


class ManifestInvalid(XRealError):
    """Raised where a valid manifest is required; carries the report."""

    def __init__(self, report: ValidationReport):
        super().__init__(report.summary())
        self.report = report


# --- reading --------------------------------------------------------------------


def open_manifest(path: str | os.PathLike[str]) -> tuple[pq.ParquetFile, str]:
    """Open a manifest file and check it is a non-empty Parquet table of a known version."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")
    if path.is_dir():
        raise ManifestError(f"{path}: is a directory; expected a Parquet manifest file")
    if path.stat().st_size == 0:
        raise ManifestError(f"{path}: empty file; expected a Parquet manifest")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path}: not a Parquet file ({exc})") from None
    meta = parquet.schema_arrow.metadata or {}
    version = meta.get(VERSION_KEY, MANIFEST_VERSION.encode()).decode()
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"{path}: manifest version {version!r} is not supported; this xreal reads version {MANIFEST_VERSION!r}"
        )
    if parquet.metadata.num_rows == 0:
        raise ManifestError(f"{path}: the manifest has no rows")
    return parquet, version


def _type_matches(actual: pa.DataType, expected: pa.DataType) -> bool:
    if pa.types.is_null(actual):
        return True
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_integer(expected):
        # floats are accepted and checked per row: pandas turns integer columns with gaps into floats
        return pa.types.is_integer(actual) or pa.types.is_floating(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_integer(actual) or pa.types.is_floating(actual)
    if pa.types.is_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _type_matches(
            actual.value_type, expected.value_type
        )
    if pa.types.is_struct(expected):
        if not pa.types.is_struct(actual):
            return False
        fields = {actual.field(i).name: actual.field(i).type for i in range(actual.num_fields)}
        wanted = {expected.field(i).name: expected.field(i).type for i in range(expected.num_fields)}
        if set(fields) - set(wanted):
            return False
        optional = {"label"}
        return all(
            (name in fields and _type_matches(fields[name], typ)) or (name in optional and name not in fields)
            for name, typ in wanted.items()
        )
    return actual.equals(expected)


def check_columns(schema: pa.Schema) -> list[ManifestIssue]:
    """Whole-column problems: missing required columns, unknown columns, wrong types."""
    issues = []
    expected = {f.name: f.type for f in MANIFEST_SCHEMA}
    names = schema.names
    for name in REQUIRED_COLUMNS:
        if name not in names:
            issues.append(ManifestIssue(None, None, name, "required column is missing"))
    for name in names:
        if name not in expected:
            issues.append(
                ManifestIssue(
                    None,
                    None,
                    name,
                    f"unknown column; the manifest columns are {', '.join(MANIFEST_SCHEMA.names)}",
                )
            )
        elif not _type_matches(schema.field(name).type, expected[name]):
            issues.append(
                ManifestIssue(None, None, name, f"has type {schema.field(name).type}; expected {expected[name]}")
            )
    if not any(name in names for name in ANATOMY_COLUMNS):
        issues.append(ManifestIssue(None, None, None, f"no anatomy column; give one of {', '.join(ANATOMY_COLUMNS)}"))
    return issues


class _RowChecker:
    """Validates rows batch by batch, remembering ids seen and files already checked."""

    def __init__(self, base: Path, root: Path):
        self.base = base
        self.root = root
        self.seen: set[str] = set()
        self.label_cache: dict[tuple, tuple[str, ...] | str] = {}
        self.file_cache: dict[tuple[str, str], tuple[Path, tuple[int, int]] | str] = {}
        self.template_cache: dict[str, str | None] = {}
        self.rle_cache: dict[tuple, list[str]] = {}

    def check_batch(self, batch: pa.RecordBatch, offset: int) -> tuple[list[Request], list[ManifestIssue]]:
        requests, issues = [], []
        for i, row in enumerate(batch.to_pylist()):  # optional columns may be absent: rows are read with .get
            request, problems = self.check_row(offset + i, row)
            if request is not None:
                requests.append(request)
            issues.extend(problems)
        return requests, issues

    def check_row(self, index: int, row: dict[str, Any]) -> tuple[Request | None, list[ManifestIssue]]:
        request_id = row.get("request_id")
        shown_id = request_id if isinstance(request_id, str) else None
        issues: list[ManifestIssue] = []

        def problem(column: str | None, reason: str) -> None:
            issues.append(ManifestIssue(index, shown_id, column, reason))

        if request_id is None or request_id == "":
            problem("request_id", "is missing")
        elif not is_safe_id(request_id):
            problem("request_id", f"must be {ID_RULE} (it names the run's files), got {request_id[:80]!r}")
        elif request_id in self.seen:
            problem("request_id", "duplicate request id")
        else:
            self.seen.add(request_id)

        labels = self._labels(row.get("labels"), problem)
        num_samples = _whole_number(row.get("num_samples"), "num_samples", problem, required=True)
        if num_samples is not None and not 1 <= num_samples <= MAX_SAMPLES_PER_REQUEST:
            problem("num_samples", f"must be between 1 and {MAX_SAMPLES_PER_REQUEST:,}, got {num_samples:,}")
            num_samples = None

        anatomy = self._anatomy(row, problem)
        mask_path, boxes, units = self._location(row, labels, anatomy, problem)

        seed = _whole_number(row.get("seed"), "seed", problem)
        if seed is not None and not 0 <= seed < 1 << 63:
            problem("seed", f"must be between 0 and 2**63 - 1, got {seed}")
        overrides = self._overrides(row, problem)

        split = row.get("split")
        if split is not None and not str(split).strip():
            problem("split", "is an empty string; leave it null or name the split")
        tags = row.get("tags") or []
        if any(not isinstance(t, str) or not t.strip() for t in tags):
            problem("tags", "tags must be non-empty strings")

        if issues:
            return None, issues
        assert labels is not None and anatomy is not None and num_samples is not None
        return (
            Request(
                row=index,
                request_id=request_id,
                labels=labels,
                num_samples=num_samples,
                anatomy=anatomy,
                pathology_mask_path=mask_path,
                boxes=boxes,
                box_units=units,
                seed=seed,
                overrides=overrides,
                split=split,
                tags=tuple(tags),
            ),
            [],
        )

    def _labels(self, raw: Any, problem) -> tuple[str, ...] | None:
        if raw is None or len(raw) == 0:
            problem("labels", f"is empty; list CheXpert labels, or [{NO_FINDING!r}] for a healthy image")
            return None
        key = tuple(raw)
        cached = self.label_cache.get(key)
        if cached is None:
            try:
                cached = canonical_labels(raw)
            except LabelError as exc:
                cached = str(exc)
            self.label_cache[key] = cached
        if isinstance(cached, str):
            problem("labels", cached)
            return None
        return cached

    def _file(self, column: str, value: str, reader) -> tuple[Path, tuple[int, int]] | str:
        key = (column, value)
        if key not in self.file_cache:
            try:
                path = resolve_under(self.root, value, base=self.base)
                self.file_cache[key] = (path, reader(path).shape)
            except (PathError, MaskError) as exc:
                self.file_cache[key] = str(exc)
        return self.file_cache[key]

    def _anatomy(self, row: dict[str, Any], problem) -> AnatomySource | None:
        given = [name for name in ANATOMY_COLUMNS if row.get(name) is not None]
        if len(given) != 1:
            problem(
                "anatomy_path" if not given else given[1],
                "give exactly one of anatomy_path, anatomy_rle, anatomy_template"
                + (f" (this row sets {', '.join(given)})" if given else ""),
            )
            return None
        column = given[0]
        value = row.get(column)
        if column == "anatomy_path":
            checked = self._file(column, value, read_label_map)
            if isinstance(checked, str):
                problem(column, checked)
                return None
            return AnatomySource("path", checked[0], checked[1])
        if column == "anatomy_template":
            if value not in self.template_cache:
                try:
                    template_seed(value)
                    self.template_cache[value] = None
                except MaskError as exc:
                    self.template_cache[value] = str(exc)
            if self.template_cache[value]:
                problem(column, self.template_cache[value])
                return None
            return AnatomySource("template", value, None)
        height = _whole_number(value.get("height"), column, problem, required=True, part="height")
        width = _whole_number(value.get("width"), column, problem, required=True, part="width")
        if height is None or width is None:
            return None
        try:
            check_image_size(height, width, "RLE anatomy")
        except XRealError as exc:
            problem(column, str(exc))
            return None
        parts = ("right_lung", "left_lung", "heart")
        key = (*(value.get(part) for part in parts), height, width)
        if key not in self.rle_cache:
            reasons = []
            for part in parts:
                try:
                    if not check_rle(value.get(part) or "", height, width):
                        reasons.append(f"{part} is empty; the anatomy needs both lungs and the heart")
                except MaskError as exc:
                    reasons.append(f"{part} {exc}")
            self.rle_cache[key] = reasons
        for reason in self.rle_cache[key]:
            problem(column, reason)
        return None if self.rle_cache[key] else AnatomySource("rle", value, (height, width))

    def _location(self, row, labels, anatomy, problem) -> tuple[Path | None, tuple[Box, ...], str]:
        mask_value, raw_boxes = row.get("pathology_mask_path"), row.get("boxes")
        units = row.get("box_units") or "normalized"
        if units not in ("normalized", "pixel"):
            problem("box_units", f"must be 'normalized' or 'pixel', got {units!r}")
            return None, (), "normalized"
        if labels is None:
            return None, (), units
        if labels == (NO_FINDING,):
            if mask_value is not None or raw_boxes:
                problem(
                    "boxes" if raw_boxes else "pathology_mask_path", "a No Finding request takes no pathology location"
                )
            return None, (), units
        if mask_value is None and not raw_boxes:
            problem("pathology_mask_path", "a pathology request needs a location: pathology_mask_path or boxes")
            return None, (), units
        if mask_value is not None and raw_boxes:
            problem("boxes", "give pathology_mask_path or boxes, not both")
            return None, (), units
        shape = anatomy.shape if anatomy is not None else None
        if mask_value is not None:
            checked = self._file("pathology_mask_path", mask_value, read_binary_mask)
            if isinstance(checked, str):
                problem("pathology_mask_path", checked)
                return None, (), units
            if shape is not None and checked[1] != shape:
                problem(
                    "pathology_mask_path",
                    f"mask is {checked[1][0]}x{checked[1][1]} but the anatomy is {shape[0]}x{shape[1]}",
                )
            return checked[0], (), units
        if units == "pixel" and anatomy is not None and shape is None:
            problem("box_units", "pixel boxes need an anatomy with a size (a file or RLE); use normalized boxes")
            return None, (), units
        height, width = shape or (1, 1)
        boxes = []
        for number, raw in enumerate(raw_boxes, 1):
            label = raw.get("label")
            if label is not None:
                try:
                    label = canonical_label(label)
                except LabelError as exc:
                    problem("boxes", f"box {number}: {exc}")
                    continue
                if label not in labels:
                    problem("boxes", f"box {number} is labelled {label!r}, which the row does not request")
                    continue
            coords = [raw.get(k) for k in ("x_min", "y_min", "x_max", "y_max")]
            if any(c is None for c in coords):
                problem("boxes", f"box {number} lacks coordinates: {raw}")
                continue
            try:
                check_box(coords, height, width, units, where=f"box {number}")
            except MaskError as exc:
                problem("boxes", str(exc))
                continue
            boxes.append(Box(label, *(float(c) for c in coords)))
        boxed = {b.label for b in boxes}
        if None not in boxed and len(boxes) == len(raw_boxes):
            unlocated = [label for label in labels if label not in boxed]
            if unlocated:
                problem("boxes", f"no box locates {', '.join(unlocated)}; label a box with it or leave a label empty")
        return None, tuple(boxes), units

    def _overrides(self, row: dict[str, Any], problem) -> dict[str, float | int]:
        overrides: dict[str, float | int] = {}
        steps = _whole_number(row.get("steps"), "steps", problem)
        if steps is not None:
            if 1 <= steps <= MAX_STEPS:
                overrides["steps"] = steps
            else:
                problem("steps", f"must be between 1 and {MAX_STEPS}, got {steps}")
        anatomy_steps = _whole_number(row.get("anatomy_steps"), "anatomy_steps", problem)
        if anatomy_steps is not None:
            limit = overrides.get("steps", DEFAULT_SETTINGS.steps)
            if 0 <= anatomy_steps <= limit:
                overrides["anatomy_steps"] = anatomy_steps
            else:
                problem("anatomy_steps", f"must be between 0 and steps ({limit}), got {anatomy_steps}")
        for column, low, high in (("guidance_scale", 0.0, MAX_GUIDANCE), ("soft_scale", 0.0, 1.0)):
            value = row.get(column)
            if value is None:
                continue
            if not isinstance(value, int | float) or math.isnan(value) or math.isinf(value):
                problem(column, f"must be a finite number, got {value}")
            elif not low <= value <= high:
                problem(column, f"must be between {low} and {high}, got {value}")
            else:
                overrides[column] = float(value)
        return overrides


def _whole_number(value: Any, column: str, problem, required: bool = False, part: str = "") -> int | None:
    what = f"{part} " if part else ""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            problem(column, f"{what}is missing")
        return None
    if isinstance(value, float):
        if math.isinf(value) or value != int(value):
            problem(column, f"{what}must be a whole number, got {value}")
            return None
        return int(value)
    if not isinstance(value, int):
        problem(column, f"{what}must be a whole number, got {value!r}")
        return None
    return value


def manifest_root(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """The folder a manifest's file paths must stay inside: ``root``, by default the manifest's own folder."""
    path = Path(path)
    return Path(root).resolve() if root is not None else path.resolve().parent


def iter_requests(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[tuple[list[Request], list[ManifestIssue]]]:
    """Stream a manifest as (valid requests, issues) per record batch.

    Relative file paths are resolved against the manifest's folder, and no
    file outside ``root`` (by default that folder) is read.
    """
    path = Path(path)
    parquet, _ = open_manifest(path)
    column_issues = check_columns(parquet.schema_arrow)
    if column_issues:
        yield [], column_issues
        return
    checker = _RowChecker(path.resolve().parent, manifest_root(path, root))
    offset = 0
    for batch in parquet.iter_batches(batch_size=batch_rows):
        yield checker.check_batch(batch, offset)
        offset += batch.num_rows


def _scan(
    path: str | os.PathLike[str], root: str | os.PathLike[str] | None, max_issues: int, keep_requests: bool
) -> tuple[ValidationReport, list[Request]]:
    path = Path(path)
    parquet, version = open_manifest(path)
    report = ValidationReport(
        path=path, root=manifest_root(path, root), version=version, rows=parquet.metadata.num_rows
    )
    kept: list[Request] = []
    for requests, issues in iter_requests(path, root):
        report.valid_rows += len(requests)
        report.samples += sum(r.num_samples for r in requests)
        report.issue_count += len(issues)
        report.issues.extend(issues[: max(0, max_issues - len(report.issues))])
        if keep_requests:
            kept.extend(requests)
    return report, kept


def validate_manifest(
    path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None, max_issues: int = 200
) -> ValidationReport:
    """Check every row of a manifest; collect problems instead of stopping at the first."""
    return _scan(path, root, max_issues, keep_requests=False)[0]


def load_requests(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> list[Request]:
    """All requests of a manifest (one pass), or :class:`ManifestInvalid` listing its problems."""
    report, requests = _scan(path, root, max_issues=200, keep_requests=True)
    if not report.ok:
        raise ManifestInvalid(report)
    return requests


# --- expansion ------------------------------------------------------------------


def _sample_batch(request_ids: Sequence[str], counts: Sequence[int], seeds: Sequence[int | None]) -> pa.RecordBatch:
    ids, owners, replicas, sample_seeds = [], [], [], []
    for request_id, count, seed in zip(request_ids, counts, seeds, strict=True):
        for replica in range(int(count)):
            ids.append(sample_id(request_id, replica))
            owners.append(request_id)
            replicas.append(replica)
            sample_seeds.append(derive_seed(request_id, replica) if seed is None else (int(seed) + replica) % (1 << 63))
    arrays = [
        pa.array(ids, pa.string()),
        pa.array(owners, pa.string()),
        pa.array(replicas, pa.int64()),
        pa.array(sample_seeds, pa.int64()),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=SAMPLE_SCHEMA)


def expand_requests(requests: Sequence[Request]) -> pa.RecordBatch:
    """One sample row per (request, replica): stable ``sample_id`` and seed."""
    return _sample_batch(
        [r.request_id for r in requests], [r.num_samples for r in requests], [r.seed for r in requests]
    )


def expand_manifest(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    batch_rows: int = BATCH_ROWS,
    validate: bool = True,
) -> Iterator[pa.RecordBatch]:
    """Stream the samples of a manifest as record batches of :data:`SAMPLE_SCHEMA`.

    The whole manifest is validated first (:class:`ManifestInvalid` lists
    every problem) unless ``validate=False`` says the caller has just done so.
    Expansion itself reads only the id, count and seed columns.
    """
    path = Path(path)
    if validate:
        report = validate_manifest(path, root)
        if not report.ok:
            raise ManifestInvalid(report)
    parquet, _ = open_manifest(path)
    columns = [c for c in ("request_id", "num_samples", "seed") if c in parquet.schema_arrow.names]
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        seeds = batch.column("seed").to_pylist() if "seed" in columns else [None] * batch.num_rows
        seeds = [None if isinstance(s, float) and math.isnan(s) else s for s in seeds]
        yield _sample_batch(batch.column("request_id").to_pylist(), batch.column("num_samples").to_pylist(), seeds)


# --- writing --------------------------------------------------------------------


def manifest_table(rows: Sequence[dict[str, Any]] | pd.DataFrame) -> pa.Table:
    """Build a manifest table with the full schema from dict rows or a DataFrame."""
    records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
    unknown = sorted({key for record in records for key in record} - set(MANIFEST_SCHEMA.names))
    if unknown:
        raise ManifestError(f"unknown manifest columns: {', '.join(unknown)}")
    columns = {}
    for f in MANIFEST_SCHEMA:
        try:
            columns[f.name] = pa.array([_none_if_nan(record.get(f.name)) for record in records], type=f.type)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ManifestError(f"column {f.name!r}: values do not fit type {f.type} ({exc})") from None
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def _none_if_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def write_manifest(rows: Sequence[dict[str, Any]] | pd.DataFrame | pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write a manifest (schema version recorded in the file metadata), atomically."""
    table = rows if isinstance(rows, pa.Table) else manifest_table(rows)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), VERSION_KEY: MANIFEST_VERSION.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)
