import json

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


def test_random_blur_smooths_about_half_a_batch_and_leaves_the_rest_untouched():
    from xreal.judges.phantom_judges import random_blur

    batch = torch.from_numpy(phantom.generate(64, 64, seed=12).images)[:, None]
    out = random_blur(2.0)(batch, np.random.default_rng(0))
    assert out.shape == batch.shape and not torch.equal(out, batch)
    changed = (out - batch).abs().flatten(1).amax(1) > 0
    assert 20 <= int(changed.sum()) <= 44  # probability 0.5 of 64

    def roughness(x):
        return (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)

    assert (roughness(out[changed]) < roughness(batch[changed])).all()  # blurred, not just altered
    assert torch.equal(out[~changed], batch[~changed])
    again = random_blur(2.0)(batch, np.random.default_rng(0))
    assert torch.equal(again, out)  # the batch's rng decides everything


def test_the_judge_card_reports_the_classifier_on_blurred_phantoms_beside_the_plain(tmp_path):
    from xreal.judges.judging import judges_card
    from xreal.judges.phantom_judges import train_phantom_judges

    folder = train_phantom_judges(
        tmp_path / "judges", size=64, segmenter_steps=2, classifier_steps=2, train_count=16, held_out_count=24
    )
    record = json.loads((folder / "judges.json").read_text())
    blurred = record["metrics"]["blurred_1px"]
    assert set(blurred) == set(phantom.PHANTOM_PATHOLOGIES)
    assert all(0.0 <= v["specificity"] <= 1.0 for v in blurred.values())
    assert "half of them blurred by up to 1.5 px" in record["trained_on"]
    card = judges_card(folder)
    assert "blurred: sensitivity" in card
    row = next(line for line in card.splitlines() if line.startswith("| Edema |"))
    assert row.count("|") == 6  # label, plain sensitivity and specificity, blurred sensitivity and specificity
