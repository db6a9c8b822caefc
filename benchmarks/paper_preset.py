"""The GPU ladder: images per hour of the XReal sampler, from the reference's batch-1 loop up, one change per rung.

Every rung adds one thing to the rung before it; all run the same sampling
(``--preset`` size with random weights: timing does not depend on the weights;
``--steps`` + ``--steps`` DDIM steps on the reference's step grid, anatomy steps
half of them, guidance 7, eta 1, a pathology on every image, so stage 2 runs
for all) over the same anatomies, except the last rung, which changes the
sampling settings:

  1 reference      the reference's loop (``reference_sample``): batch 1, float32, classic (non-fused) attention
  2 batched        the batched pipeline, still float32 and classic attention (batching alone)
  3 sdpa           + PyTorch's fused attention (``AttnProcessor2_0``: flash / memory-efficient on a GPU)
  4 bf16           + bfloat16 autocast
  5 channels-last  + channels_last memory format for the UNet and both autoencoders
  6 compile        + ``torch.compile`` of the UNet (GPU: max-autotune without CUDA graphs; CPU: default mode)
  7 cuda-graphs    + CUDA graphs (max-autotune, which records them; ``reduce-overhead`` after a default-mode
                   rung 6); CUDA only, printed as skipped elsewhere
  8 fast           the fast preset (``SPEEDS["fast"]``: its sampler, steps, anatomy steps, guidance interval) on
                   the highest of rungs 2-7 selected and runnable here, or on ``--fast-on RUNG``'s configuration
                   (on an H200 channels_last made both presets slower: ``--fast-on bf16`` is the fastest there,
                   and what ``xreal generate --precision bfloat16`` runs)

The batched rungs ask the pipeline for ``step_grid="reference"``, the reference's
DDIM grid (every ``1000 // steps`` timesteps: 31 steps for 30, 63 for 60), so
rungs 1-7 run the same UNet evaluations per image at any ``--steps`` (the
table's "evals" column; every run checks the sampler steps it took against
it). Warm-up (and compilation, at ``--warmup-steps``)
is untimed; then ``--repeats`` interleaved passes over the rungs and the
medians are compared. Progress goes to stderr as it happens, the table to
stdout at the end.

On this CPU (2 minutes, nearly all of it compiling; ``--rungs 1,2,3,4,5,7,8`` takes seconds):
    python benchmarks/paper_preset.py --preset demo --steps 4 --images 2 --batch 4 --repeats 2
On a GPU (the paper preset, 100 steps; minutes, several of them compiling):
    python benchmarks/paper_preset.py --device cuda --steps 100 --images 2 --batch 16 --repeats 2
(``--rungs 1,3,4,8`` or ``--rungs reference,sdpa,bf16,fast`` runs a few rungs only; ``--batch auto`` takes
the largest batch the float32 classic-attention model fits on the GPU.)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from sampler_throughput import requests, timed

from xreal.core.labels import Anatomy, prompt_for
from xreal.core.masks import resize_label_map, resize_mask
from xreal.core.settings import NUM_TRAIN_TIMESTEPS, SPEEDS, SamplerSettings, reference_grid
from xreal.model.bundle import build_pipeline
from xreal.model.reference import REFERENCE_ANATOMY_LEVELS
from xreal.model.reference_sampler import ReferenceParts, ddim_parameters, reference_sample
from xreal.model.sampling import label_map_image


@dataclass(frozen=True)
class Config:
    """What one rung runs."""

    batched: bool = False
    attention: str = "classic"  # "classic" (AttnProcessor) or "sdpa" (AttnProcessor2_0)
    autocast: torch.dtype | None = None
    channels_last: bool = False
    compile_mode: str | None = None  # torch.compile mode of the UNet; None: eager
    fast: bool = False  # SPEEDS["fast"] instead of the reference settings
    on: str = ""  # the fast rung: which rung's configuration it runs on

    def describe(self, settings: SamplerSettings, fp32: str = "fp32") -> str:
        precision = "bf16 autocast" if self.autocast is torch.bfloat16 else fp32
        layout = ", channels_last" if self.channels_last else ""
        compiled = f"compile {self.compile_mode}" if self.compile_mode else "eager"
        grid = " (reference grid)" if settings.step_grid == "reference" else ""
        sampling = f"{settings.sampler} {settings.steps}+{settings.steps}{grid}"
        return ", ".join(filter(None, [precision, f"{self.attention} attention{layout}", compiled, sampling, self.on]))


@dataclass(frozen=True)
class Context:
    cuda: bool
    compile_mode: str  # rung 6's mode


# Rung 7: the same compilation with CUDA graphs on top.
WITH_CUDA_GRAPHS = {"max-autotune-no-cudagraphs": "max-autotune", "default": "reduce-overhead"}


def cuda_graphs(config: Config, context: Context) -> Config | str:
    if not context.cuda:
        return "skipped (CUDA only)"
    return replace(config, compile_mode=WITH_CUDA_GRAPHS.get(context.compile_mode, context.compile_mode))


# name: the change to the previous rung's configuration, or the reason it does not run here.
# (The fast rung's "previous" is the best configuration that ran; see ``ladder``.)
RUNGS: dict[str, Callable[[Config, Context], Config | str]] = {
    "reference": lambda config, context: Config(),
    "batched": lambda config, context: replace(config, batched=True),
    "sdpa": lambda config, context: replace(config, attention="sdpa"),
    "bf16": lambda config, context: replace(config, autocast=torch.bfloat16),
    "channels-last": lambda config, context: replace(config, channels_last=True),
    "compile": lambda config, context: replace(config, compile_mode=context.compile_mode),
    "cuda-graphs": cuda_graphs,
    "fast": lambda config, context: replace(config, fast=True),
}


def ladder(selected: list[str], context: Context, fast_on: str | None = None) -> dict[str, Config | str]:
    """Every rung's configuration (or why it is skipped), each on top of the one before; the fast rung on
    ``fast_on``'s configuration, or by default on the highest batched rung selected that runs here."""
    configs: dict[str, Config | str] = {}
    previous = Config()
    for name, change in RUNGS.items():
        if name == "fast":
            ran = [n for n, c in configs.items() if isinstance(c, Config) and c.batched]
            if fast_on is not None and fast_on not in ran:
                choices = ", ".join(ran)
                raise SystemExit(f"--fast-on {fast_on}: not a batched rung that runs here; choose one of {choices}")
            base = [fast_on] if fast_on else [n for n in ran if n in selected] or ran
            previous = replace(configs[base[-1]], on=f"on rung {list(RUNGS).index(base[-1]) + 1}'s configuration")
        configs[name] = change(previous, context)
        if isinstance(configs[name], Config):
            previous = configs[name]
    return configs


