"""NIH ChestX-ray14 as published (tables, split lists, images_NNN/images/), with CheXmask's ChestX-Ray8.csv."""

import csv
import gzip
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import box_label_map
from PIL import Image
from test_chexpert import written, xrv_table

from xreal.cli import cli
from xreal.core.labels import CHEXPERT_LABELS
from xreal.core.masks import boxes_to_mask, read_binary_mask, read_label_map, resize_label_map, rle_from_label_map
from xreal.data.ingest import scaled_boxes
from xreal.data.nih import LABEL_TO_CHEXPERT, NihError, nih_index, read_bbox_list, read_data_entry
from xreal.data.training_index import TRAINING_INDEX_SCHEMA, read_training_index

ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
ENTRIES = [  # image, findings, follow-up, patient, age, sex, view, width, height, spacing x, y; split
    ("00000001_000.png", "Cardiomegaly", 0, 1, 57, "M", "PA", 2682, 2749, 0.143, 0.143, "train"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA", 2894, 2729, 0.143, 0.143, "train"),
    ("00000002_000.png", "No Finding", 0, 2, 80, "M", "AP", 2500, 2048, 0.171, 0.171, "test"),
    ("00000003_000.png", "Infiltration|Mass|Pleural_Thickening|Hernia", 0, 3, 81, "F", "PA", 2048, 2500, 0.168, 0.168,
     "train"),
    ("00000004_000.png", "Effusion|Nodule|Fibrosis", 0, 4, 82, "M", "AP", 3056, 2544, 0.139, 0.139, "test"),
]  # fmt: skip
BOXES = [  # as BBox_List_2017.csv: pixels of the 1024 x 1024 image, "Infiltrate" for Infiltration
    ("00000003_000.png", "Infiltrate", 100.5, 200.25, 300.0, 150.0),
    ("00000003_000.png", "Mass", 600.0, 500.0, 80.0, 60.0),
    ("00000004_000.png", "Effusion", 700.0, 600.0, 400.0, 300.0),  # crosses the right edge: clipped
]
SIDE = 1024


def write_nih(root, entries=ENTRIES, boxes=BOXES, layout="box", skip=(), extra_rows=()):
    """The folder as downloaded: data entry table, box list, split lists, PNGs (images_001/images/ or images/)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [ENTRY_HEADER, *(",".join(map(str, e[:11])) for e in entries), *extra_rows]
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    box_lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,", *(",".join(map(str, b)) + ",,," for b in boxes)]
    (root / "BBox_List_2017.csv").write_text("\n".join(box_lines) + "\n")
    for split, name in (("train", "train_val_list.txt"), ("test", "test_list.txt")):
        (root / name).write_text("".join(f"{e[0]}\n" for e in entries if e[-1] == split))
    pixels = (np.add.outer(np.arange(SIDE), np.arange(SIDE)) // 8).astype(np.uint8)
    for i, entry in enumerate(entries):
        if entry[0] in skip:
            continue
        folder = root / (f"images_{1 + i // 3:03d}/images" if layout == "box" else "images")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / entry[0])
    return root


def chexmask_rows(names, dice=0.9):
    encoded = rle_from_label_map(box_label_map(SIDE, SIDE, heart_width=200))
    return [
        {
            "Image Index": name,
            "Dice RCA (Mean)": dice,
            "Dice RCA (Max)": 0.95,
            "Landmarks": "[[1, 2], [3, 4]]",
            "Left Lung": encoded["left_lung"],
            "Right Lung": encoded["right_lung"],
            "Heart": encoded["heart"],
            "Height": encoded["height"],
            "Width": encoded["width"],
        }
        for name in names
    ]


def ingest(*args):
    return CliRunner().invoke(cli, ["ingest", "nih", *map(str, args), "--quiet", "--workers", "1"])


def test_findings_map_to_chexpert_labels_and_boxes_and_spacing_come_from_the_tables(tmp_path):
    table, report = nih_index(write_nih(tmp_path / "nih"))
    assert table.schema.equals(TRAINING_INDEX_SCHEMA, check_metadata=True)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == [e[0] for e in ENTRIES]
    first = rows["00000001_000.png"]
    assert first["image_path"] == "images_001/images/00000001_000.png"
    assert (first["height"], first["width"], first["view_position"]) == (1024, 1024, "PA")
    assert (first["split"], first["subject_id"], first["source"]) == ("train", "1", "chestx-ray14")
    assert first["pixel_spacing"] == pytest.approx([0.143 * 2749 / 1024, 0.143 * 2682 / 1024])  # rows, columns
    assert first["Cardiomegaly"] == 1.0 and first["No Finding"] == 0.0 and first["Edema"] == 0.0
    assert all(first[label] is None for label in ("Enlarged Cardiomediastinum", "Fracture", "Support Devices"))
    assert first["boxes"] == [] and first["annotation"] is None

    healthy = rows["00000002_000.png"]
    assert healthy["No Finding"] == 1.0 and healthy["split"] == "test"
    assert all(healthy[label] == 0.0 for label in ("Cardiomegaly", "Lung Opacity", "Pleural Effusion", "Pneumonia"))

    third = rows["00000003_000.png"]  # Infiltration, Mass, Pleural_Thickening and Hernia (no CheXpert label)
    positive = {label for label in CHEXPERT_LABELS if third[label] == 1.0}
    assert positive == {"Lung Opacity", "Lung Lesion", "Pleural Other"} and third["No Finding"] == 0.0
    assert third["image_path"] == "images_002/images/00000003_000.png" and third["annotation"] == "readers"
    assert third["boxes"] == [
        {"label": "Lung Opacity", "x_min": 100.5, "y_min": 200.25, "x_max": 400.5, "y_max": 350.25},
        {"label": "Lung Lesion", "x_min": 600.0, "y_min": 500.0, "x_max": 680.0, "y_max": 560.0},
    ]
    fourth = rows["00000004_000.png"]  # Effusion, Nodule, Fibrosis
    assert {label for label in CHEXPERT_LABELS if fourth[label] == 1.0} == {
        "Pleural Effusion",
        "Lung Lesion",
        "Pleural Other",
    }
    assert fourth["image_path"] == "images_002/images/00000004_000.png"
    assert fourth["boxes"][0]["x_max"] == 1024.0  # clipped to the image
    assert (report.kept, report.boxes, report.unmapped) == (5, 3, {"Emphysema": 1, "Hernia": 1})

    flat, _ = nih_index(write_nih(tmp_path / "flat", layout="flat"), splits=["test"])
    assert flat.column("image_path").to_pylist() == ["images/00000002_000.png", "images/00000004_000.png"]


def test_ingest_keeps_masks_boxes_and_spacing_at_the_training_size_and_a_rerun_rewrites_nothing(tmp_path):
    root = write_nih(tmp_path / "nih", skip={"00000004_000.png"})
    names = [e[0] for e in ENTRIES]
    pd.DataFrame(chexmask_rows(names[:3])).to_csv(tmp_path / "ChestX-Ray8.csv", index=False)
    out = tmp_path / "train-set"
    args = [root, "--out", out, "--size", "32", "--chexmask", tmp_path / "ChestX-Ray8.csv"]

    result = ingest(*args)

    assert result.exit_code == 0, result.output
    assert "1 listed images not found under" in result.output and "(00000004_000.png); left out" in result.output
    assert "3 masks kept" in result.output
    index = read_training_index(out).set_index("image_id")
    assert sorted(index.index) == names[:4]
    first = index.loc["00000001_000.png"]
    expected = resize_label_map(box_label_map(SIDE, SIDE, heart_width=200), (32, 32))
    np.testing.assert_array_equal(read_label_map(out / first.anatomy_path), expected)
    assert pd.isna(index.loc["00000003_000.png", "anatomy_path"])  # CheXmask has no row for it
    assert list(first.pixel_spacing) == pytest.approx([0.143 * 2749 / 32, 0.143 * 2682 / 32])  # at 32 px

    third = index.loc["00000003_000.png"]
    masks = {m["label"]: m["path"] for m in third.pathology_masks}
    assert set(masks) == {"Lung Opacity", "Lung Lesion"}
    opacity = {"label": "Lung Opacity", "x_min": 100.5, "y_min": 200.25, "x_max": 400.5, "y_max": 350.25}
    box = scaled_boxes([opacity], SIDE, SIDE, 32)[0]
    assert third.boxes[0]["x_min"] == pytest.approx(box["x_min"]) and third.boxes[0]["y_max"] == pytest.approx(
        box["y_max"]
    )
    expected_mask = boxes_to_mask([(box["x_min"], box["y_min"], box["x_max"], box["y_max"])], 32, 32)
    np.testing.assert_array_equal(read_binary_mask(out / masks["Lung Opacity"]), expected_mask)
    assert third["Lung Lesion"] == 1.0 and np.isnan(third["Fracture"]) and third.split == "train"

    before, files = read_training_index(out), written(out)
    again = ingest(*args)
    assert again.exit_code == 0, again.output
    assert "(4 already there)" in again.output
    assert written(out) == files  # not one file rewritten
    pd.testing.assert_frame_equal(read_training_index(out), before)


def test_bad_rows_and_boxes_are_named_by_line_and_left_out(tmp_path):
    extra = [
        "../../victim/pwned.png,Mass,0,9,50,M,PA,2048,2048,0.1,0.1",  # an id that climbs out
        "00000006_000.png,Covid,0,6,50,M,PA,2048,2048,0.1,0.1",  # not an NIH finding
        "00000007_000.png,No Finding|Mass,0,7,50,M,PA,2048,2048,0.1,0.1",  # a contradiction
        "00000001_000.png,Edema,0,1,57,M,PA,2682,2749,0.143,0.143",  # listed again
    ]
    boxes = [*BOXES, ("00000003_000.png", "Tumour", 1, 1, 5, 5), ("00000003_000.png", "Mass", 10, 10, 0, 5)]
    entries = [*ENTRIES, ("00000008_000.png", "Edema", 0, "", 50, "M", "", "", "", "", "", "train")]  # blanks
    root = write_nih(tmp_path / "nih", entries=entries, boxes=boxes, extra_rows=extra)
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(tmp_path / "elsewhere" / "00000009_000.png")
    (root / "images_009").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # not read
    with (root / "train_val_list.txt").open("a") as fh:
        fh.write("00000009_000.png\n00000002_000.png\n")  # the second is in test_list.txt too
    with (root / "Data_Entry_2017_v2020.csv").open("a") as fh:
        fh.write("00000009_000.png,Mass,0,9,50,M,PA,2048,2048,0.1,0.1\n")
    out = tmp_path / "out"

    result = ingest(root, "--out", out, "--size", "16")

    assert result.exit_code == 0, result.output
    text = result.output
    assert "Data_Entry_2017_v2020.csv: line 8: Image Index '../../victim/pwned.png' is not a usable id" in text
    assert "line 9: Finding Labels 'Covid' holds a finding NIH does not use; row left out" in text
    assert "line 10: Finding Labels 'No Finding|Mass' combine No Finding with findings" in text
    assert "line 11: image 00000001_000.png listed again; row left out" in text
    assert "BBox_List_2017.csv: line 5: Finding Label 'Tumour' is not an NIH finding; box left out" in text
    assert "BBox_List_2017.csv: line 6: box x, y, w, h [10.0, 10.0, 0.0, 5.0] is empty" in text
    assert "images_009/: path 'images_009' is outside the allowed root" in text
    assert "1 listed images not found under" in text and "(00000009_000.png); left out" in text
    assert "00000002_000.png: listed in train_val_list.txt and test_list.txt; left out" in text
    index = read_training_index(out).set_index("image_id")
    assert sorted(index.index) == sorted(e[0] for e in entries if e[0] != "00000002_000.png")
    blank = index.loc["00000008_000.png"]  # no patient, view, size nor spacing: kept without them
    assert blank.pixel_spacing is None and pd.isna(blank.subject_id) and pd.isna(blank.view_position)
    assert blank.Edema == 1.0
    assert not (tmp_path / "victim").exists()


def test_a_folder_without_images_or_tables_exits_2_and_writes_nothing(tmp_path):
    root = write_nih(tmp_path / "nih", skip={e[0] for e in ENTRIES})
    result = ingest(root, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "none of the 5 images the tables list was found under" in result.output
    assert "images_001/images/" in result.output and "Nothing was written" in result.output
    assert not (tmp_path / "out").exists()

    result = ingest(tmp_path / "elsewhere", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no Data_Entry_2017_v2020.csv or Data_Entry_2017.csv" in result.output
    (root / "test_list.txt").unlink()
    with pytest.raises(NihError, match=r"test_list.txt: missing; .*--split"):
        nih_index(root)
    (root / "Data_Entry_2017_v2020.csv").write_text("Image Index,Finding Labels\n00000001_000.png,Mass\n")
    with pytest.raises(NihError, match=r"Data_Entry_2017_v2020.csv: no column Patient ID, View Position"):
        nih_index(root, splits=["train"])


def test_the_real_nih_tables_torchxrayvision_ships_parse_and_map_as_documented():
    entry_path = xrv_table("Data_Entry_2017_v2020.csv.gz")
    frame, problems, unmapped = read_data_entry(entry_path)
    with gzip.open(entry_path, "rt", newline="") as fh:
        raw = list(csv.DictReader(fh))
    assert problems == [] and len(frame) == len(raw) == 112120
    findings = [set(r["Finding Labels"].split("|")) for r in raw]
    for label in {v for v in LABEL_TO_CHEXPERT.values() if v}:  # positive exactly where a mapped finding is listed
        sources = {k for k, v in LABEL_TO_CHEXPERT.items() if v == label}
        assert frame[label].sum() == sum(bool(f & sources) for f in findings), label
        assert set(frame[label].unique()) == {0.0, 1.0}
    assert frame["No Finding"].sum() == sum(f == {"No Finding"} for f in findings)
    assert frame[["Fracture", "Support Devices", "Enlarged Cardiomediastinum"]].isna().all().all()
    assert unmapped == {n: sum(n in f for f in findings) for n in ("Emphysema", "Hernia")}
    first = frame.iloc[0]
    assert (first["image_id"], first["subject_id"], first["view_position"]) == ("00000001_000.png", "1", "PA")
    assert first["pixel_spacing"] == pytest.approx([0.143 * 2749 / 1024, 0.143 * 2682 / 1024])
    assert Counter(frame["view_position"]) == Counter(r["View Position"] for r in raw)

    boxes, box_problems = read_bbox_list(xrv_table("BBox_List_2017.csv.gz"))  # the header's trailing ",,," included
    assert box_problems == [] and len(boxes) == 880 and sum(map(len, boxes.values())) == 984
    labels = Counter(b["label"] for image in boxes.values() for b in image)
    assert labels["Lung Opacity"] == 123 and labels["Lung Lesion"] == 85 + 79  # Infiltrate; Mass and Nodule
    assert all(
        0 <= b["x_min"] < b["x_max"] <= 1024 and 0 <= b["y_min"] < b["y_max"] <= 1024 for i in boxes.values() for b in i
    )
    by_image = {r["Image Index"]: r for r in raw}
    for image_id, image_boxes in boxes.items():  # each box's finding is among its image's findings, mapped
        listed = {
            LABEL_TO_CHEXPERT[n] for n in by_image[image_id]["Finding Labels"].split("|") if n in LABEL_TO_CHEXPERT
        }
        assert {b["label"] for b in image_boxes} <= listed, image_id
