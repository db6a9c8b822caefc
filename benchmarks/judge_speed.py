"""Judge networks on a CPU: memory layout and chunk size, measured side by side in one run.

Every network of a judge set (the demo set's classifier, its feature network and segmenter; torchxrayvision's
DenseNet-121 with random weights at 224 px) scores the same phantoms four ways: the whole batch in one call or in
chunks of ``--chunk``, with the weights in PyTorch's default (NCHW) or channels-last layout. Ratios are images per
second against the first way, the layout and call judges used before. The largest difference between outputs is
printed beside each: a layout changes float32 rounding, and so may chunking on CPUs whose kernels depend on the
batch size (AVX-512: ~1e-8 on scores). Usage:
``python benchmarks/judge_speed.py [--images N] [--chunk C] [--repeats R] [--threads T]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from xreal.core.records import DEMO_BUNDLE
from xreal.core.weights import import_xrv
from xreal.judges.judging import classifier_input, in_chunks, load_judges, resize_inputs
from xreal.phantom.renderer import generate

WAYS = [("NCHW", None), ("NCHW", "chunk"), ("channels-last", None), ("channels-last", "chunk")]


def timed(network, inputs: torch.Tensor, chunk: int | None) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    with torch.inference_mode():
        outputs = in_chunks(network, inputs, chunk or len(inputs)).float()
    return time.perf_counter() - started, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="phantoms per call (default 128)")
    parser.add_argument("--chunk", type=int, default=32, help="chunk size (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes; the median counts (default 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    for name in ("images", "chunk", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    torch.set_num_threads(args.threads)

    judges = load_judges(DEMO_BUNDLE / "judges")
    images = generate(args.images, judges.image_size, seed=7).images
    inputs = classifier_input(images)
    xrv = import_xrv().models.DenseNet().eval()  # torchxrayvision's DenseNet-121, untrained (weights=None)
    networks = {
        "classifier (4 DenseNets, 128 px)": (judges.classifier, inputs),
        "feature network features2 (128 px)": (judges.feature_model.features2, inputs),
        "segmenter": (judges.segmenter, (resize_inputs(inputs, judges.segmentation_size) + 1024.0) / 2048.0),
        "torchxrayvision DenseNet-121 (224 px)": (xrv, resize_inputs(inputs, 224)),
    }
    print(f"CPU, {torch.get_num_threads()} thread(s); {args.images} phantoms a call; median of {args.repeats} passes")
    print(f"{'network':40s} {'layout':14s} {'call':10s} {'img/s':>8s} {'vs first':>9s} {'max |diff|':>11s}")
    for name, (network, x) in networks.items():
        module = getattr(network, "__self__", network)
        seconds: dict[tuple, list[float]] = {way: [] for way in WAYS}
        outputs: dict[tuple, torch.Tensor] = {}
        timed(network, x[: args.chunk], None)  # warm-up
        for _ in range(args.repeats):
            for way in WAYS:
                layout, chunk = way
                module.to(memory_format=torch.channels_last if layout == "channels-last" else torch.contiguous_format)
                took, outputs[way] = timed(network, x, args.chunk if chunk else None)
                seconds[way].append(took)
        base = sorted(seconds[WAYS[0]])[len(seconds[WAYS[0]]) // 2]
        for way in WAYS:
            median = sorted(seconds[way])[len(seconds[way]) // 2]
            diff = (outputs[way] - outputs[WAYS[0]]).abs().max().item()
            call = f"chunks {args.chunk}" if way[1] else "one batch"
            print(f"{name:40s} {way[0]:14s} {call:10s} {len(x) / median:8.1f} {base / median:8.2f}x {diff:11.2e}")


if __name__ == "__main__":
    main()
