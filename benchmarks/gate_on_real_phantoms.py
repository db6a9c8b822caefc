"""How many perfect images the quality gate throws away: real phantoms judged as if they had been generated.

Each held-out real phantom is asked for exactly the labels it shows, with its own anatomy, so every rejection is
a false one. The classifier's ``absent`` check (every label not asked for must score below it; 0.5 is each
label's 95%-specificity operating point) is swept, and the same thresholds are applied to a generated run's
recorded scores, to show what each would accept there. Usage::

    python benchmarks/gate_on_real_phantoms.py [--model DIR] [--run DIR] [--count 500] [--seed 12]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
import pandas as pd

from xreal.core.labels import NO_FINDING
from xreal.judges.judging import load_phantom_judges
from xreal.model.bundle import DEMO_BUNDLE
from xreal.phantom import renderer as phantom
from xreal.run.policy import QualityPolicy

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
SCORE_PREFIXES = ("p_", "dice_", "sanity_", "realism_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_BUNDLE, help="bundle whose judges/ to use")
    parser.add_argument("--run", type=Path, default=Path("demo-output/dataset"), help="a finished run to re-decide")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", type=int, default=64, help="phantom side in pixels (the demo model's: 64)")
    parser.add_argument("--seed", type=int, default=12, help="phantom seed (12: the demo's held-out phantoms)")
    args = parser.parse_args()

    judges = load_phantom_judges(args.model / "judges")
    cases = phantom.generate(args.count, args.size, seed=args.seed)
    asked = [list(labels) or [NO_FINDING] for labels in cases.labels]
    scores = []
    for lo in range(0, args.count, 100):
        scores += judges.score(cases.images[lo : lo + 100], anatomy=cases.anatomy[lo : lo + 100])

    print(f"{args.count} real phantoms (seed {args.seed}), each asked for its own labels; judges {args.model}/judges")
    print(f"  {'absent':>6s} {'accepted':>9s}  most common reasons for rejection")
    for absent in THRESHOLDS:
        policy = QualityPolicy.from_dict({"classifier": {"absent": absent}})
        decisions = [
            policy.decide(s, labels, judges.labels, realism_threshold=judges.realism_threshold)
            for s, labels in zip(scores, asked, strict=True)
        ]
        reasons = collections.Counter(
            part.split(" (")[0] for d in decisions if not d.accepted for part in d.reason.split("; ")
        )
        common = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(3))
        print(f"  {absent:6.1f} {np.mean([d.accepted for d in decisions]):9.3f}  {common}")

    samples = args.run / "samples.parquet"
    if not samples.is_file():
        print(f"\n{samples} not found: run `make demo` to re-decide its draws")
        return
    frame = pd.read_parquet(samples)
    columns = [c for c in frame.columns if c.startswith(SCORE_PREFIXES)]
    print(f"\n{args.run}: its {len(frame)} draws re-decided from their recorded scores")
    for absent in THRESHOLDS:
        policy = QualityPolicy.from_dict({"classifier": {"absent": absent}})
        accepted = sum(
            policy.decide(
                {c: row[c] for c in columns if pd.notna(row[c])},
                list(row["labels"]),
                judges.labels,
                realism_threshold=judges.realism_threshold,
            ).accepted
            for _, row in frame.iterrows()
        )
        print(f"  absent {absent:.1f}: {accepted} accepted")


if __name__ == "__main__":
    main()
