import json

import numpy as np
import pytest
from conftest import box_label_map

from xreal.core.errors import MaskError
from xreal.core.masks import write_mask_file
from xreal.manifest.audit import audit_manifest
from xreal.manifest.schema import write_manifest
from xreal.phantom.anatomy import anatomy_stats, cardiothoracic_ratio


@pytest.fixture
def audited(tmp_path):
    write_mask_file(tmp_path / "small_heart.png", box_label_map(heart_width=16))
    write_mask_file(tmp_path / "big_heart.png", box_label_map(heart_width=40))
    box = {"label": None, "x_min": 0.15, "y_min": 0.3, "x_max": 0.4, "y_max": 0.6}
    near = {**box, "x_max": 0.41}
    outside = {"label": None, "x_min": 0.0, "y_min": 0.85, "x_max": 0.2, "y_max": 1.0}
    rows = [
        {
            "request_id": "cardio",
            "labels": ["Cardiomegaly"],
            "num_samples": 5,
            "anatomy_path": "big_heart.png",
            "boxes": [{**box, "x_min": 0.3, "x_max": 0.9}],
            "split": "train",
        },
        {"request_id": "cardio-healthy", "labels": ["No Finding"], "num_samples": 5, "anatomy_path": "big_heart.png"},
        {
            "request_id": "edema-a",
            "labels": ["Edema", "Pleural Effusion"],
            "num_samples": 2,
            "anatomy_path": "small_heart.png",
            "boxes": [box],
            "steps": 10,
        },
        {
            "request_id": "edema-b",
            "labels": ["Edema", "Pleural Effusion"],
            "num_samples": 2,
            "anatomy_path": "small_heart.png",
            "boxes": [near],
            "steps": 10,
        },
        {
            "request_id": "edema-c",
            "labels": ["Edema", "Pleural Effusion"],
            "num_samples": 2,
            "anatomy_path": "small_heart.png",
            "boxes": [box],
            "steps": 10,
        },
        {
            "request_id": "lesion-out",
            "labels": ["Lung Lesion"],
            "num_samples": 1,
            "anatomy_path": "small_heart.png",
            "boxes": [outside],
            "guidance_scale": 1.0,
        },
        {
            "request_id": "broken",
            "labels": ["Lung Lesion"],
            "num_samples": 1,
            "anatomy_path": "gone.png",
            "boxes": [box],
        },
    ]
    write_manifest(rows, tmp_path / "m.parquet")
    return audit_manifest(tmp_path / "m.parquet")


def test_counts_per_label_and_combination(audited):
    assert (audited.rows, audited.valid_rows, audited.samples) == (7, 6, 17)
    assert audited.per_label["Cardiomegaly"] == {"requests": 1, "samples": 5}
    assert audited.per_label["Edema"] == {"requests": 3, "samples": 6}
    assert audited.per_label["No Finding"] == {"requests": 1, "samples": 5}
    combos = {c["labels"]: (c["requests"], c["samples"]) for c in audited.per_combination}
    assert combos["Edema + Pleural Effusion"] == (3, 6)
    assert audited.splits == {"train": 5, "(none)": 12}


def test_unet_cost_follows_steps_and_guidance(audited):
    # default 100 steps + 2x100 guided; No Finding 100; 10-step rows 10 + 20; guidance 1.0 has no uncond branch
    expected = 5 * 300 + 5 * 100 + 6 * 30 + 1 * 200
    assert audited.unet_evaluations == expected


def test_anatomy_statistics(audited):
    assert audited.unique_anatomies == audited.measured_anatomies == 2
    ctr = audited.anatomy["cardiothoracic_ratio"]
    assert ctr["min"] == pytest.approx(cardiothoracic_ratio(box_label_map(heart_width=16)), abs=1e-3)
    assert ctr["max"] == pytest.approx(40 / 48, abs=1e-3)
    assert audited.enlarged_hearts == 1
    assert audited.pathology_requests_with_healthy_twin == 1


def test_duplicates_near_duplicates_and_misplaced_locations(audited):
    assert audited.duplicates == [["edema-a", "edema-c"]]
    assert [p["requests"] for p in audited.near_identical] == [["edema-a", "edema-b"]]
    assert audited.locations_outside_thorax == ["lesion-out"]


def test_unresolved_files_are_listed(audited):
    assert audited.issue_count == 1
    assert len(audited.unresolved_files) == 1 and "gone.png" in audited.unresolved_files[0]
    assert "request 'broken'" in audited.unresolved_files[0]


def test_text_and_json_forms(audited):
    text = audited.to_text()
    for fragment in (
        "Requested images per label",
        "Cardiomegaly",
        "UNet evaluations",
        "duplicate requests: 1",
        "unresolved files: 1",
        "cardiothoracic ratio",
    ):
        assert fragment in text
    assert json.loads(json.dumps(audited.to_dict()))["samples"] == 17


def test_cardiothoracic_ratio_of_a_known_map():
    label_map = box_label_map(height=100, width=100, heart_width=30)
    stats = anatomy_stats(label_map)
    lungs = np.flatnonzero((label_map > 0).any(axis=0))
    assert stats.cardiothoracic_ratio == pytest.approx(30 / (lungs[-1] - lungs[0] + 1))
    assert stats.heart_area == pytest.approx((label_map == 3).mean())
    with pytest.raises(MaskError):
        cardiothoracic_ratio(np.zeros((8, 8), dtype=np.uint8))
