"""The measures benchmarks/control_phantom.py adds to the pipeline's own outputs."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xreal.core.labels import Anatomy
from xreal.core.settings import SPEEDS
from xreal.phantom import renderer as phantom


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


def test_stage_one_latents_are_the_healthy_twins_the_pipeline_returns(control_phantom, pipe):
    cases = phantom.generate(3, 64, seed=5, pathologies=[[], ["Pleural Effusion"], []])
    masks = [None, cases.pathology_masks["Pleural Effusion"][1], None]
    kept = control_phantom.StageOneLatents()
    arguments = SPEEDS["fast"].pipeline_arguments()
    for lo, hi in ((0, 2), (2, 3)):
        prompts = [list(labels) for labels in cases.labels[lo:hi]]
        out = pipe(
            cases.anatomy[lo:hi], prompts, list(range(lo, hi)), masks[lo:hi], callback_on_step_end=kept, **arguments
        )
        kept.end_call()
        with torch.no_grad():
            decoded = pipe.to_unit_range(pipe.decode(kept.kept[-1])).mean(1).numpy()
        np.testing.assert_allclose(decoded, out.healthy_images, atol=1e-5)
    assert kept.latents().shape == (3, 3, 32, 32)


def test_latent_detail_power_counts_the_lungs_fine_detail_only(control_phantom):
    anatomy = np.full((2, 64, 64), Anatomy.BACKGROUND, dtype=np.uint8)
    anatomy[:, 16:48, 8:28] = Anatomy.RIGHT_LUNG
    rng = np.random.default_rng(0)
    latents = torch.from_numpy(rng.normal(size=(2, 3, 32, 32))).float()
    smooth = torch.zeros_like(latents)
    noisy_outside = latents.clone()
    noisy_outside[:, :, 8:24, 4:14] = 0.0  # the lung's cells at half the image size, flat
    power = control_phantom.latent_detail_power(latents, anatomy)
    assert power.shape == (2,) and (power > 0.5).all()
    assert (control_phantom.latent_detail_power(smooth, anatomy) == 0).all()
    assert (control_phantom.latent_detail_power(noisy_outside, anatomy) < 0.2 * power).all()
