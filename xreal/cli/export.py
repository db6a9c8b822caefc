"""The ``export`` commands: a finished run in the layout another tool reads (``export chexgenbench``)."""

from __future__ import annotations

from pathlib import Path

import click

from xreal.cli.base import _Group, cli


@cli.group(cls=_Group)
def export() -> None:
    """Write a finished run in the layout another tool reads."""


@export.command("chexgenbench", context_settings={"show_default": True})
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="New (or empty) folder to write."
)
@click.option(
    "--size",
    type=click.IntRange(min=0),
    default=512,
    help="Side of the exported PNGs in pixels; 0 keeps the run's size.",
)
def chexgenbench(run: Path, out: Path, size: int) -> None:
    """Write RUN's accepted images (8-bit PNG) and prompt_INFO.csv for the CheXGenBench benchmark.

    OUT/README.md says how to run the benchmark on them, on a machine with a GPU and MIMIC-CXR-JPG, and when
    its figures are comparable with its leaderboard.
    """
    from xreal.evaluate.chexgenbench import CSV_FILE, IMAGES, export_chexgenbench

    written = export_chexgenbench(run, out, size=size or None)
    count = sum(1 for _ in (written / IMAGES).glob("*.png"))
    click.echo(f"wrote {count} images, {written / CSV_FILE} and {written / 'README.md'}")
