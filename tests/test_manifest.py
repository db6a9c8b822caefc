import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xreal.core.errors import ManifestError
from xreal.core.masks import rle_from_label_map, write_mask_file
from xreal.manifest.schema import (
    MAX_SAMPLES_PER_REQUEST,
    ManifestInvalid,
    derive_seed,
    expand_manifest,
    load_requests,
    manifest_table,
    validate_manifest,
    write_manifest,
)


@pytest.fixture
def workspace(tmp_path, label_map):
    """A manifest folder with an anatomy label map and a pathology mask in it."""
    write_mask_file(tmp_path / "masks" / "anatomy.png", label_map)
    lesion = np.zeros_like(label_map, dtype=bool)
    lesion[20:28, 12:20] = True
    write_mask_file(tmp_path / "masks" / "lesion.png", lesion)
    (tmp_path / "masks" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return tmp_path


def good_rows(label_map):
    rle = rle_from_label_map(label_map)
    return [
        {
            "request_id": "lesion-file",
            "labels": ["Lung Lesion"],
            "num_samples": 3,
            "anatomy_path": "masks/anatomy.png",
            "pathology_mask_path": "masks/lesion.png",
            "split": "train",
        },
        {
            "request_id": "effusion-rle",
            "labels": ["pleural effusion", "Edema"],
            "num_samples": 2,
            "anatomy_rle": rle,
            "boxes": [{"label": None, "x_min": 8, "y_min": 30, "x_max": 30, "y_max": 48}],
            "box_units": "pixel",
            "seed": 1234,
        },
        {
            "request_id": "healthy-template",
            "labels": ["No Finding"],
            "num_samples": 4,
            "anatomy_template": "phantom-7",
            "steps": 20,
            "anatomy_steps": 10,
            "guidance_scale": 3.0,
            "soft_scale": 0.3,
            "tags": ["twin"],
        },
    ]


def write(path, rows):
    """Write rows as a user would with pyarrow, keeping NaN (write_manifest turns NaN into null)."""
    table = manifest_table(rows)
    for name in ("guidance_scale", "soft_scale"):
        values = [row.get(name) for row in rows]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.float64()))
    pq.write_table(table, path)
    return path


def issues_of(path, **kwargs):
    report = validate_manifest(path, **kwargs)
    assert not report.ok
    return report.issues


def test_a_good_manifest_validates(workspace, label_map):
    path = write(workspace / "m.parquet", good_rows(label_map))
    report = validate_manifest(path)
    assert report.ok, report.summary()
    assert (report.rows, report.samples) == (3, 9)
    requests = load_requests(path)
    assert requests[1].labels == ("Edema", "Pleural Effusion")
    assert requests[0].anatomy.shape == (64, 64) and requests[1].anatomy.kind == "rle"
    assert requests[2].settings().steps == 20 and requests[2].settings().eta == 1.0


def test_a_rows_own_guidance_wins_over_the_runs_finding_table(workspace, label_map):
    """The run's table guides a row by its findings (the largest of them); a row's guidance_scale column wins."""
    from xreal.core.settings import SamplerSettings

    rows = good_rows(label_map)
    rows[1]["guidance_scale"] = 2.5
    requests = load_requests(write(workspace / "m.parquet", rows))
    run = SamplerSettings(guidance_scale=5.0).with_overrides(finding_guidance={"Lung Lesion": 7, "Edema": 3})
    assert requests[0].settings(run).guidance_scale == 7.0  # Lung Lesion
    assert requests[1].settings(run).guidance_scale == 2.5  # Edema and Pleural Effusion, its own 2.5
    rows[1]["guidance_scale"] = None
    requests = load_requests(write(workspace / "m2.parquet", rows))
    assert requests[1].settings(run).guidance_scale == 5.0  # Edema 3, Pleural Effusion the run's 5


