"""What the first-stage autoencoder keeps: a detail run (L1 + KL + perceptual + patch discriminator), then its
decoder fine-tuned with the texture term, against another autoencoder.

Trains the autoencoder with the detail loss on a phantom training index and
fine-tunes its decoder as ``xreal train demo`` does (or reuses finished runs:
``--work`` holds ``autoencoder/`` and ``decoder/``, as a ``xreal train demo``
work folder does), and compares both with another autoencoder (by default the
demo bundle's) on held-out phantoms: reconstruction PSNR, the lungs'
high-frequency power over the originals', and how often an independently
trained phantom classifier (benchmarks/control_phantom.py's, cached) detects
each finding on the reconstructions against the originals.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from xreal.evaluate.metrics import lung_detail_power
from xreal.judges.phantom_judges import classify
from xreal.model.autoencoder_loss import DetailLoss
from xreal.model.bundle import DEMO_BUNDLE, PRESETS, build_autoencoder, get_preset
from xreal.model.training import DECODER_DETAIL, DEMO_SCHEDULE, TrainingRun, load_training_set, train_autoencoder
from xreal.phantom import renderer as phantom

HELD_OUT_SEED = 999


@torch.no_grad()
def reconstruct(autoencoder: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).float()[:, None].expand(-1, 3, -1, -1) * 2.0 - 1.0
    out = [
        autoencoder.decode(autoencoder.encode(x[i : i + 64]).latent_dist.mode()).sample.mean(1)
        for i in range(0, len(x), 64)
    ]
    return ((torch.cat(out) + 1.0) / 2.0).clamp(0, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 10 * np.log10(1.0 / ((a - b) ** 2).mean(axis=(1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", type=Path, default=Path("build/demo-phantom"), help="phantom training index")
    parser.add_argument(
        "--work", type=Path, default=Path("build/autoencoder-detail"), help="folder of the two runs (resumed)"
    )
    parser.add_argument("--steps", type=int, default=DEMO_SCHEDULE["autoencoder"][0])
    parser.add_argument("--decoder-steps", type=int, default=DEMO_SCHEDULE["decoder"][0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="the detail run's sizes")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=DEMO_BUNDLE / "vae",
        help="autoencoder to compare with: a diffusers folder, or a training checkpoint's model.safetensors",
    )
    parser.add_argument("--count", type=int, default=280, help="held-out phantoms, 40 per finding")
    parser.add_argument("--cache", type=Path, default=Path("build/phantom-judges"))
    args = parser.parse_args()

    from control_phantom import judges

    if args.baseline.suffix == ".safetensors":
        baseline = build_autoencoder(get_preset("demo"))
        baseline.load_state_dict(load_file(args.baseline))
    else:
        baseline = AutoencoderKL.from_pretrained(args.baseline, torch_dtype=torch.float32)
    baseline.eval()
    size = baseline.config.sample_size
    data = load_training_set(args.index, size)
    run = TrainingRun(args.work / "autoencoder", steps=args.steps, batch_size=args.batch_size)
    started = time.perf_counter()
    detailed = train_autoencoder(data, run, preset=args.preset, detail=DetailLoss()).eval()
    print(f"detail run: {args.steps} steps, {run.log['seconds']} s in all ({time.perf_counter() - started:.0f} s now)")
    decoder_run = TrainingRun(args.work / "decoder", steps=args.decoder_steps, batch_size=args.batch_size)
    started = time.perf_counter()
    tuned = train_autoencoder(
        data, decoder_run, preset=args.preset, detail=DECODER_DETAIL, fine_tune=detailed, perceptual_from=run.out
    ).eval()
    print(
        f"decoder fine-tuned: {args.decoder_steps} steps, {decoder_run.log['seconds']} s in all "
        f"({time.perf_counter() - started:.0f} s now)"
    )

    classifier = judges(args.cache, size).classifier
    labels = [phantom.PHANTOM_PATHOLOGIES[i % 7] for i in range(args.count)]
    cases = phantom.generate(args.count, size, seed=HELD_OUT_SEED, pathologies=[[lab] for lab in labels])
    real_power = lung_detail_power(cases.images, cases.anatomy, sigma=size / 64)
    on_real = classify(classifier, cases.images, 2 * size)
    rows = {"original": (cases.images, on_real)}
    for name, model in ((f"baseline ({args.baseline.parent.name}/{args.baseline.name})", baseline),
                        ("detail run", detailed), ("+ decoder fine-tuned", tuned)):  # fmt: skip
        images = reconstruct(model, cases.images)
        rows[name] = (images, classify(classifier, images, 2 * size))
    print(f"\n{args.count} held-out phantoms (seed {HELD_OUT_SEED}), {size} px")
    header = "".join(f"{lab[:12]:>13s}" for lab in phantom.PHANTOM_PATHOLOGIES)
    print(f"  {'':26s} {'PSNR dB':>8s} {'lung HF':>8s} {'detected':>9s}{header}")
    for name, (images, scores) in rows.items():
        per_label = [
            np.mean([scores[lab][i] > 0.5 for i, want in enumerate(labels) if want == lab])
            for lab in phantom.PHANTOM_PATHOLOGIES
        ]
        overall = np.mean([scores[lab][i] > 0.5 for i, lab in enumerate(labels)])
        quality = psnr(images, cases.images).mean() if name != "original" else float("inf")
        power = lung_detail_power(images, cases.anatomy, sigma=size / 64).mean() / real_power.mean()
        print(f"  {name:26s} {quality:8.2f} {power:8.2f} {overall:9.2f}" + "".join(f"{v:13.2f}" for v in per_label))


if __name__ == "__main__":
    main()
