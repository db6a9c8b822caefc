"""Import the published XReal reference checkpoints into a model bundle.

The reference implementation (github.com/BioMedIA-MBZUAI/XReal, weights under
CC BY-NC 4.0) ships PyTorch Lightning checkpoints:

- ``backbone.pth``: a latent diffusion model. Its openaimodel UNet sits under
  ``model.diffusion_model.``, the first-stage KL autoencoder under
  ``first_stage_model.``, the BERT-token transformer text encoder under
  ``cond_stage_model.transformer.``, the DDPM schedule as buffers, and an EMA
  copy of the UNet under ``model_ema.``.
- ``anatomy_controller.pth``: a KL autoencoder with the same architecture,
  with its training losses (LPIPS, patch discriminator) under ``loss.``.
- ``ldm_ae.pth`` (optional): the first-stage autoencoder on its own.

The UNet and autoencoders map onto diffusers' ``UNet2DConditionModel`` and
``AutoencoderKL`` through diffusers' own converters for original latent
diffusion checkpoints; the text encoder maps onto ``XRealTextEncoder``; the
schedule becomes the project's reference ``DDIMScheduler`` after its buffers are
checked against it. Every key is either used or reported with the reason it is
not needed; a key of no known kind, a missing one or a wrong shape stops the
import. Sizes are read from the weights' shapes, so the same code imports the
paper-size checkpoints and reduced-width ones.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from xreal.core.errors import XRealError
from xreal.core.files import atomic_directory, sha256_file
from xreal.core.labels import Anatomy
from xreal.model.bundle import (
    PRESETS,
    SD_SCALE_FACTOR,
    Preset,
    build_autoencoder,
    build_text_encoder,
    build_unet,
    quiet_diffusers,
    reference_scheduler,
    save_bundle,
    write_model_card,
)

REFERENCE_REPOSITORY = "https://github.com/BioMedIA-MBZUAI/XReal"
REFERENCE_LICENCE = "CC BY-NC 4.0"
REFERENCE_TOKENIZER = "bert-base-uncased"
REFERENCE_IMAGE_SIZE = 256
# Not stored in the weights: the reference builds its UNet with num_heads=8 and its text encoder with
# x-transformers' default of 8 heads.
REFERENCE_UNET_HEADS = 8
REFERENCE_TEXT_HEADS = 8
# The reference's anatomy masks are grey levels /4: the patient's left lung 1, right lung 2, heart 3 (and 4 where
# the heart overlaps the left lung, which a label map with the heart on top cannot say), read off its examples.
REFERENCE_ANATOMY_LEVELS = {
    Anatomy.BACKGROUND: 0.0,
    Anatomy.RIGHT_LUNG: 0.5,
    Anatomy.LEFT_LUNG: 0.25,
    Anatomy.HEART: 0.75,
}

UNET = "model.diffusion_model."
FIRST_STAGE = "first_stage_model."
TEXT = "cond_stage_model.transformer."
EMA = "model_ema."
AUTOENCODER_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class ReferenceImportError(XRealError):
    """A reference checkpoint that cannot be read or does not have the reference layout."""


# --- reading ----------------------------------------------------------------------


@dataclass
class Checkpoint:
    """One reference checkpoint: its tensors, and what the import did with each of them."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    ignored: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix``, with the prefix removed."""
        return {k.removeprefix(prefix): t for k, t in self.tensors.items() if k.startswith(prefix)}

    def ignore(self, keys: Iterable[str], reason: str) -> None:
        keys = list(keys)
        if keys:
            self.ignored[reason].extend(keys)

    def unaccounted(self) -> list[str]:
        ignored = {k for keys in self.ignored.values() for k in keys}
        return [k for k in self.tensors if k not in self.used and k not in ignored]

    def report(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "sha256": sha256_file(self.path),
            "keys": len(self.tensors),
            "used": len(self.used),
            "ignored": {reason: len(keys) for reason, keys in self.ignored.items()},
            **({"metadata": self.metadata} if self.metadata else {}),
        }


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a ``.pth`` checkpoint without running code from it (``torch.load(weights_only=True)``).

    A Lightning checkpoint's ``state_dict`` is taken; its integer bookkeeping
    (epoch, global step) is kept as metadata and everything else is left alone.
    """
    path = Path(path)
    if not path.is_file():
        raise ReferenceImportError(f"{path}: no such checkpoint file")
    loaded = _load(path, mmap=zipfile.is_zipfile(path))  # only the zip format can be memory-mapped
    if not isinstance(loaded, dict):
        raise ReferenceImportError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    state = loaded.get("state_dict", loaded)
    if not isinstance(state, dict):
        raise ReferenceImportError(f"{path}: its 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ReferenceImportError(f"{path}: entries that are not tensors: {_few(bad)}")
    metadata = {k: v for k, v in loaded.items() if k in ("epoch", "global_step") and isinstance(v, int)}
    return Checkpoint(path, dict(state), metadata)


def _load(path: Path, mmap: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        names = _pickled_globals(path)
        if names is None:
            raise ReferenceImportError(
                f"{path}: not a readable PyTorch checkpoint (damaged, or not written by torch.save)"
            ) from None
        objects = [name for name in names if not name.startswith(_TENSOR_GLOBALS)]
        dangerous = [name for name in objects if name.startswith(_CODE_RUNNING)]
        if dangerous:
            raise ReferenceImportError(
                f"{path}: names {_few(dangerous)}, which would run a command or code when the file is loaded. "
                "This is not a plain checkpoint: do not load it with weights_only=False; get the checkpoint again "
                "from its source"
            ) from None
        reason = (
            f"Python objects other than tensors ({_few(objects)})"
            if objects
            else f"pickled content that is not tensors ({_first_line(error)})"
        )
        raise ReferenceImportError(
            f"{path}: holds {reason}, which torch.load(weights_only=True) refuses to unpickle because that could "
            "run code. If you trust the file, save just its weights once and import that instead: python -c "
            f"\"import torch; c = torch.load('{path}', weights_only=False); "
            f"torch.save(c.get('state_dict', c), '{path}.weights.pth')\""
        ) from None
    except Exception as error:  # zip damage surfaces as several types
        raise ReferenceImportError(f"{path}: not a readable PyTorch checkpoint ({error})") from None


# What a checkpoint of plain tensors references: torch's rebuild functions and storages, OrderedDict, bytes.
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.bytearray")

_CODE_RUNNING = (
    *("os.", "posix.", "nt.", "subprocess.", "sys.", "shutil.", "socket.", "importlib.", "runpy."),
    *(f"builtins.{name}" for name in ("eval", "exec", "compile", "__import__", "open", "getattr", "breakpoint")),
)


def _pickled_globals(path: Path) -> list[str] | None:
    """The classes and functions a checkpoint's pickle names, read with pickletools (nothing is executed);
    None when it is no complete pickle."""
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(name)
        else:
            data = path.read_bytes()
        found, strings = [], []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except (StopIteration, ValueError, zipfile.BadZipFile, OSError):
        return None
    return sorted(set(found))


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if "Unsupported" in line or "Trying" in line]
    return lines[0] if lines else str(error).splitlines()[0]


def _few(keys: Iterable[str], n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# --- the architecture, from the shapes ---------------------------------------------


def _shape(tensors: dict[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in tensors:
        raise ReferenceImportError(f"{where}: missing {key}; this is not the reference layout")
    return tuple(tensors[key].shape)


def unet_sizes(unet: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """Channels per level, res-blocks per level and context width of an openaimodel UNet's weights."""
    width = _shape(unet, "input_blocks.0.0.weight", where)[0]
    blocks = sorted({int(k.split(".")[1]) for k in unet if k.startswith("input_blocks.")})
    downsamples = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in unet]
    per_level = (downsamples[0] - 1) if downsamples else len(blocks) - 1
    channels = [
        _shape(unet, f"input_blocks.{1 + level * (per_level + 1)}.0.out_layers.3.weight", where)[0]
        for level in range(len(downsamples) + 1)
    ]
    attention = [
        f"input_blocks.{1 + level * (per_level + 1)}.1.proj_in.weight" in unet for level in range(len(channels))
    ]
    if attention != [False] + [True] * (len(channels) - 1):
        raise ReferenceImportError(
            f"{where}: cross-attention at levels {[i for i, a in enumerate(attention) if a]}; the reference (and "
            "this importer) has it at every level but the first"
        )
    depth = len({k.split(".")[4] for k in unet if k.startswith(f"input_blocks.{per_level + 2}.1.transformer_blocks.")})
    if depth != 1:
        raise ReferenceImportError(f"{where}: {depth} transformer blocks per attention; the reference has 1")
    context = _shape(unet, f"input_blocks.{per_level + 2}.1.transformer_blocks.0.attn2.to_k.weight", where)[1]
    if channels[0] != width or any(c % 32 for c in channels):
        raise ReferenceImportError(f"{where}: UNet channels {channels} are not the reference's kind (multiples of 32)")
    return {"channels": tuple(channels), "layers": per_level, "context": context}


