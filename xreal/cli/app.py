"""The ``xreal`` command line. User errors print one paragraph and exit with status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from xreal.errors import XRealError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


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
        except KeyboardInterrupt:  # Ctrl-C: the shell's status for it (click's own says 1, "Aborted!")
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


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


@manifest.command("audit")
@click.argument("path", type=click.Path(path_type=Path))
@_root_option
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
def manifest_audit_command(path: Path, root: Path | None, as_json: bool) -> None:
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

    from xreal.index_manifest import manifest_from_index, parse_target, write_index_manifest
    from xreal.manifest import validate_manifest

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


@train.command("judges")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Judge set folder.")
@click.option("--size", type=click.IntRange(64, 512), default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=2024, show_default=True)
def train_judges_command(out: Path, size: int, seed: int) -> None:
    """Train and calibrate the phantom judge set (classifier, segmenter, realism reference) on phantoms."""
    from xreal.phantom_judges import train_phantom_judges
    from xreal.records import BUNDLE_FILE, record_bundle_files

    click.echo(f"wrote {train_phantom_judges(out, size=size, seed=seed)}")
    if (out.resolve().parent / BUNDLE_FILE).is_file():  # a bundle's own judge set: its record pins the new files
        record_bundle_files(out.resolve().parent)
        click.echo(f"recorded the new judge files in {out.resolve().parent / BUNDLE_FILE}")


def _run_options(function):
    """The options of a generation run, shared by ``generate``, ``serve`` and ``submit``."""
    path = click.Path(file_okay=False, path_type=Path)
    options = [
        click.option("--model", type=path, default=None, help="Model bundle [demo]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, help="Samples per sampler call."),
        click.option("--device", default=None, help="cpu, cuda (every GPU) or a list: cuda:0,cuda:1. [cpu]"),
        click.option(
            "--dask-workers",
            type=click.IntRange(min=0),
            default=0,
            help="Run the batches on a local Dask cluster of this many worker processes (sharing --device).",
        ),
        click.option(
            "--dask-address",
            default=None,
            metavar="tcp://HOST:PORT",
            help="Run the batches on this Dask cluster; each worker uses its own device.",
        ),
        click.option("--policy", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Policy YAML."),
        click.option("--format", "formats", type=click.Choice(["png", "dicom", "both"]), default="png"),
        click.option("--keep-rejected", is_flag=True, help="Also write rejected images (under rejected/)."),
        click.option("--healthy-twins/--no-healthy-twins", default=True, help="Keep each image's healthy twin."),
        click.option(
            "--precision",
            type=click.Choice(["float32", "float64", "bfloat16"]),
            default="float32",
            help="float64: identical images at any batch size and thread count (slower); bfloat16: GPU autocast.",
        ),
        click.option("--root", type=path, default=None, help="Allowed root of the manifest's paths."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _run_parameters(
    device: str | None, dask_address: str | None, policy: Path | None, local: bool = True, **options
) -> dict:
    """The flow's parameters from the run options, checked before anything starts (bad ones exit 2).

    ``local``: the run happens on this machine, so its devices can be checked here.
    """
    from flows.execution import Execution
    from xreal.generation import parse_devices
    from xreal.policy import QualityPolicy

    if dask_address and device:
        raise XRealError("--device and --dask-address: the cluster's workers choose their own devices")
    devices = parse_devices(device or "cpu") if local else [d.strip() for d in (device or "cpu").split(",")]
    Execution(tuple(devices), options["dask_workers"], dask_address)
    if policy is not None:
        QualityPolicy.from_yaml(policy)
        policy = str(policy.resolve())
    paths = {k: str(Path(v).resolve()) for k in ("model", "root") if (v := options.pop(k)) is not None}
    return {**options, **paths, "devices": devices, "dask_address": dask_address, "policy": policy}


def _preflight(
    manifest: Path,
    out: Path,
    policy: Path | None,
    model: Path | None,
    root: Path | None,
    formats: str,
    keep_rejected: bool,
    healthy_twins: bool,
    precision: str,
    **_,
) -> None:
    """Every check of a run that needs no Prefect and no model in memory, before either starts: the manifest and
    its files, --out (a folder, writable, not another run, not locked), the policy, the bundle's and judges'
    checksums. A refusal then takes about a second instead of Prefect's start-up and the model's loading."""
    from xreal.policy import QualityPolicy
    from xreal.records import DEMO_BUNDLE
    from xreal.run_config import RunConfig, preflight

    if "{date}" in str(out):
        return  # the scheduled date, and so the folder, is known only inside the flow run
    config = RunConfig(
        manifest=manifest,
        out=out,
        model=model or DEMO_BUNDLE,
        policy=QualityPolicy.from_yaml(policy) if policy else QualityPolicy(),
        formats=formats,
        keep_rejected=keep_rejected,
        healthy_twins=healthy_twins,
        precision=precision,
        root=root,
    )
    preflight(config, check_lock=True)


@cli.command(context_settings={"show_default": True})
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory.")
@_run_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate(manifest_path: Path, out: Path, quiet: bool, **options) -> None:
    """Generate the dataset MANIFEST asks for into --out: sample, judge, write; rerun to resume.

    Runs as a Prefect flow: on the embedded API by default (state under
    $PREFECT_HOME, default ~/.local/state/xreal/prefect), or on the server
    $PREFECT_API_URL names. Batches run on this process's devices, or on a
    Dask cluster with --dask-workers or --dask-address.
    Exits 0 when every batch ran, 1 when some failed (rerun to resume), 2 on a bad input or environment
    (one paragraph says what), 130 or 143 when interrupted (rerun to resume).
    """
    from flows import use_project_defaults

    _preflight(manifest_path, out, **options)
    parameters = _run_parameters(**options)
    use_project_defaults()
    from flows.embedded import exit_on_interrupt
    from flows.generate import run_generation

    with exit_on_interrupt(out):  # Ctrl-C, SIGTERM: stop within seconds, resumable; exit 130, 143
        state = run_generation(manifest_path, out, progress=not quiet, **parameters)
    if state.is_failed() or state.is_crashed():
        try:
            state.result()
        except XRealError:
            raise
        except Exception as exc:  # the flow's own failure message is the report
            click.echo(state.message or str(exc), err=True)
        sys.exit(1)
    click.echo(state.message)
    click.echo(f"dataset card: {out / 'README.md'}; check it with: xreal audit run {out}")


@cli.command(context_settings={"show_default": True})
@click.option("--name", default="generate-dataset", help="Deployment name.")
@click.option("--cron", default=None, help='A schedule, e.g. "0 2 * * *" (needs --manifest and --out).')
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Run directory.")
@click.option("--limit", type=click.IntRange(min=1), default=1, help="Runs at once; more wait for a slot.")
@_run_options
def serve(name: str, cron: str | None, manifest_path: Path | None, out: Path | None, limit: int, **options) -> None:
    """Serve the generate-dataset deployment from this machine until interrupted (needs PREFECT_API_URL).

    Runs asked of the server (`xreal submit`, the UI, a schedule) run here, each
    in a subprocess, with these options as their defaults. In --out, {date}
    becomes the run's scheduled date, so a schedule writes a new dataset each time.
    """
    from flows import use_project_defaults

    parameters = _run_parameters(**options)
    if manifest_path is not None:
        parameters["manifest"] = str(manifest_path.resolve())
    if out is not None:
        parameters["out"] = str(out.resolve())
    use_project_defaults()
    from flows.deploy import serve_generation

    serve_generation(name, parameters, cron=cron, limit=limit)


@cli.command(context_settings={"show_default": True})
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory.")
@click.option("--deployment", default="generate-dataset", help="Deployment name (or flow/deployment).")
@_run_options
@click.option("--wait", is_flag=True, help="Wait for the run to end; exit 1 unless it completed.")
@click.pass_context
def submit(ctx: click.Context, manifest_path: Path, out: Path, deployment: str, wait: bool, **options) -> None:
    """Ask the Prefect server (PREFECT_API_URL) for a generation run; print its id and UI link.

    Options not given keep the deployment's defaults. Paths are sent as
    absolute paths: the machine that runs it must see them.
    """
    from click.core import ParameterSource

    from flows import use_project_defaults

    given = {k for k in options if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    given = {"devices" if k == "device" else k for k in given}
    parameters = {k: v for k, v in _run_parameters(local=False, **options).items() if k in given}
    use_project_defaults()
    from flows.deploy import submit_generation

    run, link = submit_generation(deployment, manifest_path, out, parameters, wait=wait)
    click.echo(f"flow run {run.id} ({run.name}): {link}")
    if wait:
        click.echo(f"{run.state.name}: {run.state.message or ''}".rstrip(": "))
        sys.exit(0 if run.state.is_completed() else 1)


@cli.group("audit", cls=_Group)
def audit_group() -> None:
    """Check what a run wrote."""


@audit_group.command("run")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The manifest, if it moved since the run.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def audit_run_command(out: Path, manifest: Path | None, as_json: bool) -> None:
    """Check every file against its hash and every sample against the manifest; exit 1 if inconsistent."""
    from xreal.run_audit import audit_run

    report = audit_run(out, manifest)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.to_text())
    if not report.consistent:
        sys.exit(1)


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
    from xreal.weights import PROJECT_WEIGHTS, fetch_weights, weights_info

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
    from xreal.weights import record_weights

    for name, sha256 in record_weights(names, cache_dir, lock, replace=replace).items():
        click.echo(f"recorded {name}: sha256 {sha256}")


@weights.command("status")
@_cache_dir_option
@_lock_option
def weights_status_command(cache_dir: Path | None, lock: Path | None) -> None:
    """Show which weight files are present, recorded and matching; exit 1 if one does not match."""
    from xreal.weights import weights_status

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
    from xreal.records import DEMO_BUNDLE
    from xreal.verify import bundles_in, verify_files, verify_run_models

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


_CHECKPOINT = click.Path(dir_okay=False, path_type=Path)


@cli.command("import-reference")
@click.option("--backbone", type=_CHECKPOINT, required=True, help="The reference backbone.pth.")
@click.option("--anatomy-controller", type=_CHECKPOINT, required=True, help="The reference anatomy_controller.pth.")
@click.option(
    "--autoencoder",
    type=_CHECKPOINT,
    default=None,
    help="ldm_ae.pth: needed only when the backbone holds no first-stage autoencoder (checked against it otherwise).",
)
@click.option(
    "--tokenizer",
    default="bert-base-uncased",
    show_default=True,
    help="A folder with the bert-base-uncased tokenizer (vocab.txt or tokenizer.json), or its hub name when online.",
)
@click.option("--ema", is_flag=True, help="Import the UNet's EMA weights instead of the live ones the reference uses.")
@click.option(
    "--image-size", type=click.IntRange(min=8), default=256, show_default=True, help="The reference's image size."
)
@click.option("--half", is_flag=True, help="Store the weights as float16 (half the size; loads as float32).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="New bundle folder.")
def import_reference_command(
    backbone: Path,
    anatomy_controller: Path,
    autoencoder: Path | None,
    tokenizer: str,
    ema: bool,
    image_size: int,
    half: bool,
    out: Path,
) -> None:
    """Make a model bundle from the published XReal reference checkpoints (weights licensed CC BY-NC 4.0).

    The .pth files are read with torch.load(weights_only=True), so nothing in them runs. Every key is used or
    reported; a missing, unknown or wrongly shaped one stops the import and nothing is written.
    """
    import torch

    from xreal.reference import import_reference

    result = import_reference(
        backbone,
        anatomy_controller,
        out,
        autoencoder=autoencoder,
        tokenizer=tokenizer,
        ema=ema,
        image_size=image_size,
        weights_dtype=torch.float16 if half else None,
        command=" ".join(["xreal", *sys.argv[1:]]),
    )
    click.echo(result.summary())
    click.echo(
        f"The weights are licensed {result.licence}: non-commercial use, with attribution. Generate with: "
        f"xreal generate MANIFEST --model {out} --policy POLICY (judges: torchxrayvision)"
    )


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
    from xreal.mimic import mimic_index

    keep = None if views.strip().lower() == "all" else tuple(v.strip() for v in views.split(",") if v.strip())
    source, report = mimic_index(root, views=keep, reports=reports, dicom=dicom)
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


def _write_training_set(source, root, out, size, chexmask, dataset, min_dice, workers, quiet) -> None:
    """The shared end of `xreal ingest ...`: CheXmask masks for the source's images, then the training set."""
    from xreal.chexmask import ID_COLUMNS, read_chexmask
    from xreal.ingest import build_training_set

    masks = None
    if chexmask is not None:
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
    from xreal.vindr import vindr_index

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
    from xreal.chexpert import chexpert_index, read_chexpert_masks
    from xreal.ingest import build_training_set

    keep = None if views.strip().lower() == "all" else tuple(v.strip() for v in views.split(",") if v.strip())
    source, report = chexpert_index(root, views=keep, splits=splits)
    click.echo(report.to_text())
    _echo_problems(report.problems)
    # CheXmask names CheXpert images by Path, which is not an image id: the join is read_chexpert_masks', so
    # this is _write_training_set with that one step replaced
    masks = None
    if chexmask is not None:
        masks, mask_report = read_chexpert_masks(chexmask, source, min_dice)
        click.echo(mask_report.to_text())
    index, ingested = build_training_set(source, root, out, size=size, masks=masks, workers=workers, progress=not quiet)
    click.echo(ingested.to_text())
    click.echo(f"wrote {index}")


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
    from xreal.nih import nih_index

    source, report = nih_index(root, splits=splits)
    click.echo(report.to_text())
    _echo_problems(report.problems)
    _write_training_set(source, root, out, size, chexmask, "chestx-ray8", min_dice, workers, quiet)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="xreal")


if __name__ == "__main__":
    main()
