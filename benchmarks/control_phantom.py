"""How well the demo model follows the requested anatomy and places the requested pathology.

On held-out phantom anatomies (a seed no model was trained on), prints:
- anatomy adherence: Dice of lungs and heart between the requested label map
  and the segmentation of the generated healthy image, with XReal's anatomy
  control and without it (the same backbone, plain text-to-image);
- pathology placement: the share of the change between healthy twin and final
  image that falls inside the requested pathology mask;
- pathology fidelity: how often a phantom-trained classifier detects the
  requested label on the final image, and on the healthy twin.
The segmenter (a small U-Net) and the classifier (torchxrayvision DenseNet)
are trained here on phantoms first; ``--cache DIR`` keeps them between runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from xreal.judges.phantom_judges import (
    STRUCTURES,
    PhantomSegmenter,
    anatomy_dice,
    classify,
    load_weights,
    phantom_classifier,
    save_weights,
    train_phantom_classifier,
    train_phantom_segmenter,
)
from xreal.model.bundle import load_pipeline
from xreal.phantom import renderer as phantom

HELD_OUT_SEED = 999


def judges(cache: Path | None, size: int):
    segmenter_file = cache / "segmenter.safetensors" if cache else None
    classifier_file = cache / "classifier.safetensors" if cache else None
    if segmenter_file and segmenter_file.exists() and classifier_file.exists():
        return (load_weights(PhantomSegmenter(), segmenter_file), load_weights(phantom_classifier(), classifier_file))
    segmenter, classifier = train_phantom_segmenter(size), train_phantom_classifier(size)
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        save_weights(segmenter, segmenter_file)
        save_weights(classifier, classifier_file)
    return segmenter, classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="model bundle (default: the demo bundle)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per stage (reference: 100)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=Path("build/phantom-judges"))
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.config.image_size
    segmenter, classifier = judges(args.cache, size)

    n = args.count
    labels = [phantom.PHANTOM_PATHOLOGIES[i % len(phantom.PHANTOM_PATHOLOGIES)] for i in range(n)]
    healthy_cases = phantom.generate(n, size, seed=HELD_OUT_SEED, pathologies=[[]] * n)
    diseased_cases = phantom.generate(n, size, seed=HELD_OUT_SEED, pathologies=[[label] for label in labels])
    requested = healthy_cases.anatomy
    masks = [diseased_cases.pathology_masks[label][i] for i, label in enumerate(labels)]
    seeds = list(range(n))

    started = time.perf_counter()
    controlled, uncontrolled, handed_off, reference = [], [], [], []
    settings = dict(num_inference_steps=args.steps, anatomy_steps=args.steps // 2)
    for lo in range(0, n, args.batch_size):
        hi = min(n, lo + args.batch_size)
        request = (requested[lo:hi], [[label] for label in labels[lo:hi]], seeds[lo:hi], masks[lo:hi])
        controlled.append(pipe(*request, **settings))
        handed_off.append(pipe(*request, latent_handoff=True, **settings))
        reference.append(pipe(*request, restore_outside=False, **settings))
        healthy_only = (requested[lo:hi], [""] * (hi - lo), seeds[lo:hi], [None] * (hi - lo))
        uncontrolled.append(pipe(*healthy_only, num_inference_steps=args.steps, anatomy_steps=0))
    seconds = time.perf_counter() - started
    final = np.concatenate([o.images for o in controlled])
    twin = np.concatenate([o.healthy_images for o in controlled])
    plain = np.concatenate([o.healthy_images for o in uncontrolled])

    print(
        f"{n} held-out phantom anatomies (seed {HELD_OUT_SEED}), {size} px, {args.steps} DDIM steps per stage, "
        f"generated in {seconds:.0f} s"
    )
    print("\nAnatomy adherence: Dice of the segmentation of the generated image with the requested label map")
    sanity = [anatomy_dice(a, s) for a, s in zip(requested, segmenter.segment(healthy_cases.images), strict=True)]
    with_control = [anatomy_dice(a, s) for a, s in zip(requested, segmenter.segment(twin), strict=True)]
    without = [anatomy_dice(a, s) for a, s in zip(requested, segmenter.segment(plain), strict=True)]
    print(f"  {'structure':12s} {'with control':>13s} {'without':>9s} {'segmenter on the phantoms':>27s}")
    for name in STRUCTURES:
        print(
            f"  {name:12s} {np.mean([d[name] for d in with_control]):13.3f} "
            f"{np.mean([d[name] for d in without]):9.3f} {np.mean([d[name] for d in sanity]):27.3f}"
        )
    mean = lambda rows: np.mean([np.mean(list(d.values())) for d in rows])  # noqa: E731
    print(f"  {'mean':12s} {mean(with_control):13.3f} {mean(without):9.3f} {mean(sanity):27.3f}   (goal >= 0.85)")

    print("\nPathology placement: share of |final - healthy twin| inside the requested mask (goal >= 0.80)")
    handoff_final = np.concatenate([o.images for o in handed_off])
    handoff_twin = np.concatenate([o.healthy_images for o in handed_off])
    reference_final = np.concatenate([o.images for o in reference])
    modes = {
        "reference (decode + re-encode, no restore)": (reference_final, twin),
        "default (restore outside)": (final, twin),
        "default + latent hand-off": (handoff_final, handoff_twin),
    }
    for name, (after, before) in modes.items():
        change = np.abs(after - before)
        shares, margin_shares, outside = [], [], []
        for i, mask in enumerate(masks):
            total = change[i].sum() + 1e-8
            near = ndimage.binary_dilation(mask, iterations=4)
            shares.append(change[i][mask].sum() / total)
            margin_shares.append(change[i][near].sum() / total)
            outside.append(change[i][~near].mean())
        print(
            f"  {name:42s} inside the mask mean {np.mean(shares):.3f} (median {np.median(shares):.3f}); "
            f"within 4 px (one latent cell) {np.mean(margin_shares):.3f}; "
            f"mean change farther out {np.mean(outside):.4f}"
        )

    print("\nPathology fidelity: phantom-trained classifier, probability > 0.5 (goal: detected in >= 80%)")
    on_final, on_twin = classify(classifier, final), classify(classifier, twin)
    truth = classify(classifier, diseased_cases.images)
    print(f"  {'label':18s} {'final':>6s} {'healthy twin':>13s} {'real phantom':>13s}")
    for label in phantom.PHANTOM_PATHOLOGIES:
        idx = [i for i, lab in enumerate(labels) if lab == label]
        print(
            f"  {label:18s} {np.mean(on_final[label][idx] > 0.5):6.2f} {np.mean(on_twin[label][idx] > 0.5):13.2f} "
            f"{np.mean(truth[label][idx] > 0.5):13.2f}"
        )
    detected = np.mean([on_final[label][i] > 0.5 for i, label in enumerate(labels)])
    false_twin = np.mean([on_twin[label][i] > 0.5 for i, label in enumerate(labels)])
    print(
        f"  {'all':18s} {detected:6.2f} {false_twin:13.2f} "
        f"{np.mean([truth[label][i] > 0.5 for i, label in enumerate(labels)]):13.2f}"
    )


if __name__ == "__main__":
    main()
