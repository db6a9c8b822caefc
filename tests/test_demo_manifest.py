from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy import ndimage

from xreal.core.labels import NO_FINDING
from xreal.core.masks import read_binary_mask
from xreal.manifest.audit import audit_manifest
from xreal.manifest.schema import load_requests
from xreal.manifest.spec import build_manifest
from xreal.phantom.renderer import PHANTOM_PATHOLOGIES
from xreal.phantom.templates import template_finding_mask

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


def test_demo_parquet_is_built_from_its_spec(tmp_path):
    built = tmp_path / "demo.parquet"  # elsewhere, so its mask paths are rebased to lead back to manifests/
    report = build_manifest(MANIFESTS / "demo.yaml", built, root=MANIFESTS)
    assert report.ok, report.summary()
    rows = {}
    for name, path in (("built", built), ("committed", MANIFESTS / "demo.parquet")):
        rows[name] = pq.read_table(path).to_pylist()
        for row in rows[name]:
            mask = row["pathology_mask_path"]
            row["pathology_mask_path"] = (path.parent / mask).resolve() if mask else None
    assert rows["built"] == rows["committed"]
    assert any(row["pathology_mask_path"] for row in rows["built"])


def test_demo_masks_are_where_the_phantom_renders_its_findings():
    """A mask row asks for its findings where the phantom itself draws them on that template; rewrite a mask that
    no longer matches with PIL.Image.fromarray(template_finding_mask(...)).save(path)."""
    requests = [r for r in load_requests(MANIFESTS / "demo.parquet") if r.pathology_mask_path is not None]
    assert requests
    for request in requests:
        expected = template_finding_mask(request.anatomy.value, list(request.labels), 64)
        found = read_binary_mask(request.pathology_mask_path)
        assert np.array_equal(found, expected), f"{request.pathology_mask_path} is not the phantom's {request.labels}"


def test_demo_boxes_lie_where_the_phantom_renders_the_finding_but_consolidations():
    """Each box lies inside the bounding box of one region of the finding the phantom draws on that template
    (effusion-right: one of its two sides), at least three quarters of it (a box rounded to two decimals).

    consolidation-left asks for it lower in the same lung than the phantom draws it on phantom-4 (upper zone). At the
    phantom's own place the judges call an unasked nodule or atelectasis on more draws: demo_fill accepts 0.46 and
    0.50 of them on seeds + 1000 and + 2000, against 0.75 and 0.58 (stop 38)."""

    def share_inside(box, frame):
        inter = max(0.0, min(box[2], frame[2]) - max(box[0], frame[0])) * max(
            0.0, min(box[3], frame[3]) - max(box[1], frame[1])
        )
        return inter / ((box[2] - box[0]) * (box[3] - box[1]))

    requests = [r for r in load_requests(MANIFESTS / "demo.parquet") if r.boxes]
    assert requests
    for request in requests:
        finding = template_finding_mask(request.anatomy.value, list(request.labels), 64)
        frames = [
            (x.start / 64, y.start / 64, x.stop / 64, y.stop / 64)
            for y, x in ndimage.find_objects(ndimage.label(finding)[0])
        ]
        for box in request.boxes:
            inside = max(share_inside(box.coords, frame) for frame in frames)
            if request.request_id == "consolidation-left":
                assert inside < 0.5, "consolidation-left now lies where the phantom draws it: update this test"
            else:
                assert inside >= 0.75, f"{request.request_id}: {box.coords} is outside every region {frames}"


def test_demo_asks_for_every_phantom_pathology_with_healthy_twins():
    requests = load_requests(MANIFESTS / "demo.parquet")
    requested = {label for r in requests for label in r.labels}
    assert requested == {*PHANTOM_PATHOLOGIES, NO_FINDING}
    healthy = {r.anatomy.key: r for r in requests if not r.has_pathology}
    for request in requests:
        if request.has_pathology:
            twin = healthy[request.anatomy.key]
            assert twin.seed == request.seed and twin.num_samples == request.num_samples


def test_demo_audit_is_clean():
    audit = audit_manifest(MANIFESTS / "demo.parquet")
    assert audit.issue_count == 0 and not audit.duplicates and not audit.near_identical
    assert audit.locations_outside_thorax == []
    assert audit.pathology_requests_with_healthy_twin == 8
