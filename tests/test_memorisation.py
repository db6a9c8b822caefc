"""The memorisation judge: nearest-neighbour search, the hash-pinned feature bank, the policy rule, and a
generation run that judges with it (the bank pinned in the run's identity)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from xreal.core.errors import XRealError
from xreal.core.files import record_digest, sha256_file, write_json
from xreal.core.images import read_image
from xreal.core.records import DEMO_BUNDLE
from xreal.data.training_index import read_training_index, write_phantom_training_set, write_training_index
from xreal.judges import memorisation
from xreal.judges.judging import load_judges, sanity_scores
from xreal.judges.memorisation import (
    FeatureBankError,
    bank_judges_digest,
    build_feature_bank,
    load_feature_bank,
    nearest_similarity,
    normalise,
)
from xreal.manifest.schema import write_manifest
from xreal.run import generation
from xreal.run.generation import RunConfig, RunConflict, make_batches, plan
from xreal.run.policy import PolicyError, QualityPolicy

JUDGES = str(DEMO_BUNDLE / "judges")
FAST = {"steps": 6, "anatomy_steps": 3}
ONLY_MEMORISATION = {"classifier": {"enabled": False}, "anatomy": {"enabled": False}, "realism": {"enabled": False}}


def images_of(folder, rows=None):
    frame = read_training_index(folder)
    frame = frame if rows is None else frame.iloc[rows]
    return list(frame.image_id), np.stack([read_image(folder / p) for p in frame.image_path])


def memorisation_policy(bank, **rule) -> QualityPolicy:
    return QualityPolicy.from_dict({**ONLY_MEMORISATION, "memorisation": {"enabled": True, "bank": str(bank), **rule}})


# --- nearest neighbours -------------------------------------------------------------


@pytest.mark.parametrize("chunk", [8192, 7, 1])
def test_nearest_similarity_equals_brute_force(chunk):
    rng = np.random.default_rng(0)
    query, bank = normalise(rng.normal(size=(37, 16))), normalise(rng.normal(size=(101, 16)))
    bank[50] = query[3]  # an exact copy sits in a later chunk than the first
    index, similarity = nearest_similarity(query, bank, chunk=chunk)
    products = query.astype(np.float64) @ bank.T.astype(np.float64)
    assert np.array_equal(index, products.argmax(1))
    assert np.allclose(similarity, products.max(1), atol=1e-5)
    assert index[3] == 50 and similarity[3] == pytest.approx(1.0, abs=1e-5)
    assert index.dtype == np.int64 and similarity.dtype == np.float32


def test_nearest_similarity_with_faiss_equals_numpy(monkeypatch):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    query, bank = normalise(rng.normal(size=(20, 8))), normalise(rng.normal(size=(300, 8)))
    expected = nearest_similarity(query, bank)
    monkeypatch.setattr(memorisation, "FAISS_MIN_BANK", 10)
    index, similarity = nearest_similarity(query, bank, chunk=6)
    assert np.array_equal(index, expected[0]) and np.allclose(similarity, expected[1], atol=1e-5)


def test_normalise_gives_unit_rows_and_keeps_zero_rows():
    rows = normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(rows, [[0.6, 0.8], [0.0, 0.0]]) and rows.dtype == np.float32


# --- the bank -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Phantom training (seed 0), held-out (seed 1) and fresh (seed 2) sets at 64 px, and two banks."""
    root = tmp_path_factory.mktemp("memorisation")
    for name, seed, count in (("train", 0, 120), ("held", 1, 120), ("fresh", 2, 40)):
        write_phantom_training_set(root / name, count, size=64, seed=seed)
    build_feature_bank(root / "train", JUDGES, root / "bank", held_out=root / "held", batch_size=50, progress=False)
    build_feature_bank(root / "train", JUDGES, root / "split-bank", batch_size=64, progress=False)
    return root


