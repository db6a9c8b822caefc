"""``xreal evaluate`` on phantoms: a demo-bundle run against deliberately broken ones, each worse where it should be.

The runs are real generation runs of the demo bundle (few steps, one round):
- ``demo``: the demo manifest's requests as they are;
- ``control off``: the same requests with ``anatomy_steps: 0`` (no anatomy control: stage 1 is plain text-to-image);
- ``shuffled masks``: the demo run with its pathology masks moved between requests (the images no longer follow the
  masks the run says conditioned them);
- ``copies``: the demo run with every accepted image replaced by one of the model's training images.
The reference is the start of the demo model's own training set (phantom seed 11); held-out phantoms are seed 12.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from xreal.cli.app import cli
from xreal.core.files import sha256_file, write_json
from xreal.core.settings import SPEEDS
from xreal.data.training_index import write_phantom_training_set
from xreal.evaluate.broken_runs import copy_training_images, shuffle_pathology_masks
from xreal.evaluate.report import EvaluationSettings, _warnings, evaluate_run
from xreal.manifest.schema import write_manifest
from xreal.run import generation
from xreal.run.dataset import SAMPLES_FILE
from xreal.run.generation import RunConfig, make_batches, plan
from xreal.run.policy import QualityPolicy

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"steps": SPEEDS["fast"].steps, "anatomy_steps": SPEEDS["fast"].anatomy_steps}
FAST = EvaluationSettings(
    bootstrap_rounds=200, frechet_rounds=20, kid_subsets=20, diversity_pairs=60, ceiling_images=128, seed=0
)


def demo_rows(**overrides) -> list[dict]:
    """The demo manifest's requests (manifests/demo.yaml), two samples each."""
    spec = yaml.safe_load((ROOT / "manifests" / "demo.yaml").read_text())
    rows = []
    for request in spec["requests"]:
        if "pathology_mask_path" in request:
            location = {"pathology_mask_path": request["pathology_mask_path"]}
        else:
            boxes = []
            for box in request["boxes"]:
                label, box = (box["label"], box["box"]) if isinstance(box, dict) else (None, box)
                boxes.append({"label": label, "x_min": box[0], "y_min": box[1], "x_max": box[2], "y_max": box[3]})
            location = {"boxes": boxes}
        rows.append(
            {
                "request_id": request["request_id"],
                "labels": request["labels"],
                "num_samples": 2,
                "anatomy_template": request["anatomy_template"],
                **location,
                "seed": request["seed"],
                **STEPS,
                **overrides,
            }
        )
    return rows


