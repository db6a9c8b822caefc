"""Can the phantom's findings be told apart? A classifier trained on phantoms, scored on other phantoms.

For each finding: the sensitivity at 95% specificity (the operating point the
judges use), and, among the false calls, the share that carry each other
finding. A finding whose false calls all carry one other finding is drawn too
much like it: no classifier, and no gate built on one, can separate the two
labels, and a generator trained on them cannot be measured on them.

The classifier is `benchmarks/control_phantom.py`'s own (``--cache`` shares it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from control_phantom import HELD_OUT_SEED, judges

from xreal.judges.phantom_judges import classify, operating_point
from xreal.phantom import renderer as phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1200, help="phantoms to score (seed 1001)")
    parser.add_argument("--cache", type=Path, default=None, help="folder keeping control_phantom's classifier")
    args = parser.parse_args()

    size = 64
    classifier = judges(args.cache, size).classifier
    cases = phantom.generate(args.count, size, seed=HELD_OUT_SEED + 2)
    scores = classify(classifier, cases.images, 2 * size)
    has = {lab: np.array([lab in labels for labels in cases.labels]) for lab in phantom.PHANTOM_PATHOLOGIES}
    print(f"{args.count} phantoms (seed {HELD_OUT_SEED + 2}), {size} px, classifier at 95% specificity")
    print(f"{'finding':18s} {'positives':>9s} {'sensitivity':>11s}  false calls carrying each other finding")
    for lab in phantom.PHANTOM_PATHOLOGIES:
        threshold = operating_point(scores[lab], has[lab])
        sensitivity = (scores[lab][has[lab]] >= threshold).mean()
        false = ~has[lab] & (scores[lab] >= threshold)
        others = [other for other in phantom.PHANTOM_PATHOLOGIES if other != lab]
        carry = ", ".join(f"{other} {has[other][false].mean():.2f}" for other in others) if false.any() else "-"
        print(f"{lab:18s} {has[lab].sum():9d} {sensitivity:11.2f}  {carry}")


if __name__ == "__main__":
    main()