def test_pandas_written_manifests_are_accepted(workspace, label_map):
    import pandas as pd

    frame = pd.DataFrame(
        [
            {
                "request_id": "a",
                "labels": ["Edema"],
                "num_samples": 2,
                "anatomy_template": "phantom-1",
                "boxes": [{"label": "Edema", "x_min": 0.1, "y_min": 0.1, "x_max": 0.5, "y_max": 0.5}],
                "seed": None,
            },
            {"request_id": "b", "labels": ["No Finding"], "num_samples": 1, "anatomy_template": "phantom-1", "seed": 5},
        ]
    )
    frame.to_parquet(workspace / "pandas.parquet")  # seed becomes float64 with NaN
    report = validate_manifest(workspace / "pandas.parquet")
    assert report.ok, report.summary()


def mutate(label_map, row, **changes):
    rows = good_rows(label_map)
    rows[row] = {**rows[row], **changes}
    return rows


BAD_ROWS = [
    # (row, changes, column, reason fragment)
    (0, {"labels": ["Cardiomegally"]}, "labels", "unknown pathology label 'Cardiomegally'"),
    (0, {"labels": []}, "labels", "is empty"),
    (0, {"labels": ["No Finding", "Edema"]}, "labels", "cannot be combined"),
    (0, {"num_samples": 0}, "num_samples", "between 1 and"),
    (0, {"num_samples": MAX_SAMPLES_PER_REQUEST + 1}, "num_samples", "between 1 and"),
    (0, {"num_samples": None}, "num_samples", "is missing"),
    (0, {"request_id": "has space"}, "request_id", "letters, digits"),
    (0, {"request_id": None}, "request_id", "is missing"),
    (0, {"anatomy_path": "masks/missing.png"}, "anatomy_path", "not found"),
    (0, {"anatomy_path": "masks/corrupt.png"}, "anatomy_path", "unreadable mask file"),
    (0, {"pathology_mask_path": "masks/corrupt.png"}, "pathology_mask_path", "unreadable mask file"),
    (0, {"anatomy_path": "../../etc/passwd"}, "anatomy_path", "outside the allowed root"),
    (0, {"anatomy_path": "/etc/hostname"}, "anatomy_path", "outside the allowed root"),
    (0, {"anatomy_path": "masks/lesion.png"}, "anatomy_path", "not anatomy ids"),
    (0, {"pathology_mask_path": "masks/anatomy.png"}, "pathology_mask_path", "must be binary"),
    (0, {"pathology_mask_path": None}, "pathology_mask_path", "needs a location"),
    (0, {"anatomy_template": "phantom-1"}, "anatomy_template", "exactly one of"),
    (0, {"anatomy_path": None}, "anatomy_path", "exactly one of"),
    (
        1,
        {"anatomy_rle": {"right_lung": "1 2 3", "left_lung": "5 5", "heart": "20 5", "height": 64, "width": 64}},
        "anatomy_rle",
        "right_lung RLE: odd number",
    ),
    (
        1,
        {"anatomy_rle": {"right_lung": "1 2", "left_lung": "5 5", "heart": "4090 50", "height": 64, "width": 64}},
        "anatomy_rle",
        "beyond the 64x64 image",
    ),
    (
        1,
        {"anatomy_rle": {"right_lung": "1 2", "left_lung": "5 5", "heart": "", "height": 64, "width": 64}},
        "anatomy_rle",
        "heart is empty",
    ),
    (
        1,
        {"boxes": [{"label": None, "x_min": 8, "y_min": 30, "x_max": 70, "y_max": 48}]},
        "boxes",
        "outside the 64x64 image",
    ),
    (1, {"box_units": "normalized"}, "boxes", r"outside [0, 1]"),
    (1, {"box_units": "inches"}, "box_units", "'normalized' or 'pixel'"),
    (
        1,
        {"boxes": [{"label": "Cardiomegaly", "x_min": 1, "y_min": 1, "x_max": 5, "y_max": 5}]},
        "boxes",
        "which the row does not request",
    ),
    (
        1,
        {"boxes": [{"label": "Edema", "x_min": 1, "y_min": 1, "x_max": 5, "y_max": 5}]},
        "boxes",
        "no box locates Pleural Effusion",
    ),
    (1, {"seed": -4}, "seed", "between 0 and"),
    (2, {"anatomy_template": "atlas"}, "anatomy_template", "unknown anatomy template 'atlas'"),
    (
        2,
        {"boxes": [{"label": None, "x_min": 0.1, "y_min": 0.1, "x_max": 0.2, "y_max": 0.2}]},
        "boxes",
        "No Finding request takes no pathology location",
    ),
    (2, {"guidance_scale": float("nan")}, "guidance_scale", "finite number, got nan"),
    (2, {"soft_scale": 1.5}, "soft_scale", "between 0.0 and 1.0"),
    (2, {"steps": 0}, "steps", "between 1 and 1000"),
    (2, {"anatomy_steps": 30}, "anatomy_steps", "between 0 and steps (20)"),
    (2, {"split": " "}, "split", "empty string"),
]


