"""The XReal model's components, their size presets, and model bundles on disk.

A model bundle is a diffusers pipeline folder (``model_index.json`` and one
folder per component, safetensors only) plus ``xreal_bundle.json``: the preset,
what it was trained on and how, and the sha256 of every file, checked when the
bundle is loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from xreal.core.errors import XRealError
from xreal.core.files import atomic_path, sha256_file, write_json
from xreal.core.records import (  # noqa: F401 - the bundle's record, re-exported where it was
    BUNDLE_FILE,
    DEMO_BUNDLE,
    MODEL_CARD,
    bundle_digest,
    bundle_files,
    read_bundle_record,
    verify_bundle,
)
from xreal.text import XRealTextEncoder, build_tokenizer

BUNDLE_VERSION = 1
SD_SCALE_FACTOR = 0.18215


@dataclass(frozen=True)
class Preset:
    """Sizes of every component. ``paper`` follows the reference; ``demo`` trains on 2 CPU cores."""

    name: str
    image_size: int
    autoencoder_channels: tuple[int, ...]  # one per level: downsampling factor 2 ** (levels - 1)
    autoencoder_layers: int
    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_heads: int
    norm_groups: int
    context_width: int
    text_layers: int
    text_heads: int
    max_tokens: int
    text_head_width: int | None = None  # None: width // heads
    autoencoder_mid_attention: bool = False

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.autoencoder_channels) - 1)


PRESETS = {
    # The reference's sizes: its text encoder attends with 8 heads of 64 over 150 token positions, and its
    # KL autoencoders keep the mid-block attention whatever their attn_resolutions say.
    "paper": Preset("paper", 256, (128, 256, 512), 2, (224, 448, 896, 896), 2, 8, 32, 1280, 32, 8, 150, 64, True),
    # 64 px with 32x32 latents (factor 2): at factor 4 a nodule or a rib is under one latent cell and the
    # autoencoder alone loses half the findings a classifier sees on the originals.
    "demo": Preset("demo", 64, (32, 64), 1, (32, 64, 96), 1, 4, 16, 128, 2, 4, 16),
    # For tests: every code path, in milliseconds.
    "tiny": Preset("tiny", 32, (8, 8, 8), 1, (8, 16), 1, 2, 4, 16, 1, 2, 8),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise XRealError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def reference_scheduler() -> DDIMScheduler:
    """DDIM with the reference schedule: 1000 steps, betas 0.0015-0.0295 linear in sqrt space,
    uniform timesteps offset by one, and alpha_cumprod[0] as the last step's 'previous' value."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0295,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_autoencoder(preset: Preset, scaling_factor: float = SD_SCALE_FACTOR) -> AutoencoderKL:
    """A KL autoencoder: 3 latent channels, no attention (also the Anatomy Controller's shape)."""
    levels = len(preset.autoencoder_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=preset.autoencoder_channels,
        layers_per_block=preset.autoencoder_layers,
        norm_num_groups=min(32, preset.autoencoder_channels[0]),
        sample_size=preset.image_size,
        scaling_factor=scaling_factor,
        mid_block_add_attention=preset.autoencoder_mid_attention,
    )


def build_unet(preset: Preset) -> UNet2DConditionModel:
    """The latent diffusion UNet: cross-attention at every level but the first, epsilon prediction."""
    levels = len(preset.unet_channels)
    return UNet2DConditionModel(
        sample_size=preset.latent_size,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        block_out_channels=preset.unet_channels,
        layers_per_block=preset.unet_layers,
        cross_attention_dim=preset.context_width,
        attention_head_dim=preset.unet_heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=preset.norm_groups,
    )


def build_text_encoder(preset: Preset, vocab_size: int) -> XRealTextEncoder:
    return XRealTextEncoder(
        vocab_size=vocab_size,
        max_positions=preset.max_tokens,
        width=preset.context_width,
        layers=preset.text_layers,
        heads=preset.text_heads,
        head_width=preset.text_head_width,
    )


