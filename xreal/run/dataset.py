"""The output dataset: shards written atomically during a run, merged into one labelled dataset at the end.

Layout of a run directory (``../shared/DESIGN.md``, contract 3)::

    run.json               what the run is (manifest, model, judges, policy hashes); written first
    shards/*.parquet       one per finished batch: the commit record of its samples
    images/<id>.png        accepted images, 16-bit; images/metadata.jsonl for Hugging Face imagefolder
    dicom/<id>.dcm         accepted images as DICOM (--format dicom|both)
    healthy/<id>.png       the stage-1 healthy twin of each pathology sample
    masks/<request>.anatomy.png, masks/<request>.pathology.png   what conditioned the images
    rejected/<id>.png      rejected images (--keep-rejected)
    samples.parquet        one row per sample (accepted or rejected), dataset.json, README.md, preview.png

A batch writes its files first, each atomically, and its shard last: a
sample exists once its shard does. Files of a batch that died before its
shard are not part of the dataset; the next run rewrites them and
:func:`finalize` removes any left over.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from xreal.core.errors import XRealError
from xreal.core.files import atomic_path, resolve_under, sha256_file
from xreal.core.images import read_image, to_uint16, write_png16
from xreal.core.labels import CHEXPERT_LABELS, NO_FINDING
from xreal.core.masks import mask_box, write_mask_file
from xreal.data.dicom import write_dicom
from xreal.manifest.schema import BOX_TYPE
from xreal.run.config import FORMATS

SAMPLES_FILE = "samples.parquet"
DATASET_FILE = "dataset.json"
CARD_FILE = "README.md"
PREVIEW_FILE = "preview.png"
SHARDS = "shards"
HF_METADATA = "metadata.jsonl"
DATA_DIRS = ("images", "dicom", "healthy", "masks", "rejected")
SHARD_META_KEY = b"xreal.shard"

# (column, file column, hash column): every file a sample row can point at.
FILE_COLUMNS = (
    ("image_path", "image_sha256"),
    ("dicom_path", "dicom_sha256"),
    ("healthy_path", "healthy_sha256"),
    ("anatomy_mask_path", "anatomy_mask_sha256"),
    ("pathology_mask_path", "pathology_mask_sha256"),
)

BASE_FIELDS = [
    pa.field("sample_id", pa.string()),
    pa.field("request_id", pa.string()),
    pa.field("replica", pa.int64()),
    pa.field("round", pa.int64()),
    pa.field("seed", pa.int64()),
    pa.field("labels", pa.list_(pa.string())),
    *[pa.field(label, pa.float32()) for label in CHEXPERT_LABELS],
    pa.field("boxes", pa.list_(BOX_TYPE)),
    pa.field("anatomy_source", pa.string()),
    pa.field("split", pa.string()),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("steps", pa.int64()),
    pa.field("anatomy_steps", pa.int64()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("soft_scale", pa.float64()),
    pa.field("eta", pa.float64()),
    pa.field("sampler", pa.string()),
    pa.field("step_grid", pa.string()),
    pa.field("guidance_interval", pa.list_(pa.float64())),
    pa.field("healthy_guidance_scale", pa.float64()),
    pa.field("unet_evaluations", pa.int64()),
    pa.field("decision", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("content_sha256", pa.string()),
    *[pa.field(name, pa.string()) for pair in FILE_COLUMNS for name in pair],
    pa.field("shard", pa.string()),
]


class DatasetError(XRealError):
    """A run directory that cannot be written or read as an xreal dataset."""


def content_digest(image: np.ndarray) -> str:
    """sha256 of an image's 16-bit pixels and shape: the same for equal images in any file format."""
    pixels = to_uint16(np.nan_to_num(image, nan=0.0))
    return hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}:".encode() + pixels.astype("<u2").tobytes()).hexdigest()


@dataclass
class GeneratedSample:
    """One generated image with everything the writer records about it."""

    sample_id: str
    request_id: str
    replica: int
    round: int
    seed: int
    labels: tuple[str, ...]
    boxes: list[dict[str, Any]]  # BOX_TYPE rows, pixels of the written image
    anatomy_source: str
    split: str | None
    tags: tuple[str, ...]
    settings: dict[str, Any]  # SamplerSettings.to_dict() as the sample was drawn, and its unet_evaluations
    image: np.ndarray
    healthy: np.ndarray | None
    anatomy: np.ndarray
    pathology: np.ndarray | None
    scores: dict[str, float]
    accepted: bool
    reason: str


