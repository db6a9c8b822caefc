"""Real data as it ships: CheXmask's multi-line CSV values, VinDr-CXR's consensus test table, reruns, a real CR.

The CheXmask and VinDr-CXR fixtures copy the published files' layout (columns, quoting, which table has which
columns); the radiograph is a real one, ``RG1_UNCR.dcm`` from the ``pydicom-data`` package (dev extra).
"""

import csv
import io
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import box_label_map
from PIL import Image
from test_ingest import FRONTAL, chexmask_rows, write_mimic
from test_vindr import COLUMNS, TEST, TRAIN, write_vindr

from xreal.cli import cli
from xreal.core.files import missing_csv_columns
from xreal.core.masks import read_label_map, resize_label_map, rle_from_label_map
from xreal.data.chexmask import ChexmaskError, anatomy_map, read_chexmask
from xreal.data.training_index import TRAINING_INDEX_SCHEMA, read_training_index

# CheXmask's per-dataset CSV, in the published column order
CHEXMASK_COLUMNS = [
    "dicom_id",
    "Dice RCA (Mean)",
    "Dice RCA (Max)",
    "Landmarks",
    "Left Lung",
    "Right Lung",
    "Heart",
    "Height",
    "Width",
]


def landmarks(rng, points=120):
    """A printed (points, 2) array, as CheXmask's Landmarks column holds it: one line per point."""
    return np.array2string(rng.integers(0, 1024, (points, 2)), threshold=10**6)


