"""The ``phantom`` and ``ingest`` commands: training sets from phantoms and from real data."""

from __future__ import annotations

from pathlib import Path

import click

from xreal.cli.base import _Group, cli
from xreal.core.errors import XRealError


@cli.command(context_settings={"show_default": True})
@click.option("--count", type=click.IntRange(min=1), default=1000, help="Number of images.")
@click.option("--size", type=click.IntRange(64, 512), default=64, help="Image side in pixels.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the phantom stream.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing training set in --out.")
def phantom(count: int, size: int, seed: int, out: Path, overwrite: bool) -> None:
    """Render a phantom chest X-ray training set (images, masks, Parquet index)."""
    from xreal.data.training_index import write_phantom_training_set

    index = write_phantom_training_set(out, count, size=size, seed=seed, overwrite=overwrite, progress=True)
    click.echo(f"wrote {count} phantom images and {index}")


@cli.group("ingest", cls=_Group)
def ingest_group() -> None:
    """Bring real datasets in as training sets (images and anatomy at the training size, and an index)."""


def _ingest_options(chexmask_file: str):
    """The options every `xreal ingest ...` command has (ROOT, --out, --size, CheXmask, workers)."""

    def apply(function):
        options = [
            click.argument("root", type=click.Path(file_okay=False, path_type=Path)),
            click.option(
                "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Training set folder."
            ),
            click.option("--size", type=click.IntRange(16, 4096), default=256, help="Training resolution (square)."),
            click.option(
                "--chexmask",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help=f"CheXmask's {chexmask_file}: anatomy maps for the images it covers.",
            ),
            click.option(
                "--min-dice", type=click.FloatRange(0, 1), default=0.7, help="Keep masks with Dice RCA (Mean) >= this."
            ),
            click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [every core]."),
            click.option("--quiet", is_flag=True, help="No progress bar."),
        ]
        for option in reversed(options):
            function = option(function)
        return function

    return apply


@ingest_group.command("mimic", context_settings={"show_default": True})
@_ingest_options("MIMIC-CXR-JPG.csv")
@click.option("--views", default="PA,AP", help="ViewPosition values to keep, or 'all'.")
@click.option(
    "--reports",
    type=click.Path(path_type=Path),
    default=None,
    help="mimic-cxr-reports.zip (from MIMIC-CXR) or its folder: findings and impression as each image's text.",
)
@click.option("--dicom", is_flag=True, help="ROOT is MIMIC-CXR (DICOM files, .dcm) rather than MIMIC-CXR-JPG.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images (a trial run).")
def ingest_mimic_command(
    root: Path,
    out: Path,
    size: int,
    chexmask: Path | None,
    min_dice: float,
    views: str,
    reports: Path | None,
    dicom: bool,
    limit: int | None,
    workers: int | None,
    quiet: bool,
) -> None:
    """Make a training set from MIMIC-CXR-JPG 2.0.0 at ROOT (its three tables and files/), resumably.

    ROOT holds mimic-cxr-2.0.0-metadata.csv.gz, -split.csv.gz, -chexpert.csv.gz
    and files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg, as PhysioNet ships them (with
    --dicom: MIMIC-CXR's DICOM_ID.dcm files, read as displayed).
    """
    from xreal.data.mimic import mimic_index

    source, report = mimic_index(root, views=_views(views), reports=reports, dicom=dicom)
    if limit is not None:
        source = source.slice(0, limit)
    click.echo(report.to_text())
    _echo_problems(report.problems)
    if source.num_rows == 0:
        raise XRealError(
            f"{root}: the MIMIC-CXR tables list no usable image ({report.to_text()}); check --views and the rows "
            "named above. Nothing was written."
        )
    _write_training_set(source, root, out, size, chexmask, "mimic-cxr", min_dice, workers, quiet)


def _echo_problems(problems: list[str], shown: int = 20) -> None:
    for problem in problems[:shown]:
        click.echo(f"  {problem}")
    if len(problems) > shown:
        click.echo(f"  ... and {len(problems) - shown} more")


def _views(views: str) -> tuple[str, ...] | None:
    """``--views``: a comma-separated list, or ``all`` (None)."""
    return None if views.strip().lower() == "all" else tuple(v.strip() for v in views.split(",") if v.strip())