@dataclass
class WriteOptions:
    formats: str = "png"
    keep_rejected: bool = False
    healthy_twins: bool = True
    dataset_id: str = ""
    model_note: str = ""  # which model produced the images, for the DICOM text

    def __post_init__(self):
        if self.formats not in FORMATS:
            raise DatasetError(f"format must be one of {', '.join(FORMATS)}, got {self.formats!r}")


def boxes_for(labels: Sequence[str], normalized: Sequence, mask: np.ndarray | None, size: int) -> list[dict]:
    """Pathology boxes in pixels of the written image: the request's boxes, or the mask's bounding box."""
    if normalized:
        return [
            {"label": label, "x_min": x0 * size, "y_min": y0 * size, "x_max": x1 * size, "y_max": y1 * size}
            for label, (x0, y0, x1, y1) in normalized
        ]
    if mask is None or NO_FINDING in labels:
        return []
    box = mask_box(mask)
    if box is None:
        return []
    scale = size / mask.shape[0]
    label = labels[0] if len(labels) == 1 else None
    return [dict(zip(("x_min", "y_min", "x_max", "y_max"), (v * scale for v in box), strict=True), label=label)]


def shard_schema(score_names: Sequence[str]) -> pa.Schema:
    return pa.schema(BASE_FIELDS + [pa.field(name, pa.float64()) for name in sorted(score_names)])


def _relative(out: Path, path: Path) -> str:
    return path.relative_to(out).as_posix()


def _write_file(out: Path, relative: str, write) -> tuple[str, str]:
    path = out / relative
    write(path)
    return relative, sha256_file(path)


def write_shard(
    out: str | os.PathLike[str],
    shard: str,
    samples: Sequence[GeneratedSample],
    options: WriteOptions,
    timings: dict[str, float] | None = None,
) -> pa.Table:
    """Write a batch's files (each atomically), then its shard table: the batch's commit."""
    started = time.perf_counter()
    out = Path(out)
    rows = []
    written: dict[str, tuple[str, str]] = {}  # a request's masks are written once per batch

    def write_once(relative: str, write) -> tuple[str, str]:
        if relative not in written:
            written[relative] = _write_file(out, relative, write)
        return written[relative]

    for s in samples:
        row: dict[str, Any] = {
            "sample_id": s.sample_id,
            "request_id": s.request_id,
            "replica": s.replica,
            "round": s.round,
            "seed": s.seed,
            "labels": list(s.labels),
            **{label: float(label in s.labels) for label in CHEXPERT_LABELS},
            "boxes": s.boxes,
            "anatomy_source": s.anatomy_source,
            "split": s.split,
            "tags": list(s.tags),
            **s.settings,
            "decision": "accepted" if s.accepted else "rejected",
            "reason": s.reason,
            "content_sha256": content_digest(s.image),
            "shard": shard,
            **s.scores,
        }
        finite = bool(np.isfinite(s.image).all())  # non-finite pixels have no file form; the row says why
        folder = ("images" if s.accepted else "rejected" if options.keep_rejected else None) if finite else None
        if folder and options.formats in ("png", "both"):
            row["image_path"], row["image_sha256"] = _write_file(
                out, f"{folder}/{s.sample_id}.png", lambda p, s=s: write_png16(p, s.image)
            )
        if folder and options.formats in ("dicom", "both"):
            description = f"model {options.model_note}; request {s.request_id}; labels {', '.join(s.labels)}; "
            description += f"seed {s.seed}; sample {s.sample_id}"
            row["dicom_path"], row["dicom_sha256"] = _write_file(
                out,
                f"{'dicom' if s.accepted else 'rejected'}/{s.sample_id}.dcm",
                lambda p, s=s, d=description: write_dicom(
                    p, s.image, dataset_id=options.dataset_id, sample_id=s.sample_id, description=d
                ),
            )
        keep_twin = s.accepted or options.keep_rejected
        if options.healthy_twins and s.healthy is not None and keep_twin and np.isfinite(s.healthy).all():
            row["healthy_path"], row["healthy_sha256"] = _write_file(
                out, f"healthy/{s.sample_id}.png", lambda p, s=s: write_png16(p, s.healthy)
            )
        row["anatomy_mask_path"], row["anatomy_mask_sha256"] = write_once(
            f"masks/{s.request_id}.anatomy.png", lambda p, s=s: write_mask_file(p, s.anatomy)
        )
        if s.pathology is not None:
            row["pathology_mask_path"], row["pathology_mask_sha256"] = write_once(
                f"masks/{s.request_id}.pathology.png", lambda p, s=s: write_mask_file(p, s.pathology)
            )
        rows.append(row)
    names = sorted({k for s in samples for k in s.scores})
    timings = {**(timings or {}), "writing_s": time.perf_counter() - started}
    schema = shard_schema(names).with_metadata({SHARD_META_KEY: json.dumps(timings).encode()})
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(out / SHARDS / f"{shard}.parquet") as tmp:
        pq.write_table(table, tmp)
    return table


