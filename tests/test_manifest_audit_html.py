"""``xreal manifest audit --html``: the drawn audit page and the arrays behind it."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import box_label_map
from PIL import Image

from xreal.cli.app import cli
from xreal.core.labels import NO_FINDING
from xreal.core.masks import area_fraction, boxes_to_mask, read_binary_mask, write_mask_file
from xreal.manifest.audit import audit_manifest
from xreal.manifest.audit_html import audit_page, collect_drawing, flagged_requests, write_audit_html
from xreal.manifest.schema import write_manifest

DEMO = Path(__file__).resolve().parents[1] / "manifests" / "demo.parquet"
IMG = re.compile(r'<img src="([^"]*)" alt="([^"]*)"')


def decoded_images(page: str) -> list[tuple[str, np.ndarray]]:
    """(alt, pixels) of every <img>; fails unless each is a PNG data URI that decodes."""
    images = []
    for src, alt in IMG.findall(page):
        assert src.startswith("data:image/png;base64,"), f"{alt}: not an embedded PNG"
        raw = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            assert image.format == "PNG"
            images.append((alt, np.asarray(image.convert("RGB"))))
    return images


def ctr_label_map() -> np.ndarray:
    """80x100 rectangles: lungs at columns 10-44 and 56-89, heart at columns 40-64 (wins where it overlaps)."""
    label_map = np.zeros((80, 100), dtype=np.uint8)
    label_map[10:60, 10:45] = 1
    label_map[10:60, 56:90] = 2
    label_map[35:66, 40:65] = 3
    return label_map


CTR_EXPECTED = 25 / 80  # heart columns 40..64 over thorax columns 10..89


def box(x0, y0, x1, y1, label=None):
    return {"label": label, "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1}


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hand-made")
    write_mask_file(folder / "ctr.png", ctr_label_map())
    write_mask_file(folder / "big_heart.png", box_label_map(heart_width=40))
    edema = {"labels": ["Edema"], "num_samples": 2, "anatomy_path": "big_heart.png", "boxes": [box(0.2, 0.3, 0.4, 0.6)]}
    rows = [
        # every Cardiomegaly box sits in the top-left corner (the patient's right apex and beyond)
        {"request_id": "corner", "labels": ["Cardiomegaly"], "num_samples": 3, "anatomy_path": "ctr.png",
         "boxes": [box(0.0, 0.0, 0.2, 0.2)]},
        {"request_id": "corner-small", "labels": ["Cardiomegaly"], "num_samples": 1,
         "anatomy_path": "big_heart.png", "boxes": [box(0.0, 0.0, 0.1, 0.1)]},
        {"request_id": "two-labels", "labels": ["Cardiomegaly", "Edema"], "num_samples": 2,
         "anatomy_path": "ctr.png",
         "boxes": [box(0.05, 0.05, 0.15, 0.15, "Cardiomegaly"), box(0.6, 0.6, 0.9, 0.9, "Edema")]},
        {"request_id": "corner-healthy", "labels": ["No Finding"], "num_samples": 2, "anatomy_path": "ctr.png"},
        {"request_id": "edema-a", **edema},
        {"request_id": "edema-c", **edema},
        {"request_id": "broken", "labels": ["Edema"], "num_samples": 1, "anatomy_path": "gone.png",
         "boxes": [box(0.2, 0.3, 0.4, 0.6)]},
    ]  # fmt: skip
    manifest = write_manifest(rows, folder / "m.parquet")
    report = audit_manifest(manifest)
    drawing = collect_drawing(manifest)
    out = write_audit_html(manifest, folder / "audit.html", report=report)
    return manifest, report, drawing, out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "pages" / "demo-audit.html"
    result = CliRunner().invoke(cli, ["manifest", "audit", str(DEMO), "--json", "--html", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_demo_page_has_decodable_figures_and_one_heatmap_per_label(demo_page):
    audit, out = demo_page
    page = out.read_text(encoding="utf-8")
    images = decoded_images(page)
    assert len(images) == len(IMG.findall(page)) == page.count("<img")
    for alt, pixels in images:
        assert pixels.shape[0] > 50 and pixels.shape[1] > 50, alt
        assert pixels.min() < 128 < pixels.max(), f"{alt}: blank image"
    heatmaps = sorted(alt.removeprefix("heatmap: ") for alt, _ in images if alt.startswith("heatmap: "))
    requested = sorted(label for label in audit["per_label"] if label != NO_FINDING)
    assert heatmaps == requested and len(requested) >= 5
    for alt in ("anatomy outlines overlaid", "cardiothoracic ratio histogram", "samples per label"):
        assert alt in {a for a, _ in images}
    assert "<figcaption>How to read" in page and page.count("<figcaption>") == len(images)
    assert "all 16 valid requests" in page  # the anatomy sample's size is said


def test_demo_heatmaps_follow_its_boxes_and_masks():
    drawing = collect_drawing(DEMO)
    size = drawing.size
    heat = drawing.heatmaps["Pleural Effusion"]
    # effusion-right's box (x 0.09-0.27, y 0.73-0.84) holds half of the effusion samples; the other half is
    # cardiomegaly-effusion's, whose one mask locates both its findings: the enlarged heart and a sliver of fluid
    box = boxes_to_mask([(0.09, 0.73, 0.27, 0.84)], size, size, units="normalized")
    combined = area_fraction(read_binary_mask(DEMO.parent / "demo-masks" / "cardiomegaly-effusion.png"), size)
    np.testing.assert_allclose(heat, 0.5 * box + 0.5 * combined, atol=1e-6)
    assert heat.max() == pytest.approx(0.5) and (box > 0).sum() and (combined > 0).sum()
    own = area_fraction(read_binary_mask(DEMO.parent / "demo-masks" / "cardiomegaly.png"), size)
    np.testing.assert_allclose(drawing.heatmaps["Cardiomegaly"], 0.5 * own + 0.5 * combined, atol=1e-6)
    assert set(drawing.heatmaps) == set(drawing.label_samples) - {NO_FINDING}


def test_corner_boxes_give_a_corner_heatmap(hand_made):
    _, _, drawing, _ = hand_made
    size = drawing.size
    heat = drawing.heatmaps["Cardiomegaly"]
    assert heat.shape == (size, size)
    corner = heat[: size // 4, : size // 4].sum()
    assert corner / heat.sum() == pytest.approx(1.0)
    assert heat[size // 2 :, :].sum() == 0 and heat[:, size // 2 :].sum() == 0
    # share of Cardiomegaly's 6 samples: 3 + 1 + 2 on the innermost pixels, 3 + 1 at (0, 0), 3 alone further out
    assert drawing.label_samples["Cardiomegaly"] == 6
    assert heat[int(0.08 * size), int(0.08 * size)] == pytest.approx(1.0)
    assert heat[0, 0] == pytest.approx(4 / 6)
    assert heat[int(0.18 * size), int(0.18 * size)] == pytest.approx(3 / 6)
    # a box labelled Edema locates Edema only: its heatmap sits bottom right, off the Cardiomegaly corner
    edema = drawing.heatmaps["Edema"]
    assert edema[int(0.75 * size), int(0.75 * size)] == pytest.approx(2 / 6)
    assert edema[: size // 4, : size // 4].sum() == 0
    assert NO_FINDING not in drawing.heatmaps and set(drawing.heatmaps) == {"Cardiomegaly", "Edema"}


def test_hand_made_page_has_one_heatmap_per_label_and_decodes(hand_made):
    _, _, _, page = hand_made
    images = decoded_images(page)
    assert sorted(alt for alt, _ in images if alt.startswith("heatmap")) == ["heatmap: Cardiomegaly", "heatmap: Edema"]
    for alt, pixels in images:
        assert pixels.min() < 128 < pixels.max(), f"{alt}: blank image"


def test_cardiothoracic_ratios_match_a_hand_computation(hand_made):
    _, report, drawing, _ = hand_made
    ratios = {m.request_id: m.cardiothoracic_ratio for m in drawing.measured}
    big = box_label_map(heart_width=40)
    lungs = np.flatnonzero((big > 0).any(axis=0))
    expected_big = 40 / (lungs[-1] - lungs[0] + 1)
    assert ratios == pytest.approx(
        {
            "corner": CTR_EXPECTED,
            "two-labels": CTR_EXPECTED,
            "corner-healthy": CTR_EXPECTED,
            "corner-small": expected_big,
            "edema-a": expected_big,
            "edema-c": expected_big,
        }
    )
    # histogram weights are the requested samples; the text audit's range agrees
    order = np.argsort(drawing.ratios, kind="stable")
    assert drawing.ratios[order] == pytest.approx([CTR_EXPECTED] * 3 + [expected_big] * 3)
    assert sorted(drawing.ratio_weights[order][:3]) == [2, 2, 3]  # corner-healthy, two-labels, corner
    assert sorted(drawing.ratio_weights[order][3:]) == [1, 2, 2]  # corner-small, edema-a, edema-c
    assert report.anatomy["cardiothoracic_ratio"]["min"] == pytest.approx(CTR_EXPECTED, abs=1e-3)
    # the mean anatomy: a share per anatomy id that sums to one at every pixel
    assert drawing.anatomy_share.shape == (4, drawing.size, drawing.size)
    assert drawing.anatomy_share.sum(axis=0) == pytest.approx(np.ones((drawing.size, drawing.size)))
    assert drawing.sampled_requests == drawing.valid_requests == 6


def test_flagged_requests_are_in_the_table(hand_made):
    _, report, drawing, page = hand_made
    flags = {(check, request_id): (row, why) for check, request_id, row, why in flagged_requests(report, drawing)}
    assert flags[("duplicate", "edema-c")][0] == 5 and "'edema-a'" in flags[("duplicate", "edema-c")][1]
    assert ("location outside thorax", "corner") in flags
    assert flags[("unresolved file", "broken")][0] == 6 and "gone.png" in flags[("unresolved file", "broken")][1]
    table = page[page.index("<h2>Flagged requests</h2>") :].replace('<td class="text">', "<td>")  # prose cells wrap
    assert "<tr><td>duplicate</td><td>edema-c</td><td>5</td>" in table
    assert "<tr><td>location outside thorax</td><td>corner</td><td>0</td>" in table
    assert "<tr><td>unresolved file</td><td>broken</td><td>6</td>" in table and "gone.png" in table


def test_anatomy_sample_is_capped_seeded_and_said(hand_made, tmp_path):
    manifest, report, everything, _ = hand_made
    first = collect_drawing(manifest, sample_size=2, seed=7)
    again = collect_drawing(manifest, sample_size=2, seed=7)
    assert first.sampled_requests == 2 and first.valid_requests == 6
    assert [m.request_id for m in first.measured] == [m.request_id for m in again.measured]
    # a uniform random sample: other seeds pick other requests, not always the first rows
    picked = {tuple(m.request_id for m in collect_drawing(manifest, sample_size=2, seed=s).measured) for s in range(8)}
    assert len(picked) > 2
    # heatmaps still take every request
    assert first.label_samples["Cardiomegaly"] == 6
    np.testing.assert_array_equal(first.heatmaps["Cardiomegaly"], everything.heatmaps["Cardiomegaly"])
    page = audit_page(report, first)
    assert "a random sample of 2 of the 6 valid requests" in page and "seed 7" in page


def test_bad_manifest_path_exits_2_with_a_clear_message(tmp_path):
    out = tmp_path / "audit.html"
    runner = CliRunner()
    result = runner.invoke(cli, ["manifest", "audit", str(tmp_path / "missing.parquet"), "--html", str(out)])
    assert result.exit_code == 2
    assert "missing.parquet: manifest not found" in result.output and "Traceback" not in result.output
    assert not out.exists()
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    result = runner.invoke(cli, ["manifest", "audit", str(tmp_path / "junk.parquet"), "--html", str(out)])
    assert result.exit_code == 2 and "not a Parquet file" in result.output
    assert not out.exists() and not list(tmp_path.glob(".audit.html*"))