def _write_training_set(source, root, out, size, chexmask, dataset, min_dice, workers, quiet, read_masks=None) -> None:
    """The shared end of `xreal ingest ...`: CheXmask masks for the source's images, then the training set.

    ``read_masks(chexmask, source, min_dice)`` replaces the join by image id where a dataset's CheXmask file
    names its images otherwise (CheXpert: by path).
    """
    from xreal.data.chexmask import ID_COLUMNS, read_chexmask
    from xreal.data.ingest import build_training_set

    masks = None
    if chexmask is not None and read_masks is not None:
        masks, mask_report = read_masks(chexmask, source, min_dice)
        click.echo(mask_report.to_text())
    elif chexmask is not None:
        ids = source.column("image_id").to_pylist()
        masks, mask_report = read_chexmask(chexmask, ids, id_column=ID_COLUMNS[dataset], min_dice=min_dice)
        click.echo(mask_report.to_text())
    index, ingested = build_training_set(source, root, out, size=size, masks=masks, workers=workers, progress=not quiet)
    click.echo(ingested.to_text())
    click.echo(f"wrote {index}")


@ingest_group.command("vindr", context_settings={"show_default": True})
@_ingest_options("VinDr-CXR.csv")
@click.option("--split", "splits", type=click.Choice(["train", "test"]), multiple=True, default=("train", "test"))
def ingest_vindr_command(
    root: Path,
    out: Path,
    size: int,
    chexmask: Path | None,
    min_dice: float,
    splits: tuple[str, ...],
    workers: int | None,
    quiet: bool,
) -> None:
    """Make a training set from VinDr-CXR at ROOT: DICOM images, boxes merged over readers, CheXpert labels.

    ROOT holds annotations/annotations_train.csv, annotations/annotations_test.csv,
    train/IMAGE_ID.dicom and test/IMAGE_ID.dicom, as PhysioNet ships them.
    """
    from xreal.data.vindr import vindr_index

    source, report = vindr_index(root, splits=splits)
    click.echo(report.to_text())
    _echo_problems(report.problems)
    _write_training_set(source, root, out, size, chexmask, "vindr-cxr", min_dice, workers, quiet)


@ingest_group.command("chexpert", context_settings={"show_default": True})
@_ingest_options("CheXpert.csv")
@click.option("--views", default="PA,AP", help="View positions to keep (AP/PA of frontal images, LATERAL), or 'all'.")
@click.option(
    "--split",
    "splits",
    type=click.Choice(["train", "valid"]),
    multiple=True,
    default=("train", "valid"),
    help="train.csv, valid.csv (the index's validate split).",
)
def ingest_chexpert_command(
    root: Path,
    out: Path,
    size: int,
    chexmask: Path | None,
    min_dice: float,
    views: str,
    splits: tuple[str, ...],
    workers: int | None,
    quiet: bool,
) -> None:
    """Make a training set from CheXpert at ROOT (CheXpert-v1.0 or -small): labels as given, resumably.

    ROOT is the dataset folder as unzipped (train.csv, valid.csv, train/patientN/studyN/viewN_*.jpg, valid/),
    or the folder above it. CheXpert's valid split becomes the index's validate split.
    """
    from xreal.data.chexpert import chexpert_index, read_chexpert_masks

    source, report = chexpert_index(root, views=_views(views), splits=splits)
    click.echo(report.to_text())
    _echo_problems(report.problems)
    _write_training_set(
        source, root, out, size, chexmask, "chexpert", min_dice, workers, quiet, read_masks=read_chexpert_masks
    )


@ingest_group.command("nih", context_settings={"show_default": True})
@_ingest_options("ChestX-Ray8.csv")
@click.option(
    "--split",
    "splits",
    type=click.Choice(["train", "test"]),
    multiple=True,
    default=("train", "test"),
    help="train: train_val_list.txt; test: test_list.txt.",
)
def ingest_nih_command(
    root: Path,
    out: Path,
    size: int,
    chexmask: Path | None,
    min_dice: float,
    splits: tuple[str, ...],
    workers: int | None,
    quiet: bool,
) -> None:
    """Make a training set from NIH ChestX-ray14 at ROOT: findings mapped to CheXpert labels, boxes kept.

    ROOT holds Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv), BBox_List_2017.csv, train_val_list.txt,
    test_list.txt and the PNGs in images_001/images/ ... images_012/images/ (or one images/ folder), as NIH
    ships them. The mapping of NIH's findings to CheXpert labels is in manifests/README.md.
    """
    from xreal.data.nih import nih_index

    source, report = nih_index(root, splits=splits)
    click.echo(report.to_text())
    _echo_problems(report.problems)
    _write_training_set(source, root, out, size, chexmask, "chestx-ray8", min_dice, workers, quiet)