def test_a_bank_records_its_images_threshold_and_hashes(sets):
    bank = load_feature_bank(sets / "bank", bank_judges_digest(JUDGES))
    record = bank.record
    train = read_training_index(sets / "train")
    assert 0.0 < bank.tau <= 1.0 and record["percentile"] == 95
    assert bank.image_ids == list(train.image_id) and record["counts"] == {"bank": 120, "held_out": 120}
    assert bank.features.shape == (120, record["feature_size"]) and record["image_size"] == [64, 64]
    assert np.allclose(np.linalg.norm(bank.features, axis=1), 1.0, atol=1e-3)
    assert record["files"] == {name: sha256_file(sets / "bank" / name) for name in ("bank.safetensors", "ids.json")}
    assert record["training_set"]["index_sha256"] == sha256_file(sets / "train" / "index.parquet")
    assert record["held_out"]["index_sha256"] == sha256_file(sets / "held" / "index.parquet")
    assert record["judges"] == {"source": JUDGES, "kind": "phantom", "digest": bank_judges_digest(JUDGES)}
    assert record["xreal_version"] and record["created"]
    assert bank.digest == record_digest(json.loads((sets / "bank" / "bank.json").read_text()))
    assert bank.provenance() == {"path": str(sets / "bank"), "digest": bank.digest, "tau": bank.tau, "count": 120}


def test_without_a_held_out_set_the_bank_holds_the_train_split_and_the_rest_fits_tau(sets):
    bank = load_feature_bank(sets / "split-bank")
    train = read_training_index(sets / "train")
    assert bank.image_ids == list(train[train.split == "train"].image_id)
    assert bank.record["counts"]["held_out"] == int(train.split.isin(["validate", "test"]).sum()) > 0
    assert bank.record["held_out"]["index_sha256"] == bank.record["training_set"]["index_sha256"]
    assert 0.0 < bank.tau <= 1.0


def test_tau_is_the_95th_percentile_of_training_to_held_out_nearest_similarity(sets):
    bank = load_feature_bank(sets / "bank")
    judges = load_judges(JUDGES)
    held = normalise(judges.features(images_of(sets / "held")[1])).astype(np.float16).astype(np.float32)
    nearest = nearest_similarity(bank.features, held)[1]
    assert bank.tau == pytest.approx(float(np.percentile(nearest, 95)), abs=2e-3)


def test_a_copied_training_image_is_rejected_as_a_near_copy_and_fresh_phantoms_mostly_are_not(sets):
    bank = load_feature_bank(sets / "bank")
    judges = load_judges(JUDGES)
    policy = memorisation_policy(sets / "bank")
    ids, copies = images_of(sets / "train", [5, 17, 90])
    nearest, similarity = bank.nearest(judges.features(copies))
    assert nearest == ids and np.all(similarity > 0.999)
    rows = [sanity_scores(image) for image in copies]
    for row, near, value in zip(rows, nearest, similarity, strict=True):
        decision = policy.decide({**row, "memorisation_similarity": float(value), "memorisation_nearest": near},
                                 ["No Finding"], judges.labels, None, bank.tau)  # fmt: skip
        assert not decision.accepted
        assert f"near copy of training image {near} (similarity " in decision.reason
        assert f">= {bank.tau:.3f})" in decision.reason
    _, fresh = images_of(sets / "fresh")
    nearest, similarity = bank.nearest(judges.features(fresh))
    rejected = [
        not policy.decide({**row, "memorisation_similarity": float(v)}, ["No Finding"], [], None, bank.tau).accepted
        for row, v in zip(map(sanity_scores, fresh), similarity, strict=True)
    ]
    assert np.mean(rejected) <= 0.3  # other phantoms are about as close as held-out ones: about 5% cross tau
    assert similarity.max() < 0.9999


