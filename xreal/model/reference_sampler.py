"""The reference implementation's sampling algorithm, one image at a time: a baseline to check and time against.

``reference_sample`` does what the reference's ``sample_controlled`` does, in
its order: the Anatomy Controller's coarse image, clamped to [0, 1]; stage 1
from a draw of the first-stage posterior with the anatomy blended in for the
first ``anatomy_steps`` steps, empty prompt, no guidance; decode, clamp; encode
again (another posterior draw) and run stage 2 with the pathology region left
free, guidance by two separate UNet passes; decode, clamp. Batch size 1, in
the weights' dtype, DDIM over the reference's uniform timesteps computed from
``alphas_cumprod`` as the reference computes them.

The model's parts are plain callables, so the same loop runs over the
pipeline's diffusers components (``ReferenceParts.from_pipeline``) or over any
other implementation of the reference's modules. Every random number comes
from ``generator``, in the order the reference draws them from torch's global
generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from xreal.core.errors import XRealError


@dataclass
class ReferenceParts:
    """What the reference's sampler touches. Images are ``[1, 3, H, W]`` in [0, 1]; latents are unscaled."""

    unet: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t [1] long, context) -> eps
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # first stage: image -> (mean, std)
    decode: Callable[[torch.Tensor], torch.Tensor]  # first stage: latent -> image
    anatomy_controller: Callable[[torch.Tensor], torch.Tensor]  # anatomy image -> coarse X-ray (posterior mode)
    text: Callable[[str], torch.Tensor]  # prompt -> context [1, T, W]
    alphas_cumprod: torch.Tensor  # the 1000 training steps' cumulative alphas
    scale_factor: float = 0.18215

    @classmethod
    def from_pipeline(cls, pipeline) -> ReferenceParts:
        """The parts of an ``XRealPipeline`` working on [0, 1] images (imported reference bundles)."""
        if list(pipeline.config.value_range) != [0.0, 1.0]:
            raise XRealError("the reference works on images in [0, 1]; this bundle's range is different")
        vae, ac, unet = pipeline.vae, pipeline.anatomy_controller, pipeline.unet

        def encode(x):
            posterior = vae.encode(x).latent_dist
            return posterior.mean, posterior.std

        return cls(
            unet=lambda x, t, context: unet(x, t, encoder_hidden_states=context).sample,
            encode=encode,
            decode=lambda z: vae.decode(z).sample,
            anatomy_controller=lambda x: ac.decode(ac.encode(x).latent_dist.mode()).sample,
            text=lambda prompt: pipeline.encode_prompt([prompt]),
            alphas_cumprod=pipeline.scheduler.alphas_cumprod,
            scale_factor=vae.config.scaling_factor,
        )


@dataclass
class ReferenceSample:
    anatomy_prior: torch.Tensor  # the Anatomy Controller's image
    healthy: torch.Tensor  # stage 1, clamped
    image: torch.Tensor  # stage 2, clamped
    trace: list[torch.Tensor]  # latents after every DDIM step, stage 1 then stage 2


def ddim_parameters(alphas_cumprod: torch.Tensor, steps: int, eta: float):
    """The reference's uniform DDIM timesteps (offset by one) and their alphas, previous alphas and sigmas."""
    ratio = len(alphas_cumprod) // steps
    timesteps = torch.arange(0, len(alphas_cumprod), ratio) + 1
    alphas_cumprod = alphas_cumprod.float().cpu()
    alphas = alphas_cumprod[timesteps]
    previous = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    sigmas = eta * torch.sqrt((1 - previous) / (1 - alphas) * (1 - alphas / previous))
    return timesteps, alphas, previous, sigmas


@torch.no_grad()
def controlled_ddim(
    parts: ReferenceParts,
    image: torch.Tensor,
    mask: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    steps: int = 100,
    eta: float = 1.0,
    blend_steps: int | None = None,
    guidance_scale: float = 1.0,
    uncond: torch.Tensor | None = None,
    trace: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One stage: DDIM from noise, the region where ``mask`` is 1 replaced by the image's noised latent before
    each of the first ``blend_steps`` steps (every step when None). Returns the decoded image, unclamped."""
    mean, std = parts.encode(image)
    z0 = (mean + std * _randn(mean, generator)) * parts.scale_factor
    timesteps, alphas, previous, sigmas = ddim_parameters(parts.alphas_cumprod, steps, eta)
    sqrt_alphas_cumprod = parts.alphas_cumprod.float().cpu().sqrt()
    sqrt_one_minus = (1 - parts.alphas_cumprod.float().cpu()).sqrt()
    x = _randn(z0, generator)
    mask = mask.to(z0)
    for i, index in enumerate(reversed(range(len(timesteps)))):
        t = timesteps[index]
        ts = torch.full((1,), int(t), device=z0.device, dtype=torch.long)
        if blend_steps is None or i < blend_steps:
            noised = sqrt_alphas_cumprod[t].item() * z0 + sqrt_one_minus[t].item() * _randn(z0, generator)
            x = noised * mask + (1.0 - mask) * x
        if uncond is not None and guidance_scale != 1.0:
            eps_uncond = parts.unet(x, ts, uncond)
            eps = parts.unet(x, ts, context)
            eps = eps_uncond + guidance_scale * (eps - eps_uncond)
        else:
            eps = parts.unet(x, ts, context)
        a, a_prev, sigma = alphas[index].item(), previous[index].item(), sigmas[index].item()
        pred_x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        x = a_prev**0.5 * pred_x0 + (1.0 - a_prev - sigma**2) ** 0.5 * eps + sigma * _randn(x, generator)
        if trace is not None:
            trace.append(x.clone())
    return parts.decode(x / parts.scale_factor)


@torch.no_grad()
def reference_sample(
    parts: ReferenceParts,
    anatomy_image: torch.Tensor,
    anatomy_mask: torch.Tensor,
    pathology_mask: torch.Tensor | None,
    prompt: str,
    generator: torch.Generator,
    steps: int = 100,
    anatomy_steps: int = 50,
    guidance_scale: float = 7.0,
    eta: float = 1.0,
) -> ReferenceSample:
    """One image, as the reference makes it.

    Args:
        anatomy_image: the Anatomy Controller's input ``[1, 3, H, W]`` (the label map's grey levels).
        anatomy_mask: the stage-1 blend weight at latent size ``[1, 1, h, w]`` (1 on the anatomy, the soft
            scale elsewhere).
        pathology_mask: where the pathology goes, at latent size ``[1, 1, h, w]``; None skips stage 2.
        prompt: the pathology text (stage 2), e.g. "Cardiomegaly".
    """
    trace: list[torch.Tensor] = []
    prior = parts.anatomy_controller(anatomy_image).clamp(0, 1)
    empty = parts.text("")
    healthy = controlled_ddim(
        parts, prior, anatomy_mask, empty, generator, steps, eta, blend_steps=anatomy_steps, trace=trace
    ).clamp(0, 1)
    if pathology_mask is None:
        return ReferenceSample(prior, healthy, healthy, trace)
    image = controlled_ddim(
        parts,
        healthy,
        1.0 - pathology_mask,
        parts.text(prompt),
        generator,
        steps,
        eta,
        guidance_scale=guidance_scale,
        uncond=empty,
        trace=trace,
    ).clamp(0, 1)
    return ReferenceSample(prior, healthy, image, trace)


def _randn(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device="cpu").to(like.device)
