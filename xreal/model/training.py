"""Training the three trained parts of XReal from a training index.

- the first-stage autoencoder (reconstruct the image), and optionally its
  decoder fine-tuned on its own with the encoder frozen, so the latents do not
  change (as Stable Diffusion's released decoders were fine-tuned),
- the Anatomy Controller (reconstruct the image from the image or, half of the
  time, from its anatomy label map),
- the backbone: UNet and text encoder together, epsilon prediction on the
  frozen autoencoder's latents, with an EMA copy of the UNet.

Every step's batch and noise are drawn from generators seeded with
``(seed, step)``, so a run resumed from a checkpoint continues exactly as if it
had never stopped. Checkpoints hold safetensors weights, the optimizer state
(loaded with ``weights_only=True``), the step and the digest of the data
trained on: a run resumes only on the same data. ``accelerate`` places the
work on the available devices and runs mixed precision when asked.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from xreal.core.errors import XRealError
from xreal.core.files import resolve_under
from xreal.core.images import read_image
from xreal.core.labels import CHEXPERT_LABELS, prompt_for
from xreal.core.masks import read_binary_mask, read_label_map, resize_label_map, resize_mask
from xreal.data.training_index import read_training_index
from xreal.model.autoencoder_loss import (
    PERCEPTUAL_FILE,
    DetailLoss,
    PatchDiscriminator,
    PerceptualDistance,
    autoencoder_loss,
    perceptual_network,
    train_perceptual_network,
)
from xreal.model.bundle import build_autoencoder, build_pipeline, get_preset, save_bundle, write_model_card
from xreal.model.sampling import label_map_image

KL_WEIGHT = 1e-6
PROMPT_DROPOUT = 0.1


@dataclass
class TrainingSet:
    """A training index held in memory at one size: images in [-1, 1] (3 channels), label maps, prompts."""

    images: torch.Tensor
    label_maps: torch.Tensor
    prompts: list[str]
    findings: list[str]
    labels: torch.Tensor  # [N, len(CHEXPERT_LABELS)] bool: the positive labels
    finding_masks: torch.Tensor  # [N, size, size] bool: where any pathology is (all false without masks)

    def __len__(self) -> int:
        return len(self.prompts)

    @functools.cached_property
    def sha256(self) -> str:
        """A digest of everything the trainers read: pixels, anatomy, labels, prompts and finding masks. It
        changes when the data does (a phantom renderer change included), whatever the files are called."""
        digest = hashlib.sha256()
        for tensor in (self.images, self.label_maps, self.labels, self.finding_masks):
            digest.update(tensor.contiguous().numpy().tobytes())
        digest.update(json.dumps([self.prompts, self.findings]).encode())
        return digest.hexdigest()


def load_training_set(index_dir: str | Path, size: int, split: str | None = "train") -> TrainingSet:
    """Read every image and anatomy map of a training index (optionally one split) at ``size``."""
    index_dir = Path(index_dir)
    frame = read_training_index(index_dir)
    if split is not None:
        frame = frame[frame["split"] == split]
    frame = frame[frame["anatomy_path"].notna()]
    if frame.empty:
        raise XRealError(f"{index_dir}: no {split or ''} images with an anatomy map to train on")
    images, maps, findings = [], [], []
    for row in frame.itertuples(index=False):
        row = row._asdict()
        image = read_image(resolve_under(index_dir, row["image_path"]))
        if image.shape != (size, size):
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
        images.append(image)
        maps.append(resize_label_map(read_label_map(resolve_under(index_dir, row["anatomy_path"])), size))
        where = np.zeros((size, size), bool)
        for mask in row["pathology_masks"] if row["pathology_masks"] is not None else []:
            where |= resize_mask(read_binary_mask(resolve_under(index_dir, mask["path"])), size)
        findings.append(where)
    labels = frame[list(CHEXPERT_LABELS)].fillna(0.0).to_numpy() == 1.0
    prompts = [prompt_for([lab for lab, on in zip(CHEXPERT_LABELS, row, strict=True) if on]) for row in labels]
    image_tensor = torch.from_numpy(np.stack(images)).float()[:, None].expand(-1, 3, -1, -1) * 2.0 - 1.0
    return TrainingSet(
        image_tensor.contiguous(),
        torch.from_numpy(np.stack(maps)).long(),
        prompts,
        frame["finding"].fillna("").tolist(),
        torch.from_numpy(labels),
        torch.from_numpy(np.stack(findings)),
    )


@dataclass
class TrainingRun:
    """Settings shared by the three trainers."""

    out: Path
    steps: int
    batch_size: int = 32
    learning_rate: float = 2e-4
    seed: int = 0
    checkpoint_every: int = 500
    preview_every: int = 500
    mixed_precision: str = "no"
    log: dict[str, Any] = field(default_factory=dict)

    def step_generator(self, step: int, process: int = 0) -> tuple[np.random.Generator, torch.Generator]:
        """The batch and noise generators of one step (and one process, when several GPUs train)."""
        seed = int(np.random.SeedSequence([self.seed, step, process]).generate_state(1)[0])
        return np.random.default_rng([self.seed, step, process]), torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def _seeded(seed: int):
    """Initialise weights from ``seed`` without touching the caller's random state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


