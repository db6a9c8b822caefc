"""The measures benchmarks/control_phantom.py adds to the pipeline's own outputs."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from xreal.core.labels import Anatomy


@pytest.fixture(scope="module")
def control_phantom():
    folder = Path(__file__).parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))  # it imports autoencoder_detail beside it
    try:
        spec = importlib.util.spec_from_file_location("control_phantom", folder / "control_phantom.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_latent_detail_power_counts_the_lungs_fine_detail_only(control_phantom):
    anatomy = np.full((2, 64, 64), Anatomy.BACKGROUND, dtype=np.uint8)
    anatomy[:, 16:48, 8:28] = Anatomy.RIGHT_LUNG
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    smooth = np.zeros_like(latents)
    noisy_outside = latents.copy()
    noisy_outside[:, :, 8:24, 4:14] = 0.0  # the lung's cells at half the image size, flat
    power = control_phantom.latent_detail_power(latents, anatomy)
    assert power.shape == (2,) and (power > 0.5).all()
    assert (control_phantom.latent_detail_power(smooth, anatomy) == 0).all()
    assert (control_phantom.latent_detail_power(noisy_outside, anatomy) < 0.2 * power).all()
