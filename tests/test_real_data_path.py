"""From files in the real datasets' layouts to a generation manifest: ingest MIMIC-CXR-JPG with CheXmask and
VinDr-CXR, train on the result for a few steps, build a manifest on held-out anatomies, validate it."""

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_ingest import chexmask_rows, write_mimic
from test_vindr import write_vindr

from xreal.cli import cli
from xreal.core.errors import XRealError
from xreal.data.training_index import read_training_index
from xreal.manifest.from_index import box_distribution, manifest_from_index, parse_target
from xreal.manifest.schema import load_requests

pytestmark = pytest.mark.slow


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def training_sets(tmp_path):
    mimic = write_mimic(tmp_path / "mimic")
    pd.DataFrame(chexmask_rows()).to_csv(tmp_path / "MIMIC-CXR-JPG.csv", index=False)
    run("ingest", "mimic", mimic, "--out", tmp_path / "mimic-set", "--size", "32", "--quiet", "--workers", "1",
        "--chexmask", tmp_path / "MIMIC-CXR-JPG.csv")  # fmt: skip
    run("ingest", "vindr", write_vindr(tmp_path / "vindr"), "--out", tmp_path / "vindr-set", "--size", "32", "--quiet")
    return tmp_path / "mimic-set", tmp_path / "vindr-set"


def test_fixture_to_index_to_training_to_a_valid_manifest_on_held_out_anatomies(training_sets, tmp_path):
    mimic_set, vindr_set = training_sets
    out = run("train", "autoencoder", "--index", mimic_set, "--out", tmp_path / "ae", "--preset", "tiny",
              "--steps", "2", "--batch-size", "2")  # fmt: skip
    assert (tmp_path / "ae" / "model").is_dir(), out

    manifest = tmp_path / "augment.parquet"
    targets = ["--target", "Cardiomegaly=2", "--target", "Pleural Effusion+Cardiomegaly=1", "--healthy", "1"]
    out = run(
        "manifest", "from-index", mimic_set, "--out", manifest, *targets, "--boxes-from", vindr_set, "--seed", "3"
    )
    assert "4 requests on 1 anatomies" in out  # the test split holds one patient with an anatomy map
    run("manifest", "validate", manifest)
    requests = {r.request_id: r for r in load_requests(manifest)}
    assert set(requests) == {
        "cardiomegaly-00000",
        "cardiomegaly-00001",
        "cardiomegaly-pleural_effusion-00000",  # labels in CheXpert order
        "no_finding-00000",
    }
    table = pq.read_table(manifest).to_pylist()
    held_out = read_training_index(mimic_set).query("split == 'test'").image_id.tolist()
    for row in table:  # provenance: dataset and image id, nothing more about the patient
        assert row["tags"] == ["anatomy-source=mimic-cxr", f"anatomy-image={held_out[0]}"]
        assert "10000764" not in str(row)  # the subject id is not copied
    vindr_boxes = box_distribution(read_training_index(vindr_set))
    for row in table:
        for box in row["boxes"] or []:
            drawn = (box["x_min"], box["y_min"], box["x_max"], box["y_max"])
            assert any(tuple(b) == pytest.approx(drawn) for b in vindr_boxes[box["label"]])


def test_targets_and_missing_locations_are_explained(training_sets):
    mimic_set, _ = training_sets
    assert parse_target("pleural effusion+Edema=20") == (("Edema", "Pleural Effusion"), 20)  # canonical order
    with pytest.raises(XRealError, match="LABEL"):
        parse_target("Cardiomegaly")
    with pytest.raises(XRealError, match="no box of Cardiomegaly"):
        manifest_from_index(mimic_set, {("Cardiomegaly",): 1})  # MIMIC has labels, not boxes


def test_per_label_balances_every_label_that_can_be_placed(training_sets, tmp_path):
    mimic_set, vindr_set = training_sets
    manifest = tmp_path / "balanced.parquet"
    run("manifest", "from-index", mimic_set, "--out", manifest, "--per-label", "2", "--boxes-from", vindr_set)
    labels = [tuple(r["labels"]) for r in pq.read_table(manifest).to_pylist()]
    placeable = {("Cardiomegaly",), ("Lung Lesion",), ("Pleural Effusion",)}  # the VinDr fixture's boxed labels
    assert sorted(labels) == sorted([*placeable, *placeable])


def test_mimic_cxr_dicom_files_are_ingested_as_displayed(tmp_path):
    import numpy as np
    from PIL import Image
    from test_dicom import radiograph
    from test_ingest import SMALL
    from test_mimic import write_tables

    from xreal.data.mimic import image_path

    root = write_tables(tmp_path / "mimic-cxr", images=SMALL)
    for dicom, subject, study, _v, rows, columns, _ in SMALL:
        path = root / image_path(subject, study, dicom, ".dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = np.tile(np.linspace(0, 4095, columns).astype(np.uint16), (rows, 1))  # brighter to the right
        radiograph(path, stored, photometric="MONOCHROME1")  # ... as stored; displayed, darker to the right
    run("ingest", "mimic", root, "--dicom", "--out", tmp_path / "set", "--size", "16", "--quiet", "--workers", "1")
    index = read_training_index(tmp_path / "set")
    assert len(index) == 4 and index.image_path.str.endswith(".png").all()
    image = np.asarray(Image.open(tmp_path / "set" / index.image_path.iloc[0])).astype(float)
    assert image[:, 0].mean() > image[:, -1].mean()  # MONOCHROME1 inverted