def autoencoder_sizes(autoencoder: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """Channels per level, res-blocks per level, latent channels and mid attention of a KL autoencoder."""
    levels = sorted({int(k.split(".")[2]) for k in autoencoder if k.startswith("encoder.down.")})
    channels = tuple(_shape(autoencoder, f"encoder.down.{i}.block.0.conv2.weight", where)[0] for i in levels)
    layers = len({k.split(".")[4] for k in autoencoder if k.startswith("encoder.down.0.block.")})
    latent = _shape(autoencoder, "post_quant_conv.weight", where)[1]
    if latent != 3 or _shape(autoencoder, "encoder.conv_in.weight", where)[1] != 3:
        raise ReferenceImportError(f"{where}: expected 3 image and 3 latent channels like the reference")
    return {"channels": channels, "layers": layers, "mid_attention": "encoder.mid.attn_1.q.weight" in autoencoder}


def text_sizes(text: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    vocab, width = _shape(text, "token_emb.weight", where)
    positions = _shape(text, "pos_emb.emb.weight", where)[0]
    layers = len({int(k.split(".")[2]) for k in text if k.startswith("attn_layers.layers.")})
    if layers % 2:
        raise ReferenceImportError(
            f"{where}: {layers} text layers; the reference alternates attention and feed-forward"
        )
    inner = _shape(text, "attn_layers.layers.0.1.to_q.weight", where)[0]
    return {"vocab": vocab, "width": width, "positions": positions, "layers": layers // 2, "inner": inner}


def reference_preset(
    backbone: Checkpoint,
    anatomy_controller: Checkpoint,
    image_size: int = REFERENCE_IMAGE_SIZE,
    autoencoder: Checkpoint | None = None,
) -> tuple[Preset, int]:
    """The preset the checkpoints' shapes describe (``paper`` for the published weights), and the vocabulary size."""
    unet = unet_sizes(backbone.part(UNET), f"{backbone.path}: UNet")
    if backbone.keys(FIRST_STAGE):
        first_stage = autoencoder_sizes(backbone.part(FIRST_STAGE), f"{backbone.path}: first-stage autoencoder")
    elif autoencoder is not None:
        first_stage = autoencoder_sizes(autoencoder.part(""), f"{autoencoder.path}: autoencoder")
    else:
        raise ReferenceImportError(
            f"{backbone.path}: holds no first-stage autoencoder ({FIRST_STAGE}*); give it with --autoencoder ldm_ae.pth"
        )
    controller = autoencoder_sizes(anatomy_controller.part(""), f"{anatomy_controller.path}: Anatomy Controller")
    if controller != first_stage:
        raise ReferenceImportError(
            f"{anatomy_controller.path}: the Anatomy Controller {controller} differs in architecture from the "
            f"backbone's autoencoder {first_stage}; the reference uses one architecture for both"
        )
    factor = 2 ** (len(first_stage["channels"]) - 1)
    if image_size % factor:
        raise ReferenceImportError(
            f"image size {image_size} is not a multiple of the autoencoder's downsampling factor {factor}"
        )
    text = text_sizes(backbone.part(TEXT), f"{backbone.path}: text encoder")
    if text["width"] != unet["context"]:
        raise ReferenceImportError(
            f"{backbone.path}: the text encoder's width {text['width']} is not the UNet's context {unet['context']}"
        )
    if text["inner"] % REFERENCE_TEXT_HEADS:
        raise ReferenceImportError(f"{backbone.path}: text attention width {text['inner']} is not 8 heads")
    preset = Preset(
        name="reference",
        image_size=image_size,
        autoencoder_channels=first_stage["channels"],
        autoencoder_layers=first_stage["layers"],
        unet_channels=unet["channels"],
        unet_layers=unet["layers"],
        unet_heads=REFERENCE_UNET_HEADS,
        norm_groups=32,
        context_width=unet["context"],
        text_layers=text["layers"],
        text_heads=REFERENCE_TEXT_HEADS,
        max_tokens=text["positions"],
        text_head_width=text["inner"] // REFERENCE_TEXT_HEADS,
        autoencoder_mid_attention=first_stage["mid_attention"],
    )
    if preset == replace(PRESETS["paper"], name="reference"):
        preset = PRESETS["paper"]
    return preset, text["vocab"]


# --- mapping ----------------------------------------------------------------------


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _load_exactly(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load every weight of ``module`` from ``state``, shapes checked, nothing left over."""
    expected = module.state_dict()
    missing = [k for k in expected if state.get(k) is None]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if state.get(k) is not None and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label}: {_few(keys)}"
        for label, keys in (
            ("no weight in the checkpoint for", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        )
        if keys
    ]
    if problems:
        raise ReferenceImportError(f"{where}: " + "; ".join(problems))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def _map_with(checkpoint: Checkpoint, keys: Iterable[str], converted: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Mark as used those of ``keys`` whose tensors a diffusers converter passed on (views included)."""
    storages = {_storage(t) for t in converted.values() if isinstance(t, torch.Tensor)}
    checkpoint.used.update(k for k in keys if _storage(checkpoint.tensors[k]) in storages)
    return converted


def unet_state(checkpoint: Checkpoint, unet, ema: bool = False) -> dict[str, torch.Tensor]:
    """The backbone's UNet weights in diffusers' layout (the EMA copy with ``ema``)."""
    live = checkpoint.keys(UNET)
    flat = {EMA + "diffusion_model" + k.removeprefix(UNET).replace(".", ""): k for k in live}
    if ema:
        absent = [k for k in flat if k not in checkpoint.tensors]
        if absent:
            raise ReferenceImportError(f"{checkpoint.path}: no EMA weights for {_few(absent)}")
        source = {live_key: checkpoint.tensors[ema_key] for ema_key, live_key in flat.items()}
        converted = _map_with(checkpoint, flat, convert_ldm_unet_checkpoint(source, unet.config))
        checkpoint.ignore(live, "the UNet's live weights (the EMA copy was imported instead)")
    else:
        with quiet_diffusers():  # it warns about the EMA weights, which the report covers
            converted = convert_ldm_unet_checkpoint(checkpoint.tensors, unet.config)
        converted = _map_with(checkpoint, live, converted)
        checkpoint.ignore(
            [k for k in flat if k in checkpoint.tensors],
            "the UNet's EMA copy (the reference samples with the live weights; --ema imports the copy)",
        )
    checkpoint.ignore([k for k in (EMA + "decay", EMA + "num_updates") if k in checkpoint.tensors], "EMA bookkeeping")
    return converted


def autoencoder_state(checkpoint: Checkpoint, prefix: str, autoencoder) -> dict[str, torch.Tensor]:
    """A KL autoencoder's weights (``encoder.``, ``decoder.`` and the quant convs under ``prefix``) for diffusers."""
    source = {prefix + k: t for k, t in checkpoint.part(prefix).items() if k.startswith(AUTOENCODER_PARTS)}
    converted = convert_ldm_vae_checkpoint(
        {k.removeprefix(prefix): t for k, t in source.items()}, dict(autoencoder.config)
    )
    return _map_with(checkpoint, source, converted)


_TEXT_BLOCK = re.compile(r"attn_layers\.layers\.(\d+)\.(.+)")


def text_encoder_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The BERT-token transformer's weights in ``XRealTextEncoder``'s layout.

    Layers alternate attention (even) and feed-forward (odd), each
    ``[LayerNorm, block, residual]``; q, k and v are fused into one projection.
    """
    text = checkpoint.part(TEXT)
    state: dict[str, torch.Tensor] = {
        "token_embedding.weight": text.get("token_emb.weight"),
        "position_embedding.weight": text.get("pos_emb.emb.weight"),
        "final_norm.weight": text.get("norm.weight"),
        "final_norm.bias": text.get("norm.bias"),
    }
    used = ["token_emb.weight", "pos_emb.emb.weight", "norm.weight", "norm.bias"]
    renames = {
        (0, "0.weight"): "attention_norm.weight",
        (0, "0.bias"): "attention_norm.bias",
        (0, "1.to_out.weight"): "to_out.weight",
        (0, "1.to_out.bias"): "to_out.bias",
        (1, "0.weight"): "ff_norm.weight",
        (1, "0.bias"): "ff_norm.bias",
        (1, "1.net.0.0.weight"): "ff.0.weight",
        (1, "1.net.0.0.bias"): "ff.0.bias",
        (1, "1.net.2.weight"): "ff.2.weight",
        (1, "1.net.2.bias"): "ff.2.bias",
    }
    for key in text:
        match = _TEXT_BLOCK.fullmatch(key)
        if not match:
            continue
        layer, rest = int(match[1]), match[2]
        name = renames.get((layer % 2, rest))
        if name is not None:
            state[f"blocks.{layer // 2}.{name}"] = text[key]
            used.append(key)
        elif layer % 2 == 0 and rest == "1.to_q.weight":
            parts = [f"attn_layers.layers.{layer}.1.to_{p}.weight" for p in "qkv"]
            if all(p in text for p in parts):
                state[f"blocks.{layer // 2}.to_qkv.weight"] = torch.cat([text[p] for p in parts])
                used.extend(parts)
    checkpoint.used.update(TEXT + k for k in used if k in text)
    checkpoint.ignore(
        [TEXT + k for k in ("to_logits.weight", "to_logits.bias") if k in text],
        "the text transformer's token-prediction head (the reference conditions on its embeddings)",
    )
    return state


def schedule_buffers(scheduler) -> dict[str, np.ndarray]:
    """The DDPM schedule buffers a reference backbone stores, computed in float64 from the scheduler's betas."""
    betas = scheduler.betas.double().numpy()
    alphas_cumprod = np.cumprod(1.0 - betas)
    previous = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": previous,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(previous) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - previous) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
    }


def check_schedule(checkpoint: Checkpoint, scheduler, tolerance: float = 1e-4) -> float:
    """Check the DDPM schedule buffers against the scheduler; return the largest relative difference."""
    expected = schedule_buffers(scheduler)
    worst = 0.0
    for name in expected:
        if name not in checkpoint.tensors:
            raise ReferenceImportError(f"{checkpoint.path}: missing the schedule buffer {name}")
        found = checkpoint.tensors[name].double().numpy()
        if found.shape != expected[name].shape:
            raise ReferenceImportError(f"{checkpoint.path}: {name} has {found.shape}, expected 1000 timesteps")
        scale = np.maximum(np.abs(expected[name]), 1e-6)
        difference = float(np.max(np.abs(found - expected[name]) / scale))
        if difference > tolerance:
            raise ReferenceImportError(
                f"{checkpoint.path}: {name} differs from the reference schedule (betas 0.0015-0.0295, linear in "
                f"sqrt space, 1000 steps) by {difference:.2g} relative; this checkpoint was trained on another schedule"
            )
        worst = max(worst, difference)
    checkpoint.used.update(expected)
    return worst


# --- the import ---------------------------------------------------------------------


@dataclass
class ImportResult:
    bundle: Path
    preset: Preset
    checkpoints: list[Checkpoint]
    schedule_difference: float
    notes: list[str]
    licence: str = REFERENCE_LICENCE

    def summary(self) -> str:
        lines = [f"wrote {self.bundle} ({self.preset.name} sizes, UNet channels {list(self.preset.unet_channels)})"]
        for checkpoint in self.checkpoints:
            lines.append(f"{checkpoint.path.name}: {len(checkpoint.used)} of {len(checkpoint.tensors)} keys used")
            lines += [f"  not used: {len(keys)} keys, {reason}" for reason, keys in checkpoint.ignored.items() if keys]
        lines.append(f"schedule buffers match DDIMScheduler to {self.schedule_difference:.1e} (relative)")
        return "\n".join(lines + self.notes)


_TOKENIZER_HINT = (
    f"the reference tokenizes with {REFERENCE_TOKENIZER}: give --tokenizer a folder holding its vocab.txt (or "
    f"tokenizer.json), e.g. one saved on a machine with internet by "
    f"BertTokenizerFast.from_pretrained('{REFERENCE_TOKENIZER}').save_pretrained(FOLDER)"
)


def load_reference_tokenizer(source: str | os.PathLike[str], vocab_size: int):
    """The BERT WordPiece tokenizer the text encoder was trained with: a folder, the hub's cache, or the hub."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import BertTokenizerFast

    folder = Path(source)
    if folder.is_dir():
        if not any((folder / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
            raise ReferenceImportError(f"{folder}: holds no vocab.txt or tokenizer.json; {_TOKENIZER_HINT}")
        return _checked_size(BertTokenizerFast.from_pretrained(str(folder)), source, vocab_size)
    try:
        cached = try_to_load_from_cache(str(source), "vocab.txt")
    except ValueError:  # not a hub name either
        raise ReferenceImportError(f"tokenizer {str(source)!r}: no such folder; {_TOKENIZER_HINT}") from None
    if not isinstance(cached, str) and not _hub_reachable():
        raise ReferenceImportError(
            f"tokenizer {str(source)!r}: not a folder, not in the Hugging Face cache, and the hub is unreachable; "
            + _TOKENIZER_HINT
        )
    try:
        tokenizer = BertTokenizerFast.from_pretrained(str(source), local_files_only=isinstance(cached, str))
    except OSError as error:
        raise ReferenceImportError(
            f"cannot load the tokenizer {str(source)!r} ({str(error).splitlines()[0]}); {_TOKENIZER_HINT}"
        ) from None
    return _checked_size(tokenizer, source, vocab_size)


def _checked_size(tokenizer, source, vocab_size: int):
    if len(tokenizer) != vocab_size:
        raise ReferenceImportError(
            f"tokenizer {str(source)!r} has {len(tokenizer)} tokens but the text encoder embeds {vocab_size}; "
            f"the reference uses {REFERENCE_TOKENIZER} (30522)"
        )
    return tokenizer


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers at all (without internet, its client retries for minutes)."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def import_reference(
    backbone: str | os.PathLike[str],
    anatomy_controller: str | os.PathLike[str],
    out: str | os.PathLike[str],
    autoencoder: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] = REFERENCE_TOKENIZER,
    ema: bool = False,
    image_size: int = REFERENCE_IMAGE_SIZE,
    weights_dtype: torch.dtype | None = None,
    command: str = "",
) -> ImportResult:
    """Build a model bundle at ``out`` from the reference checkpoints (``out`` must not exist yet)."""
    from xreal.model.sampling import XRealPipeline

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReferenceImportError(f"{out}: already exists; choose a new folder for the bundle")
    base = read_checkpoint(backbone)
    controller = read_checkpoint(anatomy_controller)
    separate = read_checkpoint(autoencoder) if autoencoder is not None else None
    checkpoints = [c for c in (base, controller, separate) if c is not None]
    preset, vocab_size = reference_preset(base, controller, image_size, separate)
    bert_tokenizer = load_reference_tokenizer(tokenizer, vocab_size)
    notes: list[str] = []

    unet, text_encoder = build_unet(preset), build_text_encoder(preset, vocab_size)
    vae, anatomy = build_autoencoder(preset), build_autoencoder(preset)
    _load_exactly(unet, unet_state(base, unet, ema), f"{base.path}: UNet")
    _load_exactly(text_encoder, text_encoder_state(base), f"{base.path}: text encoder")
    _load_exactly(anatomy, autoencoder_state(controller, "", anatomy), f"{controller.path}: Anatomy Controller")
    for checkpoint in checkpoints:
        _ignore_losses(checkpoint)
    if base.keys(FIRST_STAGE):
        _load_exactly(vae, autoencoder_state(base, FIRST_STAGE, vae), f"{base.path}: first-stage autoencoder")
    if separate is not None:
        standalone = build_autoencoder(preset)
        _load_exactly(standalone, autoencoder_state(separate, "", standalone), f"{separate.path}: autoencoder")
        if not base.keys(FIRST_STAGE):
            vae = standalone
        elif _same_weights(vae, standalone):
            notes.append(f"{separate.path.name} is identical to the backbone's first-stage autoencoder")
        else:
            notes.append(
                f"warning: {separate.path.name} differs from the backbone's first-stage autoencoder; the reference "
                "loads it first and the backbone's copy over it, so the backbone's copy was imported"
            )
    scale = float(base.tensors["scale_factor"]) if "scale_factor" in base.tensors else SD_SCALE_FACTOR
    if "scale_factor" in base.tensors:
        base.used.add("scale_factor")
    vae.register_to_config(scaling_factor=scale)
    scheduler = reference_scheduler()
    schedule_difference = check_schedule(base, scheduler)

    for checkpoint in checkpoints:
        left = checkpoint.unaccounted()
        if left:
            raise ReferenceImportError(
                f"{checkpoint.path}: {len(left)} keys of no part of the reference layout: {_few(left)}"
            )

    pipeline = XRealPipeline(
        vae=vae,
        anatomy_controller=anatomy,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=bert_tokenizer,
        scheduler=scheduler,
        preset=preset.name,
        image_size=preset.image_size,
        value_range=(0.0, 1.0),
        sample_posterior=True,
        anatomy_levels=[REFERENCE_ANATOMY_LEVELS[a] for a in sorted(Anatomy)],
    )
    training = {
        "data": "MIMIC-CXR-JPG (the published XReal weights)",
        "command": command,
        "source": REFERENCE_REPOSITORY,
        "licence": REFERENCE_LICENCE,
        "tokenizer": {"source": str(tokenizer), "kind": REFERENCE_TOKENIZER, "tokens": vocab_size},
        "unet_weights": "ema" if ema else "live",
        "imported_from": [c.report() for c in checkpoints],
        "schedule_max_relative_difference": schedule_difference,
    }
    with atomic_directory(out) as staging:
        save_bundle(pipeline, staging, training=training, weights_dtype=weights_dtype, preset=preset)
        write_model_card(staging)
    return ImportResult(out, preset, checkpoints, schedule_difference, notes)


def _ignore_losses(checkpoint: Checkpoint) -> None:
    losses = [k for k in checkpoint.tensors if k.startswith("loss.") or k.startswith(FIRST_STAGE + "loss.")]
    checkpoint.ignore(losses, "training losses (LPIPS and the patch discriminator)")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
