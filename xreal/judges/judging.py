"""Quality judges: score every generated image so a policy can accept or reject it.

A *judge set* holds the models that look at an image:

- a multi-label classifier in torchxrayvision's conventions (a ``pathologies``
  list, inputs in [-1024, 1024], ``op_threshs`` calibrating every label so that
  0.5 is its operating point), or a :class:`CheckpointEnsemble` of one
  training run's snapshots that follows the same conventions;
- an anatomy segmenter (lungs and heart, compared with the requested anatomy);
- a realism reference: the mean and precision of the classifier's features on
  real images, so the Mahalanobis distance of a generated image's features says
  how far it lies from the images the judges know.

Sanity checks (NaN, blank, constant, saturated) need no model.

Two judge sets exist: ``phantom`` (trained here on phantoms, shipped inside the
demo bundle, safetensors only) and ``torchxrayvision`` (pretrained
torchxrayvision models from a local weight cache, hash-checked before loading;
see :mod:`xreal.core.weights`).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from xreal.core.errors import XRealError
from xreal.core.files import sha256_file, write_json
from xreal.core.labels import CHEXPERT_LABELS, STRUCTURES, canonical_label, score_key
from xreal.core.masks import resize_label_map, resize_mask
from xreal.core.records import (  # noqa: F401 - the judge set's record, re-exported where it was
    JUDGES_FILE,
    XRV_AUTOENCODER,
    XRV_CLASSIFIER,
    XRV_SEGMENTER,
    JudgeError,
    judge_files,
    judges_digest,
    read_judges_record,
    verify_judge_set,
    xrv_judge_files,
    xrv_weight_names,
)
from xreal.core.weights import import_xrv

JUDGES_VERSION = 1
XRV_NAMES = {"Effusion": "Pleural Effusion"}
CPU_CHUNK = 32  # images a judge network sees per call on a CPU (`benchmarks/judge_speed.py`)


def chexpert_name(label: str) -> str:
    """A classifier label in the CheXpert vocabulary where one matches (torchxrayvision says 'Effusion')."""
    label = XRV_NAMES.get(label, label)
    try:
        return canonical_label(label)
    except XRealError:
        return label


def classifier_input(images: np.ndarray) -> torch.Tensor:
    """Images ``[B, H, W]`` in [0, 1] -> torchxrayvision's ``[B, 1, H, W]`` in [-1024, 1024]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float()[:, None] * 2048.0 - 1024.0


def in_chunks(
    network: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, size: int = CPU_CHUNK
) -> torch.Tensor:
    """``network(inputs)``, called on ``size`` images at a time when the inputs are on a CPU.

    A judge network on a CPU is about twice as fast on 32 images a call as on 128
    (`benchmarks/judge_speed.py`); the outputs agree to float32 rounding (to the bit on
    some CPUs; on AVX-512 ones scores move by ~1e-8, features by ~1e-6). Elsewhere it
    gets the whole batch."""
    if inputs.device.type != "cpu" or len(inputs) <= size:
        return network(inputs)
    return torch.cat([network(inputs[i : i + size]) for i in range(0, len(inputs), size)])


def resize_inputs(inputs: torch.Tensor, size: int | None) -> torch.Tensor:
    """``[B, C, H, W]`` inputs at ``size`` px: area-averaged when shrinking, bilinear when growing, unchanged when
    ``size`` is None or already theirs."""
    if size is None or inputs.shape[-1] == size:
        return inputs
    return F.interpolate(inputs, size=(size, size), mode="area" if inputs.shape[-1] > size else "bilinear")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


def anatomy_dice(requested: np.ndarray, found: np.ndarray, ignore: np.ndarray | None = None) -> dict[str, float]:
    """Dice of each structure between a requested and a segmented label map, outside ``ignore`` when given.

    A structure that ``ignore`` covers for more than half of its area is not
    measured (NaN): too little of it is left to compare.
    """
    keep = ~ignore if ignore is not None else np.ones(requested.shape, dtype=bool)
    scores = {}
    for name, label in STRUCTURES.items():
        wanted = requested == label
        if ignore is not None and (wanted & keep).sum() < 0.5 * wanted.sum():
            scores[name] = float("nan")
        else:
            scores[name] = dice(wanted & keep, (found == label) & keep)
    return scores