def chexmask_csv(path, count, seed=0, size=(40, 36), points=120):
    """A CheXmask-shaped CSV of ``count`` rows with multi-line Landmarks; returns the rows written."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        height, width = size[0] + i % 7, size[1] + i % 5
        encoded = rle_from_label_map(box_label_map(height, width, heart_width=8 + i % 4))
        rows.append(
            {
                "dicom_id": f"img{i:05d}",
                "Dice RCA (Mean)": round(0.5 + 0.5 * i / count, 4),
                "Dice RCA (Max)": 0.99,
                "Landmarks": landmarks(rng, points + 13 * (i % 5)),
                "Left Lung": encoded["left_lung"],
                "Right Lung": encoded["right_lung"],
                "Heart": encoded["heart"],
                "Height": height,
                "Width": width,
            }
        )
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CHEXMASK_COLUMNS)  # quotes the values with newlines, as the published files
        writer.writeheader()
        writer.writerows(rows)
    return rows


def landmark_spans(path):
    """Byte ranges of the Landmarks values (inside their quotes) in a CSV written by :func:`chexmask_csv`."""
    data = path.read_bytes()
    spans, start = [], 0
    while (start := data.find(b'"[[', start)) >= 0:
        end = data.index(b']]"', start)
        spans.append((start + 1, end + 2))
        start = end
    return spans


def test_chexmask_reads_multiline_landmarks_whatever_block_a_value_straddles(tmp_path):
    path = tmp_path / "MIMIC-CXR-JPG.csv"
    rows = chexmask_csv(path, 60)
    block = 8192
    assert all(sum(len(str(v)) for v in r.values()) < block // 2 for r in rows)  # a block holds whole rows
    spans = landmark_spans(path)
    assert len(spans) == 60 and all("\n" in r["Landmarks"] for r in rows)
    cuts = range(block, path.stat().st_size, block)
    inside = [c for c in cuts if any(a < c < b for a, b in spans)]
    assert len(inside) >= 10  # most block boundaries fall inside a multi-line Landmarks value

    wanted = [r["dicom_id"] for r in rows[::3]] + ["not-in-the-file"]
    masks, report = read_chexmask(path, wanted, min_dice=0.0, block_size=block)
    assert (report.rows_read, report.kept, report.below_threshold, report.without_mask) == (60, 20, 0, 1)
    for row in rows[::3]:  # every value of every wanted row, exactly as written
        got = masks.loc[row["dicom_id"]]
        assert got["Left Lung"] == row["Left Lung"] and got["Right Lung"] == row["Right Lung"]
        assert got["Heart"] == row["Heart"] and got["Dice RCA (Mean)"] == row["Dice RCA (Mean)"]
        assert (int(got["Height"]), int(got["Width"])) == (row["Height"], row["Width"])
        expected = box_label_map(row["Height"], row["Width"], heart_width=8 + int(row["dicom_id"][3:]) % 4)
        np.testing.assert_array_equal(anatomy_map(got, row["Height"], row["Width"], "t"), expected)

    everything, _ = read_chexmask(path, [r["dicom_id"] for r in rows], min_dice=0.0)  # one block: the same rows
    one_by_one, _ = read_chexmask(path, [r["dicom_id"] for r in rows], min_dice=0.0, block_size=block)
    pd.testing.assert_frame_equal(everything, one_by_one)
    kept, report = read_chexmask(path, [r["dicom_id"] for r in rows], block_size=block)  # default threshold 0.7
    assert report.kept == sum(r["Dice RCA (Mean)"] >= 0.7 for r in rows) == len(kept)


def test_a_chexmask_row_longer_than_a_block_is_read_with_larger_blocks(tmp_path):
    path = tmp_path / "VinDr-CXR.csv"
    rows = chexmask_csv(path, 12, points=400)  # rows of 5-7 kB
    masks, report = read_chexmask(path, [r["dicom_id"] for r in rows], min_dice=0.0, block_size=1024)
    assert report.rows_read == 12 and list(masks.index) == [r["dicom_id"] for r in rows]
    assert masks["Heart"].tolist() == [r["Heart"] for r in rows]


def test_a_truncated_chexmask_file_names_the_file_the_last_row_read_and_what_to_do(tmp_path):
    path = tmp_path / "MIMIC-CXR-JPG.csv"
    rows = chexmask_csv(path, 30)
    data = path.read_bytes()
    start, _ = landmark_spans(path)[20]
    path.write_bytes(data[: start + 50])  # cut inside row 21's Landmarks, as an interrupted download
    with pytest.raises(ChexmaskError) as caught:
        read_chexmask(path, [r["dicom_id"] for r in rows], block_size=4096)
    message = str(caught.value)
    assert str(path) in message and "unreadable after" in message and "download it again" in message
    assert "img000" in message and len(message) < 1000  # names the last row read; does not quote 10 kB of RLE


def test_the_header_of_a_csv_with_multiline_values_is_read_whatever_its_first_block_holds(tmp_path):
    path = tmp_path / "MIMIC-CXR-JPG.csv"
    rows = chexmask_csv(path, 400, points=300)  # over 1 MiB: pyarrow's first block ends inside a value
    assert path.stat().st_size > 1 << 20
    assert any(a < 1 << 20 < b for a, b in landmark_spans(path))
    assert missing_csv_columns(path, [*CHEXMASK_COLUMNS, "Sex"]) == ["Sex"]
    masks, report = read_chexmask(path, [rows[-1]["dicom_id"]], min_dice=0.0)
    assert report.rows_read == 400 and masks.index.tolist() == [rows[-1]["dicom_id"]]

    huge = tmp_path / "huge-first-row.csv"  # a first row longer than a block
    with open(huge, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dicom_id", 'quoted "name"\nover lines', "Heart"])
        writer.writerow(["a", "\n".join(["x" * 100] * 30_000), "1 2"])
    assert missing_csv_columns(huge, ["dicom_id", 'quoted "name"\nover lines', "Left Lung"]) == ["Left Lung"]


def vindr_release(root, train=TRAIN, test=TEST):
    """VinDr-CXR as published: the training table names each box's reader, the test table is the consensus."""
    write_vindr(root, train=train, test=test)
    consensus = pd.DataFrame([(r[0], *r[2:]) for r in test], columns=[c for c in COLUMNS if c != "rad_id"])
    consensus.to_csv(root / "annotations" / "annotations_test.csv", index=False)
    return root


