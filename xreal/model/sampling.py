"""XRealPipeline: batched two-stage controlled sampling (anatomy control, then pathology control).

Every item of a batch has its own anatomy label map, pathology mask, prompt and
seed; an item's image depends only on those and the model, never on the batch
it was generated in (each item draws all its noise from its own generator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from scipy import ndimage
from transformers import PreTrainedTokenizerFast

from xreal.core.errors import XRealError
from xreal.core.labels import CHEXPERT_LABELS, NO_FINDING, Anatomy, prompt_for
from xreal.core.masks import check_binary_mask, check_label_map, resize_label_map, resize_mask
from xreal.core.settings import DEFAULT_SETTINGS, STEP_GRIDS, check_reference_grid, guided_step, reference_grid
from xreal.text import XRealTextEncoder


@dataclass
class XRealPipelineOutput(BaseOutput):
    """``images``: final X-rays ``[B, H, W]`` in [0, 1]; ``healthy_images``: the stage-1 healthy twins;
    ``has_pathology``: which items went through stage 2; ``healthy_latents``: the twins' last stage-1 latents
    ``[B, C, h, w]`` (scaled, as the UNet sees them), which decode to ``healthy_images``."""

    images: np.ndarray
    healthy_images: np.ndarray
    has_pathology: np.ndarray
    healthy_latents: np.ndarray


def _shared(name: str, value, n: int):
    """A setting the whole batch must share, given once or once per item."""
    if np.ndim(value) == 0:
        return value
    values = list(value)
    if len(values) != n:
        raise XRealError(f"{name}: got {len(values)} values for {n} items")
    if len(set(values)) > 1:
        raise XRealError(
            f"{name} must be the same for every item of a batch (they share one scheduler); got "
            f"{', '.join(str(v) for v in sorted(set(values)))}. Put items with different {name} in separate batches"
        )
    return values[0]


def _per_item(name: str, value, n: int) -> np.ndarray:
    values = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)) if np.ndim(value) == 0 else np.asarray(value)
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise XRealError(f"{name}: expected one finite number or one per item ({n}), got {value!r}")
    return values.astype(np.float64)


# The solvers step over "trailing" timesteps (the first at t = 999, pure noise, as they assume); DDIM keeps the
# bundle's "leading" spacing, the reference's.
_SOLVER = {"timestep_spacing": "trailing"}
SAMPLERS = {
    # name (xreal.core.settings.SAMPLER_NAMES): (scheduler class, options over the pipeline's scheduler config)
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, **_SOLVER}),
    "dpmsolver++-sde": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_SOLVER},
    ),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 2, **_SOLVER}),
}


def check_sampler(sampler: str) -> str:
    if sampler not in SAMPLERS:
        raise XRealError(f"sampler: unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return sampler


def step_from_blend(scheduler, step: int) -> None:
    """Make ``scheduler`` step from the sample just blended before step ``step``.

    UniPC's corrector would replace that sample by one rebuilt from the sample before it, undoing the blend; it is
    turned off for that step alone (diffusers checks ``step_index - 1`` against ``disable_corrector``). The other
    samplers step from the sample they are given.
    """
    if isinstance(scheduler, UniPCMultistepScheduler) and step > 0:
        scheduler.disable_corrector = [*scheduler.disable_corrector, step - 1]  # a new list: the default is shared


def restore_weight(mask: np.ndarray, latent_size: int) -> np.ndarray:
    """How much of stage 2's change each pixel takes: 1 on the mask, falling linearly to 0 one latent cell away.

    A finding keeps its full contrast up to the mask's edge: blurred by half a cell instead, a plate of
    atelectasis two pixels thick kept 64% of its contrast, and a classifier found half as many real ones so
    restored. A sharper edge than a cell leaves a seam that reads as another finding.
    """
    cell = mask.shape[0] / latent_size
    distance = ndimage.distance_transform_edt(~np.asarray(mask, dtype=bool))
    return np.clip(1.0 - distance / cell, 0.0, 1.0).astype(np.float32)


def label_map_image(label_maps: torch.Tensor, levels: Sequence[float] | None = None) -> torch.Tensor:
    """Anatomy label maps ``[B, H, W]`` -> the Anatomy Controller's input ``[B, 3, H, W]`` in [0, 1].

    ``levels[id]`` is the grey level of each Anatomy id; by default ids are spread evenly over [0, 1].
    """
    if levels is None:
        scaled = label_maps.float() / float(max(Anatomy))
    else:
        scaled = torch.as_tensor(levels, dtype=torch.float32, device=label_maps.device)[label_maps.long()]
    return scaled[:, None].expand(-1, 3, -1, -1)


class XRealPipeline(DiffusionPipeline):
    """Anatomy- and pathology-controlled chest X-ray generation (XReal).

    Components: ``vae`` (first-stage autoencoder), ``anatomy_controller`` (an
    autoencoder mapping an anatomy label map to a coarse X-ray), ``unet``
    (latent diffusion backbone), ``text_encoder`` and ``tokenizer`` (prompt
    conditioning) and ``scheduler`` (DDIM).
    """

    model_cpu_offload_seq = "text_encoder->anatomy_controller->vae->unet"

    def __init__(
        self,
        vae: AutoencoderKL,
        anatomy_controller: AutoencoderKL,
        unet: UNet2DConditionModel,
        text_encoder: XRealTextEncoder,
        tokenizer: PreTrainedTokenizerFast,
        scheduler: DDIMScheduler,
        preset: str = "demo",
        image_size: int = 64,
        value_range: Sequence = (-1.0, 1.0),  # (low, high) of images the autoencoder sees
        labels: Sequence = CHEXPERT_LABELS,  # the label vocabulary the model was trained on
        sample_posterior: bool = False,  # encode to a draw from the posterior (the reference) or its mean
        anatomy_levels: Sequence | None = None,  # Anatomy Controller input level per Anatomy id
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            anatomy_controller=anatomy_controller,
            unet=unet,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
        )
        self.register_to_config(
            preset=preset,
            image_size=image_size,
            value_range=list(value_range),
            labels=list(labels),
            sample_posterior=sample_posterior,
            anatomy_levels=None if anatomy_levels is None else list(anatomy_levels),
        )

    # --- pieces ---------------------------------------------------------------------

    def to_model_range(self, images01: torch.Tensor) -> torch.Tensor:
        low, high = self.config.value_range
        return images01 * (high - low) + low

    def clamp_to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self.config.value_range
        return images.clamp(low, high)

    def to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self.config.value_range
        return ((images - low) / (high - low)).clamp(0.0, 1.0)

    def conditioning_anatomy(self, label_map: np.ndarray) -> np.ndarray:
        """An anatomy label map at the model's image size, as the pipeline conditions on it (nearest)."""
        return resize_label_map(label_map, self.config.image_size)

    def anatomy_blend(self, label_map: np.ndarray, soft_scale: float) -> np.ndarray:
        """Stage 1's blend weight at latent size: 1 on the anatomy, ``soft_scale`` elsewhere."""
        return np.where(resize_label_map(label_map, self.unet.config.sample_size) > 0, 1.0, soft_scale)

    def conditioning_mask(self, mask: np.ndarray) -> np.ndarray:
        """A pathology mask at the model's image size, as the pipeline conditions on it: any overlap counts,
        so a lesion smaller than a pixel keeps a place to be generated in."""
        return resize_mask(mask, self.config.image_size, rule="any")

    def findings_prompt(self) -> str:
        """Every finding the model knows, as one prompt: stage 1's negative prompt (``healthy_guidance_scale``)."""
        return prompt_for([label for label in self.config.labels if label != NO_FINDING])

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.text_encoder.config.max_positions,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))

    def encode(
        self, autoencoder: AutoencoderKL, images: torch.Tensor, generators: list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Scaled latents of images, clamped to the model's value range first.

        The posterior's mean, or with ``sample_posterior`` and ``generators`` a draw from it, as the
        reference takes its first-stage latents.
        """
        posterior = autoencoder.encode(self.clamp_to_model_range(images)).latent_dist
        latents = posterior.sample(generators) if self.config.sample_posterior and generators else posterior.mode()
        return latents * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    @torch.no_grad()
    def round_trip(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Images ``[B, H, W]`` in [0, 1] through the autoencoder alone (posterior mean, no sampling), returned as
        the pipeline returns its images: what the decoder makes of an image it could have drawn."""
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None].expand(-1, 3, -1, -1)
        out = []
        for chunk in x.split(batch_size):
            latents = self.encode(self.vae, self.to_model_range(chunk.to(self.device, self.vae.dtype)))
            out.append(self.to_unit_range(self.decode(latents).float()).mean(dim=1).cpu())
        return torch.cat(out).numpy()

    def anatomy_prior(self, label_maps: torch.Tensor) -> torch.Tensor:
        """The Anatomy Controller's coarse X-ray for each label map, clamped to the model's value range."""
        ac = self.anatomy_controller
        inputs = self.to_model_range(label_map_image(label_maps, self.config.anatomy_levels)).to(ac.dtype)
        return self.clamp_to_model_range(ac.decode(ac.encode(inputs).latent_dist.mode()).sample)

    def _noise(self, generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
        return randn_tensor(like.shape, generator=generators, device=like.device, dtype=like.dtype)

    def make_scheduler(self, sampler: str, num_inference_steps: int, step_grid: str = "exact"):
        """A fresh scheduler of ``sampler`` (see ``SAMPLERS``), built from the pipeline's scheduler config and
        set to ``num_inference_steps``; the pipeline's own ``scheduler`` is left untouched.

        ``step_grid="reference"``: DDIM over the reference's grid, every ``1000 // num_inference_steps``
        timesteps (see ``xreal.core.settings.STEP_GRIDS``).
        """
        cls, options = SAMPLERS[check_sampler(sampler)]
        scheduler = cls.from_config(self.scheduler.config, **options)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        if step_grid == "reference":
            if cls is not DDIMScheduler:
                raise XRealError(f"the reference step grid is the reference's DDIM grid; the sampler is {sampler}")
            # DDIM's step goes back 1000 // num_inference_steps from each timestep, which is this grid's spacing.
            check_reference_grid(num_inference_steps)
            config = scheduler.config
            grid = reference_grid(num_inference_steps, config.num_train_timesteps, config.steps_offset)
            scheduler.timesteps = torch.tensor(grid, device=self.device)
        elif step_grid != "exact":
            raise XRealError(f"step grid: unknown grid {step_grid!r}; choose exact or reference")
        if hasattr(scheduler, "set_begin_index"):
            # Multistep solvers: add_noise then finds the noise level by the solver's step counter, the level
            # of the sample about to enter the next step, rather than by looking the timestep value up.
            scheduler.set_begin_index(0)
        return scheduler

    def _denoise(
        self,
        latents,
        z0,
        keep,
        blend_steps,
        context,
        uncond,
        guidance_scale,
        eta,
        generators,
        stage,
        callback,
        scheduler=None,
        guidance_interval=(0.0, 1.0),
    ):
        """Sample from ``latents`` with ``scheduler`` (default: the pipeline's DDIM); before each of the first
        ``blend_steps`` steps, the region where ``keep`` is 1 is replaced by ``z0`` noised to the current step
        (soft where keep is fractional).

        Blending before step i at ``timesteps[i]`` is the reference's order, and the same as diffusers'
        inpainting pipelines, which blend after step i at ``timesteps[i + 1]``; ``add_noise`` takes the level from
        the scheduler's own bookkeeping (its step counter for the multistep solvers). When every step blends, the
        multistep solvers' output is blended once more with ``z0`` itself, as those pipelines do after their last
        step: a solver's last step jumps to noise level 0 from t = 124 (8 trailing steps), where the known region's
        error is large. DDIM's last step starts at t = 1; its output stays the reference's, unblended. ``eta``
        applies to DDIM only; the SDE solver draws its noise from the items' own generators. Guidance runs in the
        steps whose place in the sequence, as a fraction, lies in ``guidance_interval`` ``[start, stop)``; the
        others take the conditional pass alone.
        """
        scheduler = self.scheduler if scheduler is None else scheduler
        steps = len(scheduler.timesteps)
        guided = uncond is not None and bool((guidance_scale > 1.0).any())
        scale = guidance_scale.clamp(min=1.0).view(-1, 1, 1, 1).to(latents) if guided else None
        is_ddim = isinstance(scheduler, DDIMScheduler)
        stochastic = getattr(scheduler.config, "algorithm_type", "").startswith("sde-")
        blends = bool(keep.any())
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            if i < blend_steps:
                known = scheduler.add_noise(z0, self._noise(generators, z0), t.repeat(len(z0)))
                latents = keep * known + (1.0 - keep) * latents
                if blends:
                    step_from_blend(scheduler, i)
            model_input = latents if is_ddim else scheduler.scale_model_input(latents, t)
            if guided and guided_step(guidance_interval, i, steps):
                eps_uncond, eps_cond = self.unet(
                    torch.cat([model_input, model_input]), t, encoder_hidden_states=torch.cat([uncond, context])
                ).sample.chunk(2)
                eps = eps_uncond + scale * (eps_cond - eps_uncond)
            else:
                eps = self.unet(model_input, t, encoder_hidden_states=context).sample
            if is_ddim:
                noise = self._noise(generators, latents) if eta > 0 else None
                latents = scheduler.step(eps, t, latents, eta=eta, variance_noise=noise).prev_sample
            elif stochastic:
                latents = scheduler.step(eps, t, latents, variance_noise=self._noise(generators, latents)).prev_sample
            else:
                latents = scheduler.step(eps, t, latents).prev_sample
            if i == steps - 1 and blend_steps >= steps and not is_ddim:
                latents = keep * z0 + (1.0 - keep) * latents  # the known region at level 0, where the solver ends
            if callback is not None:
                latents = (callback(self, i, t, {"latents": latents, "stage": stage}) or {}).get("latents", latents)
        return latents

    # --- the call ------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        anatomy: Sequence[np.ndarray] | np.ndarray,
        prompts: Sequence[str | Sequence[str]],
        seeds: Sequence[int],
        pathology_masks: Sequence[np.ndarray | None] | None = None,
        num_inference_steps: int | Sequence[int] = DEFAULT_SETTINGS.steps,
        anatomy_steps: int | Sequence[int] = DEFAULT_SETTINGS.anatomy_steps,
        soft_scale: float | Sequence[float] = DEFAULT_SETTINGS.soft_scale,
        guidance_scale: float | Sequence[float] = DEFAULT_SETTINGS.guidance_scale,
        eta: float | Sequence[float] = DEFAULT_SETTINGS.eta,
        sampler: str = DEFAULT_SETTINGS.sampler,
        step_grid: str = DEFAULT_SETTINGS.step_grid,
        guidance_interval: tuple[float, float] = DEFAULT_SETTINGS.guidance_interval,
        healthy_guidance_scale: float = DEFAULT_SETTINGS.healthy_guidance_scale,
        latent_handoff: bool = False,
        restore_outside: bool = True,
        autocast_dtype: torch.dtype | None = None,
        callback_on_step_end: Callable[[XRealPipeline, int, torch.Tensor, dict], dict | None] | None = None,
    ) -> XRealPipelineOutput:
        """Generate one X-ray per item.

        Args:
            anatomy: anatomy label maps (Anatomy ids), one per item, any size (resized nearest).
            prompts: per item, a prompt string or a list of CheXpert labels; "" or ["No Finding"]
                asks for a healthy image and skips stage 2.
            seeds: one seed per item; all of an item's noise comes from its own generator.
            pathology_masks: per item, a binary mask of where the pathology goes (None for healthy items).
            num_inference_steps: sampler steps of each stage.
            anatomy_steps: stage-1 steps that blend in the Anatomy Controller's latent.
            soft_scale: weight of that blend outside the anatomy (1 inside); one value or one per item.
            guidance_scale: classifier-free guidance of stage 2 (<= 1 turns it off); one value or one per item.
            eta: DDIM eta (1.0 is the reference's stochastic DDIM); ignored by the other samplers.
            sampler: the scheduler of both stages, built from the pipeline's scheduler config for each call:
                ``"ddim"`` (the reference's sampler), ``"dpmsolver++"`` (DPM-Solver++ 2M),
                ``"dpmsolver++-sde"`` (SDE-DPM-Solver++ 2M, the stochastic analogue of eta = 1; its noise
                comes from each item's own generator) or ``"unipc"`` (UniPC-2, its corrector off on blended steps).
            step_grid: ``"exact"`` (``num_inference_steps`` steps) or ``"reference"`` (DDIM only: the reference's
                grid, every 1000 // ``num_inference_steps`` timesteps, e.g. 31 steps for 30).
            guidance_interval: ``(start, stop)``, the fractions of stage 2's steps (noisiest first) where guidance
                runs; elsewhere a step costs one UNet evaluation. ``(0, 1)``: every step, as the reference.
            healthy_guidance_scale: classifier-free guidance of stage 1 away from every finding the model knows:
                the healthy image's empty prompt is guided against :meth:`findings_prompt` as the negative prompt,
                at twice the UNet evaluations of stage 1. 1 or less turns it off, as the reference.
            Steps, anatomy steps and eta may also be given per item, but must then be equal: a batch
            shares one scheduler.
            latent_handoff: give stage 2 the stage-1 latent instead of decoding and re-encoding it.
            restore_outside: keep the healthy twin's pixels away from the pathology mask: the final image is the
                twin plus stage 2's change over the decoder's rendering of the twin's latent, in full on the mask
                and fading to nothing a latent cell away (:func:`restore_weight`). The decoder's group norms
                otherwise shift the whole image a little; False gives the reference's output.
            autocast_dtype: e.g. ``torch.bfloat16`` on CUDA; None runs in the weights' dtype.
            callback_on_step_end: called after every sampler step as ``(pipeline, step, timestep, kwargs)`` with
                ``kwargs = {"latents": ..., "stage": 1 or 2}`` (stage 2 holds only the items with a pathology);
                it may return ``{"latents": ...}`` to replace them.
        """
        check_sampler(sampler)
        if step_grid not in STEP_GRIDS:
            raise XRealError(f"step_grid: unknown grid {step_grid!r}; choose one of {', '.join(STEP_GRIDS)}")
        start, stop = (float(x) for x in guidance_interval)
        if not 0.0 <= start < stop <= 1.0:
            raise XRealError(f"guidance_interval: expected 0 <= start < stop <= 1, got {guidance_interval!r}")
        n = len(anatomy)
        num_inference_steps = _shared("num_inference_steps", num_inference_steps, n)
        anatomy_steps = _shared("anatomy_steps", anatomy_steps, n)
        eta = _shared("eta", eta, n)
        items = self._check_inputs(anatomy, prompts, seeds, pathology_masks, num_inference_steps, anatomy_steps)
        soft_scales = _per_item("soft_scale", soft_scale, n)
        if not ((soft_scales >= 0) & (soft_scales <= 1)).all():
            raise XRealError(f"soft_scale must lie in [0, 1], got {soft_scale!r}")
        items += [soft_scales, _per_item("guidance_scale", guidance_scale, n)]
        settings = dict(
            num_inference_steps=num_inference_steps,
            anatomy_steps=anatomy_steps,
            eta=eta,
            sampler=sampler,
            step_grid=step_grid,
            guidance_interval=(start, stop),
            healthy_guidance_scale=float(healthy_guidance_scale),
            latent_handoff=latent_handoff,
            restore_outside=restore_outside,
            autocast_dtype=autocast_dtype,
            callback=callback_on_step_end,
        )
        return self._generate_splitting_on_oom(items, settings)

    def _generate_splitting_on_oom(self, items, settings) -> XRealPipelineOutput:
        try:
            return self._generate(*items, **settings)
        except torch.OutOfMemoryError:
            if len(items[0]) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(items[0]) // 2
            parts = [
                self._generate_splitting_on_oom([x[:half] for x in items], settings),
                self._generate_splitting_on_oom([x[half:] for x in items], settings),
            ]
            return XRealPipelineOutput(
                *(np.concatenate([getattr(p, f) for p in parts]) for f in XRealPipelineOutput.__dataclass_fields__)
            )

    def _check_inputs(self, anatomy, prompts, seeds, pathology_masks, steps, anatomy_steps):
        n = len(anatomy)
        masks = list(pathology_masks) if pathology_masks is not None else [None] * n
        if not (len(prompts) == len(seeds) == len(masks) == n) or n == 0:
            raise XRealError(
                f"one anatomy, prompt, seed and pathology mask per item: got {n} anatomies, {len(prompts)} prompts, "
                f"{len(seeds)} seeds and {len(masks)} masks"
            )
        if not 1 <= steps <= self.scheduler.config.num_train_timesteps:
            raise XRealError(f"num_inference_steps must be between 1 and 1000, got {steps}")
        if not 0 <= anatomy_steps <= steps:
            raise XRealError(f"anatomy_steps must be between 0 and num_inference_steps ({steps}), got {anatomy_steps}")
        texts, label_maps, pathology = [], [], []
        for i, (prompt, label_map, mask) in enumerate(zip(prompts, anatomy, masks, strict=True)):
            text = prompt if isinstance(prompt, str) else prompt_for(prompt)
            label_map = check_label_map(label_map, where=f"item {i} anatomy")
            label_maps.append(self.conditioning_anatomy(label_map))
            if (mask is None) != (text == ""):
                raise XRealError(
                    f"item {i}: a pathology prompt needs a pathology mask and a healthy ({NO_FINDING}) item takes "
                    f"none; got prompt {text!r} and {'no mask' if mask is None else 'a mask'}"
                )
            if mask is not None:
                mask = check_binary_mask(mask, where=f"item {i} pathology mask")
                if mask.shape != label_map.shape:
                    raise XRealError(
                        f"item {i}: pathology mask is {mask.shape[0]}x{mask.shape[1]} but its anatomy is "
                        f"{label_map.shape[0]}x{label_map.shape[1]}"
                    )
                mask = self.conditioning_mask(mask)
            texts.append(text)
            pathology.append(mask)
        return [np.stack(label_maps), texts, [int(s) for s in seeds], pathology]

    def _generate(
        self,
        label_maps,
        texts,
        seeds,
        pathology,
        soft_scales,
        guidance_scales,
        *,
        num_inference_steps,
        anatomy_steps,
        eta,
        sampler="ddim",
        step_grid="exact",
        guidance_interval=(0.0, 1.0),
        healthy_guidance_scale=1.0,
        latent_handoff,
        restore_outside,
        autocast_dtype,
        callback,
    ) -> XRealPipelineOutput:
        device = self.device
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        latent_size = self.unet.config.sample_size
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            scheduler = self.make_scheduler(sampler, num_inference_steps, step_grid)
            dtype = self.unet.dtype

            # Stage 1: anatomy control, empty prompt, guided away from the findings when asked.
            maps = torch.from_numpy(label_maps).to(device)
            z_anatomy = self.encode(self.vae, self.anatomy_prior(maps), generators).to(dtype)
            soft = np.stack([self.anatomy_blend(m, s) for m, s in zip(label_maps, soft_scales, strict=True)])
            soft = torch.from_numpy(soft).to(device=device, dtype=dtype)[:, None]
            empty = self.encode_prompt([""] * len(texts)).to(dtype)
            start = self._noise(generators, z_anatomy) * scheduler.init_noise_sigma
            healthy_scale = torch.full((len(texts),), healthy_guidance_scale)
            negative = None
            if healthy_guidance_scale > 1.0:
                negative = self.encode_prompt([self.findings_prompt()] * len(texts)).to(dtype)
            healthy_latents = self._denoise(
                start, z_anatomy, soft, anatomy_steps, empty, negative, healthy_scale, eta, generators, 1, callback,
                scheduler,
            )  # fmt: skip
            healthy = self.decode(healthy_latents)

            # Stage 2: pathology control, only where a pathology was asked for.
            final = healthy.clone()
            todo = [i for i, mask in enumerate(pathology) if mask is not None]
            if todo:
                index = torch.tensor(todo, device=device)
                sub_generators = [generators[i] for i in todo]
                if latent_handoff:
                    z_healthy = healthy_latents[index]
                else:
                    z_healthy = self.encode(self.vae, healthy[index], sub_generators)
                masks = np.stack([resize_mask(pathology[i], latent_size) for i in todo])
                keep = 1.0 - torch.from_numpy(masks).to(device=device, dtype=dtype)[:, None]
                context = self.encode_prompt([texts[i] for i in todo]).to(dtype)
                scheduler = self.make_scheduler(sampler, num_inference_steps, step_grid)  # solvers start afresh
                start = self._noise(sub_generators, z_healthy) * scheduler.init_noise_sigma
                latents = self._denoise(
                    start,
                    z_healthy.to(dtype),
                    keep,
                    len(scheduler.timesteps),
                    context,
                    empty[index],
                    torch.from_numpy(guidance_scales[todo]),
                    eta,
                    sub_generators,
                    2,
                    callback,
                    scheduler,
                    guidance_interval,
                )
                generated = self.decode(latents).to(final.dtype)
                if restore_outside:
                    # The twin plus stage 2's change over the decoder's own rendering of the twin: where stage 2
                    # changed no latent, the twin's pixels stay, rather than its slightly shifted reconstruction.
                    weight = torch.from_numpy(np.stack([restore_weight(pathology[i], latent_size) for i in todo]))
                    weight = weight.to(device=device, dtype=final.dtype)[:, None]
                    twin = healthy[index]
                    rendered = twin if latent_handoff else self.decode(z_healthy.to(dtype)).to(final.dtype)
                    generated = twin + weight * (generated - rendered)
                final[index] = generated

        to_numpy = lambda x: self.to_unit_range(x.float()).mean(dim=1).cpu().numpy()  # noqa: E731
        has = np.array([mask is not None for mask in pathology])
        return XRealPipelineOutput(
            images=to_numpy(final),
            healthy_images=to_numpy(healthy),
            has_pathology=has,
            healthy_latents=healthy_latents.float().cpu().numpy(),
        )
