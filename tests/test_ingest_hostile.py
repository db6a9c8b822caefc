"""Hostile input to `xreal ingest`: ids that climb out of folders, huge declared sizes, damaged images, no images.

Every bad row or file is reported (named) and left out while the rest is ingested; nothing is read from outside
the dataset's folder or written outside --out; a run that ingests nothing exits 2 and writes no index.
"""

import contextlib
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pydicom
import pytest
from click.testing import CliRunner
from conftest import box_label_map
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_dicom import radiograph
from test_ingest import FRONTAL, SMALL, chexmask_rows, gradient, write_mimic
from test_mimic import write_tables
from test_vindr import COLUMNS, NONE, SHAPE, TEST, TRAIN, write_vindr

import xreal.data.chexmask
from xreal.cli import cli
from xreal.core.errors import XRealError
from xreal.core.files import ID_PATTERN
from xreal.core.masks import rle_from_label_map, write_mask_file
from xreal.data.chexmask import ChexmaskError, anatomy_map, read_chexmask
from xreal.data.dicom import DicomError, read_dicom_header, read_dicom_image
from xreal.data.ingest import IngestError, build_training_set
from xreal.data.mimic import METADATA_FILE, image_path, mimic_index, read_reports
from xreal.data.training_index import (
    INDEX_FILE,
    TRAINING_INDEX_SCHEMA,
    declared_size,
    read_training_index,
    write_phantom_training_set,
    write_training_index,
)
from xreal.data.vindr import vindr_index
from xreal.manifest.from_index import manifest_from_index

FRONTAL_IDS = [i[0] for i in FRONTAL]
HOSTILE_IDS = [
    "../../victim/pwned",
    "../../../../../../../../tmp/pwned",
    "/etc/passwd",
    "a\x00b",
    "a\nb",
    "",
    " ",
    ".hidden",
    "-flag",
    "a/b",
    "..",
    "C:\\x",
    "ünïcode",
    "a" * 200,
]


def ingest(*args):
    return CliRunner().invoke(cli, ["ingest", *map(str, args), "--quiet", "--workers", "1"])


def files_outside(folder: Path, out: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``folder`` but not under ``out``, with its size and modification time."""
    return {
        p: (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and not p.is_relative_to(out)
    }


def bomb_png(path: Path, claimed: tuple[int, int] = (50000, 50000)) -> Path:
    """A tiny grayscale PNG whose IHDR claims ``claimed`` (width, height), CRC fixed so only the size is wrong."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path, format="PNG")
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:20], data[20:24] = (v.to_bytes(4, "big") for v in claimed)
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


# --- 1: ids that become paths -------------------------------------------------------------------------------------


def test_a_mimic_dicom_id_that_climbs_out_is_reported_and_nothing_is_written_outside_out(tmp_path):
    # from files/p10/p10000032/s50414267/ and from OUT/images/, five levels up is tmp_path
    climbing = "../../../../../victim/pwned"
    hostile = [
        (climbing, "10000032", "50414267", "PA", 30, 20, "train"),
        ("0badsubj-0000", "10/../../../..", "50000000", "PA", 30, 20, "train"),
        ("0badstudy-0000", "10000032", "5/../../../../x", "AP", 30, 20, "test"),
    ]
    root = write_mimic(tmp_path / "mimic")
    write_tables(root, images=SMALL + hostile)
    (tmp_path / "victim").mkdir()
    Image.fromarray(gradient(30, 20)).save(tmp_path / "victim" / "pwned.jpg")  # any JPEG on the machine
    out = tmp_path / "a" / "b" / "c" / "out"
    before = files_outside(tmp_path, out)

    result = ingest("mimic", root, "--out", out, "--size", "16")

    assert result.exit_code == 0, result.output
    assert not (tmp_path / "victim" / "pwned.png").exists()
    assert files_outside(tmp_path, out) == before  # nothing written or overwritten outside --out
    assert f"{METADATA_FILE}: line 7: dicom_id '{climbing}' is not a usable id" in result.output
    assert "line 8: subject_id '10/../../../..' is not a MIMIC-CXR id: it must be 1-20 digits" in result.output
    assert "line 9: study_id '5/../../../../x' is not a MIMIC-CXR id" in result.output
    assert "3 rows left out as unusable" in result.output
    assert sorted(read_training_index(out).image_id) == sorted(FRONTAL_IDS)  # the good rows are ingested