def test_vindr_as_published_ingests_with_the_default_splits_and_records_consensus_or_readers(tmp_path):
    root = vindr_release(tmp_path / "vindr")
    assert "rad_id" not in (root / "annotations" / "annotations_test.csv").read_text().splitlines()[0]
    out = tmp_path / "train"
    result = CliRunner().invoke(cli, ["ingest", "vindr", str(root), "--out", str(out), "--size", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    index = read_training_index(out).set_index("image_id")
    assert index.annotation.to_dict() == {
        "051132a778e61a86eb147c7c6f564dfe": "readers",
        "1c32170b4af4ce1a3030eb8167753b06": "consensus",
        "9a5094b2563a1ef3ff50dc5c7ff71345": "readers",
    }
    test = index.loc["1c32170b4af4ce1a3030eb8167753b06"]
    assert (test.split, test["Lung Lesion"], len(test.boxes)) == ("test", 1.0, 1)
    assert [m["label"] for m in test.pathology_masks] == ["Lung Lesion"]
    assert pq.read_schema(out / "index.parquet").field("annotation").type == "string"


def test_an_index_written_before_the_annotation_column_reads_with_it_null(tmp_path):
    older = TRAINING_INDEX_SCHEMA.remove(TRAINING_INDEX_SCHEMA.get_field_index("annotation"))
    row = {name: None for name in older.names}
    row.update(image_id="a", image_path="a.png", height=8, width=8, source="vindr-cxr", boxes=[])
    pq.write_table(pa.Table.from_pylist([row], schema=older), tmp_path / "index.parquet")
    frame = read_training_index(tmp_path)
    assert frame.annotation.isna().all() and len(frame) == 1 and frame.image_id.tolist() == ["a"]


def files_state(folder):
    """(inode, mtime) of every file under ``folder``: a rewrite changes one or the other."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def test_a_rerun_after_a_rejected_mask_writes_nothing(tmp_path):
    root = write_mimic(tmp_path / "mimic")
    rows = chexmask_rows()
    rows[1]["Heart"] = "5 10 3 2"  # malformed RLE: this image is kept without anatomy
    rows[1]["Landmarks"] = "[[ 1  2]\n [ 3  4]]"
    pd.DataFrame(rows).to_csv(tmp_path / "MIMIC-CXR-JPG.csv", index=False)
    out = tmp_path / "train"
    args = ["ingest", "mimic", str(root), "--out", str(out), "--size", "32", "--quiet", "--workers", "1"]
    args += ["--chexmask", str(tmp_path / "MIMIC-CXR-JPG.csv")]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "runs must be sorted" in first.output and "(0 already there)" in first.output
    before = files_state(out)
    assert f"images/{FRONTAL[1][0]}.png" in before and f"anatomy/{FRONTAL[1][0]}.png" not in before

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert f"{len(FRONTAL)} in the training set ({len(FRONTAL)} already there)" in again.output
    assert "runs must be sorted" in again.output  # the rejected mask is still reported
    assert files_state(out) == before  # not one file rewritten, the index neither
    assert read_training_index(out).annotation.isna().all()  # MIMIC-CXR has no boxes

    rows[1] = chexmask_rows()[1]  # a corrected mask: only its anatomy map is added
    pd.DataFrame(rows).to_csv(tmp_path / "MIMIC-CXR-JPG.csv", index=False)
    fixed = CliRunner().invoke(cli, args)
    assert fixed.exit_code == 0, fixed.output
    after = files_state(out)
    assert after[f"images/{FRONTAL[1][0]}.png"] == before[f"images/{FRONTAL[1][0]}.png"]
    expected = resize_label_map(box_label_map(FRONTAL[1][4], FRONTAL[1][5], heart_width=20), (32, 32))
    np.testing.assert_array_equal(read_label_map(out / "anatomy" / f"{FRONTAL[1][0]}.png"), expected)
    assert read_training_index(out).set_index("image_id").anatomy_path.notna().all()


# --- a real chest radiograph: RG1_UNCR.dcm (pydicom-data), PA chest CR, MONOCHROME1, 15 bits stored ---


@pytest.fixture(scope="module")
def real_cr():
    pytest.importorskip("data_store", reason="the pydicom-data package (dev extra) ships the real radiograph")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data is installed but RG1_UNCR.dcm was not found in it")
    return path


def regions(image):
    """Mean of the mediastinum (a central strip) and of each lung field (the middle of each side), upper chest."""
    h, w = image.shape
    rows = slice(int(h * 0.3), int(h * 0.6))
    return (
        image[rows, int(w * 0.45) : int(w * 0.55)].mean(),
        image[rows, int(w * 0.2) : int(w * 0.35)].mean(),
        image[rows, int(w * 0.65) : int(w * 0.8)].mean(),
    )


def test_a_real_monochrome1_chest_radiograph_reads_as_displayed(real_cr):
    import pydicom

    from xreal.data.dicom import read_dicom_header, read_dicom_image

    ds = pydicom.dcmread(real_cr)
    assert (ds.PhotometricInterpretation, ds.BitsStored, ds.Modality, ds.ViewPosition) == (
        "MONOCHROME1",
        15,
        "CR",
        "PA",
    )
    image = read_dicom_image(real_cr)
    pixels = image.pixels
    assert pixels.shape == (1955, 1841) and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() < 0.2 and 0.9 < pixels.max() <= 1.0
    mediastinum, right_lung, left_lung = regions(pixels)
    assert mediastinum > right_lung + 0.15 and mediastinum > left_lung + 0.15  # lungs dark, mediastinum bright
    # the window (centre 15000, width 30000) over 15 stored bits, then MONOCHROME1's inversion: high values dark
    stored = ds.pixel_array.astype(np.float64)
    windowed = np.clip((stored - 14999.5) / 29999 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(pixels, 1.0 - windowed, atol=2e-4)
    assert np.corrcoef(pixels.ravel()[::97], stored.ravel()[::97])[0, 1] < -0.99
    # the header records Pixel Spacing 0.000\0.000: no spacing, not a spacing of zero
    assert [float(v) for v in ds.PixelSpacing] == [0.0, 0.0]
    assert image.pixel_spacing is None and read_dicom_header(real_cr).pixel_spacing is None
    assert image.view_position == "PA" and image.sop_instance_uid == ds.SOPInstanceUID


def test_a_real_radiograph_resized_keeps_its_brightness_and_anatomy(real_cr):
    from xreal.data.dicom import read_dicom_image
    from xreal.data.ingest import resize_image

    pixels = read_dicom_image(real_cr).pixels
    small = resize_image(pixels, 256)
    assert small.shape == (256, 256) and small.dtype == np.float32
    assert small.min() >= 0.0 and small.max() <= 1.0
    assert abs(float(small.mean()) - float(pixels.mean())) < 0.005  # box filter: area averages
    mediastinum, right_lung, left_lung = regions(small)
    assert mediastinum > right_lung + 0.15 and mediastinum > left_lung + 0.15
    reference = np.asarray(Image.fromarray(pixels, mode="F").resize((256, 256), Image.BOX))
    np.testing.assert_allclose(small, np.clip(reference, 0, 1), atol=1e-6)


def test_a_real_radiograph_ingests_from_vindrs_layout_end_to_end(real_cr, tmp_path):
    from xreal.data.dicom import read_dicom_image
    from xreal.data.ingest import resize_image

    train_id, test_id = "4d390e07733ba06e5ff07412f09c0a92", "0a8e7e3d1c2b4f5a6978b0c1d2e3f405"
    heart = ("Cardiomegaly", 700.0, 1000.0, 1400.0, 1500.0)  # about where this patient's heart is
    train = [(train_id, "R8", *heart), (train_id, "R9", "Cardiomegaly", 690.0, 990.0, 1420.0, 1490.0)]
    root = tmp_path / "vindr"
    (root / "annotations").mkdir(parents=True)
    pd.DataFrame(train, columns=COLUMNS).to_csv(root / "annotations" / "annotations_train.csv", index=False)
    consensus = [c for c in COLUMNS if c != "rad_id"]
    pd.DataFrame([(test_id, "No finding", None, None, None, None)], columns=consensus).to_csv(
        root / "annotations" / "annotations_test.csv", index=False
    )
    for split, image_id in (("train", train_id), ("test", test_id)):
        (root / split).mkdir()
        shutil.copyfile(real_cr, root / split / f"{image_id}.dicom")
    out = tmp_path / "set"
    args = ["ingest", "vindr", str(root), "--out", str(out), "--size", "256", "--quiet", "--workers", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "2 in the training set" in result.output

    index = read_training_index(out).set_index("image_id")
    row = index.loc[train_id]
    assert (row.height, row.width, row.view_position, row.split, row.annotation) == (256, 256, "PA", "train", "readers")
    assert row.pixel_spacing is None  # the header's 0.000\0.000 is not carried into the index as a spacing
    assert row.Cardiomegaly == 1.0 and row["No Finding"] == 0.0 and len(row.boxes) == 2
    assert row.boxes[0]["x_min"] == pytest.approx(700 * 256 / 1841) and row.boxes[0]["y_max"] == pytest.approx(
        1500 * 256 / 1955
    )
    written = np.asarray(Image.open(out / row.image_path))
    assert written.shape == (256, 256) and written.dtype == np.uint16
    expected = resize_image(read_dicom_image(real_cr).pixels, 256)
    np.testing.assert_allclose(written / 65535.0, expected, atol=1 / 65535)
    mask = np.asarray(Image.open(out / row.pathology_masks[0]["path"]))
    assert mask.shape == (256, 256) and mask[135:195, 100:190].all() and not mask[:120].any()  # the boxes, scaled
    healthy = index.loc[test_id]
    assert (healthy.annotation, healthy["No Finding"], healthy.split) == ("consensus", 1.0, "test")

    state = {p: (os.stat(out / p).st_ino, os.stat(out / p).st_mtime_ns) for p in ("index.parquet", row.image_path)}
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "(2 already there)" in again.output
    assert state == {p: (os.stat(out / p).st_ino, os.stat(out / p).st_mtime_ns) for p in state}


def test_csv_header_is_read_from_gzip_too(tmp_path):
    import gzip

    text = io.StringIO()
    csv.writer(text).writerows([["dicom_id", "Landmarks"], ["a", "[[1 2]\n [3 4]]"]])
    path = tmp_path / "t.csv.gz"
    path.write_bytes(gzip.compress(text.getvalue().encode()))
    assert missing_csv_columns(path, ["dicom_id", "Landmarks", "Heart"]) == ["Heart"]