def is_temporary(path: Path) -> bool:
    """A file :func:`xreal.core.files.atomic_path` was writing when its process died (``.NAME.XXXX.part.SUFFIX``)."""
    return path.name.startswith(".") and ".part" in path.name


def shard_paths(out: str | os.PathLike[str]) -> list[Path]:
    """The committed shards: complete tables only, never a temporary file a killed writer left."""
    return sorted(p for p in (Path(out) / SHARDS).glob("*.parquet") if not p.name.startswith("."))


def read_shards(out: str | os.PathLike[str]) -> pa.Table | None:
    """Every committed sample of a run directory (None before the first shard)."""
    tables = []
    for path in shard_paths(out):
        try:
            tables.append(pq.read_table(path))
        except (OSError, pa.ArrowInvalid) as exc:
            raise DatasetError(f"{path}: unreadable shard ({exc}); delete it to regenerate its samples") from None
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default")


def shard_records(out: str | os.PathLike[str]) -> dict[str, dict]:
    """What each committed batch recorded about itself: seconds per step, device and worker."""
    records = {}
    for path in shard_paths(out):
        meta = pq.read_schema(path).metadata or {}
        records[path.stem] = json.loads(meta.get(SHARD_META_KEY, b"{}"))
    return records


def shard_timings(out: str | os.PathLike[str]) -> dict[str, float]:
    """Seconds spent sampling, judging and writing, summed over the shards."""
    totals: dict[str, float] = {}
    for record in shard_records(out).values():
        for key, value in record.items():
            if isinstance(value, int | float):
                totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def referenced_files(table: pa.Table) -> set[str]:
    files = set()
    for column, _ in FILE_COLUMNS:
        if column in table.column_names:
            files.update(p for p in table.column(column).to_pylist() if p)
    return files


def stray_files(out: str | os.PathLike[str], table: pa.Table | None) -> list[Path]:
    """Files in the data folders that no committed sample points at (left by a batch that died), and the
    temporary files of writers that were killed."""
    out = Path(out)
    known = referenced_files(table) if table is not None else set()
    known.add(f"images/{HF_METADATA}")
    stray = [p for p in sorted(out.glob(".*")) + sorted((out / SHARDS).glob(".*")) if p.is_file() and is_temporary(p)]
    for folder in DATA_DIRS:
        for path in sorted((out / folder).rglob("*")) if (out / folder).is_dir() else []:
            if path.is_file() and _relative(out, path) not in known:
                stray.append(path)
    return stray


def write_hf_metadata(out: Path, table: pa.Table) -> Path | None:
    """``images/metadata.jsonl`` so ``datasets.load_dataset("imagefolder", data_dir=out / "images")`` works."""
    rows = [r for r in table.to_pylist() if r["decision"] == "accepted" and r["image_path"]]
    path = out / "images" / HF_METADATA
    if not rows:
        path.unlink(missing_ok=True)
        return None
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for r in rows:
            record = {
                "file_name": Path(r["image_path"]).name,
                "sample_id": r["sample_id"],
                "request_id": r["request_id"],
                "labels": r["labels"],
                "split": r["split"],
                **{label: int(r[label]) for label in CHEXPERT_LABELS},
            }
            fh.write(json.dumps(record) + "\n")
    return path


