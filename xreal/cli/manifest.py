"""The ``manifest`` commands: validate, audit, build, from-index, expand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from xreal.cli.base import EXIT_USER_ERROR, _Group, cli
from xreal.core.errors import XRealError


@cli.group(cls=_Group)
def manifest() -> None:
    """Validate, audit, build and expand generation manifests."""


_root_option = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder that mask paths must stay inside (default: the manifest's folder).",
)


@manifest.command()
@click.argument("path", type=click.Path(path_type=Path))
@_root_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def validate(path: Path, root: Path | None, as_json: bool) -> None:
    """Check every row of a manifest; exit 0 when valid, 2 otherwise."""
    from xreal.manifest.schema import validate_manifest

    report = validate_manifest(path, root)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "path": str(path),
                    "ok": report.ok,
                    "rows": report.rows,
                    "samples": report.samples,
                    "issue_count": report.issue_count,
                    "issues": [
                        {"row": i.row, "request_id": i.request_id, "column": i.column, "reason": i.reason}
                        for i in report.issues
                    ],
                },
                indent=2,
            )
        )
    else:
        click.echo(report.summary(), err=not report.ok)
    if not report.ok:
        sys.exit(EXIT_USER_ERROR)


@manifest.command("audit")
@click.argument("path", type=click.Path(path_type=Path))
@_root_option
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Also write a self-contained HTML page drawing the audit: pathology-location heatmaps per label over "
    "the mean anatomy, anatomy overlays, cardiothoracic-ratio and label histograms, flagged requests.",
)
def manifest_audit_command(path: Path, root: Path | None, as_json: bool, html_path: Path | None) -> None:
    """Summarise what a manifest asks for: labels, anatomy, duplicates, missing files, cost."""
    from xreal.manifest.audit import audit_manifest

    report = audit_manifest(path, root)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.to_text())
    if html_path is not None:
        from xreal.manifest.audit_html import write_audit_html

        write_audit_html(path, html_path, root, report=report)
        click.echo(f"wrote {html_path}", err=as_json)  # stdout stays pure JSON with --json


@manifest.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Manifest to write.")
@_root_option
def build(spec: Path, out: Path, root: Path | None) -> None:
    """Write a Parquet manifest from a YAML or CSV spec (validated before it is kept)."""
    from xreal.manifest.spec import build_manifest

    report = build_manifest(spec, out, root)
    if not report.ok:
        click.echo(report.summary(), err=True)
        sys.exit(EXIT_USER_ERROR)
    click.echo(f"wrote {out}: {report.rows} requests, {report.samples} samples")


@manifest.command("from-index", context_settings={"show_default": True})
@click.argument("index_dir", metavar="TRAINING_SET", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Manifest to write.")
@click.option("--target", "targets", multiple=True, metavar="LABEL[+LABEL]=N", help="Images of a label or combination.")
@click.option(
    "--per-label",
    type=click.IntRange(min=1),
    default=None,
    help="N images of every label that has boxes (or masks) to place it by: rare labels as many as common ones.",
)
@click.option("--healthy", type=click.IntRange(min=0), default=0, help="No Finding images.")
@click.option("--split", "splits", multiple=True, default=("test",), help="Index splits anatomies may come from.")
@click.option("--seed", type=int, default=0)
@click.option(
    "--boxes-from",
    metavar="DIR|xrv:NAME",
    default=None,
    help="Where pathology locations come from: another training set (e.g. VinDr-CXR's), or radiologists' boxes "
    "shipped with torchxrayvision: xrv:nih, xrv:rsna, xrv:vindr, xrv:siim (masks' bounding boxes).",
)
@click.option(
    "--masks-from",
    metavar="xrv:siim",
    default=None,
    help="Place the labels this table annotates (Pneumothorax) by a real annotated mask (SIIM-ACR's, shipped "
    "with torchxrayvision), written as PNGs in OUT's folder, <stem>-masks/.",
)
def from_index(
    index_dir: Path,
    out: Path,
    targets: tuple[str, ...],
    per_label: int | None,
    healthy: int,
    splits: tuple[str, ...],
    seed: int,
    boxes_from: str | None,
    masks_from: str | None,
) -> None:
    """Write a manifest on real anatomies of TRAINING_SET: held-out patients, boxes where each label is seen."""
    import shutil

    from xreal.manifest.from_index import manifest_from_index, parse_target, write_index_manifest
    from xreal.manifest.schema import validate_manifest

    wanted: dict[tuple[str, ...], int] = {}
    for text in targets:
        labels, count = parse_target(text)
        wanted[labels] = wanted.get(labels, 0) + count
    if not wanted and not healthy and not per_label:
        raise XRealError("give at least one --target LABEL=N, --per-label N or --healthy N")
    rows = manifest_from_index(index_dir, wanted, healthy, splits, seed, boxes_from, per_label, masks_from)
    _, masks = write_index_manifest(rows, out)
    report = validate_manifest(out)
    if not report.ok:  # a bug, not the user's: keep nothing half-right
        out.unlink()
        if masks is not None:
            shutil.rmtree(masks, ignore_errors=True)
        raise XRealError(f"the manifest built from {index_dir} does not validate:\n{report.summary()}")
    written = f"; {sum(r.get('pathology_mask') is not None for r in rows)} pathology masks in {masks}" if masks else ""
    anatomies = len({r["tags"][1] for r in rows})
    click.echo(f"wrote {out}: {len(rows)} requests on {anatomies} anatomies of {index_dir}{written}")


@manifest.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Parquet file of samples.")
@_root_option
def expand(path: Path, out: Path, root: Path | None) -> None:
    """Write the samples a manifest expands into (sample_id, request_id, replica, seed)."""
    import pyarrow.parquet as pq

    from xreal.core.files import atomic_path
    from xreal.manifest.schema import SAMPLE_SCHEMA, expand_manifest, validate_manifest

    report = validate_manifest(path, root)
    if not report.ok:
        click.echo(report.summary(), err=True)
        sys.exit(EXIT_USER_ERROR)
    total = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, SAMPLE_SCHEMA) as writer:
        for batch in expand_manifest(path, root, validate=False):  # validated just above
            writer.write_batch(batch)
            total += batch.num_rows
    click.echo(f"wrote {out}: {total} samples")
