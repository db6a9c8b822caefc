"""How many perfect images the quality gate throws away, and whether a looser ``absent`` check lets wrong ones in.

Each held-out real phantom is asked for exactly the labels it shows, with its own anatomy, so every rejection is
a false one. The classifier's ``absent`` check (every label not asked for must score below it; 0.5 is each
label's 95%-specificity operating point) is swept, and the same thresholds are applied to a generated run's
recorded scores, to show what each would accept there.

``--draws N`` also generates one image for each of N other phantoms' requests (their own labels, anatomy and
finding masks; the fast preset) and judges them with the bundle's judges as a run does. For each ``absent``
threshold it prints what the gate accepts and, of those, how often a classifier trained apart from the judges
(control_phantom's, at 95% specificity on other real phantoms) misses a requested label or calls one that was
not asked for, beside the same shares on the accepted real phantoms. Usage::

    python benchmarks/gate_on_real_phantoms.py [--model DIR] [--run DIR] [--count 500] [--seed 12]
        [--draws 280 --draw-seed 1049]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
import pandas as pd
from control_phantom import FAST, called, classifier_thresholds, request_masks, unasked
from control_phantom import judges as independent_judges

from xreal.core.labels import NO_FINDING
from xreal.evaluate.metrics import mean_interval
from xreal.judges.judging import load_phantom_judges
from xreal.model.bundle import DEMO_BUNDLE, load_pipeline
from xreal.phantom import renderer as phantom
from xreal.run.policy import QualityPolicy

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
SCORE_PREFIXES = ("p_", "dice_", "sanity_", "realism_")


def decisions_at(absent: float, scores: list[dict], asked: list[list[str]], judges) -> list:
    """The default policy's decisions, with ``absent`` as its absent check, on each scored image."""
    policy = QualityPolicy.from_dict({"classifier": {"absent": absent}})
    return [
        policy.decide(s, labels, judges.labels, realism_threshold=judges.realism_threshold)
        for s, labels in zip(scores, asked, strict=True)
    ]


def accepted_at(absent: float, scores: list[dict], asked: list[list[str]], judges) -> np.ndarray:
    return np.array([d.accepted for d in decisions_at(absent, scores, asked, judges)])


def rejection_reasons(decisions) -> collections.Counter:
    """How often each reason of the rejected ``decisions`` was given (without its score)."""
    return collections.Counter(
        part.split(" (")[0] for d in decisions if not d.accepted for part in d.reason.split("; ")
    )


def independent_calls(classifier, thresholds, images: np.ndarray, asked: list[list[str]]):
    """Per image: whether the independent classifier misses a requested label, and whether it calls another."""
    found = called(classifier, thresholds, images)
    missed = [any(not found[label][i] for label in labels if label != NO_FINDING) for i, labels in enumerate(asked)]
    return np.array(missed), unasked(found, asked)


def share(values: np.ndarray) -> str:
    if not len(values):
        return "   -"
    lo, hi = mean_interval(values.astype(float))
    return f"{values.mean():.2f} [{lo:.2f}, {hi:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_BUNDLE, help="bundle whose judges/ to use")
    parser.add_argument("--run", type=Path, default=Path("demo-output/dataset"), help="a finished run to re-decide")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", type=int, default=64, help="phantom side in pixels (the demo model's: 64)")
    parser.add_argument("--seed", type=int, default=12, help="phantom seed (12: the demo's held-out phantoms)")
    parser.add_argument("--draws", type=int, default=0, help="requests to generate one image for (0: none)")
    parser.add_argument(
        "--draw-seed", type=int, default=1049, help="phantom seed of the generated requests (+2: the real phantoms "
        "that set the independent classifier's thresholds)"
    )  # fmt: skip
    parser.add_argument("--boxes", action="store_true", help="locate the draws' findings by their boxes")
    parser.add_argument("--sampler", default=FAST.sampler, help="the generated draws' sampler (default: fast preset)")
    parser.add_argument("--steps", type=int, default=FAST.steps, help="their steps per stage")
    parser.add_argument("--anatomy-steps", type=int, default=None, help="their stage-1 steps with the anatomy")
    parser.add_argument("--cache", type=Path, default=Path("build/phantom-judges"), help="control_phantom's cache")
    args = parser.parse_args()

    judges = load_phantom_judges(args.model / "judges")
    cases = phantom.generate(args.count, args.size, seed=args.seed)
    asked = [list(labels) or [NO_FINDING] for labels in cases.labels]
    scores = []
    for lo in range(0, args.count, 100):
        scores += judges.score(cases.images[lo : lo + 100], anatomy=cases.anatomy[lo : lo + 100])

    print(f"{args.count} real phantoms (seed {args.seed}), each asked for its own labels; judges {args.model}/judges")
    print(f"  {'absent':>6s} {'accepted':>9s}  most common reasons for rejection")
    real_accepted = {}
    for absent in THRESHOLDS:
        decisions = decisions_at(absent, scores, asked, judges)
        real_accepted[absent] = np.array([d.accepted for d in decisions])
        reasons = rejection_reasons(decisions)
        common = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(3))
        print(f"  {absent:6.1f} {real_accepted[absent].mean():9.3f}  {common}")

    if args.draws:
        check_generated(args, judges, cases, asked, real_accepted)

    samples = args.run / "samples.parquet"
    if not samples.is_file():
        print(f"\n{samples} not found: run `make demo` to re-decide its draws")
        return
    frame = pd.read_parquet(samples)
    columns = [c for c in frame.columns if c.startswith(SCORE_PREFIXES)]
    print(f"\n{args.run}: its {len(frame)} draws re-decided from their recorded scores")
    recorded = [{c: row[c] for c in columns if pd.notna(row[c])} for _, row in frame.iterrows()]
    for absent in THRESHOLDS:
        accepted = accepted_at(absent, recorded, [list(labels) for labels in frame["labels"]], judges)
        print(f"  absent {absent:.1f}: {accepted.sum()} accepted")