def write_preview(out: Path, table: pa.Table, per_label: int = 6, tile: int = 96, caption: int = 200) -> Path | None:
    """A grid of accepted images: one row per label combination (named on the left), up to ``per_label`` each."""
    from PIL import ImageDraw

    rows: dict[str, list[str]] = {}
    for r in table.to_pylist():
        if r["decision"] == "accepted" and r["image_path"]:
            rows.setdefault(" + ".join(r["labels"]), []).append(r["image_path"])
    if not rows:
        (out / PREVIEW_FILE).unlink(missing_ok=True)
        return None
    grid = Image.new("L", (caption + tile * per_label, tile * len(rows)), color=0)
    draw = ImageDraw.Draw(grid)
    for i, (labels, paths) in enumerate(sorted(rows.items())):
        draw.text((6, i * tile + tile // 2 - 6), labels[:32], fill=255)
        for j, path in enumerate(sorted(paths)[:per_label]):
            image = Image.fromarray((read_image(out / path) * 255).astype(np.uint8)).resize((tile, tile))
            grid.paste(image, (caption + j * tile, i * tile))
    path = out / PREVIEW_FILE
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def pinned_files(out: Path) -> dict[str, str]:
    """sha256 of the files finalize derives from the shards (table, card, preview, HF metadata), for dataset.json."""
    names = (SAMPLES_FILE, CARD_FILE, PREVIEW_FILE, f"images/{HF_METADATA}")
    return {name: sha256_file(out / name) for name in names if (out / name).is_file()}


def shard_hashes(out: Path) -> dict[str, str]:
    """sha256 of every committed shard, by file name, for dataset.json."""
    return {path.name: sha256_file(path) for path in shard_paths(out)}


def write_samples(out: Path, table: pa.Table) -> Path:
    table = table.sort_by("sample_id")
    path = out / SAMPLES_FILE
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


@dataclass
class LabelCounts:
    requested: int = 0
    accepted: int = 0
    rejected: int = 0
    short: int = 0


@dataclass
class Tally:
    """Per-label and per-request counts of a run: what was asked, kept, rejected and is still missing."""

    per_label: dict[str, LabelCounts] = field(default_factory=dict)
    short_requests: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    requested: int = 0
    accepted: int = 0
    rejected: int = 0

    @property
    def short(self) -> int:
        return self.requested - self.accepted

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "short": self.short,
            "per_label": {k: vars(v) for k, v in self.per_label.items()},
            "short_requests": self.short_requests,
            "rejection_reasons": self.reasons,
        }


def tally(requests: Sequence, table: pa.Table | None) -> Tally:
    """Count requested, accepted, rejected and short samples per label and per request."""
    result = Tally()
    done: dict[str, list[str]] = {}
    if table is not None:
        for rid, decision, reason in zip(
            *(table.column(c).to_pylist() for c in ("request_id", "decision", "reason")), strict=True
        ):
            done.setdefault(rid, []).append(decision)
            if decision == "rejected":
                for part in reason.split("; "):
                    key = part.split(" (")[0]
                    result.reasons[key] = result.reasons.get(key, 0) + 1
    for request in requests:
        decisions = done.get(request.request_id, [])
        accepted = min(decisions.count("accepted"), request.num_samples)
        rejected = decisions.count("rejected")
        result.requested += request.num_samples
        result.accepted += accepted
        result.rejected += rejected
        if accepted < request.num_samples:
            result.short_requests[request.request_id] = {
                "requested": request.num_samples,
                "accepted": accepted,
                "drawn": len(decisions),
            }
        for label in request.labels:
            counts = result.per_label.setdefault(label, LabelCounts())
            counts.requested += request.num_samples
            counts.accepted += accepted
            counts.rejected += rejected
            counts.short += request.num_samples - accepted
    result.reasons = dict(sorted(result.reasons.items(), key=lambda kv: -kv[1]))
    return result


def label_table_markdown(counts: Tally) -> str:
    lines = ["| label | requested | accepted | rejected | short |", "|---|---:|---:|---:|---:|"]
    for label, c in sorted(counts.per_label.items(), key=lambda kv: CHEXPERT_LABELS.index(kv[0])):
        lines.append(f"| {label} | {c.requested} | {c.accepted} | {c.rejected} | {c.short} |")
    return "\n".join(lines)


def write_card(out: Path, record: dict[str, Any], counts: Tally) -> Path:
    """The human-readable dataset card (README.md of the run directory)."""
    model, manifest = record["model"], record["manifest"]
    lines = [
        f"# Synthetic chest X-ray dataset `{out.name}`",
        "",
        "**Every image in this folder is synthetic**: generated by the xreal model named below, not taken from a "
        "patient. Do not use it as a real patient's image.",
        "",
        f"- manifest: `{manifest['path']}` (sha256 `{manifest['sha256'][:16]}…`), {manifest['requests']} requests",
        f"- model bundle: `{model['path']}` (preset {model['preset']}, {model['image_size']} px, "
        f"digest `{model['digest'][:16]}…`)",
        f"- judges: {record['judges']['kind']}; policy digest `{record['policy_digest'][:16]}…`",
        f"- images: {counts.accepted} accepted of {counts.requested} requested, {counts.rejected} rejected, "
        f"{counts.short} short",
        f"- run id `{record['run_id']}`, Prefect flow run `{record.get('flow_run_id') or '-'}`",
        "",
        "## Labels",
        "",
        label_table_markdown(counts),
    ]
    if counts.reasons:
        lines += ["", "## Why images were rejected", "", "| reason | images |", "|---|---:|"]
        lines += [f"| {reason} | {n} |" for reason, n in list(counts.reasons.items())[:12]]
    if counts.short_requests:
        lines += [
            "",
            "## Requests that fell short",
            "",
            "| request | requested | accepted | drawn |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {rid} | {v['requested']} | {v['accepted']} | {v['drawn']} |" for rid, v in counts.short_requests.items()
        ]
    if (out / PREVIEW_FILE).is_file():
        lines += ["", "## Preview", "", f"![accepted images, one row per label combination]({PREVIEW_FILE})"]
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from xreal.dataset import XRealDataset            # torchxrayvision conventions: .pathologies, .labels",
        f'ds = XRealDataset("{out.name}")                   # items: {{"img": [1, H, W] in [-1024, 1024], "lab": ...}}',
        "",
        "import datasets                                  # Hugging Face",
        f'hf = datasets.load_dataset("imagefolder", data_dir="{out.name}/images")',
        "```",
        "",
        "`samples.parquet` has one row per sample (accepted and rejected) with its labels, boxes, seed, sampler "
        "settings, judge scores, decision and reason, files and their sha256; `dataset.json` holds the provenance. "
        "`xreal audit run` checks the folder against both.",
    ]
    path = out / CARD_FILE
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


