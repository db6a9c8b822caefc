"""The phantom anatomy segmenter: a small U-Net a phantom judge set carries, loaded by
:func:`xreal.judges.judging.load_phantom_judges` and trained by :mod:`xreal.judges.phantom_judges`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from xreal.core.labels import Anatomy


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
