"""How likely `make demo` is to fill every request, measured on seeds it does not use.

`make demo` is one deterministic run: whether it fills every request says little about the next manifest drawn
the same way. This draws each finding request of a manifest ``--draws`` times on other seeds (its seed plus
``--seed-offset``), exactly as a run does (the request's anatomy, labels and location; the fast preset) and judges
every draw with the bundle's judges and the default quality policy. Per request it prints the share the gate
accepts with its interval, the gate's most common reasons for rejection, and what a classifier trained apart
from the judges (control_phantom's, at 95% specificity on real phantoms) says about the draws: the requested
finding missed, or another called. From the accepted share it computes the chance that the policy's redraws fill
the request (each round draws what is still missing, up to ``max_rounds``), and their product over the
manifest. Healthy requests are left out (the gate accepts nearly all of them). Usage::

    python benchmarks/demo_fill.py [--manifest manifests/demo.parquet] [--draws 24] [--seed-offset 1000]
"""

from __future__ import annotations

import argparse
from math import comb
from pathlib import Path

import numpy as np
from control_phantom import FAST, HELD_OUT_SEED, classifier_thresholds
from control_phantom import judges as independent_judges
from gate_on_real_phantoms import independent_calls, rejection_reasons, share

from xreal.judges.judging import load_phantom_judges
from xreal.manifest.schema import load_requests
from xreal.model.bundle import DEMO_BUNDLE, load_pipeline
from xreal.phantom import renderer as phantom
from xreal.run.policy import QualityPolicy

ROOT = Path(__file__).resolve().parents[1]


def fill_chance(accepted: float, wanted: int, rounds: int) -> float:
    """The chance that ``rounds`` rounds fill ``wanted`` samples when each draw passes with ``accepted``; each
    round draws only what is still missing, as the run's plan does."""
    if wanted == 0:
        return 1.0
    if rounds == 0:
        return 0.0
    return sum(
        comb(wanted, k) * accepted**k * (1 - accepted) ** (wanted - k) * fill_chance(accepted, wanted - k, rounds - 1)
        for k in range(wanted + 1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=ROOT / "manifests" / "demo.parquet")
    parser.add_argument("--root", type=Path, default=None, help="allowed root of its files (default: its folder)")
    parser.add_argument("--model", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--draws", type=int, default=24, help="draws of each finding request")
    parser.add_argument("--seed-offset", type=int, default=1000, help="added to each request's seed")
    parser.add_argument("--cache", type=Path, default=Path("build/phantom-judges"), help="control_phantom's cache")
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.config.image_size
    judges = load_phantom_judges(args.model / "judges")
    policy = QualityPolicy()
    classifier = independent_judges(args.cache, size).classifier
    # the thresholds gate_on_real_phantoms sets on its held-out draws' calibration phantoms
    thresholds = classifier_thresholds(classifier, phantom.generate(600, size, seed=HELD_OUT_SEED + 2))
    requests = [r for r in load_requests(args.manifest, root=args.root) if r.has_pathology]

    print(
        f"{args.manifest}: each finding request drawn {args.draws} times (its seed + {args.seed_offset} onwards; "
        f"{FAST.sampler} {FAST.steps} steps), judged as a run does; policy: {policy.retries.max_rounds} rounds"
    )
    columns = ("accepted", "fills", "missed", "other")
    print(f"  {'request':24s} {'location':8s} {columns[0]:>18s} {' '.join(f'{c:>6s}' for c in columns[1:])}  reasons")
    total = 1.0
    for request in requests:
        anatomy = request.anatomy_map(size)
        mask = request.pathology_mask(anatomy.shape)
        labels = list(request.labels)
        seeds = [request.sample_seed(args.seed_offset + r) for r in range(args.draws)]
        images, scores = [], []
        for lo in range(0, args.draws, 16):
            n = len(seeds[lo : lo + 16])
            output = pipe(
                [anatomy] * n, [labels] * n, seeds[lo : lo + 16], [mask] * n, **FAST.pipeline_arguments([labels] * n)
            )
            images.append(output.images)
            scores += judges.score(output.images, np.stack([pipe.conditioning_anatomy(anatomy)] * n), [mask] * n)
        threshold = judges.realism_threshold
        decisions = [policy.decide(s, labels, judges.labels, realism_threshold=threshold) for s in scores]
        accepted = np.array([d.accepted for d in decisions])
        missed, other = independent_calls(classifier, thresholds, np.concatenate(images), [labels] * args.draws)
        fills = fill_chance(accepted.mean(), request.num_samples, policy.retries.max_rounds)
        total *= fills
        reasons = rejection_reasons(decisions)
        location = "mask" if request.pathology_mask_path is not None else "boxes"
        print(
            f"  {request.request_id:24s} {location:8s} {share(accepted):>18s} {fills:6.3f} {missed.mean():6.2f} "
            f"{other.mean():6.2f}  {', '.join(f'{r} {n}' for r, n in reasons.most_common(2))}"
        )
    print(f"  chance that one run fills every request: {total:.3f}")


if __name__ == "__main__":
    main()
