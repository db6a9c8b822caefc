"""Which of several model bundles draws each finding closer to the real phantoms, paired request by request.

Every bundle draws the same requests: phantoms of ``--seed`` (tune on another
seed than control_phantom's held-out 999, then confirm on it), ``--per-finding``
of each of the seven findings, one draw each, the fast preset with the pixels
outside the mask restored. In control_phantom's pinned feature network's features it
prints, per finding and bundle:
- the Fréchet distance of the finals to as many real phantoms with the finding
  (seed + 1), and in brackets the share of draws on which the classifier
  detects the finding (95% specificity on other real phantoms, seed + 2);
- for each bundle after the first, the paired difference of its distance minus
  the first's, with a bootstrap interval that resamples the same requests and
  the same real phantoms for both (below 0: closer than the first). Distances
  from a few hundred images carry a bias and noise larger than most changes;
  what two bundles share cancels in the paired difference, so read that.
The last rows do the same for the finals of every finding together, and for the
healthy twins against real healthy phantoms of the same anatomies. Below them,
each bundle's autoencoder alone: the requests' own real phantoms (findings and
twins) through it, against the same real ones, beside those real phantoms
themselves. No sampler can bring a bundle's images closer than its round trip,
so that row is the floor its decoder sets. Each bundle's
draws (as features) are kept under ``--work``, keyed by its weights and the
requests, so a bundle already drawn is not drawn again.

    python benchmarks/compare_models.py xreal/bundles/demo build/candidate --seed 1049 --per-finding 160
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
from control_phantom import (
    FAST,
    Judges,
    called,
    classifier_thresholds,
    features,
    findings_and_twins,
    judges,
    request_masks,
)

from xreal.evaluate.metrics import frechet_difference, frechet_distance_of
from xreal.evaluate.utility import weights_digest
from xreal.model.bundle import load_pipeline
from xreal.phantom import renderer as phantom

REQUESTS = "healthy-twin anatomy"  # draws kept under another way of making the requests are drawn again


def draw(
    model: Path, labels: list[str], cases: phantom.PhantomBatch, healthy: phantom.PhantomBatch, batch_size: int
) -> tuple[np.ndarray, ...]:
    """One bundle's finals and healthy twins of the requests (seeds 0..n-1) with the fast preset, and the
    requests' real phantoms (``cases``, then their healthy twins ``healthy``) through its autoencoder alone.

    Each request asks for its finding's mask (``cases``) on the anatomy of its healthy twin, as control_phantom's
    do: a cardiomegaly phantom's own anatomy has the enlarged heart, and a twin drawn on it would be compared with
    real healthy twins whose hearts are normal (stop 47: drawn that way, the shipped bundle's twins read 3.13, the
    twins of the other six findings alone 0.22)."""
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    round_trip = pipe.round_trip(np.concatenate([cases.images, healthy.images]))
    masks = request_masks(cases, [[label] for label in labels])
    finals, twins = [], []
    for lo in range(0, len(labels), batch_size):
        hi = min(len(labels), lo + batch_size)
        asked = [[label] for label in labels[lo:hi]]
        request = healthy.anatomy[lo:hi], asked, list(range(lo, hi)), masks[lo:hi]
        out = pipe(*request, **FAST.pipeline_arguments(asked))
        finals.append(out.images)
        twins.append(out.healthy_images)
    return np.concatenate(finals), np.concatenate(twins), round_trip


def draws_key(model: Path, benchmark_judges: Judges) -> str:
    """A short digest of what a bundle's draws as kept depend on: its sampling weights (its judges left out), the
    fast preset, the benchmark's judges that read them (their weights) and how the requests are made
    (``REQUESTS``)."""
    judged_by = " ".join(weights_digest(network) for network in benchmark_judges)
    digest = hashlib.sha256(f"{FAST!r} {judged_by} {REQUESTS}".encode())
    for path in sorted(model.rglob("*.safetensors")):
        if "judges" not in path.relative_to(model).parts:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def paired_cell(
    generated: np.ndarray, first: np.ndarray | None, target: np.ndarray, rounds: int, seed: int, note: str = ""
) -> str:
    """One table cell: the Fréchet distance of ``generated`` to ``target`` (then ``note``), and, unless ``first``
    is None, the paired difference from ``first``'s with its bootstrap interval."""
    cell = f"{frechet_distance_of(generated, target):.3f}{note}"
    if first is not None:
        difference, low, high = frechet_difference(generated, first, target, rounds, seed=seed)
        cell += f" {difference:+.3f} [{low:+.3f}, {high:+.3f}]"
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="bundles; each after the first is compared with it")
    parser.add_argument("--seed", type=int, required=True, help="phantom seed of the requests (+1, +2: real ones)")
    parser.add_argument("--per-finding", type=int, default=160, help="requests of each of the seven findings")
    parser.add_argument("--rounds", type=int, default=200, help="bootstrap rounds of the paired differences")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--real-count", type=int, default=600, help="real phantoms that set the thresholds")
    parser.add_argument("--cache", type=Path, default=Path("build/phantom-judges"))
    parser.add_argument("--work", type=Path, default=Path("build/compare-models"), help="folder keeping the draws")
    args = parser.parse_args()

    size = load_pipeline(args.models[0]).config.image_size
    _, classifier, feature_network = benchmark_judges = judges(args.cache, size)
    findings = phantom.PHANTOM_PATHOLOGIES
    labels = [label for label in findings for _ in range(args.per_finding)]
    of_label = {label: [i for i, lab in enumerate(labels) if lab == label] for label in findings}
    cases = phantom.generate(len(labels), size, seed=args.seed, pathologies=[[label] for label in labels])
    healthy = phantom.generate(len(labels), size, seed=args.seed, pathologies=[[]] * len(labels))
    real = features(feature_network, findings_and_twins(labels, size, args.seed + 1))
    thresholds = classifier_thresholds(classifier, phantom.generate(args.real_count, size, seed=args.seed + 2))

    drawn = {}
    for model in args.models:
        kept = args.work / f"{draws_key(model, benchmark_judges)}-seed{args.seed}-{args.per_finding}.npz"
        if kept.exists():
            with np.load(kept) as saved:
                drawn[model] = saved["finals"], saved["twins"], saved["detected"], saved["round_trip"]
            print(f"{model}: its draws kept in {kept}")
            continue
        started = time.perf_counter()
        finals, twins, round_trip = draw(model, labels, cases, healthy, args.batch_size)
        on_final = called(classifier, thresholds, finals)
        detected = np.array([on_final[label][i] for i, label in enumerate(labels)])
        drawn[model] = (
            features(feature_network, finals),
            features(feature_network, twins),
            detected,
            features(feature_network, round_trip),
        )
        args.work.mkdir(parents=True, exist_ok=True)
        np.savez(kept, finals=drawn[model][0], twins=drawn[model][1], detected=detected, round_trip=drawn[model][3])
        print(f"{model}: {len(labels)} requests drawn and read in {time.perf_counter() - started:.0f} s")

    n = len(labels)
    groups = {**of_label, "every finding": list(range(n))}
    print(
        f"\nFrechet distance to as many real phantoms (seed {args.seed + 1}), feature network, with detection in "
        f"brackets; seed {args.seed}, {args.per_finding} requests a finding; paired differences against "
        f"{args.models[0]} ({args.rounds} rounds, 95% interval; below 0: closer)"
    )
    for name, idx in {**groups, "healthy twins": None}.items():
        row = []
        for k, model in enumerate(args.models):
            finals, twins, detected, _ = drawn[model]
            if idx is None:
                generated, target, share = twins, real[n:], ""
            else:
                generated, target, share = finals[idx], real[idx], f" ({detected[idx].mean():.2f})"
            baseline = drawn[args.models[0]]
            first = (baseline[1] if idx is None else baseline[0][idx]) if k else None
            row.append(paired_cell(generated, first, target, args.rounds, args.seed, share))
        print(f"  {name:16s} " + "   ".join(row))

    requests = features(feature_network, np.concatenate([cases.images, healthy.images]))
    print(
        "\nThe floor each autoencoder sets: the requests' own real phantoms (findings, then twins) through it alone, "
        "against the same real phantoms as above; paired as above"
    )
    for name, part in (("findings", slice(0, n)), ("twins", slice(n, 2 * n))):
        row = []
        for k, model in enumerate(args.models):
            first = drawn[args.models[0]][3][part] if k else None
            row.append(paired_cell(drawn[model][3][part], first, real[part], args.rounds, args.seed))
        print(f"  {'round trip, ' + name:24s} " + "   ".join(row))
        print(f"  {'the real ones, ' + name:24s} {frechet_distance_of(requests[part], real[part]):.3f}")


if __name__ == "__main__":
    main()
