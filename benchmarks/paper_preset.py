"""The paper preset: images per hour of the batched pipeline against the reference's batch-1 loop, in one run.

The baseline is ``xreal.model.reference_sampler.reference_sample``: one image at a
time, float32, classic (non-fused) attention as the reference computes it,
decode and re-encode between the stages and guidance by two UNet passes. The
pipeline runs the same sampling batched, with PyTorch's fused attention and,
on a GPU, bfloat16 autocast and optionally ``torch.compile``. Both run on the
same randomly initialised paper-size model (timing does not depend on the
weights) over the same anatomies, interleaved, and the medians are compared.

On this CPU:   python benchmarks/paper_preset.py --steps 2 --images 2
On a GPU:      python benchmarks/paper_preset.py --device cuda --steps 100 --batch auto --precision bfloat16 --compile
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from diffusers.models.attention_processor import AttnProcessor
from sampler_throughput import requests, timed

from xreal.core.labels import Anatomy, prompt_for
from xreal.core.masks import resize_label_map, resize_mask
from xreal.model.bundle import build_pipeline
from xreal.model.reference import REFERENCE_ANATOMY_LEVELS
from xreal.model.reference_sampler import ReferenceParts, reference_sample
from xreal.model.sampling import label_map_image


def reference_inputs(pipe, anatomy, masks, soft_scale: float = 0.2):
    """Per image: the Anatomy Controller's input, the stage-1 blend weight and the pathology mask at latent size."""
    size, latent = pipe.config.image_size, pipe.unet.config.sample_size
    inputs = []
    for label_map, mask in zip(anatomy, masks, strict=True):
        label_map = resize_label_map(label_map, size)
        image = label_map_image(torch.from_numpy(label_map)[None], pipe.config.anatomy_levels)
        soft = torch.from_numpy(pipe.anatomy_blend(label_map, soft_scale))[None, None]
        pathology = None if mask is None else torch.from_numpy(resize_mask(mask, latent)).float()[None, None]
        inputs.append((image.to(pipe.device), soft.float().to(pipe.device), pathology))
    return inputs


def largest_batch(pipe, candidates, autocast) -> int:
    """The largest candidate batch whose heaviest calls (UNet with guidance, autoencoder at full size) fit."""
    fits = candidates[0]
    size, latent = pipe.config.image_size, pipe.unet.config.sample_size
    context = torch.zeros(1, pipe.text_encoder.config.max_positions, pipe.unet.config.cross_attention_dim)
    for batch in candidates:
        try:
            with torch.no_grad(), torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
                x = torch.randn(2 * batch, 3, latent, latent, device=pipe.device)
                pipe.unet(x, 500, encoder_hidden_states=context.to(pipe.device).expand(2 * batch, -1, -1))
                images = torch.rand(batch, 3, size, size, device=pipe.device)
                pipe.vae.decode(pipe.vae.encode(images).latent_dist.mode())
            fits = batch
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps per stage (the reference: 100)")
    parser.add_argument("--images", type=int, default=2, help="images per timed pass of the reference loop")
    parser.add_argument("--batch", default="2", help="pipeline batch size, or 'auto' (GPU: the largest that fits)")
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--compile", action="store_true", help="also time the pipeline with torch.compile")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved passes; medians are compared")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    autocast = torch.bfloat16 if args.precision == "bfloat16" else None

    torch.manual_seed(0)
    levels = [REFERENCE_ANATOMY_LEVELS[a] for a in sorted(Anatomy)]
    pipe = build_pipeline(args.preset, value_range=(0.0, 1.0), sample_posterior=True, anatomy_levels=levels)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.batch == "auto":
        batch = largest_batch(pipe, [8, 16, 24, 32, 48, 64, 96, 128], autocast) if cuda else 4
    else:
        batch = int(args.batch)
    # Every image with a pathology: the full two-stage cost.
    anatomy, prompts, seeds, masks = requests(max(batch, args.images) * 4, pipe.config.image_size)
    with_pathology = [i for i, m in enumerate(masks) if m is not None]
    pick = lambda items, n: [items[i] for i in with_pathology[:n]]  # noqa: E731
    ref_inputs = reference_inputs(pipe, pick(anatomy, args.images), pick(masks, args.images))
    ref_prompts = [prompt_for(p) for p in pick(prompts, args.images)]
    batch_args = (pick(anatomy, batch), pick(prompts, batch), pick(seeds, batch), pick(masks, batch))
    settings = dict(num_inference_steps=args.steps, anatomy_steps=args.steps // 2, restore_outside=False)
    # The baseline gets its own copy of the model, with the reference's classic attention.
    baseline = copy.deepcopy(pipe)
    for model in (baseline.unet, baseline.vae, baseline.anatomy_controller):
        model.set_attn_processor(AttnProcessor())
    parts = ReferenceParts.from_pipeline(baseline)

    def reference_loop():
        for (image, soft, pathology), prompt in zip(ref_inputs, ref_prompts, strict=True):
            generator = torch.Generator().manual_seed(0)
            reference_sample(parts, image, soft, pathology, prompt, generator, args.steps, args.steps // 2)

    def batched(pipeline=pipe):
        pipeline(*batch_args, autocast_dtype=autocast, **settings)

    runs = {"reference loop (batch 1, fp32)": (reference_loop, len(ref_inputs))}
    runs[f"pipeline (batch {batch}, {args.precision})"] = (batched, batch)
    if args.compile:
        compiled = copy.copy(pipe)  # shares the weights; only the UNet is swapped for its compiled form
        compiled.register_modules(unet=torch.compile(pipe.unet))
        runs[f"pipeline (batch {batch}, {args.precision}, torch.compile)"] = (lambda: batched(compiled), batch)

    seconds: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float] = {}
    for name, (fn, _) in runs.items():  # warm-up (and compilation) outside the timing
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fn()
        if cuda:
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    for _ in range(args.repeats):
        for name, (fn, images) in runs.items():
            seconds[name].append(timed(fn, args.device) / images)

    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{args.preset} preset, {pipe.config.image_size} px, {args.steps} + {args.steps} DDIM steps, guidance 7 "
        f"(stage 2 on every image), {device}; median of {args.repeats} interleaved passes"
    )
    baseline = statistics.median(seconds[next(iter(runs))])
    print(f"{'run':<52} {'s/image':>9} {'images/hour':>12} {'vs loop':>8} {'peak GiB':>9}")
    for name, times in seconds.items():
        per_image = statistics.median(times)
        peak = f"{peaks[name]:.2f}" if name in peaks else "-"
        print(f"{name:<52} {per_image:>9.3f} {3600 / per_image:>12.1f} {baseline / per_image:>7.2f}x {peak:>9}")


if __name__ == "__main__":
    main()