LOSS_WINDOW = 50  # steps the shown and recorded loss averages over (checkpoints keep as many)


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def _save_checkpoint(
    run: TrainingRun,
    step: int,
    modules: dict[str, nn.Module],
    optimizer,
    ema: EMAModel | None,
    seconds: float = 0.0,
    losses: list[float] | None = None,
    data_sha256: str | None = None,
):
    """Write the part's state at ``step`` (with the training seconds and recent losses so far and the digest of
    the data it trained on, for the record)."""
    folder = run.out / "checkpoints" / f"step-{step}"
    staging = folder.with_name(folder.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, module in modules.items():
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, staging / f"{name}.safetensors"
        )
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    if ema is not None:
        torch.save(ema.state_dict(), staging / "ema.pt")
    state = {"step": step, "seconds": seconds, "losses": losses or [], "data_sha256": data_sha256}
    (staging / "state.json").write_text(json.dumps(state))
    staging.rename(folder)
    for old in run.out.glob("checkpoints/step-*"):
        if old != folder:
            shutil.rmtree(old)


def _load_checkpoint(
    folder: Path, modules: dict[str, nn.Module], optimizer, ema: EMAModel | None, data_sha256: str | None = None
) -> dict:
    """Load a checkpoint into ``modules``, ``optimizer`` and ``ema``; return its state (step, seconds, losses,
    data_sha256). A checkpoint trained on other data than ``data_sha256`` is refused."""
    state = {"seconds": 0.0, "losses": [], "data_sha256": None, **json.loads((folder / "state.json").read_text())}
    if data_sha256 is not None and state["data_sha256"] not in (None, data_sha256):
        raise XRealError(
            f"{folder}: trained on other data (sha256 {state['data_sha256'][:12]}) than this training set's "
            f"({data_sha256[:12]}): the training index or the phantom renderer changed since. Train into a new work "
            "folder, or delete this one"
        )
    for name, module in modules.items():
        try:
            module.load_state_dict(load_file(folder / f"{name}.safetensors"))
        except RuntimeError as error:  # torch names every mismatched tensor; the first line says enough
            raise XRealError(
                f"{folder}: its {name} does not fit the one being trained ({str(error).splitlines()[0]}); it was "
                "trained at other sizes (another preset?): train into a new work folder, or delete this one"
            ) from None
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    if ema is not None:
        ema.load_state_dict(torch.load(folder / "ema.pt", weights_only=True))
    return state  # checkpoints written before the seconds, losses or data digest were kept lack them