def select(spec: str, option: str = "--rungs") -> list[str]:
    """``all``, or rungs by number or name, e.g. ``1,3,4,8`` or ``reference,sdpa``; in ladder order."""
    names = list(RUNGS)
    if spec == "all":
        return names
    wanted = set()
    for item in spec.split(","):
        item = item.strip()
        name = names[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(names) else item
        if name not in RUNGS:
            raise SystemExit(f"{option}: unknown rung {item!r}; choose 1-{len(names)} or {', '.join(names)}")
        wanted.add(name)
    return [n for n in names if n in wanted]


class Models:
    """The pipeline in each configuration's attention and memory format, sharing weights where they can be
    shared: attention processors and channels_last change the modules in place, so those get a copy of the
    UNet and autoencoders (the text encoder is always shared); compiled UNets wrap the copy's UNet."""

    def __init__(self, pipe):
        self.pipes = {("sdpa", False): pipe}
        self.compiled: dict[tuple[str, bool, str], torch.nn.Module] = {}

    def pipeline(self, config: Config):
        key = (config.attention, config.channels_last)
        if key not in self.pipes:
            pipe = copy.copy(self.pipes["sdpa", False])
            models = {n: copy.deepcopy(getattr(pipe, n)) for n in ("unet", "vae", "anatomy_controller")}
            for model in models.values():
                model.set_attn_processor(AttnProcessor() if config.attention == "classic" else AttnProcessor2_0())
                if config.channels_last:
                    model.to(memory_format=torch.channels_last)
            pipe.register_modules(**models)
            self.pipes[key] = pipe
        pipe = self.pipes[key]
        if config.compile_mode is None:
            return pipe
        key = (*key, config.compile_mode)
        if key not in self.compiled:
            # One graph per input shape (the stage-1 batch, the doubled guided batch): what CUDA graphs need.
            self.compiled[key] = torch.compile(pipe.unet, mode=config.compile_mode, dynamic=False)
        compiled = copy.copy(pipe)
        compiled.register_modules(unet=self.compiled[key])
        return compiled


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


def grid_fits(steps: int) -> bool:
    """Whether the reference's DDIM grid for ``steps`` stays within the training timesteps (3 would reach 1000)."""
    return reference_grid(steps)[0] < NUM_TRAIN_TIMESTEPS


def reduced(settings: SamplerSettings, steps: int) -> SamplerSettings:
    """The same sampling at fewer steps (warm-up: every shape and kernel, at a fraction of the cost)."""
    steps = max(1, min(steps, settings.steps))
    while settings.step_grid == "reference" and not grid_fits(steps):
        steps -= 1
    return settings.with_overrides(steps=steps, anatomy_steps=min(settings.anatomy_steps, steps // 2))


def check_steps(ran: int, expected: int) -> None:
    """The sampler steps a run took, both stages, against the count its settings (and "evals") promise."""
    if ran != expected:
        raise RuntimeError(f"ran {ran} sampler steps, expected {expected}: the rungs would not compare like for like")


def float32_precision(cuda: bool) -> tuple[str, str]:
    """The header's account of float32 arithmetic, and the rows' name for it (NVIDIA GPUs may run it as TF32)."""
    header = f"float32 matmul precision {torch.get_float32_matmul_precision()!r}"
    if not cuda:
        return header, "fp32"
    tf32 = {"matmuls": torch.backends.cuda.matmul.allow_tf32, "convolutions": torch.backends.cudnn.allow_tf32}
    header += ", TF32 " + ", ".join(f"{'on' if on else 'off'} for fp32 {ops}" for ops, on in tf32.items())
    used = [ops for ops, on in tf32.items() if on]
    return header, f"fp32 (TF32 {' and '.join(used)})" if used else "fp32"


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("cudagraph_skips", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps per stage (the reference: 100)")
    parser.add_argument("--images", type=int, default=2, help="images per timed pass of the reference loop")
    parser.add_argument("--batch", default="2", help="pipeline batch size, or 'auto' (GPU: the largest that fits)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved passes; medians are compared")
    parser.add_argument("--rungs", default="all", help="'all', or numbers or names, e.g. 1,3,4,8")
    parser.add_argument("--warmup-steps", type=int, default=4, help="steps per stage of the untimed warm-up")
    parser.add_argument(
        "--compile-mode", default=None, help="rung 6's mode (default: max-autotune-no-cudagraphs on CUDA, else default)"
    )
    parser.add_argument(
        "--fast-on",
        default=None,
        help="the rung whose configuration the fast preset runs on, e.g. bf16 or 4 (default: the highest batched "
        "rung selected)",
    )
    args = parser.parse_args()
    if not 1 <= args.steps <= NUM_TRAIN_TIMESTEPS or not grid_fits(args.steps):
        parser.error(f"--steps {args.steps}: the reference's DDIM grid would run past t = {NUM_TRAIN_TIMESTEPS - 1}")
    cuda = args.device.startswith("cuda")
    selected = select(args.rungs)
    compile_mode = args.compile_mode or ("max-autotune-no-cudagraphs" if cuda else "default")
    fast_on = select(args.fast_on, "--fast-on") if args.fast_on else [None]
    if len(fast_on) != 1:
        parser.error(f"--fast-on {args.fast_on}: name one rung")
    configs = ladder(selected, Context(cuda, compile_mode), fast_on[0])

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    torch.manual_seed(0)
    levels = [REFERENCE_ANATOMY_LEVELS[a] for a in sorted(Anatomy)]
    pipe = build_pipeline(args.preset, value_range=(0.0, 1.0), sample_posterior=True, anatomy_levels=levels)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    models = Models(pipe)
    if args.batch == "auto":
        # Probed with the heaviest rung (float32, classic attention), so that every rung runs the same batch.
        heaviest = models.pipeline(Config(batched=True))
        batch = largest_batch(heaviest, [8, 16, 24, 32, 48, 64, 96, 128], None) if cuda else 4
    else:
        batch = int(args.batch)
    # Every image with a pathology: the full two-stage cost.
    anatomy, prompts, seeds, masks = requests(max(batch, args.images) * 4, pipe.config.image_size)
    with_pathology = [i for i, m in enumerate(masks) if m is not None]
    pick = lambda items, n: [items[i] for i in with_pathology[:n]]  # noqa: E731
    ref_inputs = reference_inputs(pipe, pick(anatomy, args.images), pick(masks, args.images))
    ref_prompts = [prompt_for(p) for p in pick(prompts, args.images)]
    batch_args = (pick(anatomy, batch), pick(prompts, batch), pick(seeds, batch), pick(masks, batch))
    reference = SamplerSettings(steps=args.steps, anatomy_steps=args.steps // 2, step_grid="reference")

    def make_run(config: Config):
        """(run(settings), images per run, UNet evaluations per image, settings) of one configuration."""
        settings = SPEEDS["fast"] if config.fast else reference
        if not config.batched:
            parts = ReferenceParts.from_pipeline(models.pipeline(config))

            def loop(settings):
                grid = len(ddim_parameters(pipe.scheduler.alphas_cumprod, settings.steps, settings.eta)[0])
                for (image, soft, pathology), prompt in zip(ref_inputs, ref_prompts, strict=True):
                    generator = torch.Generator().manual_seed(0)
                    sample = reference_sample(
                        parts, image, soft, pathology, prompt, generator, settings.steps, settings.anatomy_steps,
                        settings.guidance_scale, settings.eta,
                    )  # fmt: skip
                    check_steps(len(sample.trace), 2 * grid)

            # The reference's own grid: stage 1, then stage 2 with two UNet passes a step.
            grid = len(ddim_parameters(pipe.scheduler.alphas_cumprod, settings.steps, settings.eta)[0])
            return loop, len(ref_inputs), 3 * grid, settings
        pipeline = models.pipeline(config)

        def batched(settings):
            steps = []  # the stage of every sampler step
            pipeline(
                *batch_args,
                **settings.shared_arguments(),
                guidance_scale=settings.guidance_scale,
                restore_outside=False,
                autocast_dtype=config.autocast,
                callback_on_step_end=lambda pipe, i, t, state: steps.append(state["stage"]),
            )
            check_steps(len(steps), 2 * settings.steps_run)

        return batched, batch, settings.unet_evaluations(has_pathology=True), settings

    runs = {name: make_run(configs[name]) for name in selected if isinstance(configs[name], Config)}
    notes: dict[str, str] = {}
    for name, (fn, _, _, settings) in runs.items():  # warm-up (and compilation) outside the timing
        start, skips = time.perf_counter(), cudagraph_skips()
        fn(reduced(settings, args.warmup_steps))
        if cudagraph_skips() > skips:
            notes[name] = f"; CUDA graphs skipped {cudagraph_skips() - skips}x (see the log)"
        log(f"warm-up {name}: {time.perf_counter() - start:.1f} s")

    seconds: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name, (fn, images, _, settings) in runs.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds[name].append(timed(lambda fn=fn, settings=settings: fn(settings), args.device) / images)
            if cuda:
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            log(f"pass {repeat + 1}/{args.repeats} {name}: {seconds[name][-1]:.3f} s/image")

    precision, fp32 = float32_precision(cuda)
    device = torch.cuda.get_device_name(args.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{args.preset} preset (random weights), {pipe.config.image_size} px; DDIM {args.steps} + {args.steps} steps "
        f"on the reference grid, anatomy steps {reference.anatomy_steps}, guidance {reference.guidance_scale:g}, "
        f"eta {reference.eta:g}, a pathology on every image"
    )
    print(
        f"{device}; batch {batch} (rung 1: batch 1, {len(ref_inputs)} image(s) a pass); {precision}; "
        f"median of {args.repeats} interleaved passes, warm-up untimed"
    )
    base_name = "reference" if "reference" in runs else next(iter(runs), None)
    if base_name != "reference":
        print(f"(rung 1 not run: ratios are to rung {list(RUNGS).index(base_name) + 1} {base_name})")
    base = statistics.median(seconds[base_name]) if base_name else float("nan")
    print(
        f"{'rung':<16} {'s/image':>9} {'images/hour':>12} {'vs 1':>8} {'peak GiB':>9} {'evals':>6}  what ran"
    )  # fmt: skip
    for name in selected:
        label = f"{list(RUNGS).index(name) + 1} {name}"
        if name not in runs:
            print(f"{label:<16} {configs[name]}")
            continue
        _, images, evals, settings = runs[name]
        config = configs[name]
        per_image = statistics.median(seconds[name])
        peak = f"{peaks[name]:.2f}" if name in peaks else "-"
        what = f"batch {1 if not config.batched else batch}, {config.describe(settings, fp32)}{notes.get(name, '')}"
        print(
            f"{label:<16} {per_image:>9.3f} {3600 / per_image:>12.1f} {base / per_image:>7.2f}x {peak:>9} "
            f"{evals:>6}  {what}"
        )


if __name__ == "__main__":
    main()
