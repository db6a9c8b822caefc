"""Hostile and damaged input to manifests and runs: one clear error naming what is wrong, exit 2, before anything
starts; never a traceback, never a path outside the root (issue 13, items 7-10 and 12)."""

from __future__ import annotations

import json
import shutil
import string
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xreal.cli import cli
from xreal.core.files import check_id, is_safe_id
from xreal.core.images import MAX_IMAGE_SIDE
from xreal.core.labels import CHEXPERT_LABELS
from xreal.core.masks import write_mask_file
from xreal.core.records import DEMO_BUNDLE
from xreal.manifest.schema import load_requests, validate_manifest, write_manifest
from xreal.run import generation

HEALTHY = {"labels": ["No Finding"], "num_samples": 1}


def bomb_png(path: Path, width: int = 50_000, height: int = 50_000) -> Path:
    """A valid 8x8 PNG whose header claims ``width`` x ``height`` (its IHDR and CRC rewritten)."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def issues(path, root=None) -> list[tuple[int, str | None, str]]:
    return [(i.row, i.column, i.reason) for i in validate_manifest(path, root).issues]


@pytest.fixture
def no_prefect(monkeypatch):
    """Fail the test if `xreal generate` gets as far as starting Prefect or loading a model."""
    import flows
    import flows.generate

    def started(*_args, **_kwargs):
        raise AssertionError("Prefect or the model started before the refusal")

    monkeypatch.setattr(flows, "use_project_defaults", started)
    monkeypatch.setattr(flows.generate, "run_generation", started)
    monkeypatch.setattr(generation, "worker_models", started)


def generate(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["generate", *map(str, args), "--quiet"])
    assert not isinstance(result.exception, AssertionError), result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_ids_must_match_the_whole_pattern(tmp_path):
    """Item 7: ``$`` matches before a trailing newline; ids that become file names are full-matched."""
    for bad in ("a\n", "../x", ".hidden", "a/b", "", "a b", "é", "a" * 129, "-a"):
        assert not is_safe_id(bad), bad
        with pytest.raises(Exception, match="is not a usable id"):
            check_id(bad, "image id")
    assert is_safe_id("p10-s5.dcm_1") and check_id("A1", "id") == "A1"
    rows = [
        {"request_id": "nl\n", **HEALTHY, "anatomy_template": "phantom-1"},
        {"request_id": "tpl", **HEALTHY, "anatomy_template": "phantom-1\n"},
        {"request_id": "ok", **HEALTHY, "anatomy_template": "phantom-1"},
    ]
    found = issues(write_manifest(rows, tmp_path / "m.parquet"))
    assert [(row, column) for row, column, _ in found] == [(0, "request_id"), (1, "anatomy_template")]
    assert "got 'nl\\n'" in found[0][2]


def test_declared_sizes_are_bounded_before_anything_is_allocated(tmp_path, no_prefect):
    """Item 8: a 200000x200000 RLE anatomy is one clear issue; audit and generate never decode it."""
    rle = {"right_lung": "1 5", "left_lung": "10 5", "heart": "20 5", "height": 200_000, "width": 200_000}
    path = write_manifest([{"request_id": "big", **HEALTHY, "anatomy_rle": rle}], tmp_path / "m.parquet")
    found = issues(path)
    assert len(found) == 1 and f"exceeds the {MAX_IMAGE_SIDE} px per side" in found[0][2]
    audit = CliRunner().invoke(cli, ["manifest", "audit", str(path)])
    assert audit.exit_code == 0 and "rows with problems: 1" in audit.output, audit.output
    code, output = generate(path, "--out", tmp_path / "out")
    assert code == 2 and "row 0, request 'big', column 'anatomy_rle'" in output
    assert not (tmp_path / "out").exists()


def test_a_decompression_bomb_is_an_unreadable_file_not_a_traceback(tmp_path, no_prefect):
    """Item 9: a PNG header claiming 50000x50000 in validate, audit and generate."""
    bomb_png(tmp_path / "bomb.png")
    np.lib.format.open_memmap(tmp_path / "huge.npy", mode="w+", dtype=np.uint8, shape=(9000, 8))
    rows = [
        {"request_id": "png", **HEALTHY, "anatomy_path": "bomb.png"},
        {"request_id": "npy", **HEALTHY, "anatomy_path": "huge.npy"},
    ]
    path = write_manifest(rows, tmp_path / "m.parquet")
    found = issues(path)
    assert "bomb.png: mask file claims more pixels than xreal reads" in found[0][2]
    assert "huge.npy: image size 9000x8 exceeds the 8192 px per side" in found[1][2]
    audit = CliRunner().invoke(cli, ["manifest", "audit", str(path)])
    assert audit.exit_code == 0 and "claims more pixels" in audit.output
    code, output = generate(path, "--out", tmp_path / "out")
    assert code == 2 and "bomb.png" in output


def test_nul_bytes_and_damaged_files_of_every_kind_get_one_paragraph_and_exit_2(tmp_path, no_prefect, label_map):
    """Item 10: a NUL byte in a path column, and damaged masks, policies and records."""
    write_mask_file(tmp_path / "anatomy.png", label_map)
    (tmp_path / "truncated.png").write_bytes((tmp_path / "anatomy.png").read_bytes()[:60])
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    rows = [
        {"request_id": "nul", **HEALTHY, "anatomy_path": "anatomy\x00.png"},
        {"request_id": "mask", "labels": ["Edema"], "num_samples": 1, "anatomy_path": "anatomy.png",
         "pathology_mask_path": "x\x00/../../etc/passwd"},
        {"request_id": "cut", **HEALTHY, "anatomy_path": "truncated.png"},
        {"request_id": "pickle", **HEALTHY, "anatomy_path": "objects.npy"},
    ]  # fmt: skip
    path = write_manifest(rows, tmp_path / "m.parquet")
    found = {row: (column, reason) for row, column, reason in issues(path)}
    assert found[0] == ("anatomy_path", "path 'anatomy\\x00.png' holds a NUL byte")
    assert found[1][0] == "pathology_mask_path" and "NUL byte" in found[1][1]
    assert found[2][0] == "anatomy_path" and "truncated.png: unreadable mask file" in found[2][1]
    assert found[3][0] == "anatomy_path" and "objects.npy: unreadable mask file" in found[3][1]

    good = write_manifest([{"request_id": "ok", **HEALTHY, "anatomy_path": "anatomy.png"}], tmp_path / "ok.parquet")
    policy = tmp_path / "policy.yaml"
    policy.write_bytes(b"\xff\xfe\x00garbage")
    code, output = generate(good, "--out", tmp_path / "o1", "--policy", policy)
    assert code == 2 and "policy.yaml: cannot read the policy" in output

    damaged = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, damaged)
    (damaged / "xreal_bundle.json").write_text("[]")
    code, output = generate(good, "--out", tmp_path / "o2", "--model", damaged)
    assert code == 2 and "xreal_bundle.json: damaged model bundle record: expected a JSON object" in output
    (damaged / "xreal_bundle.json").write_bytes((DEMO_BUNDLE / "xreal_bundle.json").read_bytes())
    (damaged / "judges" / "judges.json").write_text('{"files": {}}')
    code, output = generate(good, "--out", tmp_path / "o3", "--model", damaged)
    assert code == 2 and "judges/judges.json does not match its checksum" in output  # the bundle's record
    shutil.copytree(damaged / "judges", tmp_path / "judges")  # a judge set of its own, named by the policy
    policy.write_text(f"judges: {tmp_path / 'judges'}\n")
    code, output = generate(good, "--out", tmp_path / "o3", "--policy", policy)
    assert code == 2 and "judges.json: damaged judge set record: no 'classifier', 'segmenter'" in output

    run = tmp_path / "o4"
    run.mkdir()
    (run / "run.json").write_text("[1, 2]")
    code, output = generate(good, "--out", run)
    assert code == 2 and "run.json: damaged run record" in output


def test_generate_refuses_before_prefect_starts(tmp_path, no_prefect):
    """Item 12: an invalid manifest, a locked --out, a bad policy and a tampered bundle are refused before Prefect
    starts or a model loads (``benchmarks/fail_fast.py`` times them)."""
    manifest = write_manifest(
        [{"request_id": "ok", **HEALTHY, "anatomy_template": "phantom-1"}], tmp_path / "m.parquet"
    )
    bad = write_manifest([{"request_id": "x", "labels": ["Broken Heart"], "num_samples": 1}], tmp_path / "bad.parquet")
    code, output = generate(bad, "--out", tmp_path / "a")
    assert code == 2 and "Broken Heart" in output and not (tmp_path / "a").exists()

    with generation.run_lock(tmp_path / "locked"):
        code, output = generate(manifest, "--out", tmp_path / "locked")
    assert code == 2 and "is being written by another run (pid" in output

    (tmp_path / "policy.yaml").write_text("classifier: {present: 2}\n")
    code, output = generate(manifest, "--out", tmp_path / "b", "--policy", tmp_path / "policy.yaml")
    assert code == 2 and "policy.yaml" in output and "present" in output

    tampered = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, tampered)
    weights = tampered / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    code, output = generate(manifest, "--out", tmp_path / "c", "--model", tampered)
    assert code == 2 and "unet/diffusion_pytorch_model.safetensors does not match its checksum" in output

    (tmp_path / "file").write_text("x")
    code, output = generate(manifest, "--out", tmp_path / "file" / "run")
    assert code == 2 and "is a file, so no folder can be made under it" in output


# --- property-based: whatever a manifest holds, validation answers in words ----------------------------------

ID_TEXT = st.one_of(
    st.sampled_from(["ok", "../x", "/etc/passwd", "a\n", "a\x00b", ".hidden", "a/b", "", " ", "é"]),
    st.text(string.ascii_letters + string.digits + "._-/\\\n\x00 ", max_size=20),
)
PATH_TEXT = st.one_of(
    st.sampled_from(["anatomy.png", "../outside.png", "/etc/passwd", "link.png", "a\x00.png", "", "missing.png"]),
    st.text(string.printable + "\x00é", max_size=30),
)
SIZE = st.one_of(st.integers(-3, 70), st.sampled_from([0, 8192, 8193, 200_000, 2**40]))
RLE_TEXT = st.one_of(
    st.sampled_from(["1 5", "1 5 3 2", "0 4", "-1 2", "1 99999999999999999999", "a b", "1"]),
    st.text("0123456789 -x\n", max_size=24),
)
ANATOMY = st.one_of(
    st.fixed_dictionaries({"anatomy_path": PATH_TEXT}),
    st.fixed_dictionaries({"anatomy_template": st.one_of(st.sampled_from(["phantom-1", "phantom-x"]), ID_TEXT)}),
    st.fixed_dictionaries(
        {
            "anatomy_rle": st.fixed_dictionaries(
                {"right_lung": RLE_TEXT, "left_lung": RLE_TEXT, "heart": RLE_TEXT, "height": SIZE, "width": SIZE}
            )
        }
    ),
)
FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=32)
BOX = st.fixed_dictionaries({"label": st.none(), "x_min": FLOAT, "y_min": FLOAT, "x_max": FLOAT, "y_max": FLOAT})
ROW = st.builds(
    lambda request_id, labels, num_samples, anatomy, location: {
        "request_id": request_id,
        "labels": labels,
        "num_samples": num_samples,
        **anatomy,
        **location,
    },
    ID_TEXT,
    st.lists(st.one_of(st.sampled_from(CHEXPERT_LABELS), st.text(max_size=8)), max_size=3),
    st.integers(-2, 200_000),
    ANATOMY,
    st.one_of(
        st.just({}),
        st.fixed_dictionaries({"pathology_mask_path": PATH_TEXT}),
        st.fixed_dictionaries({"boxes": st.lists(BOX, max_size=2)}),
    ),
)


@pytest.fixture(scope="module")
def hostile_root(
    tmp_path_factory,
):
    """A manifest folder with one good anatomy, and a link and a file that lie outside it."""
    from conftest import box_label_map

    base = tmp_path_factory.mktemp("hostile")
    root = base / "root"
    root.mkdir()
    write_mask_file(root / "anatomy.png", box_label_map())
    write_mask_file(base / "outside.png", box_label_map())
    (root / "link.png").symlink_to(base / "outside.png")
    return root


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, min_size=1, max_size=4))
def test_any_manifest_is_valid_or_answered_row_by_row_and_nothing_outside_the_root_is_read(hostile_root, rows):
    path = hostile_root / "m.parquet"
    try:
        write_manifest(rows, path)
    except Exception:  # a value Parquet cannot hold is the writer's problem, not validation's
        return
    report = validate_manifest(path)
    assert report.rows == len(rows)
    assert all(isinstance(i.reason, str) and i.reason for i in report.issues)
    rows_with_issues = {i.row for i in report.issues}
    assert report.valid_rows == len(rows) - len(rows_with_issues)
    if report.ok:
        for request in load_requests(path):
            for file in (
                request.anatomy.value if request.anatomy.kind == "path" else None,
                request.pathology_mask_path,
            ):
                if file is not None:
                    assert hostile_root.resolve() in Path(file).resolve().parents
    result = CliRunner().invoke(cli, ["manifest", "validate", str(path), "--json"])
    assert result.exit_code == (0 if report.ok else 2) and "Traceback" not in result.output
    assert json.loads(result.output)["issue_count"] == report.issue_count
