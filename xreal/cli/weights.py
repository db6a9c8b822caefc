"""The ``weights`` commands and ``verify``: the pinned weight cache and the mounted model files."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from xreal.cli.base import _Group, cli
from xreal.core.errors import XRealError


@cli.group(cls=_Group)
def weights() -> None:
    """Fetch, record and check pretrained torchxrayvision weights against a sha256 lock file."""


_cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Weights folder (default: $XREAL_WEIGHTS_DIR, else ~/.torchxrayvision/models_data).",
)
_lock_option = click.option(
    "--lock",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Lock file of sha256 hashes; keep it under version control (default: CACHE_DIR/xreal-weights.lock.json).",
)


@weights.command("fetch")
@click.argument("names", nargs=-1)
@_cache_dir_option
@_lock_option
def weights_fetch_command(names: tuple[str, ...], cache_dir: Path | None, lock: Path | None) -> None:
    """Download weights (default: all the project uses) and record or check their sha256."""
    from xreal.core.weights import PROJECT_WEIGHTS, fetch_weights, weights_info

    for name in names or PROJECT_WEIGHTS:
        click.echo(f"{name}: {weights_info(name).url}")
        click.echo(f"  -> {fetch_weights([name], cache_dir, lock)[0]}")


@weights.command("record")
@click.argument("names", nargs=-1, required=True)
@_cache_dir_option
@_lock_option
@click.option("--replace", is_flag=True, help="Overwrite a different hash already in the lock.")
def weights_record_command(names: tuple[str, ...], cache_dir: Path | None, lock: Path | None, replace: bool) -> None:
    """Record the sha256 of weight files you copied into the cache by hand and trust."""
    from xreal.core.weights import record_weights

    for name, sha256 in record_weights(names, cache_dir, lock, replace=replace).items():
        click.echo(f"recorded {name}: sha256 {sha256}")


@weights.command("status")
@_cache_dir_option
@_lock_option
def weights_status_command(cache_dir: Path | None, lock: Path | None) -> None:
    """Show which weight files are present, recorded and matching; exit 1 if one does not match."""
    from xreal.core.weights import weights_status

    rows = weights_status(cache_dir, lock)
    width = max(len(row["name"]) for row in rows)
    click.echo(f"{'weights':<{width}}  present  recorded  matches  file")
    for row in rows:
        matches = {True: "yes", False: "NO", None: "-"}[row["matches"]]
        present, recorded = ("yes" if row[key] else "no" for key in ("present", "recorded"))
        click.echo(f"{row['name']:<{width}}  {present:<7}  {recorded:<8}  {matches:<7}  {row['file']}")
    if any(row["matches"] is False for row in rows):
        click.echo("a weight file does not match its recorded sha256 and will not be loaded", err=True)
        sys.exit(1)


@cli.command("verify")
@click.option("--model", "models", multiple=True, type=click.Path(file_okay=False, path_type=Path), help="A bundle.")
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Check every bundle in this folder (where a container mounts them).",
)
@_cache_dir_option
@click.option("--require-weights", multiple=True, metavar="NAME", help="Weights that must be in the cache.")
@click.option(
    "--run",
    "runs",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A run directory: check that its model bundle and judge set are, whole, the ones that made it.",
)
def verify_command(
    models: tuple[Path, ...],
    models_dir: Path | None,
    cache_dir: Path | None,
    require_weights: tuple[str, ...],
    runs: tuple[Path, ...],
) -> None:
    """Check model bundles, their judges and the weight cache against their sha256 (default: the demo bundle).

    Exits 2 naming every damaged, unrecorded or missing file. With --run, the
    bundle and judge set are checked against the digests the run recorded.
    """
    from xreal.core.records import DEMO_BUNDLE
    from xreal.run.verify import bundles_in, verify_files, verify_run_models

    for run in runs:
        for line in verify_run_models(run):
            click.echo(line)
    if runs and not (models or models_dir):
        return
    bundles = [*models, *(bundles_in(models_dir) if models_dir else [])]
    if models_dir and not bundles_in(models_dir):
        raise XRealError(f"{models_dir}: no model bundle in it (a folder with model_index.json)")
    for line in verify_files(bundles or [DEMO_BUNDLE], cache_dir, require_weights):
        click.echo(line)
