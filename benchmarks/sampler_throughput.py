"""Images per second of the batched XReal pipeline against a batch-1 loop, side by side in one run.

Prints the ratio batched / loop, with the stage-1 -> stage-2 latent hand-off
off (the reference's decode and re-encode) and on. Runs the bundled demo model
unless ``--preset`` asks for freshly initialised weights of another size
(throughput does not depend on the weights), e.g. ``--preset paper --device
cuda --dtype bf16`` on a GPU machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from xreal.model.bundle import build_pipeline, load_pipeline
from xreal.phantom import renderer as phantom


def requests(count: int, size: int):
    labels = [["Lung Lesion"], ["Pleural Effusion"], [], ["Consolidation"]] * (count // 4 + 1)
    cases = phantom.generate(count, size, seed=7, pathologies=labels[:count])
    masks = [case.pathology_masks[case.labels[0]] if case.pathology_masks else None for case in cases]
    return cases.anatomy, [list(c.labels) for c in cases], list(range(count)), masks


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default=None, help="random weights at this preset instead of the demo bundle")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per stage (reference: 100)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are printed")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = build_pipeline(args.preset) if args.preset else load_pipeline()
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    anatomy, prompts, seeds, masks = requests(args.batch_size, pipe.config.image_size)
    settings = dict(num_inference_steps=args.steps, anatomy_steps=args.steps // 2, autocast_dtype=autocast)
    n = args.batch_size
    pipe(anatomy[:2], prompts[:2], seeds[:2], masks[:2], **settings)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    print(
        f"median of {args.repeats} interleaved runs; preset {pipe.config.preset}, {pipe.config.image_size} px, "
        f"{args.steps} steps/stage, "
        f"batch {n} ({sum(m is not None for m in masks)} with a pathology), {args.device} {args.dtype}"
    )
    # Interleave the four measurements and repeat them, so machine noise hits all alike; report medians.
    times: dict[tuple[bool, str], list[float]] = {}
    for _ in range(args.repeats):
        for handoff in (False, True):
            run = dict(settings, latent_handoff=handoff)
            times.setdefault((handoff, "batched"), []).append(
                timed(lambda run=run: pipe(anatomy, prompts, seeds, masks, **run), args.device)
            )
            times.setdefault((handoff, "loop"), []).append(
                timed(
                    lambda run=run: [
                        pipe(anatomy[i : i + 1], prompts[i : i + 1], seeds[i : i + 1], masks[i : i + 1], **run)
                        for i in range(n)
                    ],
                    args.device,
                )
            )
    rates = {}
    for handoff in (False, True):
        batched, loop = (float(np.median(times[(handoff, kind)])) for kind in ("batched", "loop"))
        rates[handoff] = n / batched
        print(
            f"latent hand-off {'on ' if handoff else 'off'}: batched {n / batched:7.2f} img/s   "
            f"batch-1 loop {n / loop:7.2f} img/s   ratio {loop / batched:5.2f}x"
        )
    print(f"hand-off on / off (batched): {rates[True] / rates[False]:.3f}x")
    with_off = pipe(anatomy, prompts, seeds, masks, **settings)
    with_on = pipe(anatomy, prompts, seeds, masks, latent_handoff=True, **settings)
    changed = np.abs(with_on.images - with_off.images)[with_off.has_pathology]
    print(f"hand-off changes final pixels by mean {changed.mean():.4f}, max {changed.max():.4f} (images in [0, 1])")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
