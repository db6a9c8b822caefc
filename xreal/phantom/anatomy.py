"""What a target anatomy measures: lung and heart areas and the cardiothoracic ratio of a label map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xreal.core.errors import MaskError
from xreal.core.labels import Anatomy


@dataclass(frozen=True)
class AnatomyStats:
    """Areas are fractions of the image; the ratio is the cardiothoracic ratio."""

    right_lung_area: float
    left_lung_area: float
    heart_area: float
    cardiothoracic_ratio: float


def _column_extent(mask: np.ndarray) -> int:
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[-1] - cols[0] + 1) if cols.size else 0


def cardiothoracic_ratio(label_map: np.ndarray) -> float:
    """Widest horizontal extent of the heart over that of the thorax (lungs and heart).

    The thoracic width is taken from the outer edge of the right lung to the
    outer edge of the left lung, as a radiologist measures it on a PA film.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise MaskError(f"cardiothoracic ratio needs a 2-D label map, got shape {label_map.shape}")
    lungs = (label_map == Anatomy.RIGHT_LUNG) | (label_map == Anatomy.LEFT_LUNG)
    heart = _column_extent(label_map == Anatomy.HEART)
    if heart == 0 or not lungs.any():
        raise MaskError("cardiothoracic ratio needs a label map with lungs and heart")
    return heart / _column_extent(lungs | (label_map == Anatomy.HEART))


def anatomy_stats(label_map: np.ndarray) -> AnatomyStats:
    """Lung and heart areas and the cardiothoracic ratio of a label map."""
    label_map = np.asarray(label_map)
    total = float(label_map.size)
    return AnatomyStats(
        right_lung_area=float((label_map == Anatomy.RIGHT_LUNG).sum()) / total,
        left_lung_area=float((label_map == Anatomy.LEFT_LUNG).sum()) / total,
        heart_area=float((label_map == Anatomy.HEART).sum()) / total,
        cardiothoracic_ratio=cardiothoracic_ratio(label_map),
    )