def test_the_policy_rule(tmp_path):
    row = {"sanity_nonfinite": 0.0, "sanity_std": 0.2, "sanity_saturated": 0.0, "memorisation_similarity": 0.95}
    policy = memorisation_policy("bank")
    assert policy.decide(row, ["No Finding"], [], None, 0.96).accepted
    assert not policy.decide(row, ["No Finding"], [], None, 0.95).accepted  # reaching the limit is enough
    assert "near copy of a training image (similarity 0.950 >= 0.940)" in policy.decide(row, [], [], None, 0.94).reason
    fixed = memorisation_policy("bank", max_similarity=0.99)
    assert fixed.decide(row, ["No Finding"], [], None, 0.5).accepted  # the policy's own limit wins over tau
    off = QualityPolicy.from_dict(ONLY_MEMORISATION)
    assert off.decide(row, ["No Finding"], [], None, 0.5).accepted
    assert "memorisation" not in QualityPolicy().to_dict()  # older policies keep their digest
    assert QualityPolicy.from_dict(policy.to_dict()) == policy and policy.digest() != off.digest()
    with pytest.raises(PolicyError, match=r"memorisation\.bank: the memorisation rule is enabled but names no"):
        QualityPolicy.from_dict({"memorisation": {"enabled": True}})
    path = tmp_path / "policy.yaml"
    path.write_text("memorisation: {enabled: true, bank: b, max_similarity: 1.5}\n")
    with pytest.raises(PolicyError, match=r"policy.yaml: memorisation.max_similarity: expected a number in \[0, 1\]"):
        QualityPolicy.from_yaml(path)


