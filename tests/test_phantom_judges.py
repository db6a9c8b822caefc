import numpy as np
import pytest
import torch

from xreal.judges.phantom_judges import (
    PhantomSegmenter,
    anatomy_dice,
    classify,
    dice,
    load_weights,
    phantom_classifier,
    save_weights,
    train_phantom_segmenter,
)
from xreal.phantom import renderer as phantom


def test_dice():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    label_map = phantom.anatomy_template(1, 64)
    assert anatomy_dice(label_map, label_map) == {"right lung": 1.0, "left lung": 1.0, "heart": 1.0}


def test_segmenter_learns_phantom_anatomy_and_round_trips(tmp_path):
    model = train_phantom_segmenter(size=64, count=64, steps=40, seed=5)
    cases = phantom.generate(8, 64, seed=77)
    found = model.segment(cases.images)
    assert found.shape == (8, 64, 64) and set(np.unique(found)) <= {0, 1, 2, 3}
    accuracy = (found == cases.anatomy).mean()
    assert accuracy > (cases.anatomy == 0).mean()  # better than calling everything background
    save_weights(model, tmp_path / "s.safetensors")
    restored = load_weights(PhantomSegmenter(), tmp_path / "s.safetensors")
    assert np.array_equal(restored.segment(cases.images), found)


def test_classifier_carries_its_labels_and_takes_xrv_input():
    model = phantom_classifier()
    assert model.pathologies == list(phantom.PHANTOM_PATHOLOGIES)
    scores = classify(model.eval(), np.random.default_rng(0).random((2, 64, 64), dtype=np.float32))
    assert set(scores) == set(phantom.PHANTOM_PATHOLOGIES)
    assert all(s.shape == (2,) and ((s >= 0) & (s <= 1)).all() for s in scores.values())
    assert torch.is_grad_enabled()


def test_judges_trained_on_upsampled_phantoms_judge_generated_images_upsampled_the_same_way(tmp_path):
    """A set trained on 64 px phantoms seen at 128 px records 128 as its size; judging a 64 px image through it
    upsamples it bilinearly, exactly as training did."""
    from xreal.judges.judging import classifier_input, load_judges, resize_inputs
    from xreal.judges.phantom_judges import train_phantom_judges

    folder = train_phantom_judges(
        tmp_path / "judges",
        size=64,
        input_size=128,
        segmenter_steps=2,
        classifier_steps=2,
        train_count=16,
        held_out_count=16,
    )
    judges = load_judges(str(folder))
    assert judges.image_size == 128 and "upsampled to 128" in (folder / "judges.json").read_text()
    images = phantom.generate(3, 64, seed=8).images
    inputs = judges.classifier_inputs(images)
    assert inputs.shape == (3, 1, 128, 128)
    assert torch.allclose(inputs, resize_inputs(classifier_input(images), 128))
    # The segmenter stays at the phantoms' 64 px: it gets the classifier's input shrunk back.
    assert judges.segmenter_size == 64 and judges.segment(images).shape == (3, 64, 64)
    assert resize_inputs(inputs, 128) is inputs and resize_inputs(inputs, None) is inputs