XRV_NAMES = {"Pleural Effusion": "Effusion"}


class XRealDataset(torch.utils.data.Dataset):
    """A finished run directory as a torch Dataset in torchxrayvision's conventions.

    ``pathologies`` lists the CheXpert labels (with torchxrayvision's names, e.g.
    ``Effusion``, so ``xrv.datasets.relabel_dataset`` and xrv models line up);
    ``labels`` is ``[N, len(pathologies)]`` float32 of 1/0; an item is
    ``{"idx", "img", "lab", "sample_id"}`` with ``img`` ``[1, H, W]`` float32 in
    [-1024, 1024] as ``xrv.datasets.normalize`` gives. Only accepted samples
    unless ``include_rejected``; ``transform`` is applied to ``img``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform=None,
        include_rejected: bool = False,
        xrv_names: bool = True,
    ):
        self.root = Path(root)
        path = self.root / SAMPLES_FILE
        if not path.is_file():
            raise DatasetError(f"{self.root}: no {SAMPLES_FILE}; is this a finished xreal run directory?")
        self._check_pinned(path)
        table = pq.read_table(path)
        frame = table.to_pandas()
        if not include_rejected:
            frame = frame[frame["decision"] == "accepted"]
        has_file = frame["image_path"].notna() | frame["dicom_path"].notna()
        self.csv = frame[has_file].reset_index(drop=True)
        labels = [label for label in CHEXPERT_LABELS if label != NO_FINDING]
        self.pathologies = [XRV_NAMES.get(label, label) if xrv_names else label for label in labels]
        self.labels = self.csv[labels].to_numpy(dtype=np.float32) if len(self.csv) else np.zeros((0, len(labels)))
        self.transform = transform

    def _check_pinned(self, path: Path) -> None:
        """Refuse a ``samples.parquet`` that differs from the one its run pinned in ``dataset.json``."""
        record_path = self.root / DATASET_FILE
        try:
            pinned = json.loads(record_path.read_text()).get("files", {}).get(SAMPLES_FILE)
        except (OSError, ValueError, AttributeError):
            pinned = None
        if pinned is not None and sha256_file(path) != pinned:
            raise DatasetError(
                f"{path}: differs from the table its run recorded in {DATASET_FILE} (sha256); it was edited. "
                f"Run `xreal audit run {self.root}` to see what changed, and rerun `xreal generate` to restore it"
            )

    def __len__(self) -> int:
        return len(self.csv)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        row = self.csv.iloc[idx]
        if isinstance(row["image_path"], str):
            image = read_image(resolve_under(self.root, row["image_path"]))
        else:
            from xreal.data.dicom import read_dicom_pixels

            image = read_dicom_pixels(resolve_under(self.root, row["dicom_path"])).astype(np.float32) / 65535.0
        img = (image * 2048.0 - 1024.0)[None].astype(np.float32)
        if self.transform is not None:
            img = self.transform(img)
        return {"idx": idx, "img": img, "lab": self.labels[idx], "sample_id": row["sample_id"]}

    def __repr__(self) -> str:
        return f"XRealDataset(root={str(self.root)!r}, num_samples={len(self)})"