def _train(
    run: TrainingRun,
    data: TrainingSet,
    modules: dict[str, nn.Module],
    loss_fn: Callable,
    ema: EMAModel | None = None,
    description: str = "train",
    preview: Callable[[dict[str, nn.Module]], np.ndarray] | None = None,
) -> Accelerator:
    """The shared loop: resume (from a checkpoint of the same ``data`` only), step, checkpoint, preview.

    ``loss_fn(step, rng, generator, device, modules)`` returns the loss of one step,
    computed with ``modules`` (the accelerator-prepared ones, so gradients are
    synchronised across GPUs). ``preview(modules)`` returns an image grid in
    [0, 1], saved as ``previews/step-N.png``.
    """
    accelerator = Accelerator(mixed_precision=run.mixed_precision, cpu=not torch.cuda.is_available())
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=run.learning_rate, weight_decay=0.0)
    start, earlier_seconds, losses, trained_on = 0, 0.0, [], data.sha256
    latest = _latest_checkpoint(run.out)
    if latest is not None:
        state = _load_checkpoint(latest, modules, optimizer, ema, data.sha256)
        start, earlier_seconds, losses = state["step"], state["seconds"], state["losses"]
        trained_on = state["data_sha256"]  # None: a checkpoint from before digests were kept, data unknown
    prepared = accelerator.prepare(*modules.values(), optimizer)
    optimizer = prepared[-1]
    live = dict(zip(modules, prepared[:-1], strict=True))
    if ema is not None:
        ema.to(accelerator.device)
    began = time.perf_counter()
    bar = tqdm(
        range(start, run.steps),
        initial=start,
        total=run.steps,
        desc=description,
        disable=not accelerator.is_local_main_process,
    )
    for step in bar:
        rng, generator = run.step_generator(step, accelerator.process_index)
        with accelerator.autocast():
            loss = loss_fn(step, rng, generator, accelerator.device, live)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(modules["unet"]).parameters())
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-LOSS_WINDOW:]):.4f}")
        done = step + 1 == run.steps
        # The preview first: the checkpoint's seconds then count it, and a resumed run's record covers every call.
        if preview is not None and accelerator.is_main_process and ((step + 1) % run.preview_every == 0 or done):
            _save_preview(run.out / "previews" / f"step-{step + 1}.png", preview, modules)
        if (step + 1) % run.checkpoint_every == 0 or done:
            _save_checkpoint(
                run,
                step + 1,
                {k: accelerator.unwrap_model(m) for k, m in modules.items()},
                optimizer,
                ema,
                seconds=earlier_seconds + time.perf_counter() - began,
                losses=losses[-LOSS_WINDOW:],
                data_sha256=trained_on,
            )
    run.log.update(
        steps=run.steps,
        resumed_from=start,
        seconds=round(earlier_seconds + time.perf_counter() - began, 1),  # over every call, resumes included
        final_loss=float(np.mean(losses[-LOSS_WINDOW:])) if losses else None,
        data_sha256=trained_on,
    )
    return accelerator


def _save_preview(path: Path, preview: Callable, modules: dict[str, nn.Module]) -> None:
    training = {name: module.training for name, module in modules.items()}
    for module in modules.values():
        module.eval()
    try:
        grid = np.asarray(preview(modules), dtype=np.float32)
    finally:
        for name, module in modules.items():
            module.train(training[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.clip(0, 1) * 255).astype(np.uint8)).save(path)