def write_demo_manifest(rows: list[dict], path: Path) -> Path:
    """``rows`` written to ``path``, with the demo's mask files beside it (their paths are relative)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "manifests" / "demo-masks", path.parent / "demo-masks", dirs_exist_ok=True)
    return write_manifest(rows, path)


def generate(manifest: Path, out: Path, **policy: dict) -> Path:
    """A whole run through the library (no Prefect): one round, rejected images kept; ``policy`` adds to the
    quality policy."""
    policy = QualityPolicy.from_dict({"retries": {"max_rounds": 1}, **policy})
    config = RunConfig(manifest=manifest, out=out, keep_rejected=True, policy=policy)
    state = generation.open_run(config)
    for batch in make_batches(plan(state.requests, state.decisions, 1), batch_size=16):
        generation.run_batch(config, batch, "cpu", state.run_id)
    generation.finalize(state)
    return out


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phantoms")
    reference = write_phantom_training_set(tmp / "reference", 400, size=64, seed=11).parent
    held_out = write_phantom_training_set(tmp / "held-out", 120, size=64, seed=12).parent
    return reference, held_out


@pytest.fixture(scope="module")
def reports(tmp_path_factory, phantoms):
    """The demo run and the three broken ones, each evaluated."""
    reference, held_out = phantoms
    tmp = tmp_path_factory.mktemp("runs")
    demo = generate(write_demo_manifest(demo_rows(), tmp / "demo.parquet"), tmp / "demo")
    # Without control the judges reject every draw (the wrong anatomy, findings where none was asked for), and a run
    # that accepted nothing is not evaluated; its anatomy figures score every draw anyway, so only sanity judges it.
    off = {name: {"enabled": False} for name in ("anatomy", "classifier", "realism")}
    off_manifest = write_demo_manifest(demo_rows(anatomy_steps=0), tmp / "off.parquet")
    control_off = generate(off_manifest, tmp / "control-off", **off)
    runs = {
        "demo": demo,
        "control off": control_off,
        "shuffled masks": shuffle_pathology_masks(demo, tmp / "shuffled"),
        "copies": copy_training_images(demo, reference, tmp / "copies"),
    }
    measured = {}  # the reference and held-out sets are measured once, for all four runs
    reports = {  # only the demo report is drawn (report.html): the browser test opens it
        name: evaluate_run(
            run,
            reference,
            tmp / f"report-{name}",
            test=held_out,
            settings=FAST,
            progress=False,
            html=name == "demo",
            reference_cache=measured,
        )
        for name, run in runs.items()
    }
    return reports | {"folders": {name: tmp / f"report-{name}" for name in runs}}


def _value(entry):
    return entry["value"]


@pytest.mark.slow
def test_without_anatomy_control_the_anatomy_figures_fall_to_random_pairing(reports):
    demo, off = reports["demo"]["control"]["all_draws"], reports["control off"]["control"]["accepted"]
    assert reports["control off"]["control"]["all_draws"] is None  # its gate accepted every draw: the same set
    print(
        json.dumps({k: (demo[k], off[k]) for k in ("anatomy_dice", "anatomy_dice_random_pairing", "anatomy_recovered")})
    )
    # The margins are small because this run is small (few images, few steps); the runs are seeded, so the figures
    # are the same on every run of this test.
    assert _value(demo["anatomy_dice"]) > _value(off["anatomy_dice"]) + 0.015
    assert demo["anatomy_recovered"] > off["anatomy_recovered"] + 0.1
    # without control an image matches its requested anatomy no better than another request's
    # Without control the figure falls to random pairing: inside its interval.
    assert off["anatomy_dice_random_pairing"]["low"] <= _value(off["anatomy_dice"])
    assert _value(off["anatomy_dice"]) <= off["anatomy_dice_random_pairing"]["high"]


@pytest.mark.slow
def test_shuffled_masks_are_caught_by_the_placement_figures(reports):
    demo, shuffled = reports["demo"]["control"]["all_draws"], reports["shuffled masks"]["control"]["all_draws"]
    print(json.dumps({k: (demo[k], shuffled[k]) for k in ("inside_mask", "within_latent_cell")}))
    assert _value(demo["inside_mask"]) > 2 * _value(shuffled["inside_mask"])
    assert shuffled["inside_mask"]["high"] < demo["inside_mask"]["low"]  # the intervals do not overlap
    assert _value(demo["within_latent_cell"]) > _value(shuffled["within_latent_cell"]) + 0.2


@pytest.mark.slow
def test_copies_of_training_images_are_caught_by_memorisation(reports):
    demo, copies = reports["demo"]["memorisation"], reports["copies"]["memorisation"]
    print(json.dumps({"demo": demo["rate"], "copies": copies["rate"]}))
    assert _value(copies["rate"]) == 1.0
    assert _value(demo["rate"]) <= 0.25
    assert _value(copies["pixel_rate"]) == 1.0
    assert any("memorisation" in w for w in reports["copies"]["warnings"])
    per_sample = pq.read_table(reports["folders"]["copies"] / "per_sample.parquet").to_pandas()
    accepted = per_sample[per_sample["decision"] == "accepted"]
    assert accepted["likely_copy"].all()
    assert (accepted["nearest_similarity"] > 0.999).all()


@pytest.mark.slow
def test_the_demo_report_records_every_section_with_its_provenance(reports):
    report = reports["demo"]
    assert report["report_format"] == 1 and report["judges"]["kind"] == "phantom"
    for section in ("fidelity", "diversity", "control", "memorisation"):
        assert report[section]
    fid = report["fidelity"]
    assert fid["synthetic"]["frechet"]["value"] > 0 and fid["real_vs_real"]["frechet"]["value"] > 0
    assert set(fid["synthetic"]["prdc"]) == {"precision", "recall", "density", "coverage"}
    assert (reports["folders"]["demo"] / "report.html").is_file()
    for folder in reports["folders"].values():
        saved = json.loads((folder / "report.json").read_text())
        assert saved["run"]["sha256"] == sha256_file(Path(saved["run"]["path"]) / SAMPLES_FILE)
    labels = {label for label in report["settings"]["labels"]}
    assert labels == set(report["control"]["accepted"]["per_label"])
    assert {"Cardiomegaly", "Pleural Effusion", "Pneumothorax"} <= labels


@pytest.mark.slow
def test_a_report_too_small_for_prdc_says_so_among_its_warnings(reports):
    report = copy.deepcopy(reports["demo"])
    assert not any("not computed" in w for w in _warnings(report))
    report["fidelity"]["synthetic"]["prdc"] = None  # what _fidelity records with k or fewer accepted images
    assert any("not computed: with k=5 they need more than 5 accepted images" in w for w in _warnings(report))


@pytest.mark.slow
def test_memorisation_warns_only_when_the_rate_is_surely_above_what_real_images_reach(reports):
    report = copy.deepcopy(reports["demo"])
    # 3 likely copies of 31: above the 5% of held-out real images that reach tau, but not surely so
    report["memorisation"]["rate"] = {"value": 3 / 31, "low": 0.0, "high": 0.226, "n": 31}
    assert not any("memorisation" in w for w in _warnings(report))
    report["memorisation"]["rate"] = {"value": 0.3, "low": 0.12, "high": 0.48, "n": 31}
    assert any("memorisation: 30.0% [12.0%, 48.0%]" in w for w in _warnings(report))


def _chromium():
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return playwright


@pytest.mark.slow
def test_the_html_report_opens_in_a_real_browser_and_shows_its_figures(reports, tmp_path):
    playwright = _chromium()
    page_file = reports["folders"]["demo"] / "report.html"
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img", "images => images.map(i => [i.complete, i.naturalWidth])")
        headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert len(widths) >= 8
    assert all(complete and width > 0 for complete, width in widths)  # every figure decoded and drawn
    assert {"Summary", "Memorisation", "Control", "Diversity"} <= set(headings)
    assert (tmp_path / "report.png").stat().st_size > 50_000


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two requests, one sample each, the fast preset's eight steps: a finished run to refuse bad inputs against."""
    tmp = tmp_path_factory.mktemp("tiny")
    rows = demo_rows(num_samples=1, steps=8, anatomy_steps=7)[:2]
    return generate(write_demo_manifest(rows, tmp / "tiny.parquet"), tmp / "run")


