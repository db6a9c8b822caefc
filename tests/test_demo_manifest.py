from pathlib import Path

import pyarrow.parquet as pq

from xreal.core.labels import NO_FINDING
from xreal.manifest.audit import audit_manifest
from xreal.manifest.schema import load_requests
from xreal.manifest.spec import build_manifest
from xreal.phantom.renderer import PHANTOM_PATHOLOGIES

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


def test_demo_parquet_is_built_from_its_spec(tmp_path):
    report = build_manifest(MANIFESTS / "demo.yaml", tmp_path / "demo.parquet")
    assert report.ok, report.summary()
    assert pq.read_table(tmp_path / "demo.parquet").equals(pq.read_table(MANIFESTS / "demo.parquet"))


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
