"""Judges for phantom images, trained here on phantoms: an anatomy segmenter and a pathology classifier.

They measure what the demo model does (does the image follow the requested
anatomy, is the requested pathology there) where no pretrained chest X-ray
network applies. The classifier is torchxrayvision's DenseNet built without
pretrained weights and carrying its own label list, as torchxrayvision
models do.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from xreal import phantom
from xreal.labels import Anatomy

STRUCTURES = {"right lung": Anatomy.RIGHT_LUNG, "left lung": Anatomy.LEFT_LUNG, "heart": Anatomy.HEART}


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
    )


class PhantomSegmenter(ModelMixin, ConfigMixin):
    """A small U-Net: grayscale image ``[B, 1, H, W]`` in [0, 1] -> anatomy logits ``[B, 4, H, W]``."""

    @register_to_config
    def __init__(self, width: int = 16, classes: int = len(Anatomy)):
        super().__init__()
        self.down1, self.down2, self.down3 = _block(1, width), _block(width, 2 * width), _block(2 * width, 4 * width)
        self.up2, self.up1 = _block(6 * width, 2 * width), _block(3 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(images)
        d2 = self.down2(F.max_pool2d(d1, 2))
        d3 = self.down3(F.max_pool2d(d2, 2))
        u2 = self.up2(torch.cat([F.interpolate(d3, scale_factor=2.0), d2], 1))
        u1 = self.up1(torch.cat([F.interpolate(u2, scale_factor=2.0), d1], 1))
        return self.head(u1)

    @torch.no_grad()
    def segment(self, images: np.ndarray) -> np.ndarray:
        """Label maps ``[B, H, W]`` for images ``[B, H, W]`` in [0, 1]."""
        return self(torch.from_numpy(images).float()[:, None]).argmax(1).numpy().astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


def anatomy_dice(requested: np.ndarray, found: np.ndarray) -> dict[str, float]:
    """Dice of each structure between a requested and a segmented label map."""
    return {name: dice(requested == label, found == label) for name, label in STRUCTURES.items()}


def train_phantom_segmenter(size: int = 64, count: int = 2000, steps: int = 600, seed: int = 123) -> PhantomSegmenter:
    """Train the segmenter on freshly rendered phantoms (their label maps are exact)."""
    cases = phantom.generate(count, size, seed=seed)
    images = torch.from_numpy(cases.images)[:, None]
    targets = torch.from_numpy(cases.anatomy).long()
    torch.manual_seed(seed)
    return _fit(PhantomSegmenter(), images, targets, F.cross_entropy, steps, 2e-3, seed, "segmenter")


def _fit(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn,
    steps: int,
    lr: float,
    seed: int,
    description: str,
) -> nn.Module:
    """Plain AdamW on random batches of 32; returns the model in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in tqdm(range(steps), desc=description):
        idx = torch.from_numpy(rng.integers(0, len(inputs), 32))
        loss = loss_fn(model(inputs[idx]), targets[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def phantom_classifier(growth_rate: int = 16, block_config: tuple[int, ...] = (4, 4, 4)):
    """torchxrayvision's DenseNet, untrained, with the phantom pathologies as its label list."""
    with warnings.catch_warnings():  # torchxrayvision silences every warning on import
        import torchxrayvision as xrv
    model = xrv.models.DenseNet(
        growth_rate=growth_rate,
        block_config=block_config,
        num_init_features=32,
        num_classes=len(phantom.PHANTOM_PATHOLOGIES),
        in_channels=1,
        weights=None,
        apply_sigmoid=False,
    )
    model.pathologies = list(phantom.PHANTOM_PATHOLOGIES)
    return model


def classifier_input(images: np.ndarray) -> torch.Tensor:
    """Images in [0, 1] -> torchxrayvision's [-1024, 1024] convention, ``[B, 1, H, W]``."""
    return torch.from_numpy(images).float()[:, None] * 2048.0 - 1024.0


def train_phantom_classifier(size: int = 64, count: int = 3000, steps: int = 800, seed: int = 321):
    """Train the classifier on phantoms (multi-label, one output per phantom pathology)."""
    cases = phantom.generate(count, size, seed=seed)
    images = classifier_input(cases.images)
    targets = torch.tensor(
        [[label in labels for label in phantom.PHANTOM_PATHOLOGIES] for labels in cases.labels], dtype=torch.float32
    )
    torch.manual_seed(seed)
    return _fit(
        phantom_classifier(), images, targets, F.binary_cross_entropy_with_logits, steps, 1e-3, seed, "classifier"
    )


@torch.no_grad()
def classify(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Probability of each phantom pathology for images ``[B, H, W]`` in [0, 1]."""
    probabilities = torch.sigmoid(model(classifier_input(images))).numpy()
    return {label: probabilities[:, i] for i, label in enumerate(model.pathologies)}


def save_weights(model: nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    model.load_state_dict(load_file(path))
    return model.eval()
