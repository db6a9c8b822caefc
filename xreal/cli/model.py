"""The ``train`` commands and ``import-reference``: model bundles and judge sets."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from xreal.cli.base import _Group, cli, label_values


@cli.group(cls=_Group)
def train() -> None:
    """Train the autoencoder (then fine-tune its decoder), the Anatomy Controller and the backbone."""


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
    from xreal.model.bundle import get_preset
    from xreal.model.training import TrainingRun, load_training_set

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


def _trained_autoencoder(folder: Path, option: str, preset: str):
    """The autoencoder a training run saved in ``folder``/model at ``preset``'s sizes, or a usage error naming
    ``option`` (before the training set is read)."""
    from diffusers import AutoencoderKL

    from xreal.model.bundle import get_preset

    model = folder / "model"
    if not (model / "config.json").is_file():
        raise click.BadParameter(f"{model} holds no trained model (no config.json)", param_hint=option)
    found = AutoencoderKL.from_pretrained(model, use_safetensors=True)
    sizes = get_preset(preset)
    trained = (found.config.sample_size, tuple(found.config.block_out_channels))
    if trained != (sizes.image_size, tuple(sizes.autoencoder_channels)):
        raise click.BadParameter(
            f"{model} was trained at {trained[0]} px with channels {list(trained[1])}; --preset {preset} needs "
            f"{sizes.image_size} px with {list(sizes.autoencoder_channels)}",
            param_hint=option,
        )
    return found


def _bundle_to_continue(folder: Path, preset: str):
    """The pipeline of the model bundle in ``folder`` (checksums verified), or a usage error naming --start-from."""
    from xreal.core.errors import XRealError
    from xreal.model.bundle import load_pipeline

    try:
        pipeline = load_pipeline(folder)
    except (XRealError, OSError, ValueError) as error:
        raise click.BadParameter(str(error), param_hint="--start-from") from None
    if pipeline.config.preset != preset:
        raise click.BadParameter(
            f"{folder} was trained at the {pipeline.config.preset} preset, not --preset {preset}",
            param_hint="--start-from",
        )
    return pipeline


@train.command("autoencoder")
@_training_options
def train_autoencoder_command(**options) -> None:
    """Train the first-stage autoencoder; saves OUT/model."""
    from xreal.model.training import train_autoencoder

    run, data = _run_and_data(**options)
    train_autoencoder(data, run, preset=options["preset"]).save_pretrained(run.out / "model")
    click.echo(f"wrote {run.out / 'model'} ({run.log['seconds']} s)")


@train.command("decoder")
@_training_options
@click.option(
    "--autoencoder",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder of `xreal train autoencoder` (or of this command): its encoder stays as it is.",
)
@click.option(
    "--texture-weight",
    type=click.FloatRange(min=0.0),
    default=None,
    help="The texture term's weight (default: the demo decoder part's).",
)
@click.option(
    "--structure-weight",
    type=click.FloatRange(min=0.0),
    default=None,
    help="The structure term's weight: which way the fine detail runs (default: the demo decoder part's).",
)
@click.option(
    "--perceptual-weight",
    type=click.FloatRange(min=0.0),
    default=1.0,
    show_default=True,
    help="The perceptual term's weight (0: no perceptual network).",
)
def train_decoder_command(
    autoencoder: Path,
    texture_weight: float | None,
    structure_weight: float | None,
    perceptual_weight: float,
    **options,
) -> None:
    """Fine-tune a trained autoencoder's decoder with its encoder frozen; saves OUT/model.

    The perceptual, texture, structure and patch-discriminator terms bring back
    fine detail (ribs, vessels) that L1 averages away. The latents do not change, so a
    backbone trained on them works with the new decoder: pass OUT as
    `xreal train backbone --autoencoder`. The perceptual network is the
    autoencoder run's when it has one, else trained here on the index's labels.
    """
    from dataclasses import replace

    from xreal.model.autoencoder_loss import PERCEPTUAL_FILE
    from xreal.model.training import DECODER_DETAIL, train_autoencoder

    start = _trained_autoencoder(autoencoder, "--autoencoder", options["preset"])
    run, data = _run_and_data(**options)
    detail = replace(DECODER_DETAIL, perceptual_weight=perceptual_weight)
    if texture_weight is not None:
        detail = replace(detail, texture_weight=texture_weight)
    if structure_weight is not None:
        detail = replace(detail, structure_weight=structure_weight)
    tuned = train_autoencoder(
        data,
        run,
        preset=options["preset"],
        detail=detail,
        fine_tune=start,
        perceptual_from=autoencoder if (autoencoder / PERCEPTUAL_FILE).is_file() else None,
    )
    tuned.save_pretrained(run.out / "model")
    click.echo(f"wrote {run.out / 'model'} ({run.log['seconds']} s)")


@train.command("anatomy-controller")
@_training_options
def train_anatomy_controller_command(**options) -> None:
    """Train the Anatomy Controller (image or anatomy map in, image out); saves OUT/model."""
    from xreal.model.training import train_autoencoder

    run, data = _run_and_data(**options)
    train_autoencoder(data, run, preset=options["preset"], anatomy_controller=True).save_pretrained(run.out / "model")
    click.echo(f"wrote {run.out / 'model'} ({run.log['seconds']} s)")


@train.command("backbone")
@_training_options
@click.option(
    "--autoencoder",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder of `xreal train autoencoder` (or of `xreal train decoder`).",
)
@click.option(
    "--anatomy-controller",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder of `xreal train anatomy-controller`.",
)
@click.option(
    "--finding-weight",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Weigh the error in the latent cells a pathology touches 1 + this times the rest (the demo's last part: 5).",
)
@click.option(
    "--finding-min-cells",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Weigh up findings that touch fewer latent cells than this, as if they touched this many.",
)
@click.option(
    "--max-timestep",
    type=click.IntRange(min=1),
    default=None,
    help="Train at the noise levels below this timestep only (the demo's detail part: 75, with --start-from).",
)
@click.option(
    "--all-levels-share",
    type=click.FloatRange(min=0.0, max=1.0),
    default=0.0,
    show_default=True,
    help="With --max-timestep: the share of each batch still drawn over all noise levels.",
)
@click.option(
    "--start-from",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="A model bundle (OUT/bundle of an earlier run on the same index) whose UNet and text encoder to train on.",
)
def train_backbone_command(
    autoencoder: Path,
    anatomy_controller: Path,
    finding_weight: float,
    finding_min_cells: int,
    max_timestep: int | None,
    all_levels_share: float,
    start_from: Path | None,
    **options,
) -> None:
    """Train UNet and text encoder on the frozen autoencoder; saves the model bundle OUT/bundle."""
    from xreal.model.bundle import reference_scheduler, save_bundle, write_model_card
    from xreal.model.training import train_backbone

    vae = _trained_autoencoder(autoencoder, "--autoencoder", options["preset"])
    controller = _trained_autoencoder(anatomy_controller, "--anatomy-controller", options["preset"])
    start = _bundle_to_continue(start_from, options["preset"]) if start_from is not None else None
    timesteps = (start.scheduler if start is not None else reference_scheduler()).config.num_train_timesteps
    if all_levels_share and max_timestep is None:  # before the training set is read
        raise click.BadParameter("needs --max-timestep", param_hint="--all-levels-share")
    if max_timestep is not None and max_timestep > timesteps:
        raise click.BadParameter(
            f"the scheduler has {timesteps} timesteps; got {max_timestep}", param_hint="--max-timestep"
        )
    run, data = _run_and_data(**options)
    pipeline = train_backbone(
        data,
        run,
        vae,
        controller,
        preset=options["preset"],
        finding_weight=finding_weight,
        start_from=start,
        finding_min_cells=finding_min_cells,
        max_timestep=max_timestep,
        all_levels_share=all_levels_share,
    )
    training = {
        "data": f"{len(data)} training images from {options['index']}",
        "data_sha256": data.sha256,
        "command": " ".join(sys.argv),
        "runs": {"backbone": {**run.log, "batch_size": run.batch_size}},
        "autoencoder": str(autoencoder),
        "anatomy_controller": str(anatomy_controller),
        **({"start_from": str(start_from)} if start_from is not None else {}),
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
    help="Folder for the training runs, one per part (a rerun resumes).",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Bundle to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--oversample",
    multiple=True,
    metavar="LABEL=FACTOR",
    help="The findings part draws the phantoms with LABEL FACTOR times as often as the rest (repeat for others).",
)
def train_demo_command(index: Path, work: Path, out: Path, seed: int, oversample: tuple[str, ...]) -> None:
    """Train the demo bundle end to end with the demo schedule (CPU-sized)."""
    from xreal.model.training import train_demo_bundle

    factors = label_values(oversample, "--oversample") or None
    bundle = train_demo_bundle(index, work, out, seed=seed, command=" ".join(sys.argv), findings_oversample=factors)
    click.echo(f"wrote {bundle}")


def _step_counts(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """``--classifier-steps``: one count, or several separated by commas."""
    if value is None:
        return None
    try:
        counts = [int(part) for part in value.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{value!r} is not a count of steps above 0, or several separated by commas")
    return counts


@train.command("judges")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Judge set folder.")
@click.option("--size", type=click.IntRange(64, 512), default=64, show_default=True, help="Image side in pixels.")
@click.option(
    "--input-size",
    type=click.IntRange(64, 512),
    default=None,
    help="Upsample the phantoms to this size before the judges see them (default: --size); generated images are "
    "upsampled the same way when judged.",
)
@click.option(
    "--autoencoder",
    "autoencoder_of",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Model bundle whose autoencoder the classifier also trains through: each phantom once more as the decoder "
    "gives it back, so it reads the findings, not the decoder's texture, in the images it will judge. Retrain the "
    "judges when that autoencoder changes.",
)
@click.option(
    "--classifier-steps",
    callback=_step_counts,
    metavar="STEPS[,STEPS...]",
    default=None,
    help="Training steps of the classifier; several, comma-separated, make it the mean of its snapshots at each "
    "(a checkpoint ensemble). Default: the demo judges' 2500,3000,3500,4000.",
)
@click.option(
    "--feature-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Training steps of the feature network that realism and `xreal evaluate` read (with --autoencoder). "
    "Default: the demo judges' 1500.",
)
@click.option("--seed", type=int, default=2024, show_default=True)
def train_judges_command(
    out: Path,
    size: int,
    input_size: int | None,
    autoencoder_of: Path | None,
    classifier_steps: list[int] | None,
    feature_steps: int | None,
    seed: int,
) -> None:
    """Train and calibrate the phantom judge set (classifier, segmenter, realism reference) on phantoms."""
    from xreal.core.records import BUNDLE_FILE, record_bundle_files
    from xreal.judges.phantom_judges import train_phantom_judges

    round_trip, through = None, None
    if autoencoder_of is not None:
        from xreal.core.records import autoencoder_weights
        from xreal.model.bundle import load_pipeline

        pipe = load_pipeline(autoencoder_of)
        if pipe.config.image_size != size:
            raise click.BadParameter(
                f"{autoencoder_of} makes {pipe.config.image_size} px images, the judges are trained on {size} px",
                param_hint="--autoencoder",
            )
        weights = autoencoder_weights(autoencoder_of)
        round_trip = pipe.round_trip
        through = {"bundle": str(autoencoder_of), **({"vae_sha256": weights[1]} if weights else {})}
    judges = train_phantom_judges(
        out,
        size=size,
        seed=seed,
        input_size=input_size,
        round_trip=round_trip,
        through_autoencoder=through,
        **({"classifier_steps": classifier_steps} if classifier_steps else {}),
        **({"feature_steps": feature_steps} if feature_steps else {}),
    )
    click.echo(f"wrote {judges}")
    if (out.resolve().parent / BUNDLE_FILE).is_file():  # a bundle's own judge set: its record pins the new files
        record_bundle_files(out.resolve().parent)
        click.echo(f"recorded the new judge files in {out.resolve().parent / BUNDLE_FILE}")


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

    from xreal.model.reference import import_reference

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
