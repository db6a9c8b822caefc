"""VinDr-CXR's box tables and DICOM images, in their published layout, into training-index rows and a training set."""

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from test_dicom import radiograph

from xreal.cli import cli
from xreal.core.masks import boxes_to_mask, read_binary_mask
from xreal.data.ingest import scaled_boxes
from xreal.data.training_index import read_training_index
from xreal.data.vindr import VindrError, vindr_index

SHAPE = (96, 80)  # rows, columns of every fixture image
NONE = (None, None, None, None)
TRAIN = [  # image_id, rad_id, class_name, x_min, y_min, x_max, y_max
    ("9a5094b2563a1ef3ff50dc5c7ff71345", "R10", "Cardiomegaly", 30.0, 50.0, 60.0, 70.0),
    ("9a5094b2563a1ef3ff50dc5c7ff71345", "R8", "Cardiomegaly", 28.5, 52.0, 62.0, 71.0),
    ("9a5094b2563a1ef3ff50dc5c7ff71345", "R9", "Pleural effusion", 5.0, 60.0, 20.0, 80.0),
    ("9a5094b2563a1ef3ff50dc5c7ff71345", "R9", "Calcification", 40.0, 20.0, 44.0, 24.0),
    ("051132a778e61a86eb147c7c6f564dfe", "R11", "No finding", *NONE),
    ("051132a778e61a86eb147c7c6f564dfe", "R7", "No finding", *NONE),
    ("051132a778e61a86eb147c7c6f564dfe", "R2", "No finding", *NONE),
]
TEST = [("1c32170b4af4ce1a3030eb8167753b06", "R1", "Nodule/Mass", 50.0, 30.0, 56.0, 36.0)]
COLUMNS = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]


def write_vindr(root, train=TRAIN, test=TEST, missing=()):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(train, columns=COLUMNS).to_csv(root / "annotations" / "annotations_train.csv", index=False)
    pd.DataFrame(test, columns=COLUMNS).to_csv(root / "annotations" / "annotations_test.csv", index=False)
    stored = (np.add.outer(np.arange(SHAPE[0]), np.arange(SHAPE[1])) * 20).astype(np.uint16)
    for split, rows in (("train", train), ("test", test)):
        (root / split).mkdir(exist_ok=True)
        for image_id in {r[0] for r in rows} - set(missing):
            radiograph(root / split / f"{image_id}.dicom", stored, photometric="MONOCHROME1", PixelSpacing=[0.1, 0.1])
    return root


def test_readers_are_merged_and_classes_mapped_to_chexpert(tmp_path):
    table, report = vindr_index(write_vindr(tmp_path / "vindr"))
    rows = {r["image_id"]: r for r in table.to_pylist()}
    sick = rows["9a5094b2563a1ef3ff50dc5c7ff71345"]
    assert (sick["Cardiomegaly"], sick["Pleural Effusion"], sick["No Finding"], sick["Edema"]) == (1.0, 1.0, 0.0, 0.0)
    assert [b["label"] for b in sick["boxes"]] == ["Cardiomegaly", "Cardiomegaly", "Pleural Effusion"]
    assert (sick["height"], sick["width"], sick["split"], sick["source"]) == (96, 80, "train", "vindr-cxr")
    assert sick["image_path"] == "train/9a5094b2563a1ef3ff50dc5c7ff71345.dicom"
    healthy = rows["051132a778e61a86eb147c7c6f564dfe"]
    assert healthy["No Finding"] == 1.0 and healthy["boxes"] == [] and healthy["Cardiomegaly"] == 0.0
    nodule = rows["1c32170b4af4ce1a3030eb8167753b06"]
    assert (nodule["Lung Lesion"], nodule["split"]) == (1.0, "test")
    assert report.unmapped == {"Calcification": 1} and report.boxes == 4 and report.images == 3


def test_ingest_rasterises_every_readers_boxes_at_the_training_size(tmp_path):
    root = write_vindr(tmp_path / "vindr", missing=["1c32170b4af4ce1a3030eb8167753b06"])
    out = tmp_path / "train"
    result = CliRunner().invoke(cli, ["ingest", "vindr", str(root), "--out", str(out), "--size", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "1c32170b4af4ce1a3030eb8167753b06" in result.output and "unreadable" in result.output
    index = read_training_index(out).set_index("image_id")
    assert list(index.index) == ["051132a778e61a86eb147c7c6f564dfe", "9a5094b2563a1ef3ff50dc5c7ff71345"]
    sick = index.loc["9a5094b2563a1ef3ff50dc5c7ff71345"]
    masks = {m["label"]: m["path"] for m in sick.pathology_masks}
    assert set(masks) == {"Cardiomegaly", "Pleural Effusion"}
    boxes = scaled_boxes(
        [{"label": r[2], "x_min": r[3], "y_min": r[4], "x_max": r[5], "y_max": r[6]} for r in TRAIN[:2]], 96, 80, 32
    )
    expected = boxes_to_mask([(b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in boxes], 32, 32)
    np.testing.assert_array_equal(read_binary_mask(out / masks["Cardiomegaly"]), expected)  # both readers' boxes
    assert sick.boxes[0]["x_max"] == pytest.approx(60.0 * 32 / 80) and sick.boxes[0]["y_max"] == pytest.approx(
        70 * 32 / 96
    )
    assert index.loc["051132a778e61a86eb147c7c6f564dfe"].pathology_masks.size == 0
    assert list(sick.pixel_spacing) == pytest.approx([0.1 * 96 / 32, 0.1 * 80 / 32])  # DICOM's, scaled to 32 px

    again = CliRunner().invoke(cli, ["ingest", "vindr", str(root), "--out", str(out), "--size", "32", "--quiet"])
    assert again.exit_code == 0 and "(2 already there)" in again.output
    resumed = read_training_index(out).set_index("image_id").loc["9a5094b2563a1ef3ff50dc5c7ff71345"]
    assert list(resumed.pixel_spacing) == pytest.approx(list(sick.pixel_spacing))  # from the header, not re-decoded


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (("abc", "R1", "Lung tumour", 1.0, 1.0, 5.0, 5.0), "line 9: class 'Lung tumour' is not a VinDr-CXR class"),
        (("abc", "R1", "Cardiomegaly", 10.0, 1.0, 5.0, 5.0), r"line 9: box \[10.0, 1.0, 5.0, 5.0\] is empty"),
        (("abc", "R1", "Cardiomegaly", 1.0, None, 5.0, 5.0), "line 9: box .* is empty or incomplete"),
    ],
)
def test_bad_annotation_rows_are_named_by_line(tmp_path, row, message):
    with pytest.raises(VindrError, match=message):
        vindr_index(write_vindr(tmp_path / "vindr", train=[*TRAIN, row]))
