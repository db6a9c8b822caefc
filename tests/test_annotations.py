"""Radiologists' annotations shipped with torchxrayvision, read as they ship, and manifests placed by them."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scipy import ndimage

from xreal.cli import cli
from xreal.core.masks import mask_box, read_binary_mask, resize_mask
from xreal.data.training_index import write_phantom_training_set
from xreal.manifest import annotations
from xreal.manifest.from_index import manifest_from_index, write_index_manifest

EXPECTED_LABELS = {
    "nih": {
        "Atelectasis",
        "Cardiomegaly",
        "Pleural Effusion",
        "Lung Opacity",
        "Lung Lesion",
        "Pneumonia",
        "Pneumothorax",
    },
    "rsna": {"Lung Opacity", "Pneumonia"},
    "vindr": {
        "Enlarged Cardiomediastinum",
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Lung Opacity",
        "Lung Lesion",
        "Pleural Effusion",
        "Pleural Other",
        "Pneumothorax",
    },
    "siim": {"Pneumothorax"},
}
BOX = ["x_min", "y_min", "x_max", "y_max"]


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "set"
    write_phantom_training_set(out, 8, size=64, seed=1)
    return out


def kaggle_rle2mask(rle: str, width: int, height: int) -> np.ndarray:
    """SIIM's sample decoder (as torchxrayvision copies it): relative runs, then ``reshape(width, height)``."""
    mask = np.zeros(width * height)
    array = np.asarray([int(x) for x in rle.split()])
    current = 0
    for start, length in zip(array[0::2], array[1::2], strict=True):
        current += start
        mask[current : current + length] = 1
        current += length
    return mask.reshape(width, height)


@pytest.mark.parametrize("name", sorted(EXPECTED_LABELS))
def test_each_shipped_table_parses_into_chexpert_labels_and_unit_boxes(name):
    frame = annotations.read_annotations(f"xrv:{name}")
    assert tuple(frame.columns) == annotations.FRAME_COLUMNS
    counts = frame["label"].value_counts()
    assert set(counts.index) == EXPECTED_LABELS[name] and (counts > 0).all()
    assert (frame["source"] == name).all() and frame["image_id"].str.len().gt(0).all()
    coords = frame[BOX].to_numpy()
    assert np.isfinite(coords).all() and (coords >= 0).all() and (coords <= 1).all()
    assert (frame.x_max > frame.x_min).all() and (frame.y_max > frame.y_min).all()
    assert frame["mask_rle"].notna().all() if name == "siim" else frame["mask_rle"].isna().all()
    if name == "rsna":  # every Target 1 box locates both labels
        assert counts["Lung Opacity"] == counts["Pneumonia"]
    if name == "nih":  # Mass and Nodule both become Lung Lesion; Infiltrate Lung Opacity; Effusion Pleural Effusion
        raw = pd.read_csv(annotations.data_dir() / "BBox_List_2017.csv.gz")["Finding Label"].value_counts()
        assert counts["Lung Lesion"] == raw["Mass"] + raw["Nodule"]
        assert counts["Lung Opacity"] == raw["Infiltrate"] and counts["Pleural Effusion"] == raw["Effusion"]


def test_siim_masks_decode_column_major_into_small_apical_pleural_regions():
    frame = annotations.siim_masks()
    first = frame.iloc[:20]
    for rle in first["mask_rle"]:  # the same pixels as SIIM's own sample decoder, transposed as torchxrayvision does
        expected = kaggle_rle2mask(rle, 1024, 1024).T > 0
        np.testing.assert_array_equal(annotations.decode_siim_rle(rle), expected)
    centres, whole = [], []
    for image_id in sorted(frame["image_id"].unique())[::20]:
        rows = frame[frame["image_id"] == image_id]
        for rle, box in zip(rows["mask_rle"], rows[BOX].to_numpy() * 1024, strict=True):
            region = annotations.decode_siim_rle(rle)
            assert mask_box(region) == tuple(round(v) for v in box)  # the table's box is the region's bounding box
            x0, y0, x1, y1 = (round(v) for v in box)
            labelled, _ = ndimage.label(region[y0:y1, x0:x1])
            whole.append(np.bincount(labelled.ravel())[1:].max() / region.sum())  # stripes would be many pieces
        mask = annotations.image_mask(frame, image_id)
        assert mask.any() and mask.mean() < 0.15  # a pneumothorax is a rim of the lung, not half the image
        centres.append(np.nonzero(mask)[0].mean() / 1024)
    assert np.median(whole) > 0.9  # each region is one piece
    assert np.median(centres) < 0.33  # at the apex (read row-major, the transposed masks centre near 0.42)


def test_siim_rle_that_does_not_decode_is_refused():
    for bad in ("5", "a 3", "10 0", f"{1024 * 1024} 2"):
        with pytest.raises(annotations.AnnotationError, match="RLE"):
            annotations.decode_siim_rle(bad)


