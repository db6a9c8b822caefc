"""CheXpert-v1.0 and CheXpert-v1.0-small as published, with CheXmask's CheXpert.csv, into training sets."""

import csv
import gzip
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import box_label_map
from PIL import Image

from xreal.cli import cli
from xreal.core.labels import CHEXPERT_LABELS
from xreal.core.masks import read_label_map, resize_label_map, rle_from_label_map
from xreal.data.chexpert import ChexpertError, chexmask_aliases, chexpert_index, read_chexpert_table
from xreal.data.training_index import TRAINING_INDEX_SCHEMA, read_training_index

COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
SMALL = (39, 32)  # rows, columns of a small-variant image (CheXpert-v1.0-small keeps the aspect ratio)
FULL = (390, 320)  # the original's, ten times: what CheXmask's Height and Width give
TRAIN = [  # path below the dataset folder, Frontal/Lateral, AP/PA, labels (blank: not mentioned)
    ("train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP", {"No Finding": "1.0", "Pneumothorax": "0.0"}),
    (
        "train/patient00002/study2/view1_frontal.jpg",
        "Frontal",
        "PA",
        {"Cardiomegaly": "-1.0", "Lung Opacity": "1.0", "Edema": "-1.0", "Fracture": "1.0", "Atelectasis": "0.0"},
    ),
    ("train/patient00002/study1/view2_lateral.jpg", "Lateral", "", {"Lung Opacity": "1.0"}),
    ("train/patient00003/study1/view1_frontal.jpg", "Frontal", "LL", {"Edema": "1.0"}),
]
VALID = [  # valid.csv: three radiologists' majority vote, 0 or 1 everywhere
    (
        "valid/patient64541/study1/view1_frontal.jpg",
        "Frontal",
        "AP",
        {label: "1.0" if label in ("Cardiomegaly", "Support Devices") else "0.0" for label in CHEXPERT_LABELS},
    )
]
IDS = {
    "a": "patient00001_study1_view1_frontal",
    "b": "patient00002_study2_view1_frontal",
    "lat": "patient00002_study1_view2_lateral",
    "ll": "patient00003_study1_view1_frontal",
    "v": "patient64541_study1_view1_frontal",
}


def gradient(height, width):
    return (np.add.outer(np.arange(height), np.arange(width)) * 255 // (height + width)).astype(np.uint8)


def write_chexpert(parent, folder="CheXpert-v1.0-small", train=TRAIN, valid=VALID, shape=SMALL, skip=()):
    """The dataset as unzipped under ``parent``: the two tables (Path relative to ``parent``) and the JPEGs."""
    root = parent / folder
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train), ("valid.csv", valid)):
        records = [
            {"Path": f"{folder}/{path}", "Sex": "Female", "Age": "68", "Frontal/Lateral": fl, "AP/PA": ap, **labels}
            for path, fl, ap, labels in rows
        ]
        pd.DataFrame(records, columns=COLUMNS).to_csv(root / name, index=False)
        for path, *_ in rows:
            if path not in skip and ".." not in path:
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(gradient(*shape)).save(root / path, quality=95)
    return root