def build_pipeline(preset: str | Preset, texts: list[str] | None = None, **metadata: Any):
    """A freshly initialised XReal pipeline at a preset (untrained, for training or tests)."""
    from xreal.model.sampling import XRealPipeline

    preset = get_preset(preset) if isinstance(preset, str) else preset
    tokenizer = build_tokenizer(texts or [], preset.max_tokens)
    return XRealPipeline(
        vae=build_autoencoder(preset),
        anatomy_controller=build_autoencoder(preset),
        unet=build_unet(preset),
        text_encoder=build_text_encoder(preset, len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=reference_scheduler(),
        preset=preset.name,
        image_size=preset.image_size,
        **metadata,
    )


# --- bundles on disk --------------------------------------------------------------


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warnings (only errors are shown) for the duration."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _parts_on_other_data(training: dict[str, Any]) -> list[str]:
    """A card line naming the training runs that saw other data than the bundle's training set (its
    ``data_sha256``), or whose data is not known (resumed from checkpoints older than the digest); none when all
    agree."""
    if not training.get("data_sha256"):
        return []
    other = [
        f"{name} ({(run.get('data_sha256') or 'unknown')[:16]})"
        for name, run in training.get("runs", {}).items()
        if run.get("data_sha256") != training["data_sha256"]
    ]
    return [f"- parts trained on other or unknown data: {', '.join(other)}"] if other else []


def write_model_card(folder: str | os.PathLike[str], metrics: str | None = None) -> Path:
    """Write MODEL_CARD.md from the bundle record (and measured metrics, as Markdown, when given)."""
    folder = Path(folder)
    record = read_bundle_record(folder)
    preset, training = record["preset"], record["training"]
    lines = [
        f"# XReal model bundle: preset `{preset['name']}`",
        "",
        f"- images: {record['image_size']} px grayscale, value range {record['value_range']}; "
        f"latents {record['image_size'] // 2 ** (len(preset['autoencoder_channels']) - 1)} px, 3 channels",
        f"- autoencoder channels {preset['autoencoder_channels']}, UNet channels {preset['unet_channels']}, "
        f"context width {preset['context_width']}, text encoder {preset['text_layers']} layers",
        f"- trained on: {training.get('data', 'unknown')}"
        + (f" (data sha256 `{training['data_sha256'][:16]}`)" if training.get("data_sha256") else ""),
        *_parts_on_other_data(training),
        f"- command: `{training.get('command', '')}`",
        *([f"- weights from {training['source']}, licence {training['licence']}"] if "licence" in training else []),
        "",
    ]
    if training.get("runs"):
        lines += ["## Training runs", "", "| part | steps | batch | seconds | final loss |", "|---|---|---|---|---|"]
    for name, run in training.get("runs", {}).items():
        # No final loss: a part resumed from a last checkpoint written before checkpoints kept their losses.
        loss = run.get("final_loss")
        lines.append(
            f"| {name} | {run.get('steps')} | {run.get('batch_size', '')} | {run.get('seconds')} | "
            f"{'-' if loss is None else f'{loss:.4f}'} |"
        )
    if training.get("imported_from"):
        lines += ["## Imported from", "", "| file | sha256 | keys | used | not used |", "|---|---|---|---|---|"]
        for source in training["imported_from"]:
            unused = "; ".join(f"{n} {reason}" for reason, n in source["ignored"].items()) or "-"
            lines.append(
                f"| {source['file']} | `{source['sha256'][:16]}` | {source['keys']} | {source['used']} | {unused} |"
            )
    if metrics:
        lines += ["", "## Measured", "", metrics.strip()]
    if (folder / "judges" / "judges.json").is_file():
        from xreal.judges.judging import judges_card

        lines += ["", "## Judges", "", judges_card(folder / "judges")]
    path = folder / MODEL_CARD
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


# Config keys that record where and how a component was loaded, not what it is.
LOAD_KEYS = ("_name_or_path", "is_local", "local_files_only")


def _drop_load_paths(folder: Path) -> None:
    """Remove what loading adds to the component configs (``_name_or_path``, the tokenizer's ``is_local``): a bundle
    saved from a loaded pipeline would carry that machine's path and differ by where it was loaded from."""
    configs = ("model_index.json", "*/config.json", "*/scheduler_config.json", "*/tokenizer_config.json")
    for path in [p for pattern in configs for p in folder.glob(pattern)]:
        config = json.loads(path.read_text())
        if [config.pop(key) for key in LOAD_KEYS if key in config]:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as diffusers writes configs


def save_bundle(
    pipeline,
    folder: str | os.PathLike[str],
    training: dict[str, Any] | None = None,
    weights_dtype: torch.dtype | None = None,
    preset: Preset | None = None,
) -> Path:
    """Save a pipeline as a model bundle (safetensors only) with its record and checksums.

    ``weights_dtype=torch.float16`` halves the files (the demo bundle ships
    that way); loading gives float32 weights again unless asked otherwise.
    ``preset`` describes sizes that are not one of ``PRESETS`` (imported weights).
    """
    folder = Path(folder)
    original = pipeline.unet.dtype
    backend = pipeline.tokenizer.backend_tokenizer  # keeps its last call's truncation and padding, and saves them
    backend.no_truncation()
    backend.no_padding()
    with quiet_diffusers():  # casting a whole pipeline warns once per component
        try:
            if weights_dtype is not None:
                pipeline.to(dtype=weights_dtype)
            pipeline.save_pretrained(folder, safe_serialization=True)
        finally:
            pipeline.to(dtype=original)
    _drop_load_paths(folder)
    pickled = [p for p in bundle_files(folder) if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    if pickled:
        raise XRealError(f"refusing to keep pickled weights in a bundle: {', '.join(map(str, pickled))}")
    record = {
        "bundle_version": BUNDLE_VERSION,
        "preset": asdict(preset or get_preset(pipeline.config.preset)),
        "image_size": pipeline.config.image_size,
        "value_range": list(pipeline.config.value_range),
        "labels": list(pipeline.config.labels),
        "weights_dtype": str(weights_dtype or original).removeprefix("torch."),
        "training": training or {},
        "files": {str(p.relative_to(folder)): sha256_file(p) for p in bundle_files(folder)},
    }
    write_json(folder / BUNDLE_FILE, record)
    return folder


def load_pipeline(
    folder: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    verify: bool = True,
    dtype: torch.dtype | None = None,
):
    """Load a model bundle (the bundled demo model by default), checksums verified first."""
    from xreal.model.sampling import XRealPipeline

    folder = Path(folder) if folder is not None else DEMO_BUNDLE
    if verify:
        verify_bundle(folder)
    options = {"dtype": dtype} if dtype is not None else {}
    pipeline = XRealPipeline.from_pretrained(folder, use_safetensors=True, **options)
    return pipeline.to(device)