def test_nih_boxes_and_siim_masks_make_a_valid_manifest(phantom_set, tmp_path):
    manifest = tmp_path / "augment.parquet"
    targets = [
        "--target",
        "Pneumothorax=2",
        "--target",
        "Cardiomegaly=1",
        "--target",
        "Pneumothorax+Pleural Effusion=1",
    ]
    cmd = ("manifest", "from-index", phantom_set, "--out", manifest, "--boxes-from", "xrv:nih", "--masks-from")
    out = run(*cmd, "xrv:siim", *targets, "--healthy", "1", "--seed", "2")
    assert "3 pathology masks in" in out
    run("manifest", "validate", manifest)
    rows = {r["request_id"]: r for r in pq.read_table(manifest).to_pylist()}
    nih, siim = annotations.nih_boxes(), annotations.siim_masks()
    for request_id in ("pneumothorax-00000", "pneumothorax-00001", "pneumothorax-pleural_effusion-00000"):
        row = rows[request_id]
        assert row["pathology_mask_path"] == f"augment-masks/{request_id}.png" and row["boxes"] is None
        tag = next(t for t in row["tags"] if t.startswith("pathology-mask="))
        image_id = tag.removeprefix("pathology-mask=xrv:siim:")
        expected = resize_mask(annotations.image_mask(siim, image_id), (64, 64), rule="any")
        mask = read_binary_mask(manifest.parent / row["pathology_mask_path"])
        if row["labels"] == ["Pneumothorax"]:
            np.testing.assert_array_equal(mask, expected)
        else:  # the effusion's NIH box joins the SIIM mask: one location per row
            assert (mask >= expected).all() and mask.sum() > expected.sum()
    cardio = rows["cardiomegaly-00000"]
    assert cardio["pathology_mask_path"] is None
    (box,) = cardio["boxes"]
    drawn = [box[k] for k in BOX]
    assert any(b == pytest.approx(drawn) for b in nih[nih.label == "Cardiomegaly"][BOX].to_numpy().tolist())
    assert rows["no_finding-00000"]["pathology_mask_path"] is None

    run(*cmd, "xrv:siim", "--target", "Pneumothorax=1")  # a new manifest of that name replaces its masks
    assert sorted(p.name for p in (tmp_path / "augment-masks").iterdir()) == ["pneumothorax-00000.png"]
    (tmp_path / "augment-masks" / "notes.txt").write_text("mine")
    assert "holds more than pathology masks" in run(*cmd, "xrv:siim", "--target", "Pneumothorax=1", code=2)


def test_rsna_and_vindr_boxes_place_their_labels(phantom_set, tmp_path):
    for name in ("rsna", "vindr"):
        manifest = tmp_path / f"{name}.parquet"
        run("manifest", "from-index", phantom_set, "--out", manifest, "--boxes-from", f"xrv:{name}", "--per-label", "1")
        run("manifest", "validate", manifest)
        table = pq.read_table(manifest).to_pylist()
        assert {r["labels"][0] for r in table} == EXPECTED_LABELS[name]
        frame = annotations.read_annotations(f"xrv:{name}")
        for row in table:
            (box,) = row["boxes"]
            known = frame[frame.label == box["label"]][BOX].to_numpy()
            assert np.isclose(known, [box[k] for k in BOX]).all(axis=1).any()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--boxes-from", "xrv:nope", "--target", "Cardiomegaly=1"], "no such shipped annotation table"),
        (["--boxes-from", "xrv:rsna", "--target", "Cardiomegaly=1"], "xrv:rsna: no box of Cardiomegaly"),
        (["--boxes-from", "xrv:siim", "--target", "Edema=1"], "xrv:siim: no box of Edema"),
        (["--masks-from", "xrv:nih", "--target", "Pneumothorax=1"], "holds boxes, not masks"),
        (["--masks-from", "xrv:nope", "--target", "Pneumothorax=1"], "no such shipped annotation table"),
        (["--masks-from", "some/folder", "--target", "Pneumothorax=1"], "give a table of annotated masks"),
        (["--masks-from", "xrv:siim", "--target", "Cardiomegaly=1"], "annotates Pneumothorax only"),
    ],
)
def test_a_source_that_cannot_place_a_request_is_one_clear_error(phantom_set, tmp_path, args, message):
    output = run("manifest", "from-index", phantom_set, "--out", tmp_path / "m.parquet", *args, code=2)
    assert message in output and "Traceback" not in output
    assert not (tmp_path / "m.parquet").exists()


@pytest.mark.slow
def test_a_siim_masked_manifest_generates_end_to_end_on_the_demo_bundle(phantom_set, tmp_path):
    # Prefect's embedded API, as `xreal generate` starts it, where this process runs no session `prefect_api`
    # harness yet (this file runs first). Where another file started the harness first (`pytest -n`), the run uses
    # it, and it is left running: Prefect keeps it where it keeps the embedded server, which stop_embedded_api stops.
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    from flows.embedded import stop_embedded_api
    from flows.generate import run_generation
    from xreal.run.audit import audit_run

    manifest = tmp_path / "real.parquet"
    rows = manifest_from_index(
        phantom_set, {("Pneumothorax",): 1, ("Cardiomegaly",): 1}, boxes_from="xrv:nih", masks_from="xrv:siim"
    )
    for row in rows:
        row.update(steps=4, anatomy_steps=2)
    _, masks = write_index_manifest(rows, manifest)
    run("manifest", "validate", manifest)
    out = tmp_path / "out"
    harness = SubprocessASGIServer._instances.get(None)
    try:
        state = run_generation(manifest, out, policy={"retries": {"max_rounds": 1}}, progress=False)
    finally:  # stop it now, its run's logs sent, not at exit where its log lines meet closed streams
        APILogWorker.drain_all(timeout=10)
        if SubprocessASGIServer._instances.get(None) is not harness:
            stop_embedded_api()
    assert state.is_completed(), state.message
    report = audit_run(out)
    assert report.consistent, report.to_text()
    samples = pq.read_table(out / "samples.parquet").to_pandas()
    assert set(samples.request_id) == {"pneumothorax-00000", "cardiomegaly-00000"}
    requested = read_binary_mask(masks / "pneumothorax-00000.png")
    written = read_binary_mask(out / "masks" / "pneumothorax-00000.pathology.png")
    np.testing.assert_array_equal(written, requested)  # the model's 64 px: the SIIM mask as it was requested
    assert (samples[samples.request_id == "pneumothorax-00000"].pathology_mask_path.notna()).all()
