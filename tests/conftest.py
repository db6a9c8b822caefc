"""Shared fixtures: small label maps and manifests written the way users write them."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def box_label_map(height: int = 64, width: int = 64, heart_width: int = 16) -> np.ndarray:
    """A label map of rectangles: lungs at the sides, heart in between (right of centre)."""
    label_map = np.zeros((height, width), dtype=np.uint8)
    top, bottom = height // 8, height * 3 // 4
    label_map[top:bottom, width // 8 : width // 2 - 2] = 1
    label_map[top:bottom, width // 2 + 2 : width * 7 // 8] = 2
    centre = width // 2 + width // 16
    label_map[height // 2 : bottom, centre - heart_width // 2 : centre + heart_width // 2] = 3
    return label_map


@pytest.fixture
def label_map() -> np.ndarray:
    return box_label_map()