def chexmask_row(path, shape=FULL, dice=0.9):
    encoded = rle_from_label_map(box_label_map(*shape, heart_width=shape[1] // 4))
    return {
        "Path": path,
        "Dice RCA (Mean)": dice,
        "Dice RCA (Max)": 0.95,
        "Landmarks": "[[1, 2], [3, 4]]",
        "Left Lung": encoded["left_lung"],
        "Right Lung": encoded["right_lung"],
        "Heart": encoded["heart"],
        "Height": encoded["height"],
        "Width": encoded["width"],
    }


def ingest(*args):
    return CliRunner().invoke(cli, ["ingest", "chexpert", *map(str, args), "--quiet", "--workers", "1"])


def written(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "index.parquet"}


def test_the_tables_become_index_rows_with_labels_as_given(tmp_path):
    root = write_chexpert(tmp_path)
    table, report = chexpert_index(tmp_path)  # the folder above the dataset: the tables' paths are relative to it
    assert table.schema.equals(TRAINING_INDEX_SCHEMA, check_metadata=True)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted([IDS["a"], IDS["b"], IDS["v"]])  # lateral and LL left out by default
    a, b, v = rows[IDS["a"]], rows[IDS["b"]], rows[IDS["v"]]
    assert a["image_path"] == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert (root.parent / a["image_path"]).is_file()
    assert (a["subject_id"], a["split"], a["view_position"], a["source"]) == ("patient00001", "train", "AP", "chexpert")
    assert (a["height"], a["width"]) == SMALL  # from the JPEG header
    assert (a["No Finding"], a["Pneumothorax"], a["Cardiomegaly"]) == (1.0, 0.0, None)  # blank stays null
    assert (b["Cardiomegaly"], b["Edema"], b["Lung Opacity"], b["Atelectasis"]) == (-1.0, -1.0, 1.0, 0.0)
    assert (b["Fracture"], b["No Finding"], b["view_position"]) == (1.0, None, "PA")
    assert (v["split"], v["Cardiomegaly"], v["Edema"], v["subject_id"]) == ("validate", 1.0, 0.0, "patient64541")
    assert (report.images, report.kept, report.other_views) == (5, 3, {"LATERAL": 1, "LL": 1})
    assert "other views left out: LATERAL 1, LL 1" in report.to_text()

    everything, _ = chexpert_index(root, views=None, splits=["train"])  # the dataset folder itself as ROOT
    views = dict(zip(*(everything.column(c).to_pylist() for c in ("image_id", "view_position")), strict=True))
    assert views == {IDS["a"]: "AP", IDS["b"]: "PA", IDS["lat"]: "LATERAL", IDS["ll"]: "LL"}
    assert everything.column("image_path").to_pylist()[0] == "train/patient00001/study1/view1_frontal.jpg"


def test_ingest_joins_chexmask_by_path_for_the_small_variant_and_a_rerun_rewrites_nothing(tmp_path):
    root = write_chexpert(tmp_path)
    rows = [
        chexmask_row("CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg"),  # the full-size release's name
        chexmask_row("valid/patient64541/study1/view1_frontal.jpg"),  # or without the dataset folder
        chexmask_row("train/patient00002/study2/view1_frontal.jpg", shape=(320, 320)),  # not this image's shape
        chexmask_row("train/patient09999/study1/view1_frontal.jpg"),  # an image not ingested
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "CheXpert.csv", index=False)
    out = tmp_path / "train-set"
    args = [root, "--out", out, "--size", "32", "--chexmask", tmp_path / "CheXpert.csv"]

    result = ingest(*args)

    assert result.exit_code == 0, result.output
    assert "3 kept" in result.output and "3 masks kept" in result.output
    assert f"{IDS['b']}: CheXmask mask is 320x320 but the image is 39x32" in result.output
    index = read_training_index(out).set_index("image_id")
    assert sorted(index.index) == sorted([IDS["a"], IDS["b"], IDS["v"]])
    expected = resize_label_map(box_label_map(*FULL, heart_width=FULL[1] // 4), (32, 32))  # full-size mask, resized
    for image_id in (IDS["a"], IDS["v"]):
        np.testing.assert_array_equal(read_label_map(out / index.loc[image_id, "anatomy_path"]), expected)
    assert pd.isna(index.loc[IDS["b"], "anatomy_path"])
    image = np.asarray(Image.open(out / index.loc[IDS["a"], "image_path"]))
    assert image.shape == (32, 32) and image.dtype == np.uint16
    assert index.loc[IDS["b"], "Cardiomegaly"] == -1.0 and np.isnan(index.loc[IDS["b"], "Pneumonia"])
    assert (index.loc[IDS["v"], "split"], index.loc[IDS["a"], "height"]) == ("validate", 32)

    before, files = read_training_index(out), written(out)
    again = ingest(*args)
    assert again.exit_code == 0, again.output
    assert "(3 already there)" in again.output
    assert written(out) == files  # not one file rewritten
    pd.testing.assert_frame_equal(read_training_index(out), before)


def test_the_full_size_layout_joins_chexmask_paths_with_the_dataset_folder(tmp_path):
    root = write_chexpert(tmp_path, folder="CheXpert-v1.0", train=TRAIN[:1], valid=VALID, shape=FULL)
    source, _ = chexpert_index(root)
    aliases = chexmask_aliases(source)
    assert aliases["CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg"] == IDS["a"]
    assert aliases["train/patient00001/study1/view1_frontal.jpg"] == IDS["a"]
    pd.DataFrame([chexmask_row("CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg")]).to_csv(
        tmp_path / "CheXpert.csv", index=False
    )
    result = ingest(root, "--out", tmp_path / "out", "--size", "16", "--chexmask", tmp_path / "CheXpert.csv")
    assert result.exit_code == 0, result.output
    index = read_training_index(tmp_path / "out").set_index("image_id")
    assert isinstance(index.loc[IDS["a"], "anatomy_path"], str) and index.loc[IDS["v"], "Pleural Other"] == 0.0


def test_bad_rows_and_images_are_named_and_left_out_and_the_rest_ingested(tmp_path):
    train = [
        *TRAIN[:2],
        ("../../../../victim/pwned.jpg", "Frontal", "PA", {}),  # a path that climbs out
        ("valid/patient00009/study1/view1_frontal.jpg", "Frontal", "PA", {}),  # in valid/, listed in train.csv
        TRAIN[0],  # listed twice
        ("train/patient00004/study1/view1_frontal.jpg", "Frontal", "PA", {}),  # no image
        ("train/patient00005/study1/view1_frontal.jpg", "Frontal", "AP", {}),  # not a JPEG
        ("train/patient00006/study1/view1_frontal.jpg", "Frontal", "AP", {}),  # a folder linked from elsewhere
    ]
    root = write_chexpert(tmp_path, train=train, skip={train[5][0], train[7][0]})
    (root / train[6][0]).write_bytes(b"not a jpeg")
    (tmp_path / "elsewhere" / "study1").mkdir(parents=True)
    Image.fromarray(gradient(*SMALL)).save(tmp_path / "elsewhere" / "study1" / "view1_frontal.jpg")
    (root / "train" / "patient00006").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    out = tmp_path / "out"

    result = ingest(root, "--out", out, "--size", "16")

    assert result.exit_code == 0, result.output
    lines = result.output
    assert "train.csv: line 4: Path 'CheXpert-v1.0-small/../../../../victim/pwned.jpg' is not a CheXpert" in lines
    assert (
        "train.csv: line 5: Path 'CheXpert-v1.0-small/valid/patient00009/study1/view1_frontal.jpg' lies in valid/"
        in lines
    )
    assert "train.csv: line 6: image train/patient00001/study1/view1_frontal.jpg listed again; row left out" in lines
    assert "1 listed images not found under" in lines and "patient00004_study1_view1_frontal" in lines
    assert "patient00005_study1_view1_frontal: " in lines and "unreadable CheXpert image" in lines
    assert "patient00006_study1_view1_frontal: path 'train/patient00006/study1/view1_frontal.jpg' is outside" in lines
    assert sorted(read_training_index(out).image_id) == sorted([IDS["a"], IDS["b"], IDS["v"]])
    assert not (tmp_path / "victim").exists()


def test_tables_without_images_or_with_foreign_values_exit_2_naming_the_file_and_write_nothing(tmp_path):
    root = write_chexpert(tmp_path / "a", skip={p for p, *_ in TRAIN + VALID})
    result = ingest(root, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert (
        "none of the 3 images the tables list was found under" in result.output
        and "Nothing was written" in result.output
    )
    assert not (tmp_path / "out").exists()

    root = write_chexpert(tmp_path / "b", train=[(*TRAIN[0][:3], {"Edema": "2.0"})])
    with pytest.raises(ChexpertError, match=r"train.csv: line 2, column 'Edema': '2.0' is not one of 1.0, 0.0, -1.0"):
        chexpert_index(root)
    root = write_chexpert(tmp_path / "b2")
    (root / "valid.csv").unlink()
    with pytest.raises(ChexpertError, match=r"valid.csv: missing; .* \(--split train\)"):
        chexpert_index(root)
    assert chexpert_index(root, splits=["train"])[1].kept == 2
    result = ingest(tmp_path / "nowhere", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no train.csv or valid.csv here" in result.output

    root = write_chexpert(tmp_path / "c")
    pd.read_csv(root / "train.csv").drop(columns="AP/PA").to_csv(root / "train.csv", index=False)
    with pytest.raises(ChexpertError, match=r"train.csv: no column AP/PA"):
        chexpert_index(root)
    result = ingest(write_chexpert(tmp_path / "d"), "--out", tmp_path / "out", "--views", "RL")
    assert result.exit_code == 2 and "check --views" in result.output


def xrv_table(name: str) -> Path:
    """A table shipped inside the installed torchxrayvision package (found without importing it)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision is not installed")
    path = Path(spec.submodule_search_locations[0]) / "data" / name
    if not path.is_file():
        pytest.skip(f"torchxrayvision ships no {name}")
    return path


def test_the_real_chexpert_table_torchxrayvision_ships_parses_with_every_value_as_given():
    path = xrv_table("chexpert_train.csv.gz")  # CheXpert-v1.0-small's train.csv, 223,414 images
    frame, problems = read_chexpert_table(path, "train")
    with gzip.open(path, "rt", newline="") as fh:
        raw = list(csv.DictReader(fh))
    assert problems == [] and len(frame) == len(raw) == 223414 and frame["image_id"].is_unique
    for label in CHEXPERT_LABELS:  # every 1, 0, -1 and blank where the file has it
        given = Counter(row[label] for row in raw)
        parsed = Counter(pd.Series(frame[label]).map({1.0: "1.0", 0.0: "0.0", -1.0: "-1.0"}).fillna("").to_numpy())
        assert parsed == given, label
    views = Counter(r["AP/PA"] if r["Frontal/Lateral"] == "Frontal" else "LATERAL" for r in raw)
    assert Counter(frame["view_position"]) == views  # AP, PA, LATERAL and the rare LL and RL
    first = frame.iloc[0]
    assert (first["image_id"], first["subject_id"], first["rel"]) == (
        "patient00001_study1_view1_frontal",
        "patient00001",
        "train/patient00001/study1/view1_frontal.jpg",
    )
    assert set(frame["split"]) == {"train"}