def sanity_scores(image: np.ndarray) -> dict[str, float]:
    """Model-free checks of one image: finite, spread, clipped pixels."""
    finite = np.isfinite(image)
    values = image[finite]
    return {
        "sanity_nonfinite": float(1.0 - finite.mean()),
        "sanity_std": float(values.std()) if values.size else 0.0,
        "sanity_saturated": float(((values <= 0.0) | (values >= 1.0)).mean()) if values.size else 1.0,
    }


@dataclass
class RealismReference:
    """Feature statistics of real images: the distance of new features to them is the realism score."""

    mean: torch.Tensor
    precision: torch.Tensor
    threshold: float  # distance that held-out real images stay under (their 99.9th percentile)

    @classmethod
    def fit(cls, features: torch.Tensor, held_out: torch.Tensor, shrinkage: float = 0.1) -> RealismReference:
        mean = features.mean(0)
        centered = features - mean
        cov = centered.T @ centered / max(1, len(features) - 1)
        cov = (1 - shrinkage) * cov + shrinkage * torch.eye(len(mean)) * cov.diagonal().mean()
        reference = cls(mean, torch.linalg.inv(cov), 0.0)
        reference.threshold = float(np.quantile(reference.distance(held_out), 0.999))
        return reference

    def distance(self, features: torch.Tensor) -> np.ndarray:
        centered = features.double() - self.mean.double()
        squared = ((centered @ self.precision.double()) * centered).sum(1).clamp(min=0)
        return squared.sqrt().numpy()


def pspnet_label_scores(probabilities: torch.Tensor, targets: Sequence[str]) -> torch.Tensor:
    """ChestX-Det probabilities ``[B, 14, H, W]`` -> ``[B, 4, H, W]`` whose argmax is an Anatomy label map.

    A pixel is background unless a lung or the heart passes 0.5; the heart wins
    where it overlaps a lung, as in the project's label maps. ChestX-Det names
    sides as the patient's, like :class:`~xreal.core.labels.Anatomy`.
    """
    names = list(targets)
    right, left, heart = (probabilities[:, names.index(n)] for n in ("Right Lung", "Left Lung", "Heart"))
    heart = torch.where(heart > 0.5, heart + 1.0, heart)
    return torch.stack([torch.full_like(heart, 0.5), right, left, heart], 1)


class XRVAnatomySegmenter(torch.nn.Module):
    """torchxrayvision's ChestX-Det PSPNet as an anatomy segmenter: ``[B, 1, H, W]`` in [0, 1] -> ``[B, 4, H, W]``."""

    def __init__(self, pspnet: torch.nn.Module):
        super().__init__()
        self.pspnet = pspnet

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = torch.sigmoid(self.pspnet(images * 2048.0 - 1024.0))
        probabilities = F.interpolate(probabilities, size=images.shape[-2:], mode="bilinear")
        return pspnet_label_scores(probabilities, self.pspnet.targets)


