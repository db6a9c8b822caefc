"""The committed demo bundle: it loads by default, and it visibly does what the method promises."""

import numpy as np
import pytest

from xreal import phantom
from xreal.labels import Anatomy
from xreal.model import DEMO_BUNDLE, load_pipeline, read_bundle_record

pytestmark = pytest.mark.slow
STEPS = dict(num_inference_steps=25, anatomy_steps=12)


@pytest.fixture(scope="module")
def pipe():
    pipeline = load_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def generated(pipe):
    labels = ["Pleural Effusion", "Lung Lesion", "Consolidation", "Cardiomegaly"]
    seeds = [900 + i for i in range(len(labels))]
    healthy = [phantom.generate(1, 64, seed=s, pathologies=[[]])[0] for s in seeds]
    diseased = [phantom.generate(1, 64, seed=s, pathologies=[[lab]])[0] for s, lab in zip(seeds, labels, strict=True)]
    masks = [case.pathology_masks[lab] for case, lab in zip(diseased, labels, strict=True)]
    anatomy = np.stack([case.anatomy for case in healthy])
    out = pipe(anatomy, [[lab] for lab in labels], seeds, masks, **STEPS)
    return anatomy, masks, out


def test_bundle_is_small_safetensors_and_records_its_training():
    files = [p for p in DEMO_BUNDLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".md"}
    record = read_bundle_record(DEMO_BUNDLE)
    assert record["preset"]["name"] == "demo" and "phantom" in record["training"]["data"]


def test_healthy_twins_follow_the_requested_anatomy(generated):
    anatomy, _, out = generated
    for label_map, image in zip(anatomy, out.healthy_images, strict=True):
        lungs = (label_map == Anatomy.RIGHT_LUNG) | (label_map == Anatomy.LEFT_LUNG)
        body = (label_map == 0)
        body[:, :8] = body[:, -8:] = False  # air outside the body is dark too
        assert image[lungs].mean() + 0.15 < image[body].mean()  # lungs are dark where they were asked for
        dark = image < np.quantile(image[8:-8, 8:-8], lungs.mean() / 0.8)
        overlap = (dark & lungs).sum() / lungs.sum()
        assert overlap > 0.7


def test_pathology_appears_inside_its_mask_only(generated):
    _, masks, out = generated
    for mask, final, twin in zip(masks, out.images, out.healthy_images, strict=True):
        change = np.abs(final - twin)
        from scipy import ndimage

        near = ndimage.binary_dilation(mask, iterations=6)
        assert change[mask].mean() > 0.03  # something was generated there
        assert change[~near].mean() < 0.2 * change[mask].mean()