def test_an_edited_or_extra_file_or_another_judge_set_is_refused(sets, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(sets / "bank", edited)
    data = bytearray((edited / "bank.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (edited / "bank.safetensors").write_bytes(bytes(data))
    with pytest.raises(FeatureBankError, match=r"edited: feature bank is damaged: bank.safetensors does not match"):
        load_feature_bank(edited)

    extra = tmp_path / "extra"
    shutil.copytree(sets / "bank", extra)
    (extra / "more.safetensors").write_bytes(b"x")
    with pytest.raises(FeatureBankError, match=r"more.safetensors is not in the bank's record"):
        load_feature_bank(extra)

    other = tmp_path / "other-judges"  # the same weights at other operating points: another judge set
    shutil.copytree(JUDGES, other)
    record = json.loads((other / "judges.json").read_text())
    record["classifier"]["op_threshs"] = [0.5] * len(record["classifier"]["op_threshs"])
    write_json(other / "judges.json", record)
    with pytest.raises(FeatureBankError) as error:
        load_feature_bank(sets / "bank", bank_judges_digest(other), str(other))
    assert f"built with the judge set {JUDGES!r}" in str(error.value)
    assert f"not with the judge set {str(other)!r}" in str(error.value)


def test_a_missing_bank_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureBankError, match=r"no feature bank at .*nowhere; build one with `xreal evaluate bank"):
        load_feature_bank(tmp_path / "nowhere")


def test_building_refuses_what_it_cannot_use(sets, tmp_path):
    with pytest.raises(FeatureBankError, match=r"no index.parquet, so not a training set"):
        build_feature_bank(tmp_path, JUDGES, tmp_path / "b", progress=False)

    frame = read_training_index(sets / "train")
    only_train = tmp_path / "only-train"
    shutil.copytree(sets / "train", only_train)
    write_training_index(frame.assign(split="train"), only_train / "index.parquet")
    with pytest.raises(FeatureBankError, match=r"no rows with split validate or test.*--held-out"):
        build_feature_bank(only_train, JUDGES, tmp_path / "b", progress=False)

    mixed = tmp_path / "mixed"
    shutil.copytree(sets / "train", mixed)
    write_training_index(frame.assign(height=[64] * 119 + [128]), mixed / "index.parquet")
    with pytest.raises(FeatureBankError, match=r"training images of mixed sizes \(row 0 is 64x64, row 119 is 128x64"):
        build_feature_bank(mixed, JUDGES, tmp_path / "b", held_out=sets / "held", progress=False)

    broken = tmp_path / "broken"
    shutil.copytree(sets / "train", broken)
    (broken / frame.image_path[7]).write_bytes(b"not a png")
    with pytest.raises(FeatureBankError, match=rf"row 7 \(image_id '{frame.image_id[7]}'\): .*unreadable image"):
        build_feature_bank(broken, JUDGES, tmp_path / "b", held_out=sets / "held", progress=False)
    assert not (tmp_path / "b" / "bank.json").exists()


# --- a run that judges with it ------------------------------------------------------


def small_manifest(path):
    rows = [
        {"request_id": "healthy", "labels": ["No Finding"], "num_samples": 3, "anatomy_template": "phantom-1",
         "seed": 4, **FAST},
    ]  # fmt: skip
    return write_manifest(rows, path)


def test_a_run_pins_the_bank_and_its_samples_carry_memorisation_similarity(sets, tmp_path):
    bank_dir = tmp_path / "bank"
    shutil.copytree(sets / "bank", bank_dir)
    bank = load_feature_bank(bank_dir)
    policy = QualityPolicy.from_dict(
        {**ONLY_MEMORISATION, "memorisation": {"enabled": True, "bank": str(bank_dir), "max_similarity": 0.0},
         "retries": {"max_rounds": 1}}
    )  # fmt: skip  # every image reaches 0: each reason names its nearest training image
    config = RunConfig(manifest=small_manifest(tmp_path / "m.parquet"), out=tmp_path / "out", policy=policy)
    state = generation.open_run(config)
    for batch in make_batches(plan(state.requests, state.decisions, 1), batch_size=4):
        generation.run_batch(config, batch, "cpu", state.run_id)
    state.refresh()
    summary = generation.finalize(state)

    run = json.loads((config.out / "run.json").read_text())
    assert run["identity"]["memorisation_bank"] == bank.digest
    assert run["memorisation"] == {"path": str(bank_dir), "digest": bank.digest, "tau": bank.tau, "count": 120}
    assert summary.record["memorisation"] == run["memorisation"]
    table = pq.read_table(config.out / "samples.parquet").to_pandas()
    assert len(table) == 3 and "memorisation_nearest" not in table.columns
    assert table.memorisation_similarity.between(0.0, 1.0 + 1e-6).all()
    for row in table.itertuples():
        assert row.decision == "rejected"
        near = row.reason.split("near copy of training image ")[1].split(" ")[0]
        assert near in bank.image_ids
        assert f"(similarity {row.memorisation_similarity:.3f} >= 0.000)" in row.reason

    # the same bank path with other content: the run is refused, naming the bank
    shutil.rmtree(bank_dir)
    shutil.copytree(sets / "split-bank", bank_dir)
    with pytest.raises(RunConflict, match=r"holds a run of a different memorisation_bank;"):
        generation.open_run(config)
    pinned = run["identity"]
    with pytest.raises(RunConflict, match=r"feature bank .* changed since this run started"):
        generation.worker_bank(bank_dir, JUDGES, pinned)


def test_preflight_refuses_a_missing_bank_or_one_of_another_judge_set_before_writing(sets, tmp_path):
    manifest = small_manifest(tmp_path / "m.parquet")
    missing = RunConfig(manifest=manifest, out=tmp_path / "out", policy=memorisation_policy(tmp_path / "nowhere"))
    with pytest.raises(XRealError, match=r"no feature bank at .*nowhere"):
        generation.preflight(missing)
    other = tmp_path / "other-judges"
    shutil.copytree(JUDGES, other)
    record = json.loads((other / "judges.json").read_text())
    record["realism"]["threshold"] = 1.0
    write_json(other / "judges.json", record)
    policy = QualityPolicy.from_dict(
        {**ONLY_MEMORISATION, "judges": str(other), "memorisation": {"enabled": True, "bank": str(sets / "bank")}}
    )
    both = rf"built with the judge set {re.escape(repr(JUDGES))}.*not with the judge set {re.escape(repr(str(other)))}"
    with pytest.raises(XRealError, match=both):
        generation.open_run(RunConfig(manifest=manifest, out=tmp_path / "out", policy=policy))
    assert not (tmp_path / "out").exists()


def test_index_rows_are_named_in_build_errors_when_a_file_is_missing(sets, tmp_path):
    copy = tmp_path / "train"
    shutil.copytree(sets / "train", copy)
    frame = pd.read_parquet(copy / "index.parquet")
    (copy / frame.image_path[3]).unlink()
    with pytest.raises(FeatureBankError, match=rf"index.parquet row 3 \(image_id '{frame.image_id[3]}'\)"):
        build_feature_bank(copy, JUDGES, tmp_path / "b", held_out=sets / "held", progress=False)
