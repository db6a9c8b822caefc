"""The usefulness experiment: three training regimes on real phantoms and a generated run, scored by AUROC."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from xreal.core.errors import XRealError
from xreal.data.training_index import read_training_index, write_phantom_training_set, write_training_index
from xreal.evaluate.utility import REGIMES, fresh_classifier, run_utility, utility_table, weights_digest
from xreal.manifest.schema import write_manifest
from xreal.run import generation
from xreal.run.generation import RunConfig, make_batches, plan
from xreal.run.policy import QualityPolicy

FAST = {"steps": 6, "anatomy_steps": 3}
CARDIO_BOX = {"label": None, "x_min": 0.36, "y_min": 0.44, "x_max": 0.69, "y_max": 0.69}  # the demo manifest's
# Classifier and realism judges off; a heart Dice of 1.0 is never reached, and the heart is only compared where
# the pathology mask leaves it visible: Cardiomegaly images pass (heart under the mask), healthy ones are rejected.
POLICY = {
    "classifier": {"enabled": False},
    "realism": {"enabled": False},
    "anatomy": {"min_dice": {"heart": 1.0}},
    "retries": {"max_rounds": 1},
}


def generated_run(folder):
    """A finished run through the library on the demo bundle (as tests/test_generation.py's ``finished_run``):
    two Cardiomegaly images accepted, two healthy ones rejected (kept under rejected/)."""
    rows = [
        {"request_id": "cardio", "labels": ["Cardiomegaly"], "num_samples": 2, "anatomy_template": "phantom-1"}
        | {"boxes": [CARDIO_BOX], "seed": 10, **FAST},
        {"request_id": "healthy", "labels": ["No Finding"], "num_samples": 2, "anatomy_template": "phantom-1"}
        | {"seed": 10, **FAST},
    ]
    config = RunConfig(
        manifest=write_manifest(rows, folder / "m.parquet"),
        out=folder / "run",
        keep_rejected=True,
        policy=QualityPolicy.from_dict(POLICY),
    )
    state = generation.open_run(config)
    for batch in make_batches(plan(state.requests, state.decisions, 1), batch_size=4):
        generation.run_batch(config, batch, "cpu", state.run_id)
    generation.finalize(state)
    return config.out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and two threads on a busy two-core machine spin far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("utility")
    write_phantom_training_set(tmp / "real", 200, size=64, seed=31)
    write_phantom_training_set(tmp / "test", 120, size=64, seed=32)
    return tmp / "real", generated_run(tmp), tmp / "test"


@pytest.fixture(scope="module")
def result(sets):
    real, synthetic, test = sets
    return run_utility(
        real, synthetic, test, size=64, real_count=160, real_split=None, steps=80, pretrain_steps=10,
        bootstrap_rounds=200, progress=False,
    )  # fmt: skip


def test_every_regime_reports_an_auroc_with_its_interval_per_label(result):
    assert json.loads(json.dumps(result)) == result  # JSON as it is
    assert list(result["regimes"]) == list(REGIMES)
    settings = result["settings"]
    assert settings["labels"] == ["Cardiomegaly"]  # the only label the run's accepted images show
    assert settings["real_count"] == 160 and settings["synthetic_count"] == 2 and settings["test_count"] == 120
    assert settings["train_positives"]["synthetic"] == {"Cardiomegaly": 2}
    for name in REGIMES:
        regime = result["regimes"][name]
        entry = regime["labels"]["Cardiomegaly"]
        assert 0.0 <= entry["low"] <= entry["auroc"] <= entry["high"] <= 1.0, (name, entry)
        assert entry["positives"] > 0 and entry["negatives"] > 0
        assert regime["mean_auroc"] == entry["auroc"] and regime["seconds"] > 0
        if name != "real_only":  # the paired difference to real only, with its interval
            change = regime["mean_auroc_change"]
            base = result["regimes"]["real_only"]["mean_auroc"]
            assert change["value"] == pytest.approx(regime["mean_auroc"] - base)
            assert -1.0 <= change["low"] <= change["high"] <= 1.0
    table = utility_table(result)
    assert "| Cardiomegaly |" in table and "real only" in table and "**mean**" in table
    assert "paired bootstrap interval" in table


def test_a_classifier_trained_on_real_phantoms_beats_chance(result):
    # At full size: since the phantom's heart size varies like real chests' (issue 18), cardiomegaly is a pixel
    # or two of heart width at 32 px, where 60 images teach the classifier nothing (AUROC 0.54). At 64 px, 60 images
    # (8 with cardiomegaly) gave 0.68 [0.46, 0.81] on 60 test phantoms; 160 (35) give 0.96 [0.91, 1.00] on 120.
    assert result["regimes"]["real_only"]["labels"]["Cardiomegaly"]["auroc"] > 0.7
    assert result["regimes"]["real_only"]["labels"]["Cardiomegaly"]["low"] > 0.5


def test_the_regimes_train_different_models_from_the_same_start(result):
    digests = {name: result["regimes"][name]["weights_sha256"] for name in REGIMES}
    assert len(set(digests.values())) == len(REGIMES), digests  # pretraining changed where fine-tuning starts
    start = weights_digest(fresh_classifier(["Cardiomegaly"], 0))
    assert start == weights_digest(fresh_classifier(["Cardiomegaly"], 0)) and start not in digests.values()
    assert "then 80 on the real subset" in result["settings"]["schedule"]["pretrain_finetune"]


def test_a_label_without_test_positives_is_reported_not_crashed_on(sets, tmp_path):
    real, synthetic, test = sets
    shutil.copytree(test, tmp_path / "test")
    frame = read_training_index(tmp_path / "test")
    frame["Cardiomegaly"] = np.where(frame["Cardiomegaly"] == 1.0, -1.0, frame["Cardiomegaly"])  # uncertain: negative
    write_training_index(frame, tmp_path / "test" / "index.parquet")
    result = run_utility(
        real, synthetic, tmp_path / "test", size=32, real_count=20, steps=2, bootstrap_rounds=20, progress=False
    )
    for name in REGIMES:
        entry = result["regimes"][name]["labels"]["Cardiomegaly"]
        assert entry["auroc"] is None and entry["positives"] == 0 and "no positives" in entry["note"]
        assert result["regimes"][name]["mean_auroc"] is None
        assert result["regimes"][name].get("mean_auroc_change", {"value": None})["value"] is None
    assert "n/a" in utility_table(result) and "no positives" in utility_table(result)


def test_an_unfinished_run_or_a_short_real_set_is_refused_naming_it(sets, tmp_path):
    real, synthetic, test = sets
    unfinished = tmp_path / "unfinished"
    shutil.copytree(synthetic, unfinished)
    (unfinished / "dataset.json").unlink()
    with pytest.raises(XRealError, match=r"unfinished.*not a finished xreal run"):
        run_utility(real, unfinished, test, real_count=10, steps=1, progress=False)
    with pytest.raises(XRealError, match="no such run directory"):
        run_utility(real, tmp_path / "nothing", test, real_count=10, steps=1, progress=False)
    with pytest.raises(XRealError, match="asked for 5000 real images"):
        run_utility(real, synthetic, test, real_count=5000, steps=1, progress=False)
