"""``xreal evaluate``: every figure of a finished run against real images, into ``report.json``.

One pass streams the run's images (with their healthy twins and the masks that
conditioned them) and the reference images through the judge set, keeping per
image only its features, a small pixel thumbnail and its control figures; the
figures are then computed from those:

- fidelity: Fréchet distance and KID on the judges' ``features2`` (the FXD
  convention: their classifier's, or their own feature network's), precision /
  recall / density / coverage, each beside the same figure for two halves of the
  reference (what "good" is on these data);
- diversity: MS-SSIM among a request's replicas, across requests and among real images;
- control: anatomy Dice against the requested map beside random pairing and the
  segmenter's ceiling; the share of the image-twin change inside the requested
  mask; the requested label's hit rate and AUROC, and the twin's false-positive rate;
- memorisation: each image's nearest training image in feature and pixel space,
  and the share at or above the data-driven threshold tau.

Figures over images carry bootstrap 95% intervals. Per-image figures go to
``per_sample.parquet`` so each one traces back to the sample's provenance row.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from xreal.core.errors import XRealError
from xreal.core.files import atomic_path, record_digest, write_json
from xreal.core.labels import NO_FINDING, canonical_label, score_key
from xreal.core.masks import read_binary_mask, read_label_map, resize_label_map, resize_mask
from xreal.evaluate import metrics
from xreal.evaluate.inputs import (
    EvaluationError,
    FinishedRun,
    TrainingSet,
    as_json,
    describe,
    image_batches,
    read_finished_run,
    read_training_set,
    resize_image,
)
from xreal.judges.judging import JudgeSet, anatomy_dice, judges_digest, load_judges
from xreal.judges.memorisation import bank_judges_digest, load_feature_bank, nearest_similarity, normalise

REPORT_FORMAT = 1
REPORT_FILE = "report.json"
PER_SAMPLE_FILE = "per_sample.parquet"
MEMORISATION_PERCENTILE = 95.0
PRIVACY_NOTE = (
    "A nearest-neighbour threshold catches exact and near-exact copies of training images; it is an audit, "
    "not a privacy guarantee: it can miss near-duplicates and says nothing about other re-identification risks."
)


@dataclass
class EvaluationSettings:
    """How the figures are computed; recorded in the report."""

    batch_size: int = 128
    bootstrap_rounds: int = 1000  # intervals of means, rates and AUROC
    frechet_rounds: int = 50
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prdc_k: int = 5
    prdc_max_points: int = 10000
    diversity_pairs: int = 1000
    pixel_size: int = 32  # side of the thumbnails compared in pixel space
    closest: int = 8  # most similar synthetic-training pairs shown
    ceiling_images: int = 512  # reference images the segmenter's ceiling is measured on
    seed: int = 0
    latent_cell: int | None = None  # pixels per latent cell; None: from the model bundle, else size // 8


def resolve_judges(choice: str | None, run: FinishedRun) -> str:
    """The judge set to measure with: ``torchxrayvision``, a judge set folder, ``phantom`` (the demo bundle's),
    or None: the one the run was judged with."""
    from xreal.core.records import DEMO_BUNDLE

    if choice == "phantom":
        return str(DEMO_BUNDLE / "judges")
    if choice is not None:
        return str(choice)
    source = run.judges_source
    if source == "torchxrayvision" or (source and Path(source).is_dir()):
        return source
    raise EvaluationError(
        f"{run.root}: the run's judge set {source!r} is not on this machine; name one with --judges "
        "(a judge set folder, 'phantom' for the demo bundle's, or 'torchxrayvision')"
    )


def latent_cell(run: FinishedRun, setting: int | None) -> int:
    """Pixels per latent cell of the run's model (its autoencoder's downsampling), for 'within one latent cell'."""
    if setting:
        return int(setting)
    model = Path(str(run.record["model"].get("path", "")))
    try:
        config = json.loads((model / "vae" / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return 8  # the latent diffusion default (Stable Diffusion's autoencoder)


def evaluate_run(
    run: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    out: str | os.PathLike[str],
    test: str | os.PathLike[str] | None = None,
    judges: str | None = None,
    bank: str | os.PathLike[str] | None = None,
    labels: Sequence[str] | None = None,
    settings: EvaluationSettings | None = None,
    progress: bool = True,
    html: bool = True,
    reference_cache: dict | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run against a reference training set; write ``report.json``, ``report.html`` and
    ``per_sample.parquet`` (each image's figures, by sample id) into ``out``.

    ``test``: held-out real images (never trained on) for the memorisation
    threshold; without it the reference's validate/test rows are held out.
    ``bank``: a feature bank from ``xreal evaluate bank`` to measure memorisation
    against (else it is built here from the reference). ``labels``: evaluate only
    these (each must have images in the run and in the reference).
    ``reference_cache``: a dict kept between calls that evaluate several runs against the same reference and test
    sets; their measurements (the slow part) are made once.
    """
    settings = settings or EvaluationSettings()
    started = time.perf_counter()
    finished = read_finished_run(run)
    size = finished.image_size
    ref = read_training_set(reference, "--reference", size)
    held = read_training_set(test, "--test", size) if test is not None else None
    source = resolve_judges(judges, finished)
    chosen = _chosen_labels(finished, ref, labels)
    loaded_bank = load_feature_bank(bank, judges_digest=bank_judges_digest(source)) if bank is not None else None
    judge_set = load_judges(source)  # last: every input above is checked before a model loads
    rng = np.random.default_rng(settings.seed)

    drawn = finished.samples[finished.samples["image_path"].notna()].reset_index(drop=True)
    cell = latent_cell(finished, settings.latent_cell)
    synthetic = _measure_samples(finished, drawn, judge_set, settings, cell, rng, progress)

    def measure(training_set: TrainingSet, what: str, ceiling_count: int) -> dict[str, np.ndarray]:
        key = (training_set.index_sha256, str(training_set.root), source, repr(settings), ceiling_count)
        cache = reference_cache if reference_cache is not None else {}
        if key not in cache:
            cache[key] = _measure_reference(training_set, judge_set, settings, progress, what, ceiling_count)
        return cache[key]

    reference_measures = measure(ref, "reference", settings.ceiling_images)
    held_measures = measure(held, "test", 0) if held is not None else None

    accepted = (drawn["decision"] == "accepted").to_numpy()
    report: dict[str, Any] = {
        "report_format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": _software(),
        "run": describe(
            finished.root,
            finished.samples_sha256,
            run_id=finished.record.get("run_id"),
            model=finished.record.get("model", {}).get("digest"),
            judges=(finished.record.get("judges") or {}).get("digest"),
            samples=len(finished.samples),
            drawn_on_disk=len(drawn),
            accepted=int(accepted.sum()),
        ),
        "reference": describe(ref.root, ref.index_sha256, images=len(ref), image_size=ref.image_size),
        "test": describe(held.root, held.index_sha256, images=len(held)) if held is not None else None,
        "judges": {
            "source": source,
            "kind": judge_set.kind,
            "digest": judges_digest(source),
            "feature": f"{judge_set.feature_source} features2 on inputs in [-1024, 1024] (FXD convention)",
            "feature_size": int(synthetic["features"].shape[1]),
            "image_size": judge_set.image_size,
        },
        "settings": {**asdict(settings), "latent_cell": cell, "labels": chosen},
    }
    halves = _halves(len(ref), rng)
    report["fidelity"] = _fidelity(synthetic, reference_measures, ref, drawn, accepted, halves, chosen, settings)
    report["diversity"] = _diversity(finished, ref, drawn, accepted, settings, rng, progress)
    report["control"] = _control(synthetic, drawn, accepted, reference_measures, chosen, settings)
    memorisation, per_sample_nearest = _memorisation(
        synthetic, reference_measures, ref, held_measures, loaded_bank, accepted, settings
    )
    report["memorisation"] = memorisation
    report["warnings"] = _warnings(report)
    report["seconds"] = round(time.perf_counter() - started, 2)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_sample = _per_sample_table(drawn, synthetic, per_sample_nearest)
    with atomic_path(out / PER_SAMPLE_FILE) as tmp:
        per_sample.to_parquet(tmp, index=False)
    report = as_json(report)
    report["digest"] = record_digest(report)
    write_json(out / REPORT_FILE, report)
    if html:
        from xreal.evaluate.html import write_report_html

        write_report_html(report, out, finished, ref, per_sample, seed=settings.seed)
    return report


