"""Judges for phantom images, trained here on phantoms: an anatomy segmenter and a pathology classifier.

They measure what the demo model does (does the image follow the requested
anatomy, is the requested pathology there) where no pretrained chest X-ray
network applies. The classifier is torchxrayvision's DenseNet built without
pretrained weights and carrying its own label list, as torchxrayvision
models do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur
from tqdm.auto import tqdm

from xreal.judges.judging import (
    STRUCTURES,
    CheckpointEnsemble,
    RealismReference,
    anatomy_dice,
    build_phantom_classifier,
    classifier_input,
    dice,
    in_chunks,
    resize_inputs,
    save_phantom_judges,
)
from xreal.judges.phantom_segmenter import PhantomSegmenter
from xreal.phantom import renderer as phantom

__all__ = ["STRUCTURES", "anatomy_dice", "dice"]  # re-exported: the benchmarks measure with them

# The demo judges' recipe: the classifier's snapshots at these steps of one constant-rate run, the feature network
# trained apart (README, "Judges trained longer").
CLASSIFIER_STEPS = (2500, 3000, 3500, 4000)
FEATURE_STEPS = 1500


def train_phantom_segmenter(size: int = 64, count: int = 2000, steps: int = 600, seed: int = 123) -> PhantomSegmenter:
    """Train the segmenter on freshly rendered phantoms (their label maps are exact)."""
    cases = phantom.generate(count, size, seed=seed)
    images = torch.from_numpy(cases.images)[:, None]
    targets = torch.from_numpy(cases.anatomy).long()
    torch.manual_seed(seed)
    return fit(PhantomSegmenter(), images, targets, F.cross_entropy, steps, 2e-3, seed, "segmenter")


def fit(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn,
    steps: int,
    lr: float,
    seed: int,
    description: str,
    augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
    after_step: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Plain AdamW on random batches of 32 (each passed through ``augment`` when given); returns the model in
    eval mode. ``after_step(step, model)`` is called after each step, counted from 1."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    model.train()
    for step in tqdm(range(1, steps + 1), desc=description):
        idx = torch.from_numpy(rng.integers(0, len(inputs), 32))
        batch = inputs[idx] if augment is None else augment(inputs[idx], rng)
        loss = loss_fn(model(batch), targets[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step, model)
    return model.eval()


def phantom_classifier(growth_rate: int = 16, block_config: tuple[int, ...] = (4, 4, 4)):
    """torchxrayvision's DenseNet, untrained, with the phantom pathologies as its label list."""
    return build_phantom_classifier(phantom.PHANTOM_PATHOLOGIES, growth_rate, block_config)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Images ``[..., H, W]`` blurred by a Gaussian of ``sigma`` pixels (kernel out to 3 sigma)."""
    kernel = 2 * int(np.ceil(3.0 * sigma)) + 1
    return gaussian_blur(images, [kernel, kernel], [sigma, sigma])


def random_blur(max_sigma: float, probability: float = 0.5):
    """An ``augment`` for :func:`fit`: each image of a batch, with ``probability``, blurred by a Gaussian of sigma
    uniform in (0, ``max_sigma``) pixels of the batch."""

    def augment(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        out = batch.clone()
        for i in np.flatnonzero(rng.random(len(batch)) < probability):
            out[i] = blur(batch[i], float(rng.uniform(0.0, max_sigma)) + 1e-3)
        return out

    return augment


def given_back(round_trip: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """``images`` as ``round_trip`` gives them back, which must be as many images of the same size."""
    returned = np.asarray(round_trip(images), dtype=np.float32)
    if returned.shape != images.shape:
        raise ValueError(f"the round trip gave back images of shape {returned.shape} for {images.shape}")
    return returned


def snapshot_steps(steps: int | Sequence[int]) -> list[int]:
    """The steps a classifier is kept at, ascending: one count, or the snapshots of a checkpoint ensemble."""
    counts = list(steps) if isinstance(steps, Sequence) else [steps]
    if not counts or any(type(count) is not int or count < 1 for count in counts):
        raise ValueError(f"classifier steps must be whole numbers above 0, not {steps!r}")
    return sorted(set(counts))


def train_phantom_classifier(
    size: int = 64,
    count: int = 3000,
    steps: int | Sequence[int] = 800,
    seed: int = 321,
    input_size: int | None = None,
    blur_sigma: float = 0.0,
    round_trip: Callable[[np.ndarray], np.ndarray] | None = None,
):
    """Train the classifier on phantoms (multi-label, one output per phantom pathology).

    ``input_size`` upsamples the ``size`` px phantoms first: the DenseNet's stem shrinks its input four times
    before the first dense block, which leaves a 2-pixel plate of atelectasis half a cell wide at 64 px.
    ``blur_sigma`` (phantom pixels) blurs half the training images by up to that much, labels unchanged, so that
    the classifier reads a finding from its shape and density rather than from how sharp the lung texture is.
    ``round_trip`` (images in [0, 1] to images, e.g. :meth:`XRealPipeline.round_trip`) adds each phantom once more
    as it comes back from it, labels unchanged: half of what the classifier sees is then in the decoder's texture,
    the texture of every image it will judge.
    ``steps`` as several counts trains to the last and returns a :class:`CheckpointEnsemble` of the network at each
    (mean probability): the snapshots of one run at a constant rate disagree on generated images far more than on
    phantoms, and their mean finds more atelectasis than any one of them (README, "Judges trained longer").
    """
    kept = snapshot_steps(steps)
    cases = phantom.generate(count, size, seed=seed)
    pictures = (
        cases.images if round_trip is None else np.concatenate([cases.images, given_back(round_trip, cases.images)])
    )
    images = resize_inputs(classifier_input(pictures), input_size)
    targets = torch.tensor(
        [[label in labels for label in phantom.PHANTOM_PATHOLOGIES] for labels in cases.labels], dtype=torch.float32
    ).repeat(len(pictures) // count, 1)
    augment = random_blur(blur_sigma * images.shape[-1] / size) if blur_sigma > 0 else None
    snapshots = {}

    def keep(step: int, model: nn.Module) -> None:
        if step in kept:
            snapshots[step] = copy.deepcopy(model).eval()

    torch.manual_seed(seed)
    model = fit(
        phantom_classifier(),
        images,
        targets,
        F.binary_cross_entropy_with_logits,
        kept[-1],
        1e-3,
        seed,
        "classifier",
        augment=augment,
        after_step=keep if len(kept) > 1 else None,
    )
    return model if len(kept) == 1 else CheckpointEnsemble([snapshots[step] for step in kept])


@torch.no_grad()
def classify(model, images: np.ndarray, input_size: int | None = None) -> dict[str, np.ndarray]:
    """Probability of each label for images ``[B, H, W]`` in [0, 1] (calibrated when the model has op_threshs),
    upsampled to ``input_size`` first for a classifier trained that way."""
    outputs = in_chunks(model, resize_inputs(classifier_input(images), input_size))
    probabilities = (outputs if getattr(model, "op_threshs", None) is not None else torch.sigmoid(outputs)).numpy()
    return {label: probabilities[:, i] for i, label in enumerate(model.pathologies)}


def save_weights(model: nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    model.load_state_dict(load_file(path))
    return model.eval()


def operating_point(scores: np.ndarray, truth: np.ndarray, min_specificity: float = 0.95) -> float:
    """The threshold with the best sensitivity + specificity among those keeping ``min_specificity``.

    A filter must rarely see a pathology that is not there (it would reject
    healthy images), so specificity is held first.
    """
    if truth.all() or not truth.any():
        return 0.5
    best, best_j = float(np.quantile(scores[~truth], min_specificity)), -1.0
    for t in np.unique(scores):
        specificity = (scores[~truth] < t).mean()
        j = (scores[truth] >= t).mean() + specificity
        if specificity >= min_specificity and j > best_j:
            best, best_j = float(t), j
    return best


def _share(hits: np.ndarray) -> float | None:
    """The share of true values, or None (not measured) when there are none to count."""
    return float(hits.mean()) if hits.size else None


def _rates(detected: np.ndarray, truth: np.ndarray, labels: list[str]) -> tuple[dict, dict]:
    """Per label (columns of ``[N, L]`` calls and truth): sensitivity and specificity, None for a label the
    held-out set has no positive (or no negative) of."""
    sensitivity = {lab: _share(detected[truth[:, i], i]) for i, lab in enumerate(labels)}
    specificity = {lab: _share(~detected[~truth[:, i], i]) for i, lab in enumerate(labels)}
    return sensitivity, specificity


@torch.no_grad()
def train_phantom_judges(
    out: str | Path,
    size: int = 64,
    seed: int = 2024,
    segmenter_steps: int = 600,
    classifier_steps: int | Sequence[int] = CLASSIFIER_STEPS,
    feature_steps: int = FEATURE_STEPS,
    train_count: int = 3000,
    held_out_count: int = 800,
    input_size: int | None = None,
    blur_sigma: float = 1.5,
    round_trip: Callable[[np.ndarray], np.ndarray] | None = None,
    through_autoencoder: dict[str, str] | None = None,
) -> Path:
    """Train, calibrate and save the phantom judge set (classifier, segmenter, realism reference).

    The judges see ``size`` px phantoms, upsampled to ``input_size`` when given (the set's recorded image size, so
    :meth:`JudgeSet.classifier_inputs` upsamples generated images the same way).
    Calibration and the realism threshold use held-out phantoms of another seed:
    each label's operating point keeps 95% specificity there (:func:`operating_point`).
    The classifier trains with ``blur_sigma`` (see :func:`train_phantom_classifier`): generated images are smoother
    than phantoms, and a classifier that never saw a blurred lung calls one oedema (86% of healthy phantoms blurred
    by 1.2 px). Its sensitivity and specificity on held-out phantoms blurred by 1 px are recorded beside the plain.
    With ``round_trip`` (``through_autoencoder`` records whose: ``bundle`` and ``vae_sha256``, which
    :func:`~xreal.core.records.judges_autoencoder_mismatch` checks bundles against) it also trains on the phantoms as
    the autoencoder gives them back (see :func:`train_phantom_classifier`), and its rates on held-out phantoms through
    it are recorded too. The set then gets a feature network of its own, trained as the classifier is but without
    the autoencoder (``feature_steps``): it gives the realism reference and every figure of ``xreal evaluate``. A
    network taught to read the decoder's texture as nothing cannot tell generated images from real ones (on the demo
    run: Fréchet distance halved, a third of the images called likely copies).

    ``classifier_steps`` as several counts makes the classifier a checkpoint ensemble of the run's snapshots at
    those steps (see :func:`train_phantom_classifier`). The default's snapshots find 0.91 of atelectasis in 1600 fresh
    held-out phantoms where 1500 steps found 0.86, and any single end point swings on generated images (README,
    "Judges trained longer"). ``feature_steps`` trains the feature network apart from the classifier, so that a
    retrained classifier moves no figure the feature network gives; every demo figure so far was measured at 1500.
    """
    input_size = input_size or size
    snapshot_steps(classifier_steps)  # refused before any training
    with torch.enable_grad():
        segmenter = train_phantom_segmenter(size, count=train_count, steps=segmenter_steps, seed=seed)
        classifier = train_phantom_classifier(
            size,
            count=train_count,
            steps=classifier_steps,
            seed=seed + 1,
            input_size=input_size,
            blur_sigma=blur_sigma,
            round_trip=round_trip,
        )
        feature_network = None
        if round_trip is not None:
            feature_network = train_phantom_classifier(
                size, count=train_count, steps=feature_steps, seed=seed + 1, input_size=input_size,
                blur_sigma=blur_sigma,
            )  # fmt: skip
    features = classifier if feature_network is None else feature_network
    training = phantom.generate(train_count, size, seed=seed + 1)
    held_out = phantom.generate(held_out_count, size, seed=seed + 2)
    held_out_inputs = resize_inputs(classifier_input(held_out.images), input_size)
    probabilities = torch.sigmoid(classifier(held_out_inputs)).numpy()
    truth = np.array([[label in labels for label in classifier.pathologies] for labels in held_out.labels])
    blurred = torch.sigmoid(classifier(blur(held_out_inputs, input_size / size))).numpy()
    thresholds = [operating_point(probabilities[:, i], truth[:, i]) for i in range(truth.shape[1])]
    classifier.op_threshs = torch.tensor(thresholds, dtype=torch.float32)  # from here on its outputs are calibrated
    detected = probabilities >= np.array(thresholds)
    detected_blurred = blurred >= np.array(thresholds)
    sensitivity, specificity = _rates(detected, truth, classifier.pathologies)
    blurred_sensitivity, blurred_specificity = _rates(detected_blurred, truth, classifier.pathologies)
    returned_rates = {}
    if round_trip is not None:
        returned = classify(classifier, given_back(round_trip, held_out.images), input_size)
        detected_returned = np.stack([returned[lab] >= 0.5 for lab in classifier.pathologies], axis=1)
        returned_sensitivity, returned_specificity = _rates(detected_returned, truth, classifier.pathologies)
        returned_rates = {
            "through_autoencoder": {
                lab: {"sensitivity": returned_sensitivity[lab], "specificity": returned_specificity[lab]}
                for lab in classifier.pathologies
            }
        }
    realism = RealismReference.fit(
        features.features2(resize_inputs(classifier_input(training.images), input_size)),
        features.features2(held_out_inputs),
    )
    # The segmenter works at the phantoms' size; judged images reach it resized from the classifier's input.
    found = segmenter.segment(((resize_inputs(held_out_inputs, size)[:, 0] + 1024.0) / 2048.0).numpy())
    metrics = {
        "held_out": f"{held_out_count} phantoms, seed {seed + 2}",
        "sensitivity": sensitivity,
        "specificity": specificity,
        "blurred_1px": {
            lab: {"sensitivity": blurred_sensitivity[lab], "specificity": blurred_specificity[lab]}
            for lab in classifier.pathologies
        },
        **returned_rates,
        "segmenter_dice": {
            name: float(np.mean([dice(a == label, b == label) for a, b in zip(held_out.anatomy, found, strict=True)]))
            for name, label in STRUCTURES.items()
        },
        "realism_threshold": realism.threshold,
    }
    architecture = {"growth_rate": 16, "block_config": [4, 4, 4], "num_init_features": 32}
    seen = f"phantoms at {size} px" + (f", upsampled to {input_size}" if input_size != size else "")

    def recipe(steps: int | Sequence[int]) -> str:
        kept = snapshot_steps(steps)
        counts = ", ".join(map(str, kept))
        trained = f"{counts} steps" if len(kept) == 1 else f"mean of its snapshots at {counts} steps"
        blurred = f", half of them blurred by up to {blur_sigma:g} px" if blur_sigma > 0 else ""
        return f"{train_count} (seed {seed + 1}, {trained}{blurred}"

    described = through_autoencoder or {}
    source = "an autoencoder"
    if described.get("bundle"):
        source = f"the autoencoder of {described['bundle']}" + (
            f", vae sha256 {described['vae_sha256'][:12]}" if described.get("vae_sha256") else ""
        )
    if round_trip is None:
        trained = f"classifier and realism reference {recipe(classifier_steps)})"
    else:
        trained = (
            f"classifier {recipe(classifier_steps)}, each also through {source}), "
            f"feature network and realism reference {recipe(feature_steps)})"
        )
    trained_on = f"{seen}: segmenter {train_count} (seed {seed}, {segmenter_steps} steps), {trained}"
    return save_phantom_judges(
        out,
        classifier,
        segmenter,
        realism,
        input_size,
        architecture,
        trained_on,
        metrics,
        segmenter_size=size,
        feature_network=feature_network,
        through_autoencoder=through_autoencoder if round_trip is not None else None,
    )