def test_image_path_refuses_ids_that_are_not_ids():
    assert image_path("10000032", "50414267", "abc-1") == "files/p10/p10000032/s50414267/abc-1.jpg"
    for ids in [("10000032", "50414267", "../x"), ("1/../2", "5", "a"), ("1", "5\n", "a"), ("1", "5", "a\x00")]:
        with pytest.raises(XRealError, match="is not a"):
            image_path(*ids)


def test_a_source_index_naming_files_outside_root_or_out_is_refused_row_by_row(tmp_path):
    root = write_mimic(tmp_path / "mimic")
    source, _ = mimic_index(root)
    good = source.to_pylist()
    bait = tmp_path / "outside.jpg"
    Image.fromarray(gradient(30, 20)).save(bait)
    (root / "files" / "link.jpg").symlink_to(bait)
    template = {**good[0], "height": 30, "width": 20}
    hostile = [
        {**template, "image_id": "../../escape"},  # OUT/images/../../escape.png is outside OUT
        {**template, "image_id": "via-dotdot", "image_path": "../outside.jpg"},
        {**template, "image_id": "via-absolute", "image_path": str(bait)},
        {**template, "image_id": "via-symlink", "image_path": "files/link.jpg"},
        {**template, "image_id": "via-nul", "image_path": "files/a\x00.jpg"},
        {**template, "image_id": "huge-row", "height": 200000, "width": 20},
    ]
    table = pa.Table.from_pylist(good + hostile, schema=TRAINING_INDEX_SCHEMA)
    out = tmp_path / "out"
    before = files_outside(tmp_path, out)

    index, report = build_training_set(table, root, out, size=16, workers=1, progress=False)

    assert sorted(read_training_index(index).image_id) == sorted(FRONTAL_IDS)
    assert files_outside(tmp_path, out) == before and not (tmp_path / "escape.png").exists()
    text = "\n".join(report.problems)
    assert "image_id '../../escape' is not a usable id" in text
    for image_id in ("via-dotdot", "via-absolute", "via-symlink"):
        assert f"{image_id}: path " in text and "is outside the allowed root" in text
    assert "via-nul: path 'files/a\\x00.jpg' holds a NUL byte" in text
    assert "huge-row: the index's height x width: image size 200000x20 exceeds the 8192 px" in text


def test_report_paths_are_built_only_from_digit_ids_and_stay_in_their_folder(tmp_path):
    folder = tmp_path / "reports"
    (folder / "files" / "p10" / "p10000032").mkdir(parents=True)
    (folder / "files" / "p10" / "p10").mkdir()  # so that the climbing path below resolves
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "sy.txt").write_text("FINDINGS: a secret outside the reports folder.")
    # "files/p10/p10/../../../../x/sy.txt" is tmp_path/x/sy.txt
    assert read_reports(folder, {("10/../../../../x", "y")}) == {}
    (folder / "files" / "p10" / "p10000032" / "s50414267.txt").symlink_to(tmp_path / "x" / "sy.txt")
    assert read_reports(folder, {("10000032", "50414267")}) == {}  # a link out of the folder is not followed
    (folder / "files" / "p10" / "p10000032" / "s50000000.txt").write_text("FINDINGS: inside.")
    assert read_reports(folder, {("10000032", "50000000")}) == {("10000032", "50000000"): "inside."}


def test_a_vindr_image_id_that_climbs_out_is_reported_by_line_and_nothing_is_written_outside_out(tmp_path):
    root = tmp_path / "vindr"
    # write_vindr also writes the DICOM of the climbing id, at tmp_path/escape.dicom: outside ROOT
    write_vindr(root, train=[*TRAIN, ("../../escape", "R1", "No finding", *NONE)])
    assert (tmp_path / "escape.dicom").is_file()
    out = tmp_path / "set"
    before = files_outside(tmp_path, out)

    result = ingest("vindr", root, "--out", out, "--size", "16")

    assert result.exit_code == 0, result.output
    assert "annotations_train.csv: line 9: image_id '../../escape' is not a usable id" in result.output
    assert files_outside(tmp_path, out) == before and not (tmp_path / "escape.png").exists()
    assert sorted(read_training_index(out).image_id) == sorted({r[0] for r in TRAIN + TEST})