@torch.no_grad()
def _latents(autoencoder: AutoencoderKL, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Unscaled posterior means of ``images``, encoded in chunks."""
    return torch.cat(
        [autoencoder.encode(images[i : i + chunk]).latent_dist.mode() for i in range(0, len(images), chunk)]
    )


def _perceptual_distance(data: TrainingSet, folder: Path, detail: DetailLoss, seed: int) -> PerceptualDistance:
    """The perceptual network kept in ``folder``: trained on the training set's labels once, then read back."""
    path = folder / PERCEPTUAL_FILE
    if path.is_file():
        network = perceptual_network(data.labels.shape[1])
        network.load_state_dict(load_file(path))
    else:
        network = train_perceptual_network(data.images, data.labels, steps=detail.perceptual_steps, seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, path)
    return PerceptualDistance(network)


def train_autoencoder(
    data: TrainingSet,
    run: TrainingRun,
    preset: str = "demo",
    anatomy_controller: bool = False,
    detail: DetailLoss | None = None,
    fine_tune: AutoencoderKL | None = None,
    perceptual_from: Path | None = None,
) -> AutoencoderKL:
    """Train the first-stage autoencoder, or the Anatomy Controller with ``anatomy_controller=True``.

    The controller sees the anatomy label map (scaled to [-1, 1], 3 channels)
    instead of the image with probability 0.5 and always reconstructs the image.
    ``detail`` adds the perceptual, texture and patch-discriminator terms
    (:mod:`xreal.model.autoencoder_loss`) to L1 + KL. ``fine_tune`` starts from
    a trained autoencoder and trains its decoder only: the encoder stays
    frozen, so its latents, and a backbone trained on them, stay valid.
    ``perceptual_from`` is a folder holding the perceptual network to reuse
    (default: the run's own, trained on first use).
    """
    with _seeded(run.seed):
        model = build_autoencoder(get_preset(preset))
        if fine_tune is not None:
            model.load_state_dict(fine_tune.state_dict())
            model.register_to_config(scaling_factor=fine_tune.config.scaling_factor)
            model.encoder.requires_grad_(False)
            model.quant_conv.requires_grad_(False)
        discriminator = (
            PatchDiscriminator(width=detail.discriminator_width, layers=detail.discriminator_layers)
            if detail is not None and detail.discriminator_start < run.steps
            else None
        )
    masks = label_map_image(data.label_maps) * 2.0 - 1.0
    perceptual = (
        _perceptual_distance(data, perceptual_from or run.out, detail, run.seed)
        if detail is not None and detail.perceptual_weight
        else None
    )
    modules: dict[str, nn.Module] = {"model": model}
    if discriminator is not None:
        modules["discriminator"] = discriminator
    if detail is not None:
        run.log["detail_loss"] = detail.to_dict()

    def loss_fn(step, rng, generator, device, modules):
        idx = torch.from_numpy(rng.integers(0, len(data), run.batch_size))
        targets = data.images[idx]
        inputs = targets
        if anatomy_controller:
            use_mask = torch.from_numpy(rng.random(run.batch_size) < 0.5)[:, None, None, None]
            inputs = torch.where(use_mask, masks[idx], targets)
        return autoencoder_loss(
            modules["model"],
            inputs.to(device),
            targets.to(device),
            generator,
            KL_WEIGHT,
            step=step,
            detail=detail,
            perceptual=perceptual.to(device) if perceptual is not None else None,
            discriminator=modules.get("discriminator"),
        )

    shown = (masks if anatomy_controller else data.images)[:8]

    @torch.no_grad()
    def preview(modules):
        ae = modules["model"]
        device = next(ae.parameters()).device
        output = ae.decode(ae.encode(shown.to(device)).latent_dist.mode()).sample.cpu()
        return torch.cat([torch.cat(list(shown.mean(1)), 1), torch.cat(list(output.mean(1)), 1)], 0) / 2 + 0.5

    _train(
        run,
        data,
        modules,
        loss_fn,
        preview=preview,
        description="anatomy controller" if anatomy_controller else "decoder" if fine_tune else "autoencoder",
    )
    model = model.cpu().eval()
    if not anatomy_controller and fine_tune is None:
        model.register_to_config(scaling_factor=float(1.0 / _latents(model, data.images[:512]).std()))
    return model


def finding_weights(
    finding_masks: torch.Tensor, latent_size: tuple[int, int], weight: float, min_cells: int = 0
) -> torch.Tensor:
    """Loss weights per latent cell, [N, 1, h, w]: ``1 + weight`` where a pathology touches the cell, 1 elsewhere.

    An image whose findings touch fewer than ``min_cells`` cells has them weighed up so their extra weight adds up
    to that of ``min_cells`` cells: ``1 + weight * min_cells / touched``.
    """
    touched = F.adaptive_max_pool2d(finding_masks[:, None].float(), latent_size)
    scale = (min_cells / touched.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1.0)).clamp(min=1.0)
    return 1.0 + weight * scale * touched


def draw_chances(labels: torch.Tensor, oversample: dict[str, float]) -> np.ndarray:
    """The chance of drawing each training image when those with a label in ``oversample`` are drawn that many
    times as often as the rest (an image with several such labels takes the largest factor)."""
    factors = np.ones(len(labels))
    for label, factor in oversample.items():
        if label not in CHEXPERT_LABELS:
            raise XRealError(f"oversample: unknown label {label!r}; known: {', '.join(CHEXPERT_LABELS)}")
        if not factor > 0:
            raise XRealError(f"oversample: {label}'s factor must be positive, got {factor}")
        has = labels[:, CHEXPERT_LABELS.index(label)].numpy()
        factors[has] = np.maximum(factors[has], factor)
    return factors / factors.sum()


