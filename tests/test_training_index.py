import numpy as np
import pyarrow.parquet as pq
import pytest

from xreal.core.errors import XRealError
from xreal.core.images import read_image
from xreal.core.labels import CHEXPERT_LABELS, NO_FINDING
from xreal.core.masks import read_binary_mask, read_label_map
from xreal.data.training_index import (
    TRAINING_INDEX_SCHEMA,
    read_training_index,
    write_phantom_training_set,
    write_training_index,
)
from xreal.phantom.renderer import PHANTOM_PATHOLOGIES, generate


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    write_phantom_training_set(out, count=24, size=64, seed=5, chunk=10)
    return out


def test_index_has_the_documented_schema_and_version(phantom_set):
    schema = pq.read_schema(phantom_set / "index.parquet")
    assert schema.remove_metadata().equals(TRAINING_INDEX_SCHEMA.remove_metadata())
    assert schema.metadata[b"xreal.schema_version"] == b"1"
    index = read_training_index(phantom_set)
    assert len(index) == 24 and index["image_id"].is_unique
    assert set(index["split"]) <= {"train", "validate", "test"}


def test_files_match_the_phantom_and_the_labels(phantom_set):
    index = read_training_index(phantom_set)
    reference = generate(24, size=64, seed=5)
    for row, case in zip(index.itertuples(index=False), (reference[i] for i in range(24)), strict=True):
        row = row._asdict()
        image = read_image(phantom_set / row["image_path"])
        assert np.abs(image - case.image).max() <= 1 / 65535
        assert np.array_equal(read_label_map(phantom_set / row["anatomy_path"]), case.anatomy)
        positives = {label for label in CHEXPERT_LABELS if index.loc[index.image_id == row["image_id"], label].item()}
        assert positives == set(case.labels)
        assert {m["label"] for m in row["pathology_masks"]} == set(case.labels) - {NO_FINDING}
        for entry in row["pathology_masks"]:
            assert np.array_equal(read_binary_mask(phantom_set / entry["path"]), case.pathology_masks[entry["label"]])
        assert {b["label"] for b in row["boxes"]} == set(case.labels) - {NO_FINDING}
        assert row["finding"] == case.finding


def test_index_covers_the_phantom_pathologies(tmp_path):
    write_phantom_training_set(tmp_path, count=60, size=64, seed=1)
    index = read_training_index(tmp_path)
    for label in (*PHANTOM_PATHOLOGIES, NO_FINDING):
        assert index[label].sum() > 0, label


def test_existing_sets_are_not_overwritten_by_accident(phantom_set):
    before = (phantom_set / "index.parquet").read_bytes()
    with pytest.raises(XRealError, match="already exists"):
        write_phantom_training_set(phantom_set, count=2, size=64, seed=9)
    assert (phantom_set / "index.parquet").read_bytes() == before


def test_reading_something_else_is_refused(tmp_path):
    with pytest.raises(XRealError, match="cannot read training index"):
        read_training_index(tmp_path / "missing.parquet")
    pq.write_table(
        pq.read_table(write_training_index_rows(tmp_path)).replace_schema_metadata({}), tmp_path / "plain.parquet"
    )
    with pytest.raises(XRealError, match="not an xreal training index"):
        read_training_index(tmp_path / "plain.parquet")
    with pytest.raises(XRealError, match="lack columns: image_path"):
        write_training_index([{"image_id": "x"}], tmp_path / "bad.parquet")


def write_training_index_rows(folder):
    row = {name: None for name in TRAINING_INDEX_SCHEMA.names}
    row.update(image_id="a", image_path="a.png", height=8, width=8, source="test", pathology_masks=[], boxes=[])
    return write_training_index([row], folder / "one.parquet")


def test_an_index_written_before_pixel_spacing_existed_still_reads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xreal.data.training_index import TRAINING_INDEX_SCHEMA, read_training_index

    older = pa.schema(
        [f for f in TRAINING_INDEX_SCHEMA if f.name != "pixel_spacing"], metadata=TRAINING_INDEX_SCHEMA.metadata
    )
    pq.write_table(older.empty_table(), tmp_path / "index.parquet")
    frame = read_training_index(tmp_path)
    assert "pixel_spacing" in frame.columns and len(frame) == 0