def _evaluate(*args: str):
    return CliRunner().invoke(cli, ["evaluate", *map(str, args)])


def test_an_unfinished_run_is_refused(phantoms, tmp_path):
    reference, _ = phantoms
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}")
    result = _evaluate(unfinished, "--reference", reference, "--out", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert "not a finished xreal run" in result.output and "dataset.json is missing" in result.output
    assert not (tmp_path / "r").exists()


def test_a_training_set_of_another_size_or_an_empty_label_is_refused(phantoms, tiny_run, tmp_path):
    reference, _ = phantoms
    small = write_phantom_training_set(tmp_path / "small", 8, size=128, seed=3).parent
    result = _evaluate(tiny_run, "--reference", small, "--out", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert "--reference" in result.output and "128x128" in result.output and "64x64" in result.output

    result = _evaluate(tiny_run, "--reference", reference, "--labels", "Fracture", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "--labels Fracture" in result.output and "no accepted image" in result.output
    result = _evaluate(tiny_run, "--reference", reference, "--labels", "Broken Heart", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "Broken Heart" in result.output
    assert not (tmp_path / "r").exists()


def test_a_missing_bank_or_one_of_another_judge_set_is_refused(phantoms, tiny_run, tmp_path):
    reference, held_out = phantoms
    result = _evaluate(tiny_run, "--reference", reference, "--bank", tmp_path / "nowhere", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "no feature bank" in result.output and "nowhere" in result.output

    other_judges = tmp_path / "other-judges"  # the demo judge set with one threshold moved: another judge set
    shutil.copytree(ROOT / "xreal" / "bundles" / "demo" / "judges", other_judges)
    record = json.loads((other_judges / "judges.json").read_text())
    record["classifier"]["op_threshs"][0] += 0.01
    write_json(other_judges / "judges.json", record)
    bank = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "bank",
            str(reference),
            "--held-out",
            str(held_out),
            "--judges",
            str(other_judges),
            "--out",
            str(tmp_path / "bank"),
        ],
    )
    assert bank.exit_code == 0, bank.output
    result = _evaluate(tiny_run, "--reference", reference, "--bank", tmp_path / "bank", "--out", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert "judge set" in result.output and str(other_judges) in result.output