def train_backbone(
    data: TrainingSet,
    run: TrainingRun,
    autoencoder: AutoencoderKL,
    anatomy_controller: AutoencoderKL,
    preset: str = "demo",
    ema_decay: float = 0.999,
    finding_weight: float = 0.0,
    start_from=None,
    finding_min_cells: int = 0,
    max_timestep: int | None = None,
    all_levels_share: float = 0.0,
    oversample: dict[str, float] | None = None,
):
    """Train UNet and text encoder on the frozen autoencoder's latents; return the full pipeline.

    ``finding_weight`` weighs the noise-prediction error in the latent cells a
    pathology touches ``1 + finding_weight`` times the rest (the loss stays a
    weighted mean), so a nodule a cell wide is not drowned by the lungs around it;
    findings smaller than ``finding_min_cells`` latent cells are weighed as if that
    large (:func:`finding_weights`).
    ``max_timestep`` draws the noise levels below it only (None: all of the
    scheduler's): the low noise levels, where a sampler's last steps draw the fine detail.
    ``all_levels_share`` of each batch is still drawn over all noise levels, so the
    levels above ``max_timestep`` are not forgotten.
    ``oversample`` draws the images with a given label that many times as often as the rest (:func:`draw_chances`).
    ``start_from`` is a pipeline (trained on the same index) whose UNet and text
    encoder training continues from; it is trained in place.
    """
    if start_from is not None:
        pipeline = start_from
    else:
        with _seeded(run.seed):
            pipeline = build_pipeline(preset, texts=data.findings + data.prompts)
    pipeline.vae, pipeline.anatomy_controller = autoencoder, anatomy_controller
    unet, text_encoder, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    scheduler = pipeline.scheduler
    all_timesteps = scheduler.config.num_train_timesteps
    timesteps = all_timesteps
    if not 0.0 <= all_levels_share <= 1.0:
        raise XRealError(f"all_levels_share must lie in [0, 1], got {all_levels_share}")
    if all_levels_share and max_timestep is None:
        raise XRealError("all_levels_share needs max_timestep: without it every level is drawn already")
    if max_timestep is not None:
        if not 1 <= max_timestep <= timesteps:
            raise XRealError(f"max_timestep must lie in [1, {timesteps}], got {max_timestep}")
        timesteps = max_timestep
        run.log["max_timestep"] = max_timestep
        if all_levels_share:
            run.log["all_levels_share"] = all_levels_share
    n_all_levels = round(all_levels_share * run.batch_size)
    latents = _latents(autoencoder, data.images) * autoencoder.config.scaling_factor
    tokens = tokenizer(
        data.prompts,
        padding="max_length",
        truncation=True,
        max_length=text_encoder.config.max_positions,
        return_tensors="pt",
    ).input_ids
    empty = tokenizer(
        [""], padding="max_length", max_length=text_encoder.config.max_positions, return_tensors="pt"
    ).input_ids
    alphas = scheduler.alphas_cumprod
    weights = finding_weights(data.finding_masks, latents.shape[-2:], finding_weight, finding_min_cells)
    run.log["finding_weight"] = finding_weight
    if finding_min_cells:
        run.log["finding_min_cells"] = finding_min_cells
    chances = draw_chances(data.labels, oversample) if oversample else None
    if oversample:
        run.log["oversample"] = dict(oversample)
    ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True)

    def loss_fn(step, rng, generator, device, modules):
        unet, text_encoder = modules["unet"], modules["text_encoder"]
        if chances is None:
            idx = torch.from_numpy(rng.integers(0, len(data), run.batch_size))
        else:
            idx = torch.from_numpy(rng.choice(len(data), run.batch_size, p=chances))
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, timesteps, (run.batch_size,), generator=generator)
        if n_all_levels:
            t[:n_all_levels] = torch.randint(0, all_timesteps, (n_all_levels,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ids = tokens[idx].clone()
        ids[torch.from_numpy(rng.random(run.batch_size) < PROMPT_DROPOUT)] = empty[0]
        context = text_encoder(ids.to(device))
        prediction = unet(noisy.to(device), t.to(device), encoder_hidden_states=context).sample
        error = (prediction.float() - noise.to(device)) ** 2
        weight = weights[idx].to(device).expand_as(error)
        return (error * weight).sum() / weight.sum()

    @torch.no_grad()
    def preview(modules):
        from xreal.model.sampling import XRealPipeline

        parts = {**pipeline.components, "unet": modules["unet"], "text_encoder": modules["text_encoder"]}
        sampler = XRealPipeline(**parts, preset=preset, image_size=pipeline.config.image_size)
        sampler.set_progress_bar_config(disable=True)
        label_maps = data.label_maps[:4].numpy().astype(np.uint8)
        images = sampler(label_maps, [""] * 4, [0, 1, 2, 3], num_inference_steps=20, anatomy_steps=10).images
        return torch.from_numpy(np.concatenate(list(images), 1))

    parts = {"unet": unet, "text_encoder": text_encoder}
    _train(run, data, parts, loss_fn, ema=ema, preview=preview, description="backbone")
    ema.copy_to(unet.parameters())
    pipeline.to("cpu")
    return pipeline


# At 32x32 latents a backbone step costs 3.7x one at 16x16: half the batch keeps the whole run within 2 hours. From
# scratch on 2 otherwise idle cores it took 68 min (stop 33): autoencoder 9 min, decoder 3, anatomy controller 9,
# backbone 36, findings 7, detail 3.5. A backbone trained to 14000 steps (stop 48) drew healthy twins closer to the real
# phantoms but pneumothoraces further and found them less (0.82 -> 0.70 of draws; README, "A longer backbone").
DEMO_SCHEDULE = {
    "autoencoder": (1200, 16),
    "decoder": (400, 16),
    "anatomy_controller": (1200, 16),
    "backbone": (8000, 16),
    "findings": (1500, 16),
    "detail": (800, 16),
}
# The backbone's "findings" part: trained on, at half the learning rate, with the error in the latent cells a
# pathology touches weighing 1 + FINDING_WEIGHT times the rest. The findings touch 3.7% of the training latents'
# cells, a nodule a handful of the 32x32, and a plain mean let the backbone all but ignore them (control_phantom,
# seed 1049: nodules detected in 0.10 of draws, 0.00 after 1500 more plain steps; 0.55 with weight 5).
FINDING_WEIGHT = 5.0
# Nodules and plates of atelectasis touch about 8 latent cells, a tenth of an enlarged heart: weighed up as if they
# touched 24, nodules were detected in 0.80 of draws instead of 0.55 (seed 1049, stop 30). From scratch (stop 34,
# 280 requests each): as if they touched 48, nodules 0.88 on seed 1049 and 0.85 held out (seed 999) against 0.80 for
# the bundle before, with fewer unasked findings.
FINDING_MIN_CELLS = 48
FINDINGS_LEARNING_RATE = 1e-4
# The last part, "detail": trained on as "findings" is, at the lowest noise levels only (t < 75 of 1000), where a
# sampler's last steps draw ribs, vessels and the edges of findings. control_phantom, seed 1049: Frechet ratio 2.55
# -> 1.82 (t < 300: 2.24, at 800 or 1600 steps; t < 150: 1.82), findings detected 0.96 before and after; held out
# (seed 999): 2.81 -> 2.01, unasked findings on 0.21 -> 0.14 of the finals (README, "The demo model"). The Frechet
# ratios lie within the figure's noise at 140 requests (stop 34); the fewer unasked findings held on 280 (0.19 ->
# 0.11, intervals apart). The fast preset never evaluates the backbone at these levels: its 12 trailing DPM-Solver++
# steps evaluate it last at t = 82 and step from there straight to the clean latent, so what it gets from this part is
# what the part changed above t = 75 (stop 39). Steps that evaluate lower drew worse texture on seed 1049 (README,
# "A decoder that draws ribs, not a grid").
DETAIL_MAX_TIMESTEP = 75
# The decoder's fine-tuning: the texture term brings back the fine detail the autoencoder's round trip lost. From
# scratch (stop 34; control_phantom, seed 1049, 280 requests) the generated lungs kept 0.69 of the real phantoms'
# high-frequency power at weight 10 (goal 0.7-1.3), 0.74 at 15 and 0.79 at 20; but the judges call a pneumothorax on
# more of the draws as it rises (gate_on_real_phantoms, seed 999: 209, 205 and 189 of 280 accepted). The backbone
# reads the encoder only, so the weight changes nothing else. The texture term matches how much detail a patch holds,
# and the decoder drew it as a grid of lines across the lungs; the structure term (weight 15) matches which way it
# runs, so the ribs run as the phantoms' do. Healthy twins' Frechet distance to real healthy phantoms at 1120 requests
# (stop 39): seed 1049 0.245 -> 0.186 (structure alone 0.333, weight 30 0.217); held out, seed 999, 0.261 -> 0.167;
# the autoencoder's own round trip 0.76 -> 0.35.
DECODER_DETAIL = DetailLoss(discriminator_start=0, texture_weight=15.0, structure_weight=15.0)


def continue_with_findings(
    data: TrainingSet,
    run: TrainingRun,
    pipeline,
    finding_weight: float = FINDING_WEIGHT,
    finding_min_cells: int = FINDING_MIN_CELLS,
    max_timestep: int | None = None,
    all_levels_share: float = 0.0,
    oversample: dict[str, float] | None = None,
):
    """The demo's "findings" part: ``pipeline``'s backbone trained on with the finding-weighted loss, in place;
    with ``max_timestep``, its "detail" part (the low noise levels only)."""
    return train_backbone(
        data,
        run,
        pipeline.vae,
        pipeline.anatomy_controller,
        preset=pipeline.config.preset,
        finding_weight=finding_weight,
        start_from=pipeline,
        finding_min_cells=finding_min_cells,
        max_timestep=max_timestep,
        all_levels_share=all_levels_share,
        oversample=oversample,
    )


def train_demo_bundle(
    index_dir: Path,
    work: Path,
    out: Path,
    schedule: dict[str, tuple[int, int]] = DEMO_SCHEDULE,
    seed: int = 0,
    command: str = "",
    findings_oversample: dict[str, float] | None = None,
) -> Path:
    """Train every part on a phantom training index and save the demo bundle to ``out``.

    ``schedule`` maps each part to (steps, batch size); the parts run in its order. ``findings_oversample``: the
    labels the "findings" part draws more often, and how many times (:func:`draw_chances`; ``xreal train demo
    --oversample``). The bundle was trained without it.
    """
    preset = get_preset("demo")
    data = load_training_set(index_dir, preset.image_size)
    if findings_oversample:
        draw_chances(data.labels, findings_oversample)  # a bad factor stops here, not after an hour of training
    runs = {
        name: TrainingRun(work / name, steps=steps, batch_size=batch_size, seed=seed)
        for name, (steps, batch_size) in schedule.items()
    }
    for name in ("findings", "detail"):
        if name in runs:
            runs[name].learning_rate = FINDINGS_LEARNING_RATE
    autoencoder = train_autoencoder(data, runs["autoencoder"], detail=DetailLoss())
    if "decoder" in runs:
        autoencoder = train_autoencoder(
            data, runs["decoder"], detail=DECODER_DETAIL, fine_tune=autoencoder, perceptual_from=runs["autoencoder"].out
        )
    controller = train_autoencoder(data, runs["anatomy_controller"], anatomy_controller=True)
    pipeline = train_backbone(data, runs["backbone"], autoencoder, controller)
    if "findings" in runs:
        pipeline = continue_with_findings(data, runs["findings"], pipeline, oversample=findings_oversample)
    if "detail" in runs:
        pipeline = continue_with_findings(data, runs["detail"], pipeline, max_timestep=DETAIL_MAX_TIMESTEP)
    training = {
        "data": f"{len(data)} phantom training images ({index_dir})",
        "data_sha256": data.sha256,
        "command": command,
        "runs": {
            name: {**r.log, "batch_size": r.batch_size, "learning_rate": r.learning_rate} for name, r in runs.items()
        },
    }
    save_bundle(pipeline, out, training=training, weights_dtype=torch.float16)
    write_model_card(out)
    return out
