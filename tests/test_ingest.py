"""MIMIC-CXR-JPG files and a CheXmask CSV, in their published layouts, into a training set."""

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import box_label_map
from PIL import Image
from test_mimic import IMAGES, write_tables

from xreal.cli import cli
from xreal.core.masks import read_label_map, resize_label_map, rle_from_label_map
from xreal.data.chexmask import ChexmaskError, read_chexmask
from xreal.data.mimic import image_path, mimic_index
from xreal.data.training_index import read_training_index

SMALL = [(d, s, t, v, rows // 16, columns // 16, split) for d, s, t, v, rows, columns, split in IMAGES]  # fast
FRONTAL = [i for i in SMALL if i[3] in ("PA", "AP")]


def gradient(height, width):
    return (np.add.outer(np.arange(height), np.arange(width)) * 255 // (height + width)).astype(np.uint8)


def write_mimic(root, skip_image=None, wrong_size=None):
    """The tables, and JPEGs of the sizes they give at the published paths (MIMIC's sizes divided by 16)."""
    write_tables(root, images=SMALL)
    for dicom, subject, study, _view, rows, columns, _ in SMALL:
        if dicom == skip_image:
            continue
        path = root / image_path(subject, study, dicom)
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (rows + 3, columns) if dicom == wrong_size else (rows, columns)
        Image.fromarray(gradient(*shape)).save(path, quality=95)
    return root


def chexmask_rows(images=FRONTAL):
    """CheXmask rows: RLE masks of known shapes at each image's (scaled) size, good quality."""
    rows = []
    for dicom, _s, _t, _v, height, width, _ in images:
        encoded = rle_from_label_map(box_label_map(height, width, heart_width=20))
        rows.append(
            {
                "dicom_id": dicom,
                "Dice RCA (Mean)": 0.9,
                "Dice RCA (Max)": 0.95,
                "Landmarks": "1,2,3,4",
                "Left Lung": encoded["left_lung"],
                "Right Lung": encoded["right_lung"],
                "Heart": encoded["heart"],
                "Height": encoded["height"],
                "Width": encoded["width"],
            }
        )
    return rows


def test_chexmask_keeps_wanted_rows_above_the_threshold_reading_in_blocks(tmp_path):
    rows = chexmask_rows()
    rows[1]["Dice RCA (Mean)"] = 0.5
    rows.append({**rows[0], "dicom_id": "not-in-the-index"})
    pd.DataFrame(rows).to_csv(tmp_path / "MIMIC-CXR-JPG.csv", index=False)
    wanted = [i[0] for i in FRONTAL] + ["never-masked"]
    masks, report = read_chexmask(tmp_path / "MIMIC-CXR-JPG.csv", wanted, block_size=4096)  # many small blocks
    assert set(masks.index) == {FRONTAL[0][0], FRONTAL[2][0], FRONTAL[3][0]}
    assert (report.rows_read, report.kept, report.below_threshold, report.without_mask) == (5, 3, 1, 1)

    pd.DataFrame([rows[0], rows[0]]).to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(ChexmaskError, match=f"image {FRONTAL[0][0]} has more than one row"):
        read_chexmask(tmp_path / "twice.csv", wanted)
    pd.DataFrame(rows).drop(columns="Heart").to_csv(tmp_path / "no-heart.csv", index=False)
    with pytest.raises(ChexmaskError, match="not a CheXmask table"):
        read_chexmask(tmp_path / "no-heart.csv", wanted)  # names the column: no column Heart


def test_ingest_writes_a_resumable_training_set_and_reports_what_it_left_out(tmp_path):
    root = write_mimic(tmp_path / "mimic", skip_image=FRONTAL[3][0])  # one image file is missing
    rows = chexmask_rows()
    rows[1]["Heart"] = "5 10 3 2"  # malformed RLE: runs overlap
    rows[2]["Height"], rows[2]["Width"] = 100, 300  # another shape than the image: not its mask
    pd.DataFrame(rows).to_csv(tmp_path / "MIMIC-CXR-JPG.csv", index=False)
    out = tmp_path / "train"
    args = [
        "ingest",
        "mimic",
        str(root),
        "--out",
        str(out),
        "--size",
        "64",
        "--chexmask",
        str(tmp_path / "MIMIC-CXR-JPG.csv"),
    ]
    result = CliRunner().invoke(cli, [*args, "--quiet", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "5 images in the metadata, 4 kept" in result.output and "4 masks kept" in result.output

    index = read_training_index(out).set_index("image_id")
    assert list(index.index) == [i[0] for i in FRONTAL[:3]]  # the image with no file is left out
    assert f"{FRONTAL[3][0]}: " in result.output and "no such image file" in result.output
    assert "runs must be sorted" in result.output and "100x300 but the image is" in result.output
    first = index.loc[FRONTAL[0][0]]
    assert (first.height, first.width, first.split, first["No Finding"]) == (64, 64, "train", 1.0)
    expected = resize_label_map(box_label_map(FRONTAL[0][4], FRONTAL[0][5], heart_width=20), (64, 64))
    np.testing.assert_array_equal(read_label_map(out / first.anatomy_path), expected)
    image = np.asarray(Image.open(out / first.image_path))
    assert image.shape == (64, 64) and image.dtype == np.uint16 and image[0, 0] < image[-1, -1]
    assert index.anatomy_path.isna().tolist() == [False, True, True]  # bad masks: kept without anatomy

    before = read_training_index(out)
    again = CliRunner().invoke(cli, [*args, "--quiet", "--workers", "1"])
    assert again.exit_code == 0 and "(3 already there)" in again.output  # a rejected mask is not retried by rewriting
    pd.testing.assert_frame_equal(read_training_index(out), before)


def test_a_source_index_from_the_tables_has_the_published_paths(tmp_path):
    root = write_mimic(tmp_path / "mimic")
    source, _ = mimic_index(root)
    assert all((root / p).is_file() for p in source.column("image_path").to_pylist())


def test_an_image_of_another_size_than_its_table_says_is_left_out_and_named(tmp_path):
    from xreal.data.ingest import build_training_set

    wrong = FRONTAL[0]
    root = write_mimic(tmp_path / "mimic", wrong_size=wrong[0])
    source, _ = mimic_index(root)
    index, report = build_training_set(source, root, tmp_path / "train", size=32, workers=1, progress=False)
    assert wrong[0] not in read_training_index(index).image_id.tolist()
    assert any(f"{wrong[4] + 3}x{wrong[5]}, the index says {wrong[4]}x{wrong[5]}" in p for p in report.problems)


def test_a_rerun_at_another_size_rewrites_what_an_earlier_run_wrote(tmp_path):
    from xreal.data.ingest import build_training_set

    root = write_mimic(tmp_path / "mimic")
    source, _ = mimic_index(root)
    build_training_set(source, root, tmp_path / "train", size=32, workers=1, progress=False)
    index, report = build_training_set(source, root, tmp_path / "train", size=48, workers=1, progress=False)
    assert report.resumed == 0
    for path in read_training_index(index).image_path:
        assert Image.open(tmp_path / "train" / path).size == (48, 48)