def test_an_index_naming_files_outside_its_folder_is_never_trusted_to_delete_or_read_them(tmp_path):
    out = tmp_path / "set"
    write_phantom_training_set(out, count=2, size=64)
    victim = write_mask_file(tmp_path / "victim.png", box_label_map())  # a valid anatomy map, outside the set
    kept = victim.read_bytes()
    frame = read_training_index(out)
    frame.loc[0, "image_path"] = "../victim.png"  # a planted index: a rewrite deletes the files it no longer lists
    frame["anatomy_path"] = "../victim.png"  # and a manifest reads the anatomy maps it lists
    write_training_index(frame, out / INDEX_FILE)
    with pytest.raises(XRealError, match=r"path '\.\./victim\.png' is outside the allowed root"):
        manifest_from_index(out, {("No Finding",): 1}, splits=("train", "validate", "test"))

    write_phantom_training_set(out, count=1, size=64, overwrite=True)
    assert victim.read_bytes() == kept


# --- 8: declared sizes ----------------------------------------------------------------------------------------------


def test_mimic_rows_with_a_size_xreal_does_not_read_are_reported_and_left_out(tmp_path):
    images = [SMALL[0], SMALL[2], SMALL[3], SMALL[4]]
    bad = [
        ("b1", "10000032", "50414267", "PA", 200000, 200000, "train"),
        ("b2", "10000032", "50414267", "PA", "abc", 20, "train"),
        ("b3", "10000032", "50414267", "PA", 0, 20, "train"),
        ("b4", "10000032", "50414267", "PA", -5, 20, "train"),
        ("b5", "10000032", "50414267", "PA", None, 20, "train"),
    ]
    table, report = mimic_index(write_tables(tmp_path / "mimic", images=images + bad))
    assert sorted(table.column("image_id").to_pylist()) == sorted(FRONTAL_IDS)
    text = "\n".join(report.problems)
    assert "line 6: Rows x Columns: image size 200000x200000 exceeds the 8192 px" in text
    assert "line 7: Rows x Columns: image size 'abc'x'20' is not a whole number of pixels" in text
    assert "line 8: Rows x Columns: image size 0x20 is not positive" in text
    assert "line 9: Rows x Columns: image size -5x20 is not positive" in text
    assert "line 10: Rows x Columns: image size ''x'20' is not a whole number" in text


def test_a_vindr_dicom_header_claiming_50000_rows_is_reported_and_left_out(tmp_path):
    root = write_vindr(tmp_path / "vindr")
    radiograph(root / "test" / f"{TEST[0][0]}.dicom", np.zeros(SHAPE, np.uint16), Rows=50000, Columns=50000)
    table, report = vindr_index(root)
    assert TEST[0][0] not in table.column("image_id").to_pylist() and table.num_rows == 2
    assert any(
        p.startswith(f"{TEST[0][0]}: ") and "DICOM header: image size 50000x50000 exceeds the 8192 px" in p
        for p in report.problems
    )


