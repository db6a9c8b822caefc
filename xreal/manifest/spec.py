"""Build a Parquet manifest from a small YAML or CSV spec, for people who do not write Parquet.

A spec row uses the manifest's column names (see ``manifests/README.md``) with
a few conveniences:

- ``labels`` and ``tags`` may be one string separated by ``;``;
- a box may be ``[x_min, y_min, x_max, y_max]`` (locating every label of its
  row), ``{label: ..., box: [...]}``, or in CSV ``"Label: x0 y0 x1 y1; ..."``;
- ``healthy_twin: true`` adds a No Finding request ``<request_id>-healthy`` on
  the same anatomy with the same seed, split and tags;
- YAML specs may set ``defaults:`` applied to every request;
- file paths are relative to the spec and are rewritten relative to the
  manifest written.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import yaml

from xreal.core.errors import ManifestError
from xreal.core.labels import NO_FINDING
from xreal.manifest.schema import MANIFEST_SCHEMA, ValidationReport, validate_manifest, write_manifest

PATH_COLUMNS = ("anatomy_path", "pathology_mask_path")
INT_COLUMNS = ("num_samples", "seed", "steps", "anatomy_steps")
FLOAT_COLUMNS = ("guidance_scale", "soft_scale")
TWIN_SUFFIX = "-healthy"


def read_spec(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a YAML (``.yaml``/``.yml``) or CSV spec into raw request rows."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: spec file not found")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            document = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(document, dict) or not isinstance(document.get("requests"), list):
            raise ManifestError(f"{path}: a YAML spec is a mapping with a 'requests:' list")
        defaults = document.get("defaults") or {}
        rows = []
        for number, request in enumerate(document["requests"]):
            if not isinstance(request, dict):
                raise ManifestError(f"{path}: request {number} is not a mapping")
            rows.append({**defaults, **request})
        return rows
    if suffix == ".csv":
        with open(path, newline="") as fh:
            return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
    raise ManifestError(f"{path}: unsupported spec format {suffix!r}; use .yaml, .yml or .csv")


def _split_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(";") if part.strip()]
    return list(value)


def _parse_box(raw: Any, where: str) -> dict[str, Any]:
    label = None
    if isinstance(raw, dict):
        label = raw.get("label")
        coords = raw.get("box", [raw.get(k) for k in ("x_min", "y_min", "x_max", "y_max")])
    elif isinstance(raw, str):
        if ":" in raw:
            label, raw = (part.strip() for part in raw.split(":", 1))
        coords = raw.replace(",", " ").split()
    else:
        coords = raw
    try:
        x_min, y_min, x_max, y_max = (float(c) for c in coords)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: a box is four numbers x_min y_min x_max y_max, got {raw!r}") from None
    return {"label": label, "x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max}


def _number(value: Any, kind: type, where: str) -> Any:
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: expected a {kind.__name__}, got {value!r}") from None


def spec_to_rows(raw_rows: list[dict[str, Any]], spec_dir: Path, manifest_dir: Path) -> list[dict[str, Any]]:
    """Turn raw spec rows into manifest rows (twins added, paths rebased, types fixed)."""
    allowed = set(MANIFEST_SCHEMA.names) | {"healthy_twin"}
    rows = []
    for number, raw in enumerate(raw_rows):
        where = f"spec request {number} ({raw.get('request_id', '?')})"
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)}")
        row = {k: v for k, v in raw.items() if k != "healthy_twin"}
        for column in ("labels", "tags"):
            if column in row:
                row[column] = _split_list(row[column])
        if "boxes" in row:
            boxes = row["boxes"]
            boxes = [b for b in boxes.split(";") if b.strip()] if isinstance(boxes, str) else boxes
            row["boxes"] = [_parse_box(b, where) for b in boxes]
        for column in INT_COLUMNS:
            row[column] = _number(row.get(column), int, f"{where}, {column}")
        for column in FLOAT_COLUMNS:
            row[column] = _number(row.get(column), float, f"{where}, {column}")
        for column in PATH_COLUMNS:
            if row.get(column):
                row[column] = os.path.relpath((spec_dir / row[column]).resolve(), manifest_dir.resolve())
        if "request_id" in row:
            row["request_id"] = str(row["request_id"])
        rows.append(row)
        if str(raw.get("healthy_twin", "")).lower() in ("true", "1", "yes"):
            twin = {
                k: row[k]
                for k in ("anatomy_path", "anatomy_rle", "anatomy_template", "num_samples", "seed", "split", "tags")
                if row.get(k) is not None
            }
            rows.append({**twin, "request_id": f"{row.get('request_id')}{TWIN_SUFFIX}", "labels": [NO_FINDING]})
    return rows


def build_manifest(
    spec: str | os.PathLike[str], out: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
) -> ValidationReport:
    """Write the manifest a spec describes, validated; an invalid result is not kept."""
    spec, out = Path(spec), Path(out)
    rows = spec_to_rows(read_spec(spec), spec.resolve().parent, out.resolve().parent)
    if not rows:
        raise ManifestError(f"{spec}: the spec has no requests")
    staged = out.with_name(f".{out.name}.staged")
    try:
        write_manifest(rows, staged)
        report = validate_manifest(staged, root=root or out.resolve().parent)
        report.path = out
        if report.ok:
            os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    return report
