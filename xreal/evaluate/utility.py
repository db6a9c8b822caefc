"""Usefulness: do a run's synthetic images help a classifier trained on scarce real data?

One small torchxrayvision DenseNet (``build_phantom_classifier``: growth rate
16, blocks 4-4-4) is trained from the same initial weights in three regimes
and scored on a real test set, per label, by AUROC with a 95% bootstrap
interval:

1. ``real_only``: ``steps`` optimisation steps on a scarce real subset
   (``real_count`` images of the real set's ``real_split``, drawn with ``seed``);
2. ``mixed``: ``steps`` steps on that real subset and every accepted synthetic
   image together, each batch drawn uniformly from the union (naive mixing);
3. ``pretrain_finetune``: ``pretrain_steps`` steps on the synthetic images
   only, then a fresh optimiser and ``steps`` steps on the real subset
   (RoentGen-v2's recipe, which beat mixing there).

Every phase uses AdamW (``lr``, weight decay 0.01), batches of ``batch_size``
drawn with replacement, binary cross-entropy on every label, no augmentation
(left and right matter on a chest X-ray). The phases that see real images draw
their batch indices from one random stream, so regimes 1 and 3 differ only in
where training starts, and regime 2 only in what it draws from.
Regime 3 spends ``pretrain_steps`` more steps than the others: the extra
compute is the synthetic data's, which is what the experiment asks about. The
pretrained model before fine-tuning is also scored (``synthetic_only``): it
shows whether the synthetic labels alone carry signal.

Labels: the CheXpert labels (No Finding aside) shown by at least one accepted
synthetic image. Real and test labels 1.0 are positive; 0.0, blank (NaN) and
uncertain (-1) count as negative. A label without positives (or negatives)
in the test set is reported with its counts and no AUROC.

Each regime other than ``real_only`` also gets ``mean_auroc_change``: its mean
AUROC minus real only's, with a paired bootstrap interval (both models scored
on the same resampled test images), the figure that says whether the synthetic
images helped beyond the noise of a small test set.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from xreal.core.labels import CHEXPERT_LABELS, NO_FINDING
from xreal.evaluate.inputs import (
    EvaluationError,
    TrainingSet,
    as_json,
    describe,
    image_batches,
    read_finished_run,
    read_training_set,
    resize_image,
)
from xreal.evaluate.metrics import auroc, auroc_interval, bootstrap_interval
from xreal.judges.judging import build_phantom_classifier, classifier_input
from xreal.run.dataset import XRealDataset

REGIMES = ("real_only", "mixed", "pretrain_finetune", "synthetic_only")
REGIME_NAMES = {
    "real_only": "real only",
    "mixed": "real + synthetic, mixed",
    "pretrain_finetune": "synthetic pretraining, real fine-tuning",
    "synthetic_only": "synthetic only (the pretrained model, before fine-tuning)",
}
ARCHITECTURE = {
    "model": "torchxrayvision DenseNet",
    "growth_rate": 16,
    "block_config": [4, 4, 4],
    "num_init_features": 32,
}
WEIGHT_DECAY = 0.01
UNKNOWN_LABELS = "real and test labels: 1.0 positive; 0.0, blank (NaN) and uncertain (-1) negative"


@dataclass
class _Images:
    """Classifier inputs ``[N, 1, S, S]`` in [-1024, 1024] and their labels ``[N, L]`` (1.0 or 0.0)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