def _chosen_labels(run: FinishedRun, ref: TrainingSet, labels: Sequence[str] | None) -> list[str]:
    asked = [label for label in run.labels if label != NO_FINDING]
    if labels is None:
        return asked
    chosen = []
    accepted = run.samples[run.samples["decision"] == "accepted"]
    for name in labels:
        try:
            label = canonical_label(name)
        except XRealError as exc:
            raise EvaluationError(f"--labels: {exc}") from None
        if not any(label in row for row in accepted["labels"]):
            raise EvaluationError(f"--labels {label}: the run {run.root} has no accepted image of it")
        if not ref.positives(label).any():
            raise EvaluationError(f"--labels {label}: the reference {ref.root} has no image showing it")
        chosen.append(label)
    return chosen


def _halves(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(count)
    return order[: count // 2], order[count // 2 :]


def _thumbnails(images: np.ndarray, side: int) -> np.ndarray:
    """Mean-free unit-length pixel vectors of ``side``-px thumbnails: their dot product is a correlation."""
    small = np.stack([resize_image(image, side) for image in images]).reshape(len(images), -1)
    small = small - small.mean(1, keepdims=True)
    return (small / np.maximum(np.linalg.norm(small, axis=1, keepdims=True), 1e-8)).astype(np.float32)


def _measure_samples(
    run: FinishedRun,
    drawn: pd.DataFrame,
    judge_set: JudgeSet,
    settings: EvaluationSettings,
    cell: int,
    rng: np.random.Generator,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Stream the run's images (and twins): features, thumbnails, label scores and control figures per image."""
    n = len(drawn)
    seg_size = judge_set.segmentation_size
    anatomy_of = lru_cache(maxsize=4096)(lambda rel: resize_label_map(read_label_map(run.path(rel)), seg_size))
    partners = _random_partners(drawn["request_id"].to_numpy(), rng)
    found: dict[str, list] = {
        "features": [],
        "thumbs": [],
        "dice": [],
        "dice_random": [],
        "inside": [],
        "within_cell": [],
    }
    scores: list[dict[str, float]] = []
    twin_scores: list[dict[str, float] | None] = []
    paths = [run.path(p) for p in drawn["image_path"]]
    bar = tqdm(total=n, desc="evaluate: run images", unit="img", disable=not progress)
    for start, images in zip(range(0, n, settings.batch_size), image_batches(paths, settings.batch_size), strict=True):
        rows = drawn.iloc[start : start + len(images)]
        found["features"].append(judge_set.features(images))
        found["thumbs"].append(_thumbnails(images, settings.pixel_size))
        scores += judge_set.score(images)
        segmented = judge_set.segment(images) if judge_set.segmenter is not None else None
        twins_wanted = []
        for offset, (_, row) in enumerate(rows.iterrows()):
            i = start + offset
            mask = read_binary_mask(run.path(row["pathology_mask_path"])) if _has(row, "pathology_mask_path") else None
            ignore = resize_mask(mask, seg_size, rule="any") if mask is not None else None
            dice = chance = math.nan
            if segmented is not None and _has(row, "anatomy_mask_path"):
                dice = _mean_dice(anatomy_of(row["anatomy_mask_path"]), segmented[offset], ignore)
                partner = drawn.iloc[partners[i]]
                if _has(partner, "anatomy_mask_path"):
                    chance = _mean_dice(anatomy_of(partner["anatomy_mask_path"]), segmented[offset], ignore)
            found["dice"].append(dice)
            found["dice_random"].append(chance)
            if mask is not None and _has(row, "healthy_path"):
                twins_wanted.append((offset, mask, run.path(row["healthy_path"])))
        batch_twins: dict[int, dict[str, float]] = {}
        batch_inside = dict.fromkeys(range(len(images)), (math.nan, math.nan))
        if twins_wanted:
            twins = next(image_batches([path for _, _, path in twins_wanted], len(twins_wanted)))
            for (offset, mask, _), twin, twin_score in zip(twins_wanted, twins, judge_set.score(twins), strict=True):
                batch_twins[offset] = twin_score
                batch_inside[offset] = (
                    metrics.change_share(images[offset], twin, mask, 0),
                    metrics.change_share(images[offset], twin, mask, cell),
                )
        for offset in range(len(images)):
            found["inside"].append(batch_inside[offset][0])
            found["within_cell"].append(batch_inside[offset][1])
            twin_scores.append(batch_twins.get(offset))
        bar.update(len(images))
    bar.close()
    result = {
        key: np.concatenate(value) if key in ("features", "thumbs") else np.asarray(value, dtype=float)
        for key, value in found.items()
    }
    result["scores"] = scores
    result["twin_scores"] = twin_scores
    return result


def _has(row: pd.Series, column: str) -> bool:
    return column in row and isinstance(row[column], str) and bool(row[column])


def _mean_dice(requested: np.ndarray, found: np.ndarray, ignore: np.ndarray | None) -> float:
    values = [v for v in anatomy_dice(requested, found, ignore).values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _random_partners(requests: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each image another image of a different request (random pairing: what Dice is by chance)."""
    n = len(requests)
    partners = rng.permutation(n)
    for i in range(n):
        if requests[partners[i]] == requests[i] and len(set(requests)) > 1:
            others = np.flatnonzero(requests != requests[i])
            partners[i] = rng.choice(others)
    return partners


def _measure_reference(
    ref: TrainingSet, judge_set: JudgeSet, settings: EvaluationSettings, progress: bool, what: str, ceiling_count: int
) -> dict[str, np.ndarray]:
    """Stream a training set's images: features, thumbnails, and the segmenter's Dice on the first ``ceiling_count``
    images that have anatomy maps (the segmenter's ceiling)."""
    features, thumbs, dice_values = [], [], []
    paths = ref.paths()
    has_anatomy = "anatomy_path" in ref.frame and ref.frame["anatomy_path"].notna().any()
    bar = tqdm(total=len(paths), desc=f"evaluate: {what} images", unit="img", disable=not progress)
    for start, images in zip(
        range(0, len(paths), settings.batch_size), image_batches(paths, settings.batch_size), strict=True
    ):
        features.append(judge_set.features(images))
        thumbs.append(_thumbnails(images, settings.pixel_size))
        if has_anatomy and judge_set.segmenter is not None and start < ceiling_count:
            segmented = judge_set.segment(images)
            for offset, relative in enumerate(ref.frame["anatomy_path"].iloc[start : start + len(images)]):
                if isinstance(relative, str) and relative:
                    requested = resize_label_map(read_label_map(ref.resolve(relative)), judge_set.segmentation_size)
                    dice_values.append(_mean_dice(requested, segmented[offset], None))
        bar.update(len(images))
    bar.close()
    return {
        "features": np.concatenate(features),
        "thumbs": np.concatenate(thumbs),
        "ceiling": np.asarray(dice_values, dtype=float),
    }


def _interval(values: np.ndarray, settings: EvaluationSettings) -> dict[str, Any]:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"value": None, "low": None, "high": None, "n": 0}
    low, high = metrics.mean_interval(values, rounds=settings.bootstrap_rounds, seed=settings.seed)
    return {"value": float(values.mean()), "low": low, "high": high, "n": len(values)}


def _frechet(a: np.ndarray, b: np.ndarray, settings: EvaluationSettings) -> dict[str, Any]:
    if len(a) < 2 or len(b) < 2:
        return {"value": None, "low": None, "high": None, "n": [len(a), len(b)]}
    # The centred bootstrap interval: how much the figure would move with fresh samples of the same sizes (a
    # Fréchet distance is biased by sample size, so it is compared with the real-vs-real figure at equal sizes).
    low, high = metrics.frechet_interval(a, b, rounds=settings.frechet_rounds, seed=settings.seed)
    return {"value": metrics.frechet_distance_of(a, b), "low": low, "high": high, "n": [len(a), len(b)]}


def _kid(a: np.ndarray, b: np.ndarray, settings: EvaluationSettings) -> dict[str, Any]:
    if len(a) < 2 or len(b) < 2:
        return {"value": None, "std": None}
    mean, std = metrics.kid(a, b, settings.kid_subsets, settings.kid_subset_size, seed=settings.seed)
    return {"value": mean, "std": std}


def _fidelity(synthetic, reference, ref, drawn, accepted, halves, labels, settings) -> dict[str, Any]:
    """Synthetic against half B of the reference, beside half A (as many images) against half B."""
    fake, real = synthetic["features"][accepted], reference["features"]
    half_a, half_b = halves
    matched = half_a[: max(2, min(len(fake), len(half_a)))]
    every_draw = np.random.default_rng(settings.seed).permutation(len(accepted))[: len(fake)]

    def compare(a, b):
        return {
            "frechet": _frechet(a, b, settings),
            "kid": _kid(a, b, settings),
            "prdc": metrics.prdc(b, a, k=settings.prdc_k, max_points=settings.prdc_max_points, seed=settings.seed)
            if len(a) > settings.prdc_k and len(b) > settings.prdc_k
            else None,
        }

    result = {
        "synthetic": compare(fake, real[half_b]),
        "real_vs_real": compare(real[matched], real[half_b]),
        "reference_halves": [len(half_a), len(half_b)],
        # every draw, subsampled to as many as were accepted: a Fréchet distance is only comparable at equal sizes
        "all_draws": compare(synthetic["features"][every_draw], real[half_b]) if (~accepted).any() else None,
        "per_label": {},
    }
    for label in labels:
        mine = accepted & np.array([label in row for row in drawn["labels"]])
        theirs = np.flatnonzero(ref.positives(label))
        split = len(theirs) // 2
        result["per_label"][label] = {
            "synthetic": int(mine.sum()),
            "reference": len(theirs),
            "frechet": _frechet(synthetic["features"][mine], real[theirs], settings),
            "real_vs_real": _frechet(real[theirs[:split]][: max(2, int(mine.sum()))], real[theirs[split:]], settings),
        }
    return result


def _diversity(run, ref, drawn, accepted, settings, rng, progress) -> dict[str, Any]:
    """MS-SSIM (lower is more diverse) within a request's replicas, across requests, and among real images."""
    kept = drawn[accepted].reset_index(drop=True)
    by_request: dict[str, list[int]] = {}
    for i, request in enumerate(kept["request_id"]):
        by_request.setdefault(request, []).append(i)
    within = [(a, b) for rows in by_request.values() for j, a in enumerate(rows) for b in rows[j + 1 :]]
    if len(within) > settings.diversity_pairs:
        within = [within[i] for i in rng.choice(len(within), settings.diversity_pairs, replace=False)]
    requests = kept["request_id"].to_numpy()
    across = []
    if len(by_request) > 1:
        while len(across) < min(settings.diversity_pairs, len(kept) * (len(kept) - 1) // 2):
            a, b = rng.integers(0, len(kept), 2)
            if requests[a] != requests[b]:
                across.append((int(a), int(b)))
    real_pairs = [
        tuple(int(v) for v in rng.choice(len(ref), 2, replace=False)) for _ in range(settings.diversity_pairs)
    ]
    run_paths = [run.path(p) for p in kept["image_path"]]
    values = {
        "within_request": _pair_ms_ssim(within, run_paths, settings),
        "across_requests": _pair_ms_ssim(across, run_paths, settings),
        "real_pairs": _pair_ms_ssim(real_pairs, ref.paths(), settings),
    }
    return {name: {**_interval(v, settings), "pairs": len(v)} for name, v in values.items()} | {
        "requests_with_replicas": sum(len(rows) > 1 for rows in by_request.values())
    }


def _pair_ms_ssim(pairs: Sequence[tuple[int, int]], paths: Sequence[Path], settings) -> np.ndarray:
    if not pairs:
        return np.zeros(0)
    out = []
    for start in range(0, len(pairs), settings.batch_size):
        chunk = pairs[start : start + settings.batch_size]
        needed = sorted({i for pair in chunk for i in pair})
        images = dict(zip(needed, next(image_batches([paths[i] for i in needed], len(needed))), strict=True))
        a = np.stack([images[i] for i, _ in chunk])
        b = np.stack([images[j] for _, j in chunk])
        out.append(metrics.ms_ssim(a, b))
    return np.concatenate(out)


def _control(synthetic, drawn, accepted, reference, labels, settings) -> dict[str, Any]:
    """Anatomy and pathology control, over accepted images and over every draw on disk."""
    ceiling = _interval(reference["ceiling"], settings)
    requested = [set(row) for row in drawn["labels"]]
    result: dict[str, Any] = {"segmenter_ceiling": ceiling}
    for subset, keep in (("accepted", accepted), ("all_draws", np.ones(len(drawn), bool))):
        if subset == "all_draws" and keep.sum() == accepted.sum():
            result[subset] = None  # rejected images were not kept (--keep-rejected): no figure over every draw
            continue
        dice = _interval(synthetic["dice"][keep], settings)
        chance = _interval(synthetic["dice_random"][keep], settings)
        section = {
            "anatomy_dice": dice,
            "anatomy_dice_random_pairing": chance,
            "anatomy_recovered": _recovered(dice["value"], chance["value"], ceiling["value"]),
            "inside_mask": _interval(synthetic["inside"][keep], settings),
            "within_latent_cell": _interval(synthetic["within_cell"][keep], settings),
            "per_label": {},
        }
        for label in labels:
            key = score_key("p", label)
            mine = keep & np.array([label in r for r in requested])
            others = keep & ~np.array([label in r for r in requested])
            p = np.array([s.get(key, math.nan) for s in synthetic["scores"]])
            twins = np.array([t.get(key, math.nan) if t is not None else math.nan for t in synthetic["twin_scores"]])
            if np.isnan(p).all():
                section["per_label"][label] = {"judged": False, "samples": int(mine.sum())}
                continue
            truth = np.concatenate([np.ones(mine.sum(), bool), np.zeros(others.sum(), bool)])
            scores = np.concatenate([p[mine], p[others]])
            auroc = metrics.auroc(scores, truth)
            low, high = (
                metrics.auroc_interval(scores, truth, rounds=settings.bootstrap_rounds, seed=settings.seed)
                if not math.isnan(auroc)
                else (None, None)
            )
            section["per_label"][label] = {
                "judged": True,
                "samples": int(mine.sum()),
                "hit_rate": _interval((p[mine] >= 0.5).astype(float), settings),
                "twin_positive_rate": _interval((twins[mine][~np.isnan(twins[mine])] >= 0.5).astype(float), settings),
                "auroc": {"value": auroc, "low": low, "high": high},
                "anatomy_dice": _interval(synthetic["dice"][mine], settings),
                "inside_mask": _interval(synthetic["inside"][mine], settings),
                "within_latent_cell": _interval(synthetic["within_cell"][mine], settings),
            }
        hits = [v["hit_rate"]["value"] for v in section["per_label"].values() if v.get("judged")]
        section["hit_rate_mean"] = float(np.mean([h for h in hits if h is not None])) if hits else None
        result[subset] = section
    return result


def _recovered(dice: float | None, chance: float | None, ceiling: float | None) -> float | None:
    """The share of the room between random pairing and the segmenter's ceiling that control recovers."""
    if dice is None or chance is None or ceiling is None or ceiling - chance <= 1e-6:
        return None
    return (dice - chance) / (ceiling - chance)


def _memorisation(synthetic, reference, ref, held, bank, accepted, settings):
    """Nearest training image of each synthetic image (features and pixels) and the share at or above tau."""
    feats, thumbs = normalise(synthetic["features"]), synthetic["thumbs"]
    ids = ref.frame["image_id"].to_numpy()
    if held is not None:
        train = np.arange(len(ref))
        held_feats, held_thumbs = normalise(held["features"]), held["thumbs"]
    else:
        split = ref.frame["split"].fillna("train").to_numpy()
        train = np.flatnonzero(split == "train")
        out_rows = np.flatnonzero(np.isin(split, ("validate", "test")))
        if not len(out_rows) or not len(train):
            raise EvaluationError(
                f"--reference {ref.root}: the memorisation threshold needs held-out real images; pass --test "
                "TRAINING_SET, or use a training set with train and validate/test splits"
            )
        held_feats, held_thumbs = normalise(reference["features"][out_rows]), reference["thumbs"][out_rows]
    train_feats = normalise(reference["features"][train])
    train_thumbs = reference["thumbs"][train]
    if bank is not None:
        nearest_ids, similarity = bank.nearest(synthetic["features"])
        tau = float(bank.tau)
        bank_record = bank.provenance()
    else:
        _, held_best = nearest_similarity(train_feats, held_feats)
        tau = float(np.percentile(held_best, MEMORISATION_PERCENTILE))
        index, similarity = nearest_similarity(feats, train_feats)
        nearest_ids = ids[train][index]
        bank_record = None
    pixel_index, pixel_similarity = nearest_similarity(thumbs, train_thumbs)
    _, pixel_held = nearest_similarity(train_thumbs, held_thumbs)
    pixel_tau = float(np.percentile(pixel_held, MEMORISATION_PERCENTILE))
    copies = similarity >= tau
    order = np.argsort(-similarity)[: settings.closest]
    summary = {
        "tau": tau,
        "percentile": MEMORISATION_PERCENTILE,
        "recipe": "tau: the 95th percentile over training images of each one's highest cosine similarity to any "
        "held-out real image (features2); an image at or above tau is a likely copy",
        "bank": bank_record,
        "training_images": len(train),
        "held_out_images": len(held_feats),
        "rate": _interval(copies[accepted].astype(float), settings),
        "rate_all_draws": _interval(copies.astype(float), settings) if (~accepted).any() else None,
        "similarity": _interval(similarity[accepted], settings),
        "pixel_tau": pixel_tau,
        "pixel_rate": _interval((pixel_similarity >= pixel_tau)[accepted].astype(float), settings),
        "closest": [
            {"sample": int(i), "nearest": str(nearest_ids[i]), "similarity": float(similarity[i])} for i in order
        ],
        "note": PRIVACY_NOTE,
    }
    per_sample = {
        "nearest_training_id": np.asarray(nearest_ids).astype(str),
        "nearest_similarity": similarity,
        "nearest_pixel_id": ids[train][pixel_index].astype(str),
        "nearest_pixel_similarity": pixel_similarity,
        "likely_copy": copies,
    }
    return summary, per_sample


def _per_sample_table(drawn: pd.DataFrame, synthetic, nearest) -> pd.DataFrame:
    table = drawn[["sample_id", "request_id", "decision"]].copy()
    table["labels"] = drawn["labels"].map(list)
    table["anatomy_dice"] = synthetic["dice"]
    table["anatomy_dice_random_pairing"] = synthetic["dice_random"]
    table["change_inside_mask"] = synthetic["inside"]
    table["change_within_latent_cell"] = synthetic["within_cell"]
    for key, values in nearest.items():
        table[key] = values
    requested_p = []
    twin_p = []
    for labels, scores, twin in zip(drawn["labels"], synthetic["scores"], synthetic["twin_scores"], strict=True):
        keys = [score_key("p", label) for label in labels if label != NO_FINDING]
        requested_p.append(min((scores.get(k, math.nan) for k in keys), default=math.nan))
        twin_p.append(max((twin.get(k, math.nan) for k in keys), default=math.nan) if twin else math.nan)
    table["requested_label_score"] = requested_p
    table["twin_requested_label_score"] = twin_p
    return table


def _warnings(report: dict[str, Any]) -> list[str]:
    warnings = []
    diversity = report["diversity"]
    within, real = diversity["within_request"], diversity["real_pairs"]
    if within["value"] is not None and within["value"] >= 0.95:
        warnings.append(
            f"mode collapse: a request's replicas are near-identical (within-request MS-SSIM {within['value']:.3f})"
        )
    across = diversity["across_requests"]
    if across["low"] is not None and real["high"] is not None and across["low"] > real["high"]:
        warnings.append(
            f"low diversity: images of different requests are more alike (MS-SSIM {across['value']:.3f}) than "
            f"random real images ({real['value']:.3f})"
        )
    # tau is the 95th percentile of held-out real images' similarity, so 5% of real images reach it: a rate warns
    # when its interval lies above that, not when a few images of a small run do.
    rate = report["memorisation"]["rate"]
    if rate["low"] is not None and rate["low"] > 0.05:
        warnings.append(
            f"memorisation: {rate['value']:.1%} [{rate['low']:.1%}, {rate['high']:.1%}] of accepted images are at "
            "or above tau (likely copies), more than the 5% of held-out real images that reach it"
        )
    fid = report["fidelity"]
    if fid["synthetic"]["prdc"] is None:
        k = report["settings"]["prdc_k"]
        warnings.append(
            f"precision, recall, density and coverage not computed: with k={k} they need more than {k} accepted images"
        )
    synthetic, real_fd = fid["synthetic"]["frechet"], fid["real_vs_real"]["frechet"]
    if synthetic["value"] is not None and real_fd["high"] is not None and synthetic["value"] > 2 * real_fd["high"]:
        warnings.append(
            f"fidelity: the Fréchet distance to real images ({synthetic['value']:.3g}) is more than twice the "
            f"real-vs-real figure ({real_fd['value']:.3g})"
        )
    return warnings


def _software() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("xreal", "torch", "torchxrayvision", "numpy", "scipy", "diffusers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
