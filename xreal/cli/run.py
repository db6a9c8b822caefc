"""The run commands: ``generate``, ``serve``, ``submit`` and ``audit run``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from xreal.cli.base import _Group, cli, label_values
from xreal.core.errors import XRealError
from xreal.core.settings import MAX_GUIDANCE, SAMPLER_NAMES, SPEEDS, STEP_GRIDS, SamplerSettings

SAMPLER_OPTIONS = (
    "speed",
    "sampler",
    "steps",
    "anatomy_steps",
    "step_grid",
    "guidance_interval",
    "guidance_scale",
    "healthy_guidance_scale",
    "finding_guidance",
)


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
        click.option(
            "--speed",
            type=click.Choice(list(SPEEDS)),
            default="reference",
            help="Sampler preset: reference (DDIM, 100 + 100 steps) or fast (see the README's table); the "
            "options below change it.",
        ),
        click.option("--sampler", type=click.Choice(SAMPLER_NAMES), default=None, help="Sampler of both stages."),
        click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Sampler steps of each stage."),
        click.option(
            "--anatomy-steps",
            type=click.IntRange(min=0),
            default=None,
            help="Stage-1 steps with the anatomy blended in (at most --steps; default: the preset's share of them).",
        ),
        click.option(
            "--step-grid",
            type=click.Choice(STEP_GRIDS),
            default=None,
            help="exact: --steps steps; reference: DDIM over the reference's grid (31 steps for 30).",
        ),
        click.option(
            "--guidance-interval",
            type=(click.FloatRange(0, 1), click.FloatRange(0, 1)),
            default=None,
            metavar="START STOP",
            help="Fractions of stage 2's steps (noisiest first) where guidance runs [0 1].",
        ),
        click.option(
            "--guidance-scale",
            type=click.FloatRange(0, MAX_GUIDANCE),
            default=None,
            help="Classifier-free guidance of stage 2 for rows without their own (1: off) [reference: 7; fast: 5.5, "
            "2.5-4.5 for the findings its table names].",
        ),
        click.option(
            "--healthy-guidance",
            "healthy_guidance_scale",
            type=click.FloatRange(0, MAX_GUIDANCE),
            default=None,
            help="Guidance of stage 1 away from every finding the model knows (1: off) [reference: 1, fast: 2].",
        ),
        click.option(
            "--finding-guidance",
            multiple=True,
            metavar="LABEL=SCALE",
            help="Stage 2's guidance for requests of one finding, over the preset's table (repeat for others; "
            "a request of several takes the largest). --guidance-scale without it drops the preset's table.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _sampler_settings(options: dict) -> SamplerSettings:
    """The run's sampler settings from the sampler options (removed from ``options``): the --speed preset with
    the options given over it; bad ones exit 2 naming the option."""
    given = {k: options.pop(k) for k in SAMPLER_OPTIONS}
    preset = SPEEDS[given.pop("speed") or "reference"]
    steps, anatomy_steps = given["steps"], given["anatomy_steps"]
    if steps is not None and anatomy_steps is None:  # keep the preset's share of anatomy steps
        given["anatomy_steps"] = anatomy_steps = preset.anatomy_steps_for(steps)
    limit = steps if steps is not None else preset.steps
    if anatomy_steps is not None and anatomy_steps > limit:
        raise XRealError(f"--anatomy-steps {anatomy_steps} is more than the {limit} steps of each stage (--steps)")
    entries = given.pop("finding_guidance")
    if entries:
        given["finding_guidance"] = {**dict(preset.finding_guidance), **label_values(entries, "--finding-guidance")}
    interval = given["guidance_interval"]
    if interval is not None and not interval[0] < interval[1]:
        raise XRealError(f"--guidance-interval: START must be below STOP, got {interval[0]} {interval[1]}")
    settings = preset.with_overrides(**given)
    if settings.step_grid == "reference" and settings.sampler != "ddim":
        raise XRealError(f"--step-grid reference is the reference's DDIM grid; --sampler is {settings.sampler}")
    return settings.check("the sampler options")


def _run_parameters(
    device: str | None,
    dask_address: str | None,
    policy: Path | None,
    local: bool = True,
    sampler: SamplerSettings | None = None,
    **options,
) -> dict:
    """The flow's parameters from the run options, checked before anything starts (bad ones exit 2).

    ``local``: the run happens on this machine, so its devices can be checked here.
    """
    from flows.execution import Execution
    from xreal.run.policy import QualityPolicy

    if dask_address and device:
        raise XRealError("--device and --dask-address: the cluster's workers choose their own devices")
    if local:
        from xreal.run.generation import parse_devices  # imports torch: only for devices on this machine

        devices = parse_devices(device or "cpu")
    else:
        devices = [d.strip() for d in (device or "cpu").split(",")]
    Execution(tuple(devices), options["dask_workers"], dask_address)
    if policy is not None:
        QualityPolicy.from_yaml(policy)
        policy = str(policy.resolve())
    paths = {k: str(Path(v).resolve()) for k in ("model", "root") if (v := options.pop(k)) is not None}
    parameters = {**options, **paths, "devices": devices, "dask_address": dask_address, "policy": policy}
    return parameters | ({"sampler": sampler.to_dict()} if sampler is not None else {})


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
    sampler: SamplerSettings,
    **_,
) -> None:
    """Every check of a run that needs no Prefect and no model in memory, before either starts: the manifest and
    its files, --out (a folder, writable, not another run, not locked), the policy, the bundle's and judges'
    checksums. A refusal then takes about a second instead of Prefect's start-up and the model's loading."""
    from xreal.core.records import DEMO_BUNDLE
    from xreal.run.config import RunConfig, preflight
    from xreal.run.policy import QualityPolicy

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
        sampler=sampler,
    )
    preflight(config, check_lock=True)
    if config.judges_source != "torchxrayvision":
        from xreal.core.records import judges_autoencoder_mismatch

        if mismatch := judges_autoencoder_mismatch(config.model, config.judges_source):
            click.echo(f"warning: {mismatch}", err=True)


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

    sampler = _sampler_settings(options)
    _preflight(manifest_path, out, sampler=sampler, **options)
    parameters = _run_parameters(sampler=sampler, **options)
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

    parameters = _run_parameters(sampler=_sampler_settings(options), **options)
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
    given = {"devices" if k == "device" else "sampler" if k in SAMPLER_OPTIONS else k for k in given}
    sampler = _sampler_settings(options)
    parameters = {k: v for k, v in _run_parameters(local=False, sampler=sampler, **options).items() if k in given}
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
    from xreal.run.audit import audit_run

    report = audit_run(out, manifest)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.to_text())
    if not report.consistent:
        sys.exit(1)