def test_a_chexmask_size_of_200000_is_reported_and_never_decoded(tmp_path, monkeypatch):
    decoded = []
    real = xreal.data.chexmask.label_map_from_rle
    monkeypatch.setattr(
        xreal.data.chexmask, "label_map_from_rle", lambda *a: decoded.append(a[3:]) or real(*a)
    )  # records every size that is decoded
    square = chexmask_rows([SMALL[4]])[0]  # a 126x126 image: an aspect a 200000x200000 mask matches
    with pytest.raises(ChexmaskError, match=r"200000x200000 exceeds the 8192 px .*; the mask is not decoded"):
        anatomy_map(pd.Series({**square, "Height": 200000, "Width": 200000}), 126, 126, where="ea030e7a")
    for height, width in [(0, 0), (-126, -126), ("abc", 126), (None, 126), (float("nan"), 126), (126.5, 126)]:
        with pytest.raises(ChexmaskError, match="CheXmask Height x Width: image size"):
            anatomy_map(pd.Series({**square, "Height": height, "Width": width}), 126, 126, where="ea030e7a")
    assert decoded == []
    for rle in ["1 \u00b2", "99999999999999999999999 1"]:  # digits to str.isdigit, not to int
        with pytest.raises(ChexmaskError, match="ea030e7a: CheXmask "):
            anatomy_map(pd.Series({**square, "Heart": rle}), 126, 126, where="ea030e7a")
    assert anatomy_map(pd.Series(square), 126, 126, where="ea030e7a").shape == (126, 126)

    # end to end: one row too large, one with a size that is not a number; both images kept without anatomy
    root = write_mimic(tmp_path / "mimic")
    rows = chexmask_rows()
    rows[3]["Height"], rows[3]["Width"] = 200000, 200000
    rows[0]["Height"] = "abc"
    pd.DataFrame(rows).to_csv(tmp_path / "MIMIC-CXR-JPG.csv", index=False)
    masks, _ = read_chexmask(tmp_path / "MIMIC-CXR-JPG.csv", FRONTAL_IDS)
    index, report = build_training_set(
        mimic_index(root)[0], root, tmp_path / "out", size=16, masks=masks, workers=1, progress=False
    )
    frame = read_training_index(index).set_index("image_id")
    assert len(frame) == 4 and frame.anatomy_path.isna().tolist() == [True, False, False, True]
    text = "\n".join(report.problems)
    assert f"{FRONTAL_IDS[3]}: CheXmask Height x Width: image size 200000x200000 exceeds" in text
    assert f"{FRONTAL_IDS[0]}: CheXmask Height x Width: image size 'abc'x'159' is not a whole number" in text


# --- 9: images that fail to decode ----------------------------------------------------------------------------------