class ReconstructionError(torch.nn.Module):
    """Realism as torchxrayvision's ResNetAE reconstruction error: mean absolute error in [0, 1] units.

    It has no calibrated threshold (that needs real images): set
    ``realism.max_distance`` in the policy to judge with it.
    """

    threshold = None

    def __init__(self, autoencoder: torch.nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` ``[B, 1, 224, 224]`` in [-1024, 1024] -> ``[B]``."""
        return (self.autoencoder(inputs)["out"] - inputs).abs().mean((1, 2, 3)) / 2048.0


@dataclass
class JudgeSet:
    """The models that score images, on one device. Build with :func:`load_judges`."""

    kind: str
    image_size: int
    classifier: torch.nn.Module
    segmenter: torch.nn.Module | None
    realism: RealismReference | ReconstructionError | None
    files: dict[str, str] = field(default_factory=dict)  # weight file -> sha256
    folder: Path | None = None
    segmenter_size: int | None = None  # when the segmenter works at another size than the classifier
    # Whose features2 the realism reference and every figure of `xreal evaluate` use (default: the classifier's).
    feature_network: torch.nn.Module | None = None

    @property
    def feature_model(self) -> torch.nn.Module:
        """The network whose ``features2`` :meth:`features` and the realism reference read."""
        return self.classifier if self.feature_network is None else self.feature_network

    @property
    def feature_source(self) -> str:
        """What :meth:`features` reads, as reports name it."""
        return "classifier" if self.feature_network is None else "own feature network"

    @property
    def labels(self) -> list[str]:
        """The CheXpert labels this set judges (classifier outputs outside that vocabulary are scored only)."""
        return [name for name in map(chexpert_name, self.classifier.pathologies) if name in CHEXPERT_LABELS]

    def classifier_inputs(self, images: np.ndarray) -> torch.Tensor:
        """Images ``[B, H, W]`` in [0, 1] -> the classifier's input on its device: [-1024, 1024] at its size."""
        clean = np.nan_to_num(np.asarray(images, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)
        return resize_inputs(classifier_input(clean).to(next(self.classifier.parameters()).device), self.image_size)

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        """The :attr:`feature_model`'s ``features2`` of images ``[B, H, W]`` in [0, 1], float32 ``[B, D]``.

        This is the FXD convention (torchxrayvision DenseNet ``features2`` on
        inputs in [-1024, 1024] at the classifier's size), the space every
        fidelity and memorisation figure of ``xreal evaluate`` is measured in.
        """
        return in_chunks(self.feature_model.features2, self.classifier_inputs(images)).float().cpu().numpy()

    @property
    def segmentation_size(self) -> int:
        """Side of the label maps :meth:`segment` returns."""
        return self.segmenter_size or self.image_size

    @torch.no_grad()
    def segment(self, images: np.ndarray) -> np.ndarray:
        """Anatomy label maps ``[B, S, S]`` (uint8, S :attr:`segmentation_size`) of images ``[B, H, W]`` in [0, 1]."""
        if self.segmenter is None:
            raise JudgeError(f"the {self.kind} judge set has no anatomy segmenter")
        return self._segment(self.classifier_inputs(images))

    def _segment(self, inputs: torch.Tensor) -> np.ndarray:
        """Label maps of classifier inputs (the segmenter reads [0, 1] at its own size)."""
        inputs = resize_inputs(inputs, self.segmenter_size)
        return in_chunks(self.segmenter, (inputs + 1024.0) / 2048.0).argmax(1).cpu().numpy().astype(np.uint8)

    @property
    def feature_size(self) -> int:
        """Length of a :meth:`features` vector."""
        with torch.no_grad():
            probe = np.zeros((1, self.image_size, self.image_size), dtype=np.float32)
            return int(self.features(probe).shape[1])

    @torch.no_grad()
    def score(
        self,
        images: np.ndarray,
        anatomy: np.ndarray | None = None,
        pathology: Sequence[np.ndarray | None] | None = None,
    ) -> list[dict[str, float]]:
        """Scores per image ``[B, H, W]`` in [0, 1]; ``anatomy`` (requested label maps) enables Dice.

        Where a ``pathology`` mask is given, Dice is measured outside it: a
        pathology may rightly change the anatomy it covers (an enlarged heart,
        a lung compressed by effusion), the rest must follow the request.

        Keys: ``sanity_*``; ``p_<label>`` for every classifier label (calibrated:
        0.5 is the label's operating point); ``dice_<structure>``; ``realism_distance``.
        """
        images = np.asarray(images, dtype=np.float32)
        rows = [sanity_scores(image) for image in images]
        inputs = self.classifier_inputs(images)
        probabilities = in_chunks(self.classifier, inputs).float().cpu().numpy()
        for row, p in zip(rows, probabilities, strict=True):
            row.update(
                {
                    score_key("p", chexpert_name(label)): float(v)
                    for label, v in zip(self.classifier.pathologies, p, strict=True)
                    if label
                }
            )
        if isinstance(self.realism, RealismReference):
            distances = self.realism.distance(in_chunks(self.feature_model.features2, inputs).float().cpu())
        elif self.realism is not None:
            distances = in_chunks(self.realism, inputs).float().cpu().numpy()
        if self.realism is not None:
            for row, d in zip(rows, distances, strict=True):
                row["realism_distance"] = float(d)
        if self.segmenter is not None and anatomy is not None:
            found = self._segment(inputs)
            masks = pathology if pathology is not None else [None] * len(found)
            for row, requested, segmented, mask in zip(rows, anatomy, found, masks, strict=True):
                size = segmented.shape[0]
                requested = resize_label_map(np.asarray(requested), size)
                ignore = resize_mask(np.asarray(mask, dtype=bool), size, rule="any") if mask is not None else None
                row.update({score_key("dice", k): v for k, v in anatomy_dice(requested, segmented, ignore).items()})
        return rows

    @property
    def realism_threshold(self) -> float | None:
        return self.realism.threshold if self.realism is not None else None

    def to(self, device: str | torch.device) -> JudgeSet:
        """Move every network to ``device``; on a CPU their weights take the channels-last layout, in which they
        run 1.5-1.9x faster there (`benchmarks/judge_speed.py`; scores change in the sixth decimal)."""
        cpu = torch.device(device).type == "cpu"
        for model in (self.classifier, self.segmenter, self.realism, self.feature_network):
            if isinstance(model, torch.nn.Module):
                model.to(device)
                if cpu:
                    model.to(memory_format=torch.channels_last)
        return self


def build_phantom_classifier(
    pathologies: Sequence[str], growth_rate: int = 16, block_config: Sequence[int] = (4, 4, 4), num_init_features=32
):
    """torchxrayvision's DenseNet, untrained, carrying ``pathologies`` as its label list."""
    model = import_xrv().models.DenseNet(
        growth_rate=growth_rate,
        block_config=tuple(block_config),
        num_init_features=num_init_features,
        num_classes=len(pathologies),
        in_channels=1,
        weights=None,
        apply_sigmoid=False,
    )
    model.pathologies = list(pathologies)
    return model


class CheckpointEnsemble(torch.nn.Module):
    """Snapshots of one classifier's training run judging as one classifier: the mean of their probabilities.

    It follows torchxrayvision's conventions: it carries the members' ``pathologies``, and once ``op_threshs`` is
    set its outputs are calibrated (0.5 at each label's operating point, :func:`torchxrayvision.models.op_norm`).
    Uncalibrated it returns the logit of the mean probability, as a lone member returns logits. Its ``features2``
    are the last member's: the end of the run.
    """

    def __init__(self, members: Sequence[torch.nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("a checkpoint ensemble needs at least one member")
        if any(getattr(m, "op_threshs", None) is not None for m in members):
            raise ValueError("the ensemble is calibrated as a whole: its members must have no op_threshs")
        self.members = torch.nn.ModuleList(members)
        self.pathologies = list(members[0].pathologies)
        self.register_buffer("op_threshs", None)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([torch.sigmoid(member(inputs)) for member in self.members]).mean(0)
        if self.op_threshs is None:
            return torch.logit(probabilities, eps=1e-7)
        return import_xrv().models.op_norm(probabilities, self.op_threshs)

    def features2(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.members[-1].features2(inputs)


def save_phantom_judges(
    folder: str | os.PathLike[str],
    classifier,
    segmenter,
    realism: RealismReference,
    image_size: int,
    architecture: dict[str, Any],
    trained_on: str,
    metrics: dict[str, Any] | None = None,
    segmenter_size: int | None = None,
    feature_network: torch.nn.Module | None = None,
    through_autoencoder: dict[str, str] | None = None,
) -> Path:
    """Write a phantom judge set: safetensors weights and ``judges.json`` with thresholds and checksums.

    ``feature_network`` (same architecture as the classifier) gives the set features of its own: those of
    :meth:`JudgeSet.features` and the ``realism`` reference, which must then be fitted on them.
    ``through_autoencoder`` records the autoencoder the classifier also trained through (``bundle``,
    ``vae_sha256``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, folder / "classifier.safetensors")
    save_file({k: v.contiguous() for k, v in segmenter.state_dict().items()}, folder / "segmenter.safetensors")
    save_file(
        {"mean": realism.mean.float().contiguous(), "precision": realism.precision.float().contiguous()},
        folder / "realism.safetensors",
    )
    files = ["classifier.safetensors", "segmenter.safetensors", "realism.safetensors"]
    feature_part = {}
    if feature_network is not None:
        files.append("features.safetensors")
        save_file({k: v.contiguous() for k, v in feature_network.state_dict().items()}, folder / files[3])
        feature_part = {
            "features": {"file": files[3], "class": "torchxrayvision.models.DenseNet", "architecture": architecture}
        }
    record = {
        "judges_version": JUDGES_VERSION,
        "kind": "phantom",
        "image_size": image_size,
        "classifier": {
            "file": files[0],
            "class": "torchxrayvision.models.DenseNet",
            "architecture": architecture,
            "pathologies": list(classifier.pathologies),
            "op_threshs": [float(v) for v in classifier.op_threshs],
            **({"members": len(classifier.members)} if isinstance(classifier, CheckpointEnsemble) else {}),
        },
        "segmenter": {  # without diffusers' private keys: one lists a set, in another order on every retrain
            "file": files[1],
            "class": "xreal.phantom_judges.PhantomSegmenter",
            "config": {k: v for k, v in segmenter.config.items() if not k.startswith("_")},
            "image_size": segmenter_size or image_size,
        },
        "realism": {"file": files[2], "threshold": realism.threshold},
        **feature_part,
        **({"through_autoencoder": dict(through_autoencoder)} if through_autoencoder else {}),
        "trained_on": trained_on,
        "metrics": metrics or {},
        "files": {name: sha256_file(folder / name) for name in files},
    }
    write_json(folder / JUDGES_FILE, record)
    return folder


def _rate(value: float | None) -> str:
    """A recorded sensitivity or specificity as a card shows it (None: the held-out set had no case to count)."""
    return "not measured" if value is None else f"{value:.3f}"


def judges_card(folder: str | os.PathLike[str]) -> str:
    """A Markdown section describing a judge set and what it measured (for model cards)."""
    record = read_judges_record(folder)
    metrics = record.get("metrics", {})
    lines = [
        f"The quality gate of `xreal generate` ({record['kind']} judges: `{Path(folder).name}/`), "
        f"trained on {record.get('trained_on', 'unknown data')}.",
    ]
    if "sensitivity" in metrics:
        lines += [
            "",
            f"Measured on {metrics.get('held_out', 'held-out data')}, at the calibrated operating points "
            "(each keeps 95% specificity, so a healthy image is rarely rejected for a finding it does not show):",
            "",
        ]
        variants = {
            name: metrics[key]
            for key, name in (("blurred_1px", "blurred"), ("through_autoencoder", "autoencoder"))
            if metrics.get(key)
        }
        notes = {
            "blurred": "The blurred columns score the same phantoms blurred by 1 px, as smooth as a generated image "
            "may be.",
            "autoencoder": "The autoencoder columns score them as the model's autoencoder gives them back: in the "
            "decoder's texture, which every generated image has.",
        }
        if variants:
            lines += [" ".join(notes[name] for name in variants), ""]
        lines += [
            "| label | sensitivity | specificity |"
            + "".join(f" {name}: sensitivity | {name}: specificity |" for name in variants),
            "|---|---:|---:|" + "---:|---:|" * len(variants),
        ]
        for label, value in metrics["sensitivity"].items():
            row = f"| {label} | {_rate(value)} | {_rate(metrics['specificity'][label])} |"
            for rates in variants.values():
                if label in rates:
                    row += f" {_rate(rates[label]['sensitivity'])} | {_rate(rates[label]['specificity'])} |"
            lines.append(row)
    if "segmenter_dice" in metrics:
        dice_text = ", ".join(f"{k} {v:.3f}" for k, v in metrics["segmenter_dice"].items())
        lines += ["", f"Segmenter Dice: {dice_text}."]
    if "realism_threshold" in metrics:
        lines += [f"Realism threshold (99.9% of held-out real images under it): {metrics['realism_threshold']:.2f}."]
    return "\n".join(lines)


def load_phantom_judges(folder: str | os.PathLike[str], device: str = "cpu") -> JudgeSet:
    """Load a phantom judge set, every file checked against its recorded sha256 first."""
    from xreal.judges.phantom_segmenter import PhantomSegmenter

    folder = Path(folder)
    record = verify_judge_set(folder)
    spec = record["classifier"]
    members = spec.get("members")  # checked by verify_judge_set
    if members is None:
        classifier = build_phantom_classifier(spec["pathologies"], **spec["architecture"])
    else:
        classifier = CheckpointEnsemble(
            [build_phantom_classifier(spec["pathologies"], **spec["architecture"]) for _ in range(members)]
        )
    classifier.op_threshs = torch.tensor(spec["op_threshs"], dtype=torch.float32)  # a buffer: set before loading
    try:
        classifier.load_state_dict(load_file(folder / spec["file"]))
    except RuntimeError as error:  # e.g. a member count the file does not hold
        described = f"{members} networks" if members else "one network"
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
        raise JudgeError(
            f"{folder / spec['file']} does not hold the classifier {JUDGES_FILE} describes ({described}): "
            f"{textwrap.shorten(details[0], 160)}"
        ) from None
    segmenter = PhantomSegmenter(**record["segmenter"]["config"])
    segmenter.load_state_dict(load_file(folder / record["segmenter"]["file"]))
    stats = load_file(folder / record["realism"]["file"])
    realism = RealismReference(stats["mean"], stats["precision"], float(record["realism"]["threshold"]))
    feature_network = None
    if "features" in record:
        feature_network = build_phantom_classifier(spec["pathologies"], **record["features"]["architecture"])
        feature_network.load_state_dict(load_file(folder / record["features"]["file"]))
        feature_network.eval()
    judges = JudgeSet(
        "phantom",
        record["image_size"],
        classifier.eval(),
        segmenter.eval(),
        realism,
        record["files"],
        folder,
        record["segmenter"].get("image_size"),
        feature_network,
    )
    return judges.to(device)


def load_xrv_judges(
    classifier: str = XRV_CLASSIFIER,
    cache_dir: str | os.PathLike[str] | None = None,
    lock: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    anatomy: bool = True,
    realism: bool = True,
) -> JudgeSet:
    """Pretrained torchxrayvision judges from a local weight cache, every file hash-checked before loading.

    The classifier keeps torchxrayvision's calibrated thresholds. ``anatomy``
    adds the ChestX-Det PSPNet (lungs and heart), ``realism`` the ResNetAE
    reconstruction error; their weight files must then be in the cache too.
    """
    from xreal.core import weights

    model = weights.load_classifier(classifier, cache_dir=cache_dir, lock=lock)
    segmenter = XRVAnatomySegmenter(weights.load_segmenter(cache_dir=cache_dir, lock=lock)) if anatomy else None
    reconstruction = ReconstructionError(weights.load_autoencoder(cache_dir=cache_dir, lock=lock)) if realism else None
    files = xrv_judge_files(classifier, anatomy, realism, cache_dir, lock)
    judges = JudgeSet("torchxrayvision", 224, model.eval(), segmenter, reconstruction, files)
    return judges.to(device)


def load_judges(
    source: str | os.PathLike[str], device: str = "cpu", anatomy: bool = True, realism: bool = True
) -> JudgeSet:
    """A judge set by name: ``torchxrayvision`` or a phantom judge set folder.

    ``anatomy`` and ``realism`` say whether those judges will run (a policy
    may switch them off); torchxrayvision then does not need their weights.
    """
    if str(source) == "torchxrayvision":
        return load_xrv_judges(device=device, anatomy=anatomy, realism=realism)
    return load_phantom_judges(source, device=device)
