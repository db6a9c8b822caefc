"""Time the evaluation metrics on 10,000 synthetic against 100,000 reference phantom feature vectors, on CPU.

Features are the demo bundle's phantom judge set's ``features`` of rendered phantoms (64 px), extracted in
chunks into preallocated float32 arrays (never all images at once). The "synthetic" set is phantoms of another
seed with Gaussian pixel noise (``--synthetic-noise``), a stand-in for a generator's flaws. Rendering is slow
(a few hundred phantoms a second): when the full count would take more than ``--render-budget`` seconds, only
``--real-count`` phantoms per set are rendered and the rest are resampled from them with small Gaussian jitter
(the output says so). Then each step is timed with its wall seconds and its peak resident memory (sampled):

- streaming :class:`FeatureStats` over both sets and the Fréchet distance (plus the real-vs-real distance of two
  disjoint reference subsets of the synthetic size, the figure to read it against);
- the Fréchet bootstrap interval (50 rounds, both sets resampled);
- KID (100 subsets of 1,000);
- PRDC (k = 5, default ``max_points``: what was subsampled is printed);
- the memorisation search: each synthetic vector's nearest reference vector by cosine similarity.

A benchmark measures: it prints and asserts nothing. Usage:
``python benchmarks/evaluate_scale.py [--synthetic 10000] [--reference 100000] [--real-count auto|N]``.
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

from xreal.evaluate.metrics import FeatureStats, frechet_distance, frechet_interval, kid, prdc
from xreal.judges.judging import load_judges
from xreal.phantom import renderer as phantom

JUDGES = "xreal/bundles/demo/judges"
MIB = 1024 * 1024


class PeakMemory:
    """Resident memory before a step and its peak during the step (sampled every few milliseconds)."""

    def __init__(self, interval: float = 0.003) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self.before = self.peak = 0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self.before = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


RESULTS: list[tuple[str, float, int, int]] = []


def timed(name: str, step: Callable[[], Any]) -> Any:
    """Run ``step``, print and record its seconds and memory, return its result."""
    with PeakMemory() as memory:
        started = time.perf_counter()
        result = step()
        seconds = time.perf_counter() - started
    RESULTS.append((name, seconds, memory.peak, memory.peak - memory.before))
    print(
        f"  {name}: {seconds:.2f} s, peak RSS {memory.peak / MIB:.0f} MiB "
        f"(+{(memory.peak - memory.before) / MIB:.0f} MiB over the {memory.before / MIB:.0f} MiB before)",
        flush=True,
    )
    return result


def render_features(judges, out: np.ndarray, lo: int, hi: int, seed: int, noise: float, chunk: int) -> None:
    """Render phantoms ``lo..hi-1`` of ``seed`` a chunk at a time and write their features into ``out[lo:hi]``."""
    rng = np.random.default_rng([seed, lo])
    for start in range(lo, hi, chunk):
        count = min(chunk, hi - start)
        images = phantom.generate(count, size=64, seed=seed, start=start).images
        if noise > 0:
            images = np.clip(images + rng.normal(0.0, noise, images.shape).astype(np.float32), 0.0, 1.0)
        out[start : start + count] = judges.features(images)


def fill_by_jitter(out: np.ndarray, real: int, jitter: float, seed: int, chunk: int = 65536) -> None:
    """Rows ``real..`` of ``out``: rows drawn from ``out[:real]`` plus Gaussian noise of ``jitter`` x each std."""
    rng = np.random.default_rng(seed)
    scale = (out[:real].std(axis=0) * jitter).astype(np.float32)
    for start in range(real, len(out), chunk):
        count = min(chunk, len(out) - start)
        picks = rng.integers(0, real, count)
        out[start : start + count] = out[picks] + rng.normal(size=(count, out.shape[1])).astype(np.float32) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=int, default=10_000, help="synthetic feature vectors (default 10000)")
    parser.add_argument("--reference", type=int, default=100_000, help="reference feature vectors (default 100000)")
    parser.add_argument(
        "--real-count",
        default="auto",
        help="phantoms actually rendered per set, the rest resampled with jitter; 'auto' (default): all of them "
        "when the measured rate renders everything within --render-budget, else 4000; 'all': always all",
    )
    parser.add_argument("--render-budget", type=float, default=600.0, help="seconds allowed for rendering (600)")
    parser.add_argument("--jitter", type=float, default=0.05, help="jitter of resampled vectors, x each std (0.05)")
    parser.add_argument("--synthetic-noise", type=float, default=0.03, help="pixel noise of 'synthetic' (0.03)")
    parser.add_argument("--chunk", type=int, default=512, help="phantoms rendered and embedded at a time (512)")
    parser.add_argument("--rounds", type=int, default=50, help="Fréchet bootstrap rounds (50)")
    args = parser.parse_args()

    judges = load_judges(JUDGES)
    dim = judges.feature_size
    sets = {"synthetic": (args.synthetic, 1, args.synthetic_noise), "reference": (args.reference, 2, 0.0)}
    features = {name: np.empty((count, dim), np.float32) for name, (count, _, _) in sets.items()}
    print(f"{args.synthetic} synthetic against {args.reference} reference phantom feature vectors, D = {dim}")

    # measure the rate on a first chunk of the synthetic set (kept)
    probe = min(args.chunk, args.synthetic)
    started = time.perf_counter()
    render_features(judges, features["synthetic"], 0, probe, 1, args.synthetic_noise, args.chunk)
    rate = probe / (time.perf_counter() - started)
    estimate = (args.synthetic + args.reference) / rate
    total = args.synthetic + args.reference
    print(f"rendering + feature extraction: {rate:.0f} phantoms/s, so all {total} would take ~{estimate:.0f} s")
    if args.real_count == "all" or (args.real_count == "auto" and estimate <= args.render_budget):
        real_count = max(args.synthetic, args.reference)
    else:
        real_count = 4000 if args.real_count == "auto" else int(args.real_count)
    reals = {name: min(count, real_count) for name, (count, _, _) in sets.items()}
    for name, (count, _, _) in sets.items():
        if reals[name] < count:
            print(
                f"  {name}: {reals[name]} rendered phantoms, the other {count - reals[name]} vectors resampled "
                f"from them with Gaussian jitter of {args.jitter} x each feature's std (rendering all would take "
                f"~{estimate:.0f} s)"
            )
        else:
            print(f"  {name}: all {count} vectors from rendered phantoms")

    def extract() -> None:
        for name, (count, seed, noise) in sets.items():
            done = probe if name == "synthetic" else 0
            render_features(judges, features[name], done, reals[name], seed, noise, args.chunk)
            if reals[name] < count:
                fill_by_jitter(features[name], reals[name], args.jitter, seed)

    print("steps:")
    timed(f"features ({reals['synthetic'] + reals['reference']} phantoms rendered, streamed in {args.chunk}s)", extract)
    synthetic, reference = features["synthetic"], features["reference"]

    def streaming_frechet() -> tuple[float, float]:
        stats = {}
        for name, x in features.items():
            stats[name] = FeatureStats(dim)
            for start in range(0, len(x), 4096):
                stats[name].update(x[start : start + 4096])
        s, r = stats["synthetic"], stats["reference"]
        distance = frechet_distance(s.mean, s.covariance(), r.mean, r.covariance())
        # the real-vs-real baseline: two disjoint reference subsets of the synthetic size
        order = np.random.default_rng(0).permutation(len(reference))
        halves = []
        for part in (order[: len(synthetic)], order[len(synthetic) : 2 * len(synthetic)]):
            halves.append(FeatureStats(dim))
            halves[-1].update(reference[np.sort(part)])
        baseline = frechet_distance(halves[0].mean, halves[0].covariance(), halves[1].mean, halves[1].covariance())
        return distance, baseline

    distance, baseline = timed("FeatureStats (streamed, 4096 rows a time) + Fréchet distance", streaming_frechet)
    print(f"    Fréchet distance {distance:.4f}; real-vs-real at {len(synthetic)} vs {len(synthetic)}: {baseline:.4f}")
    if reals["reference"] < len(reference):
        print(f"    (real-vs-real is optimistic here: both subsets come from the same {reals['reference']} phantoms)")

    interval = lambda: frechet_interval(synthetic, reference, args.rounds)  # noqa: E731
    low, high = timed(f"Fréchet bootstrap interval ({args.rounds} rounds, both sets resampled)", interval)
    print(f"    95% interval (centred) [{low:.4f}, {high:.4f}]")

    kid_mean, kid_std = timed("KID (100 subsets of 1000)", lambda: kid(synthetic, reference))
    print(f"    KID {kid_mean:.5f} +- {kid_std:.5f}")

    scores = timed("PRDC (k=5, max_points=10000)", lambda: prdc(reference, synthetic))
    kept = {name: min(len(x), 10_000) for name, x in (("reference", reference), ("synthetic", synthetic))}
    subsampled = [f"{name} {len(features[name])} -> {n}" for name, n in kept.items() if n < len(features[name])]
    print(f"    {', '.join(f'{k} {v:.4f}' for k, v in scores.items())}")
    print(f"    subsampled: {'; '.join(subsampled) or 'nothing'} (random, seed 0)")

    search = None
    for attempt in range(11):
        try:
            from xreal.judges.memorisation import nearest_similarity, normalise

            search = (nearest_similarity, normalise)
            break
        except ImportError:
            if attempt < 10:
                print("    xreal.judges.memorisation.nearest_similarity not importable yet; retrying in 120 s")
                time.sleep(120)
    if search is not None:
        nearest_similarity, normalise = search
        try:
            import faiss  # noqa: F401

            engine = "faiss"
        except ImportError:
            engine = "numpy float32 blocks"

        def memorisation() -> np.ndarray:
            return nearest_similarity(normalise(synthetic), normalise(reference))[1]

        name = f"memorisation search {len(synthetic)} vs {len(reference)} (nearest_similarity, {engine})"
    else:

        def memorisation() -> np.ndarray:
            query = synthetic / np.linalg.norm(synthetic, axis=1, keepdims=True)
            bank = reference / np.linalg.norm(reference, axis=1, keepdims=True)
            best = np.full(len(query), -np.inf, np.float32)
            for start in range(0, len(bank), 8192):
                np.maximum(best, (query @ bank[start : start + 8192].T).max(axis=1), out=best)
            return best

        name = "memorisation search (FALLBACK: chunked matmul here, nearest_similarity was not importable)"
    similarity = timed(name, memorisation)
    print(
        f"    cosine similarity to the nearest reference: median {np.median(similarity):.4f}, "
        f"max {similarity.max():.4f}"
    )

    print("summary (seconds, peak RSS MiB, peak over the step's start MiB):")
    for name, seconds, peak, extra in RESULTS:
        print(f"  {seconds:8.2f}  {peak / MIB:7.0f}  {extra / MIB:+7.0f}  {name}")
    print(f"process peak RSS (getrusage): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
