"""The ``xreal`` command line. User errors print one paragraph and exit with status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from xreal.errors import XRealError

EXIT_USER_ERROR = 2


class UserError(click.ClickException):
    exit_code = EXIT_USER_ERROR

    def format_message(self) -> str:
        return self.message


class _Group(click.Group):
    """Turns library errors a user can fix into a clean message instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except XRealError as exc:
            raise UserError(str(exc)) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            raise UserError(f"{exc.strerror}: {exc.filename}") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xreal")
def cli() -> None:
    """xreal: labelled synthetic chest X-rays from anatomy and pathology masks (XReal)."""


@cli.command(context_settings={"show_default": True})
@click.option("--count", type=click.IntRange(min=1), default=1000, help="Number of images.")
@click.option("--size", type=click.IntRange(64, 512), default=64, help="Image side in pixels.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the phantom stream.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing training set in --out.")
def phantom(count: int, size: int, seed: int, out: Path, overwrite: bool) -> None:
    """Render a phantom chest X-ray training set (images, masks, Parquet index)."""
    from xreal.training_index import write_phantom_training_set

    index = write_phantom_training_set(out, count, size=size, seed=seed, overwrite=overwrite, progress=True)
    click.echo(f"wrote {count} phantom images and {index}")


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
    from xreal.manifest import validate_manifest

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


@manifest.command()
@click.argument("path", type=click.Path(path_type=Path))
@_root_option
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
def audit(path: Path, root: Path | None, as_json: bool) -> None:
    """Summarise what a manifest asks for: labels, anatomy, duplicates, missing files, cost."""
    from xreal.audit import audit_manifest

    report = audit_manifest(path, root)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.to_text())


@manifest.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Manifest to write.")
@_root_option
def build(spec: Path, out: Path, root: Path | None) -> None:
    """Write a Parquet manifest from a YAML or CSV spec (validated before it is kept)."""
    from xreal.manifest_spec import build_manifest

    report = build_manifest(spec, out, root)
    if not report.ok:
        click.echo(report.summary(), err=True)
        sys.exit(EXIT_USER_ERROR)
    click.echo(f"wrote {out}: {report.rows} requests, {report.samples} samples")


@manifest.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Parquet file of samples.")
@_root_option
def expand(path: Path, out: Path, root: Path | None) -> None:
    """Write the samples a manifest expands into (sample_id, request_id, replica, seed)."""
    import pyarrow.parquet as pq

    from xreal.files import atomic_path
    from xreal.manifest import SAMPLE_SCHEMA, expand_manifest, validate_manifest

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


@cli.group(cls=_Group)
def train() -> None:
    """Train the autoencoder, the Anatomy Controller and the backbone from a training index."""


def _training_options(function):
    options = [
        click.option(
            "--index",
            type=click.Path(file_okay=False, path_type=Path),
            required=True,
            help="Training set folder (with index.parquet).",
        ),
        click.option(
            "--out",
            type=click.Path(file_okay=False, path_type=Path),
            required=True,
            help="Run folder: checkpoints, the trained component; a rerun resumes.",
        ),
        click.option("--preset", type=click.Choice(["demo", "paper", "tiny"]), default="demo", show_default=True),
        click.option("--steps", type=click.IntRange(min=1), required=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True),
        click.option("--lr", "learning_rate", type=float, default=2e-4, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, show_default=True),
        click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _run_and_data(index, out, preset, steps, batch_size, learning_rate, seed, checkpoint_every, mixed_precision):
    from xreal.model import get_preset
    from xreal.training import TrainingRun, load_training_set

    data = load_training_set(index, get_preset(preset).image_size)
    run = TrainingRun(
        out,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        checkpoint_every=checkpoint_every,
        mixed_precision=mixed_precision,
    )
    return run, data


@train.command("autoencoder")
@_training_options
def train_autoencoder_command(**options) -> None:
    """Train the first-stage autoencoder; saves OUT/model."""
    from xreal.training import train_autoencoder

    run, data = _run_and_data(**options)
    train_autoencoder(data, run, preset=options["preset"]).save_pretrained(run.out / "model")
    click.echo(f"wrote {run.out / 'model'} ({run.log['seconds']} s)")


@train.command("anatomy-controller")
@_training_options
def train_anatomy_controller_command(**options) -> None:
    """Train the Anatomy Controller (image or anatomy map in, image out); saves OUT/model."""
    from xreal.training import train_autoencoder

    run, data = _run_and_data(**options)
    train_autoencoder(data, run, preset=options["preset"], anatomy_controller=True).save_pretrained(run.out / "model")
    click.echo(f"wrote {run.out / 'model'} ({run.log['seconds']} s)")


@train.command("backbone")
@_training_options
@click.option(
    "--autoencoder",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder of `xreal train autoencoder`.",
)
@click.option(
    "--anatomy-controller",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder of `xreal train anatomy-controller`.",
)
def train_backbone_command(autoencoder: Path, anatomy_controller: Path, **options) -> None:
    """Train UNet and text encoder on the frozen autoencoder; saves the model bundle OUT/bundle."""
    from diffusers import AutoencoderKL

    from xreal.model import save_bundle, write_model_card
    from xreal.training import train_backbone

    run, data = _run_and_data(**options)
    vae = AutoencoderKL.from_pretrained(autoencoder / "model", use_safetensors=True)
    controller = AutoencoderKL.from_pretrained(anatomy_controller / "model", use_safetensors=True)
    pipeline = train_backbone(data, run, vae, controller, preset=options["preset"])
    training = {
        "data": f"{len(data)} training images from {options['index']}",
        "command": " ".join(sys.argv),
        "runs": {"backbone": {**run.log, "batch_size": run.batch_size}},
        "autoencoder": str(autoencoder),
        "anatomy_controller": str(anatomy_controller),
    }
    bundle = save_bundle(pipeline, run.out / "bundle", training=training)
    write_model_card(bundle)
    click.echo(f"wrote {bundle}")


@train.command("demo")
@click.option(
    "--index", type=click.Path(file_okay=False, path_type=Path), required=True, help="Phantom training set folder."
)
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the three training runs (a rerun resumes).",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Bundle to write.")
@click.option("--seed", type=int, default=0, show_default=True)
def train_demo_command(index: Path, work: Path, out: Path, seed: int) -> None:
    """Train the demo bundle end to end with the demo schedule (CPU-sized)."""
    from xreal.training import train_demo_bundle

    click.echo(f"wrote {train_demo_bundle(index, work, out, seed=seed, command=' '.join(sys.argv))}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="xreal")


if __name__ == "__main__":
    main()
