import pytest
from conftest import box_label_map

from xreal.core.errors import ManifestError
from xreal.core.masks import write_mask_file
from xreal.manifest.schema import load_requests
from xreal.manifest.spec import build_manifest

YAML_SPEC = """
defaults:
  num_samples: 2
  split: train
requests:
  - request_id: cardio
    anatomy_path: masks/anatomy.png
    labels: Cardiomegaly; pleural effusion
    boxes:
      - [0.5, 0.4, 0.9, 0.8]
    seed: 7
    healthy_twin: true
  - request_id: lesion
    anatomy_template: phantom-3
    labels: [Lung Lesion]
    boxes:
      - {label: lung lesion, box: [0.2, 0.3, 0.3, 0.4]}
    num_samples: 1
    tags: [small, nodule]
"""

CSV_SPEC = """request_id,anatomy_template,labels,boxes,num_samples,guidance_scale,healthy_twin
a,phantom-1,Edema;Consolidation,"0.1 0.2 0.4 0.6; Consolidation: 0.6 0.5 0.8 0.7",3,5.5,yes
b,phantom-2,No Finding,,1,,
"""


def test_yaml_spec_builds_a_valid_manifest_with_twins(tmp_path):
    write_mask_file(tmp_path / "masks" / "anatomy.png", box_label_map())
    (tmp_path / "spec.yaml").write_text(YAML_SPEC)
    out = tmp_path / "out" / "manifest.parquet"
    out.parent.mkdir()
    report = build_manifest(tmp_path / "spec.yaml", out, root=tmp_path)
    assert report.ok, report.summary()
    requests = {r.request_id: r for r in load_requests(out, root=tmp_path)}
    assert list(requests) == ["cardio", "cardio-healthy", "lesion"]
    cardio, twin = requests["cardio"], requests["cardio-healthy"]
    assert cardio.labels == ("Cardiomegaly", "Pleural Effusion")
    assert twin.labels == ("No Finding",) and twin.anatomy == cardio.anatomy and twin.seed == 7
    assert twin.num_samples == 2 and twin.split == "train" and not twin.boxes
    assert cardio.anatomy.value == (tmp_path / "masks" / "anatomy.png").resolve()
    assert requests["lesion"].boxes[0].label == "Lung Lesion" and requests["lesion"].tags == ("small", "nodule")


def test_csv_spec(tmp_path):
    (tmp_path / "spec.csv").write_text(CSV_SPEC)
    report = build_manifest(tmp_path / "spec.csv", tmp_path / "m.parquet")
    assert report.ok, report.summary()
    requests = {r.request_id: r for r in load_requests(tmp_path / "m.parquet")}
    assert set(requests) == {"a", "a-healthy", "b"}
    a = requests["a"]
    assert a.num_samples == 3 and a.overrides == {"guidance_scale": 5.5}
    assert [b.label for b in a.boxes] == [None, "Consolidation"]
    assert a.boxes[1].coords == (0.6, 0.5, 0.8, 0.7)


def test_invalid_spec_writes_nothing_and_names_the_problem(tmp_path):
    (tmp_path / "spec.csv").write_text(CSV_SPEC.replace("Edema;Consolidation", "Edema;Consolidaton"))
    out = tmp_path / "m.parquet"
    out.write_bytes(b"previous manifest")
    report = build_manifest(tmp_path / "spec.csv", out)
    assert not report.ok
    assert "row 0, request 'a', column 'labels': unknown pathology label 'Consolidaton'" in report.summary()
    assert out.read_bytes() == b"previous manifest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet", "spec.csv"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("requests: [1, 2]", "request 0 is not a mapping"),
        ("- a\n- b", "a mapping with a 'requests:' list"),
        ("requests: [{request_id: a, colour: red}]", "unknown field(s) colour"),
        ("requests: [{request_id: a, num_samples: many}]", "num_samples: expected a int"),
        ("requests: [{request_id: a, boxes: [[1, 2, 3]]}]", "a box is four numbers"),
        ("requests: {", "not valid YAML"),
    ],
)
def test_malformed_specs(tmp_path, text, message):
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_manifest(tmp_path / "spec.yaml", tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


def test_unknown_spec_format(tmp_path):
    (tmp_path / "spec.json").write_text("{}")
    with pytest.raises(ManifestError, match="unsupported spec format"):
        build_manifest(tmp_path / "spec.json", tmp_path / "m.parquet")