def test_a_png_claiming_50000x50000_and_a_truncated_jpeg_are_reported_and_the_rest_ingested(tmp_path):
    root = write_mimic(tmp_path / "mimic")
    paths = [root / image_path(s, t, d) for d, s, t, *_ in FRONTAL]
    bomb_png(paths[0])  # a PNG under a .jpg name: PIL reads what the bytes say
    paths[1].write_bytes(paths[1].read_bytes()[: paths[1].stat().st_size // 2])
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    bomb_png(out / "images" / f"{FRONTAL_IDS[2]}.png")  # a damaged output of an earlier run: redone, not trusted

    result = ingest("mimic", root, "--out", out, "--size", "16")

    assert result.exit_code == 0, result.output
    bomb = next(line for line in result.output.splitlines() if line.startswith(f"  {FRONTAL_IDS[0]}: {paths[0]}: "))
    assert "2500000000 pixels" in bomb and bomb.endswith("left out")
    assert f"{FRONTAL_IDS[1]}: {paths[1]}: unreadable image (OSError: image file is truncated" in result.output
    assert sorted(read_training_index(out).image_id) == sorted(FRONTAL_IDS[2:])
    assert Image.open(out / "images" / f"{FRONTAL_IDS[2]}.png").size == (16, 16)  # the damaged output is redone


def test_a_damaged_dicom_is_a_dicom_error_naming_the_file_never_a_pydicom_exception(tmp_path):
    good = radiograph(tmp_path / "good.dcm", np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) % 4096)
    data = good.read_bytes()
    damaged = [data[:cut] for cut in range(0, 700, 3)]
    rng = np.random.default_rng(0)
    for _ in range(150):
        flipped = bytearray(data)
        for at in rng.integers(128, 420, 2):
            flipped[at] = rng.integers(0, 256)
        damaged.append(bytes(flipped))
    path = tmp_path / "damaged.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every invalid value it meets
        for content in damaged:
            path.write_bytes(content)
            for read in (read_dicom_image, read_dicom_header):
                try:
                    read(path)
                except DicomError as exc:
                    assert str(exc).startswith(f"{path}: ")


def test_a_truncated_dicom_in_an_ingest_is_reported_and_the_rest_ingested(tmp_path):
    root = write_tables(tmp_path / "mimic-cxr", images=SMALL)
    for dicom, subject, study, _v, rows, columns, _ in FRONTAL:
        path = root / image_path(subject, study, dicom, ".dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        radiograph(path, np.zeros((rows, columns), np.uint16))
    first = root / image_path(*FRONTAL[0][1:3], FRONTAL[0][0], ".dcm")
    first.write_bytes(first.read_bytes()[:154])  # inside the file meta: pydicom raised struct.error here
    pixels = root / image_path(*FRONTAL[1][1:3], FRONTAL[1][0], ".dcm")
    ds = pydicom.dcmread(pixels)
    ds.PixelData = ds.PixelData[:100]  # the header's size, too few pixels
    ds.save_as(pixels)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = ingest("mimic", root, "--dicom", "--out", tmp_path / "out", "--size", "16")

    assert result.exit_code == 0, result.output
    assert f"{FRONTAL_IDS[0]}: {first}: not a readable DICOM file (" in result.output
    assert f"{FRONTAL_IDS[1]}: {pixels}: " in result.output
    assert sorted(read_training_index(tmp_path / "out").image_id) == sorted(FRONTAL_IDS[2:])


# --- 15: nothing ingested -------------------------------------------------------------------------------------------


def test_mimic_tables_without_images_exit_2_naming_the_folder_and_write_no_index(tmp_path):
    root = write_tables(tmp_path / "mimic", images=SMALL)
    result = ingest("mimic", root, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert f"none of the 4 images listed was found under {root / 'files'}" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / INDEX_FILE).exists()

    write_tables(root, images=[("../x", *SMALL[0][1:])], labels={})  # the only row is unusable
    result = ingest("mimic", root, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "the MIMIC-CXR tables list no usable image" in result.output
    assert "dicom_id '../x' is not a usable id" in result.output and not (tmp_path / "out" / INDEX_FILE).exists()


def test_mimic_images_that_are_all_unreadable_exit_2(tmp_path):
    root = write_mimic(tmp_path / "mimic")
    for dicom, subject, study, *_ in FRONTAL:
        (root / image_path(subject, study, dicom)).write_bytes(b"not a JPEG")
    result = ingest("mimic", root, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "none of the 4 images listed could be ingested (0 not found, the others unusable)" in result.output
    assert "cannot identify image file" in result.output and not (tmp_path / "out" / INDEX_FILE).exists()


def test_vindr_tables_without_images_exit_2_naming_the_folders_and_write_no_index(tmp_path):
    root = write_vindr(tmp_path / "vindr", missing=[r[0] for r in TRAIN + TEST])
    result = ingest("vindr", root, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert f"none of the 3 images the annotation tables list was found under {root / 'train'} and" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / INDEX_FILE).exists()


def test_an_empty_source_is_an_ingest_error(tmp_path):
    with pytest.raises(IngestError, match="the source lists none"):
        build_training_set(TRAINING_INDEX_SCHEMA.empty_table(), tmp_path, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / INDEX_FILE).exists()


# --- properties -----------------------------------------------------------------------------------------------------

ids = st.one_of(
    st.sampled_from(HOSTILE_IDS),
    st.text(max_size=12),
    st.from_regex(ID_PATTERN, fullmatch=True).filter(lambda s: len(s) < 40),
)
numbers = st.one_of(st.sampled_from(["10000032", "../10", "1\x002", "", "-1", "１２"]), st.text(max_size=6))
sizes = st.one_of(
    st.integers(1, 24),
    st.integers(max_value=0),
    st.integers(min_value=8193),
    st.sampled_from(["", "abc", "1e9", "nan", "12.5", " 7 "]),
    st.floats(allow_nan=True),
)
GOOD = ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", 12, 10, "train")


def _valid(check, *args) -> bool:
    try:
        check(*args)
    except XRealError:
        return False
    return True


def _try_write(write, path: Path, inside: Path) -> None:
    """Write a file at a hostile path when it lands inside ``inside`` (bait a wrong ingest would read)."""
    try:
        if path.resolve().is_relative_to(inside):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
    except (OSError, ValueError):
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dicom=ids, subject=numbers, study=numbers, rows=sizes, columns=sizes)
def test_any_mimic_metadata_row_is_ingested_or_reported_and_nothing_lands_outside_out(
    dicom, subject, study, rows, columns
):
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        root, out = tmp / "mimic", tmp / "a" / "b" / "c" / "out"
        row = (dicom, subject, study, "PA", rows, columns, "train")
        write_tables(root, images=[GOOD, row], labels={})
        Image.fromarray(gradient(12, 10)).save(_mkparent(root / image_path(*GOOD[1:3], GOOD[0])))
        valid = _valid(image_path, subject, study, dicom) and _valid(declared_size, rows, columns, "")
        naive = root / f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
        if valid:
            height, width = declared_size(rows, columns, "")
            Image.fromarray(gradient(height, width)).save(_mkparent(naive))
        else:
            _try_write(lambda p: Image.fromarray(gradient(12, 10)).save(p, format="JPEG"), naive, tmp)
        before = files_outside(tmp, out)
        try:
            source, report = mimic_index(root)
            index, _ = build_training_set(source, root, out, size=16, workers=1, progress=False)
        except XRealError as exc:  # a table damaged as a whole (a newline in an id, a repeated id)
            assert str(root) in str(exc) or "dicom_id" in str(exc)
        else:
            kept = read_training_index(index).image_id.tolist()
            assert GOOD[0] in kept
            if valid and dicom != GOOD[0]:
                assert dicom in kept
            elif dicom != GOOD[0]:
                assert dicom not in kept and any(f"{METADATA_FILE}: line 3: " in p for p in report.problems)
        assert files_outside(tmp, out) == before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_id=ids, rows=st.sampled_from([1, 8, 24, 0, 8193, 50000, 65535]), columns=st.integers(0, 30))
def test_any_vindr_image_id_or_header_size_is_ingested_or_reported(image_id, rows, columns):
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        root, out = tmp / "vindr", tmp / "out"
        train = [TRAIN[4], (image_id, "R1", "Cardiomegaly", 1.0, 1.0, 5.0, 5.0)]
        (root / "annotations").mkdir(parents=True)
        pd.DataFrame(train, columns=COLUMNS).to_csv(root / "annotations" / "annotations_train.csv", index=False)
        (root / "train").mkdir()
        radiograph(root / "train" / f"{TRAIN[4][0]}.dicom", np.zeros(SHAPE, np.uint16))
        small = 1 <= rows <= 8192 and 1 <= columns <= 8192
        stored = np.zeros((rows, columns) if small else (4, 4), np.uint16)
        bait = root / "train" / f"{image_id}.dicom"
        _try_write(lambda p: radiograph(p, stored, Rows=rows, Columns=columns), bait, tmp)
        before = files_outside(tmp, out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                source, report = vindr_index(root, splits=("train",))
                index, ingested = build_training_set(source, root, out, size=16, workers=1, progress=False)
            except XRealError as exc:
                assert str(root) in str(exc)
            else:
                kept = read_training_index(index).image_id.tolist()
                assert TRAIN[4][0] in kept
                if image_id not in kept and image_id != TRAIN[4][0]:
                    problems = report.problems + ingested.problems
                    assert any("line 3: image_id" in p or p.startswith(f"{image_id}: ") for p in problems)
        assert files_outside(tmp, out) == before


rle_texts = st.one_of(
    st.sampled_from(["1 \u00b2", "99999999999999999999999 1", "\u0663 4", "1 2 3", "-1 4", "0 0"]),
    st.text(max_size=30),
    st.lists(st.integers(-5, 10**12), max_size=8).map(lambda v: " ".join(map(str, v))),
    st.just(rle_from_label_map(box_label_map(32, 32, heart_width=8))["heart"]),
)


@settings(max_examples=60, deadline=None)
@given(height=sizes, width=sizes, right=rle_texts, heart=rle_texts)
def test_any_chexmask_size_or_rle_gives_a_label_map_or_a_chexmask_error(height, width, right, heart):
    encoded = rle_from_label_map(box_label_map(32, 32, heart_width=8))
    row = {"Right Lung": right, "Left Lung": encoded["left_lung"], "Heart": heart, "Height": height, "Width": width}
    try:
        label_map = anatomy_map(pd.Series(row), 32, 32, where="img")
    except ChexmaskError as exc:
        assert str(exc).startswith("img: ")
    else:
        assert label_map.shape == (declared_size(height, width, ""))

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "masks.csv"
        csv_row = {"dicom_id": "img", **row, "Dice RCA (Mean)": 0.9, "Dice RCA (Max)": 0.9}
        pd.DataFrame([csv_row]).to_csv(path, index=False)
        try:
            masks, _ = read_chexmask(path, ["img"])
        except ChexmaskError as exc:
            assert str(path) in str(exc)
        else:
            for image_id, mask in masks.iterrows():
                with contextlib.suppress(ChexmaskError):
                    anatomy_map(mask, 32, 32, where=image_id)


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