def check_generated(args, judges, real_cases, real_asked, real_accepted) -> None:
    """Generate the --draws requests, judge them, and check what each absent threshold accepts independently."""
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    requests = phantom.generate(args.draws, args.size, seed=args.draw_seed)
    asked = [list(labels) or [NO_FINDING] for labels in requests.labels]
    masks = request_masks(requests, asked, boxes=args.boxes)
    anatomy_steps = FAST.anatomy_steps_for(args.steps) if args.anatomy_steps is None else args.anatomy_steps
    sampling = FAST.with_overrides(steps=args.steps, anatomy_steps=anatomy_steps, sampler=args.sampler)
    scores, images = [], []
    for lo in range(0, args.draws, 16):
        hi = min(args.draws, lo + 16)
        anatomy = requests.anatomy[lo:hi]
        output = pipe(
            anatomy,
            asked[lo:hi],
            list(range(lo, hi)),
            masks[lo:hi],
            **sampling.pipeline_arguments(asked[lo:hi]),
        )
        images.append(output.images)
        scores += judges.score(output.images, anatomy, masks[lo:hi])
    images = np.concatenate(images)

    classifier = independent_judges(args.cache, args.size).classifier
    thresholds = classifier_thresholds(classifier, phantom.generate(600, args.size, seed=args.draw_seed + 2))
    missed, extra = independent_calls(classifier, thresholds, images, asked)
    real_missed, real_extra = independent_calls(classifier, thresholds, real_cases.images, real_asked)
    print(
        f"\n{args.draws} generated draws (requests of phantom seed {args.draw_seed}: their own labels, anatomy and "
        f"masks; {args.sampler} {args.steps} steps, one draw each), judged as a run does; of those the gate accepts, "
        "the share in which a classifier trained apart from the judges misses a requested label, or calls one not "
        "asked for (95% specificity each; bootstrap intervals). Beside it, the same shares on the real phantoms "
        "accepted above."
    )
    print(f"  {'absent':>6s} {'accepted':>9s} {'missed':>18s} {'other called':>18s}   real: missed  other")
    for absent in THRESHOLDS:
        accepted = accepted_at(absent, scores, asked, judges)
        real = real_accepted[absent]
        print(
            f"  {absent:6.1f} {accepted.sum():4d}/{len(accepted):<4d} {share(missed[accepted]):>18s} "
            f"{share(extra[accepted]):>18s}   {real_missed[real].mean():11.2f} {real_extra[real].mean():6.2f}"
        )
    print(f"  {'all':>6s} {len(missed):4d}/{len(missed):<4d} {share(missed):>18s} {share(extra):>18s}")

    print("\n  per label asked for, at absent 0.5: draws accepted, and the gate's most common reasons for rejection")
    decisions = decisions_at(0.5, scores, asked, judges)
    for label in sorted({label for labels in asked for label in labels}):
        mine = [d for d, labels in zip(decisions, asked, strict=True) if label in labels]
        reasons = rejection_reasons(mine)
        common = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(2))
        print(f"  {label:18s} {sum(d.accepted for d in mine):3d}/{len(mine):<3d}  {common}")


if __name__ == "__main__":
    main()