def run_utility(
    real: str | os.PathLike[str],
    synthetic: str | os.PathLike[str],
    test: str | os.PathLike[str],
    size: int = 64,
    real_count: int | None = 200,
    steps: int = 300,
    pretrain_steps: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    real_split: str | None = "train",
    bootstrap_rounds: int = 500,
    level: float = 0.95,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the classifier in each regime and score it on ``test``; a JSON-able result for :func:`utility_table`.

    ``real``, ``test``: training-set folders (``index.parquet``); ``test`` is used
    whole, whatever its split. ``real_split``: the rows of ``real`` the subset is
    drawn from (None: all). ``real_count``: the subset's size (None: all of them).
    ``synthetic``: a finished ``xreal generate`` run; its accepted images are used.
    ``pretrain_steps`` defaults to ``steps``. Images are resized to ``size``.
    """
    started = time.perf_counter()
    if size < 16:
        raise EvaluationError(f"size must be at least 16 px for the classifier, got {size}")
    if steps < 1 or batch_size < 1:
        raise EvaluationError(f"steps and batch size must be at least 1, got {steps} and {batch_size}")
    pretrain_steps = steps if pretrain_steps is None else pretrain_steps
    if pretrain_steps < 1:
        raise EvaluationError(f"pretrain steps must be at least 1, got {pretrain_steps}")

    run = read_finished_run(synthetic)
    dataset = XRealDataset(run.root, xrv_names=False)
    if len(dataset) == 0:
        raise EvaluationError(f"{run.root}: the run has no accepted image with a file; nothing to train on")
    synthetic_positives = {
        label: int(dataset.labels[:, dataset.pathologies.index(label)].sum()) for label in dataset.pathologies
    }
    labels = [label for label in CHEXPERT_LABELS if label != NO_FINDING and synthetic_positives.get(label, 0) > 0]
    if not labels:
        raise EvaluationError(
            f"{run.root}: its accepted images show no pathology (all No Finding); a classifier cannot learn "
            "a label from them"
        )
    real_set = read_training_set(real, "--real")
    test_set = read_training_set(test, "--test")
    rows = _real_rows(real_set, real_split, real_count, seed)

    real_data = _training_images(real_set, rows, labels, size)
    test_data = _training_images(test_set, range(len(test_set)), labels, size)
    synthetic_data = _synthetic_images(dataset, labels, size)
    mixed_data = _Images(torch.cat([real_data.x, synthetic_data.x]), torch.cat([real_data.y, synthetic_data.y]))

    settings = {
        "size": size,
        "real_count": len(rows),
        "real_available": len(_split_rows(real_set, real_split)),
        "real_split": real_split,
        "synthetic_count": len(synthetic_data),
        "test_count": len(test_data),
        "labels": labels,
        "seed": seed,
        "steps": steps,
        "pretrain_steps": pretrain_steps,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": f"AdamW (weight decay {WEIGHT_DECAY}), a fresh one per phase",
        "loss": "binary cross-entropy on every label",
        "architecture": ARCHITECTURE,
        "unknown_labels": UNKNOWN_LABELS,
        "schedule": {
            "real_only": f"{steps} steps on the real subset",
            "mixed": f"{steps} steps on the real subset and the synthetic images, batches drawn from the union",
            "pretrain_finetune": f"{pretrain_steps} steps on the synthetic images, then {steps} on the real subset",
            "synthetic_only": f"the pretrain_finetune model after its {pretrain_steps} synthetic steps",
        },
        "bootstrap": {"rounds": bootstrap_rounds, "level": level},
        "train_positives": {
            "real": dict(zip(labels, real_data.y.sum(0).int().tolist(), strict=True)),
            "synthetic": dict(zip(labels, synthetic_data.y.sum(0).int().tolist(), strict=True)),
        },
    }
    inputs = {
        "real": describe(real_set.root / "index.parquet", real_set.index_sha256),
        "synthetic": describe(run.root / "samples.parquet", run.samples_sha256, run_id=run.record.get("run_id")),
        "test": describe(test_set.root / "index.parquet", test_set.index_sha256),
    }

    def fit(model, data: _Images, phase_steps: int, phase: int, name: str) -> float:
        clock = time.perf_counter()
        train(model, data, phase_steps, batch_size, lr, seed=seed * 1000 + phase, description=name, progress=progress)
        return time.perf_counter() - clock

    models: dict[str, torch.nn.Module] = {}
    seconds: dict[str, float] = {}
    for name in ("real_only", "mixed", "pretrain_finetune"):
        model = fresh_classifier(labels, seed)
        seconds[name] = 0.0
        if name == "pretrain_finetune":
            seconds[name] += fit(model, synthetic_data, pretrain_steps, 2, "synthetic pretraining")
            models["synthetic_only"] = copy.deepcopy(model)
            seconds["synthetic_only"] = seconds[name]
        seconds[name] += fit(model, mixed_data if name == "mixed" else real_data, steps, 0, REGIME_NAMES[name])
        models[name] = model
    truth = test_data.y.numpy().astype(bool)
    scores = {name: predict(models[name], test_data) for name in REGIMES}
    regimes = {}
    for name in REGIMES:
        regimes[name] = {
            "description": REGIME_NAMES[name],
            **_score(scores[name], truth, labels, bootstrap_rounds, level, seed),
            "seconds": seconds[name],
            "weights_sha256": weights_digest(models[name]),
        }
        if name != "real_only":
            regimes[name]["mean_auroc_change"] = _paired_change(
                scores[name], scores["real_only"], truth, bootstrap_rounds, level, seed
            )
    result = {"settings": settings, "inputs": inputs, "regimes": regimes, "seconds": time.perf_counter() - started}
    return as_json(result)


def fresh_classifier(labels: list[str], seed: int) -> torch.nn.Module:
    """The untrained classifier every regime starts from: the same weights for the same ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_phantom_classifier(
            labels, growth_rate=ARCHITECTURE["growth_rate"], block_config=tuple(ARCHITECTURE["block_config"])
        )


def train(
    model: torch.nn.Module,
    data: _Images,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    description: str = "training",
    progress: bool = False,
) -> torch.nn.Module:
    """``steps`` AdamW steps on batches drawn (with replacement) by ``seed``; returns the model in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in tqdm(range(steps), desc=description, disable=not progress, leave=False):
        idx = torch.from_numpy(rng.integers(0, len(data), batch_size))
        loss = F.binary_cross_entropy_with_logits(model(data.x[idx]), data.y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, data: _Images, batch_size: int = 256) -> np.ndarray:
    """Probabilities ``[N, L]`` of the classifier on ``data``."""
    model.eval()
    return np.concatenate(
        [torch.sigmoid(model(data.x[i : i + batch_size])).numpy() for i in range(0, len(data), batch_size)]
    )


def _evaluable(truth: np.ndarray) -> np.ndarray:
    """Which labels (columns of ``truth``) have both classes in the test set."""
    positives = truth.sum(0)
    return (positives > 0) & (positives < len(truth))


def _score(scores: np.ndarray, truth: np.ndarray, labels: list[str], rounds: int, level: float, seed: int) -> dict:
    per_label = {}
    for i, label in enumerate(labels):
        positives, negatives = int(truth[:, i].sum()), int((~truth[:, i]).sum())
        entry: dict[str, Any] = {"auroc": None, "low": None, "high": None, "positives": positives}
        entry["negatives"] = negatives
        if positives == 0 or negatives == 0:
            entry["note"] = f"no {'positives' if positives == 0 else 'negatives'} in the test set: no AUROC"
        else:
            entry["auroc"] = float(auroc(scores[:, i], truth[:, i]))
            low, high = auroc_interval(scores[:, i], truth[:, i], rounds=rounds, level=level, seed=seed)
            entry["low"], entry["high"] = float(low), float(high)
        per_label[label] = entry
    scored = [e["auroc"] for e in per_label.values() if e["auroc"] is not None]
    return {"labels": per_label, "mean_auroc": float(np.mean(scored)) if scored else None, "scored_labels": len(scored)}


def _paired_change(
    scores: np.ndarray, baseline: np.ndarray, truth: np.ndarray, rounds: int, level: float, seed: int
) -> dict[str, float | None]:
    """Mean AUROC (over the evaluable labels) of ``scores`` minus ``baseline``'s, with a paired bootstrap interval.

    Both models are scored on the same resampled test images each round, so the
    interval is that of the difference, narrower than two overlapping intervals
    suggest. A round that leaves a label without one of its classes is dropped.
    """
    columns = np.flatnonzero(_evaluable(truth))
    if columns.size == 0:
        return {"value": None, "low": None, "high": None}

    def change(rows: np.ndarray) -> float:
        t = truth[rows]
        return float(np.mean([auroc(scores[rows, i], t[:, i]) - auroc(baseline[rows, i], t[:, i]) for i in columns]))

    low, high = bootstrap_interval(change, len(truth), rounds=rounds, level=level, seed=seed)
    return {"value": change(np.arange(len(truth))), "low": float(low), "high": float(high)}


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, bytes): which weights a regime ended with."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _split_rows(training: TrainingSet, split: str | None) -> np.ndarray:
    if split is None:
        return np.arange(len(training))
    return np.flatnonzero(training.frame["split"].astype(str).to_numpy() == split)


def _real_rows(training: TrainingSet, split: str | None, count: int | None, seed: int) -> list[int]:
    """The scarce real subset: ``count`` rows of ``split``, drawn without replacement by ``seed``, in index order."""
    candidates = _split_rows(training, split)
    where = f"--real {training.root}"
    if len(candidates) == 0:
        raise EvaluationError(f"{where}: no image in split {split!r}; choose another split (or all rows)")
    if count is None:
        return candidates.tolist()
    if count < 1:
        raise EvaluationError(f"the real subset needs at least one image, got {count}")
    if count > len(candidates):
        raise EvaluationError(
            f"{where}: asked for {count} real images but split {split!r} has {len(candidates)}; "
            "ask for fewer or use a larger real set"
        )
    return sorted(np.random.default_rng(seed).choice(candidates, size=count, replace=False).tolist())


def _label_matrix(frame, labels: list[str]) -> torch.Tensor:
    columns = [frame[label].to_numpy(dtype=np.float64) if label in frame else np.zeros(len(frame)) for label in labels]
    return torch.from_numpy((np.stack(columns, axis=1) == 1.0).astype(np.float32))  # NaN and -1: negative


def _training_images(training: TrainingSet, rows, labels: list[str], size: int) -> _Images:
    rows = list(rows)
    images = np.concatenate(list(image_batches(training.paths(rows), size=size)))
    return _Images(classifier_input(images), _label_matrix(training.frame.iloc[rows], labels))


def _synthetic_images(dataset: XRealDataset, labels: list[str], size: int) -> _Images:
    """The run's accepted images (read by :class:`XRealDataset`, in [-1024, 1024]) at ``size``, and their labels."""
    images = np.stack(
        [resize_image((dataset[i]["img"][0] + 1024.0) / 2048.0, size) for i in range(len(dataset))]
    ).astype(np.float32)
    return _Images(classifier_input(images), _label_matrix(dataset.csv, labels))


def utility_table(result: dict[str, Any]) -> str:
    """The result of :func:`run_utility` as Markdown: AUROC (95% interval) per label and regime, then the means."""
    s = result["settings"]
    regimes = [name for name in REGIMES if name in result["regimes"]]
    level = round(100 * s["bootstrap"]["level"])
    header = ["label", "test +/-"] + [REGIME_NAMES[name].split(" (")[0] for name in regimes]
    lines = [
        f"Usefulness: AUROC on {s['test_count']} real test images ({level}% bootstrap interval, "
        f"{s['bootstrap']['rounds']} rounds). Real subset {s['real_count']} images"
        f"{'' if s['real_split'] is None else ' of split ' + repr(s['real_split'])}, "
        f"{s['synthetic_count']} synthetic; {s['size']} px; {s['steps']} steps per real phase"
        f", {s['pretrain_steps']} synthetic pretraining steps, "
        f"batch {s['batch_size']}, lr {s['lr']:g}, seed {s['seed']}; {result['seconds']:.0f} s in all.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---:|" + "---|" * len(regimes),
    ]
    first = result["regimes"][regimes[0]]["labels"]
    for label, entry in first.items():
        cells = [label, f"{entry['positives']}/{entry['negatives']}"]
        for name in regimes:
            e = result["regimes"][name]["labels"][label]
            cells.append("n/a" if e["auroc"] is None else f"{e['auroc']:.3f} ({e['low']:.3f}-{e['high']:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    means = ["**mean**", ""]
    for name in regimes:
        mean = result["regimes"][name]["mean_auroc"]
        means.append("n/a" if mean is None else f"**{mean:.3f}**")
    lines.append("| " + " | ".join(means) + " |")
    changes = []
    for name in regimes[1:]:
        change = result["regimes"][name].get("mean_auroc_change") or {}
        if change.get("value") is not None:
            interval = "" if change["low"] is None else f" ({change['low']:+.3f} to {change['high']:+.3f})"
            changes.append(f"{REGIME_NAMES[name].split(' (')[0]} {change['value']:+.3f}{interval}")
    if changes:
        lines += [
            "",
            f"Mean AUROC minus real only's, {level}% paired bootstrap interval over test images: "
            + "; ".join(changes)
            + ".",
        ]
    missing = [label for label, e in first.items() if e["auroc"] is None]
    if missing:
        lines += ["", "No AUROC (a test class is empty): " + ", ".join(f"{m} ({first[m]['note']})" for m in missing)]
    lines += ["", f"Labels: {UNKNOWN_LABELS}."]
    return "\n".join(lines) + "\n"