@pytest.mark.parametrize(("row", "changes", "column", "reason"), BAD_ROWS)
def test_bad_rows_are_reported_with_row_id_and_column(workspace, label_map, row, changes, column, reason):
    rows = mutate(label_map, row, **changes)
    path = write(workspace / "bad.parquet", rows)
    issues = issues_of(path)
    matching = [i for i in issues if i.row == row and i.column == column and reason in i.reason]
    assert matching, [str(i) for i in issues]
    text = str(matching[0])
    assert text.startswith(f"row {row}, ") and f"column '{column}'" in text
    if rows[row]["request_id"]:
        assert f"request {rows[row]['request_id']!r}" in text


def test_symlink_out_of_the_root_is_refused(workspace, label_map, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    write_mask_file(outside / "anatomy.png", label_map)
    os.symlink(outside / "anatomy.png", workspace / "masks" / "link.png")
    path = write(workspace / "m.parquet", mutate(label_map, 0, anatomy_path="masks/link.png"))
    assert any(i.column == "anatomy_path" and "outside the allowed root" in i.reason for i in issues_of(path))


def test_root_option_widens_or_narrows_what_may_be_read(workspace, label_map):
    path = write(workspace / "m.parquet", good_rows(label_map))
    narrow = workspace / "elsewhere"
    narrow.mkdir()
    issues = issues_of(path, root=narrow)
    assert {i.column for i in issues} == {"anatomy_path", "pathology_mask_path"}


def test_duplicate_request_ids(workspace, label_map):
    rows = good_rows(label_map)
    rows.append({**rows[2]})
    issues = issues_of(write(workspace / "dup.parquet", rows))
    assert [(i.row, i.request_id, i.column) for i in issues] == [(3, "healthy-template", "request_id")]
    assert "duplicate" in issues[0].reason


def test_mask_size_must_match_a_sized_anatomy(workspace, label_map):
    write_mask_file(workspace / "masks" / "small.png", np.ones((32, 32), dtype=bool))
    issues = issues_of(write(workspace / "m.parquet", mutate(label_map, 0, pathology_mask_path="masks/small.png")))
    assert "mask is 32x32 but the anatomy is 64x64" in issues[0].reason


def test_pixel_boxes_need_a_sized_anatomy(workspace, label_map):
    rows = mutate(label_map, 1, anatomy_rle=None, anatomy_template="phantom-2")
    issues = issues_of(write(workspace / "m.parquet", rows))
    assert issues[0].column == "box_units" and "pixel boxes need" in issues[0].reason


def raw_table(columns: dict) -> pa.Table:
    return pa.table(columns)


def test_missing_extra_and_mistyped_columns(tmp_path):
    base = {
        "request_id": ["a"],
        "labels": [["Edema"]],
        "num_samples": [1],
        "anatomy_template": ["phantom-1"],
        "boxes": pa.array([[{"x_min": 0.1, "y_min": 0.1, "x_max": 0.3, "y_max": 0.3}]]),
    }
    cases = [
        ({k: v for k, v in base.items() if k != "num_samples"}, "num_samples", "required column is missing"),
        ({**base, "priority": [3]}, "priority", "unknown column"),
        ({**base, "num_samples": ["two"]}, "num_samples", "has type string; expected int64"),
        ({**base, "labels": ["Edema"]}, "labels", "has type string; expected list<item: string>"),
    ]
    for number, (columns, column, reason) in enumerate(cases):
        path = tmp_path / f"c{number}.parquet"
        pq.write_table(raw_table(columns), path)
        issues = issues_of(path)
        assert any(i.row is None and i.column == column and reason in i.reason for i in issues), issues
        assert str(issues[0]).startswith("all rows")
    pq.write_table(raw_table({k: v for k, v in base.items() if k != "anatomy_template"}), tmp_path / "none.parquet")
    assert "no anatomy column" in issues_of(tmp_path / "none.parquet")[0].reason


def test_unreadable_manifests_get_clear_messages(tmp_path, label_map):
    with pytest.raises(ManifestError, match="manifest not found"):
        validate_manifest(tmp_path / "nope.parquet")
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(ManifestError, match="empty file"):
        validate_manifest(tmp_path / "empty.parquet")
    (tmp_path / "text.parquet").write_text("request_id,labels\na,Edema\n")
    with pytest.raises(ManifestError, match="not a Parquet file"):
        validate_manifest(tmp_path / "text.parquet")
    with pytest.raises(ManifestError, match="is a directory"):
        validate_manifest(tmp_path)
    write_manifest([], tmp_path / "norows.parquet")
    with pytest.raises(ManifestError, match="has no rows"):
        validate_manifest(tmp_path / "norows.parquet")
    table = pq.read_table(write(tmp_path / "v.parquet", good_rows(label_map)[2:]))
    pq.write_table(table.replace_schema_metadata({b"xreal.manifest_version": b"9"}), tmp_path / "v9.parquet")
    with pytest.raises(ManifestError, match="version '9' is not supported"):
        validate_manifest(tmp_path / "v9.parquet")


def test_all_problems_are_reported_not_just_the_first(workspace, label_map):
    rows = good_rows(label_map)
    rows[0]["labels"] = ["Nope"]
    rows[1]["num_samples"] = -1
    rows[2]["soft_scale"] = float("nan")
    report = validate_manifest(write(workspace / "m.parquet", rows))
    assert report.issue_count == 3
    assert [i.row for i in report.issues] == [0, 1, 2]
    assert report.valid_rows == 0


def samples_of(path, **kwargs):
    batches = list(expand_manifest(path, **kwargs))
    table = pa.Table.from_batches(batches)
    return list(zip(table["sample_id"].to_pylist(), table["seed"].to_pylist(), strict=True))


def test_expansion_is_stable_and_independent_of_row_order(workspace, label_map):
    rows = good_rows(label_map)
    first = samples_of(write(workspace / "a.parquet", rows))
    random.Random(3).shuffle(rows)
    second = samples_of(write(workspace / "b.parquet", rows))
    assert sorted(first) == sorted(second)
    assert samples_of(workspace / "a.parquet") == first
    assert samples_of(workspace / "a.parquet", batch_rows=1) == first
    ids = [sid for sid, _ in first]
    assert len(ids) == len(set(ids)) == 9
    assert "lesion-file-r0002" in ids


def test_seeds_come_from_the_manifest_or_are_derived(workspace, label_map):
    samples = dict(samples_of(write(workspace / "m.parquet", good_rows(label_map))))
    assert [samples[f"effusion-rle-r{i:04d}"] for i in range(2)] == [1234, 1235]
    derived = [samples[f"lesion-file-r{i:04d}"] for i in range(3)]
    assert derived == [derive_seed("lesion-file", i) for i in range(3)]
    assert len(set(derived)) == 3 and all(0 <= s < 2**63 for s in derived)
    assert derive_seed("lesion-file", 0) != derive_seed("lesion-file2", 0)


def test_expanding_an_invalid_manifest_raises(workspace, label_map):
    path = write(workspace / "m.parquet", mutate(label_map, 0, labels=["Nope"]))
    with pytest.raises(ManifestInvalid, match="row 0, request 'lesion-file', column 'labels'"):
        list(expand_manifest(path))
