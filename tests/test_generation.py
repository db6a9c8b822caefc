"""The generation run's library half, without Prefect: planning, batching, one batch, finalize, audit."""

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from xreal.core.images import to_uint16
from xreal.core.settings import SPEEDS
from xreal.manifest.schema import ManifestInvalid, load_requests, write_manifest
from xreal.run import dataset, generation
from xreal.run.audit import audit_run
from xreal.run.generation import RunConfig, RunConflict, Sample, make_batches, plan
from xreal.run.policy import QualityPolicy

# The demo bundle draws its findings at the fast preset; at fewer DDIM steps its judges reject most draws.
FAST = {"steps": SPEEDS["fast"].steps, "anatomy_steps": SPEEDS["fast"].anatomy_steps}


def small_manifest(path, rows=None):
    rows = rows or [
        {
            "request_id": "cardio",
            "labels": ["Cardiomegaly"],
            "num_samples": 2,
            "anatomy_template": "phantom-1",
            "boxes": [{"label": None, "x_min": 0.35, "y_min": 0.46, "x_max": 0.76, "y_max": 0.78}],
            "seed": 10,
            **FAST,
        },
        {
            "request_id": "healthy",
            "labels": ["No Finding"],
            "num_samples": 2,
            "anatomy_template": "phantom-1",
            "seed": 10,
            **FAST,
        },
    ]
    return write_manifest(rows, path)


def test_plan_redraws_only_what_is_missing_and_stops_at_the_round_limit(tmp_path):
    requests = load_requests(small_manifest(tmp_path / "m.parquet"))
    first = plan(requests, {}, max_rounds=3)
    assert [(s.sample_id, s.round) for s in first] == [
        ("cardio-r0000", 0),
        ("cardio-r0001", 0),
        ("healthy-r0000", 0),
        ("healthy-r0001", 0),
    ]
    decisions = {s.sample_id: "accepted" for s in first}
    decisions["cardio-r0001"] = "rejected"
    second = plan(requests, decisions, max_rounds=3)
    assert [(s.sample_id, s.round, s.seed) for s in second] == [("cardio-r0002", 1, 12)]
    decisions["cardio-r0002"] = "rejected"
    assert [s.sample_id for s in plan(requests, decisions, max_rounds=3)] == ["cardio-r0003"]
    decisions["cardio-r0003"] = "rejected"
    assert plan(requests, decisions, max_rounds=3) == []  # three rounds drawn: report the shortfall
    assert plan(requests, decisions, max_rounds=1) == []
    partial = {"cardio-r0000": "accepted"}  # a crash mid-round: finish that round before redrawing
    assert [s.sample_id for s in plan(requests, partial, max_rounds=3)][:1] == ["cardio-r0001"]


def test_batches_share_sampler_settings_and_have_stable_names(tmp_path):
    rows = [
        {
            "request_id": f"r{i}",
            "labels": ["No Finding"],
            "num_samples": 3,
            "anatomy_template": "phantom-1",
            "steps": 6 if i < 2 else 8,
            "anatomy_steps": 3,
        }
        for i in range(3)
    ]
    requests = load_requests(write_manifest(rows, tmp_path / "m.parquet"))
    samples = plan(requests, {}, 3)
    batches = make_batches(samples, batch_size=4)
    assert [len(b.samples) for b in batches] == [4, 2, 3]
    for b in batches:
        assert len({s.request.settings().steps for s in b.samples}) == 1
    assert [b.name for b in batches] == [b.name for b in make_batches(samples, 4)]
    assert len({b.name for b in batches}) == 3
    with pytest.raises(Exception, match="batch size must be at least 1"):
        make_batches(samples, 0)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One batch run through the library on the demo bundle, then finalized."""
    tmp = tmp_path_factory.mktemp("run")
    config = RunConfig(
        manifest=small_manifest(tmp / "m.parquet"), out=tmp / "out", formats="both", keep_rejected=True,
        sampler=SPEEDS["fast"],
    )  # fmt: skip
    state = generation.open_run(config)
    batches = make_batches(plan(state.requests, state.decisions, 3), batch_size=4)
    summaries = [generation.run_batch(config, b, "cpu", state.run_id) for b in batches]
    summary = generation.finalize(state)
    return config, state, summaries, summary


def test_a_batch_writes_its_files_then_its_shard(finished_run):
    config, state, summaries, _summary = finished_run
    out = config.out
    table = pq.read_table(out / "samples.parquet").to_pandas()
    assert list(table.sample_id) == ["cardio-r0000", "cardio-r0001", "healthy-r0000", "healthy-r0001"]
    assert set(table.decision) <= {"accepted", "rejected"} and all(table.reason.str.len() > 0)
    for column in ("p_cardiomegaly", "dice_left_lung", "realism_distance", "sanity_std"):
        assert table[column].notna().all(), column
    assert table.dice_heart.isna().tolist() == [True, True, False, False]  # under the Cardiomegaly box: not compared
    assert "heart not compared" in table.reason[0] or table.decision[0] == "rejected"
    assert (table["Cardiomegaly"] == [1, 1, 0, 0]).all() and (table["No Finding"] == [0, 0, 1, 1]).all()
    assert table.boxes[0][0]["x_min"] == pytest.approx(0.35 * 64)
    assert table.seed.tolist() == [10, 11, 10, 11]
    fast = SPEEDS["fast"]
    cardio = fast.for_labels(["Cardiomegaly"]).guidance_scale
    assert cardio != fast.guidance_scale  # the fast preset's finding table guides cardiomegaly apart
    assert table.guidance_scale.tolist() == [cardio, cardio, 1.0, 1.0]  # healthy requests have no stage 2
    pinned = json.loads((out / "run.json").read_text())["identity"]["sampler"]["finding_guidance"]
    assert pinned == dict(fast.finding_guidance)
    for row in table.itertuples():
        folder = "images" if row.decision == "accepted" else "rejected"
        assert row.image_path == f"{folder}/{row.sample_id}.png"
        assert (out / row.dicom_path).is_file() and (out / row.anatomy_mask_path).is_file()
        assert dataset.content_digest(dataset.read_image(out / row.image_path)) == row.content_sha256
    assert table.healthy_path[0] == "healthy/cardio-r0000.png" and table.healthy_path.isna()[2]
    record = json.loads((out / "dataset.json").read_text())
    assert record["manifest"]["sha256"] == state.record["identity"]["manifest_sha256"]
    assert record["model"]["files"] and record["judges"]["files"] and record["software"]["torch"]
    assert record["counts"]["requested"] == 4 and record["complete"] in (True, False)
    assert "synthetic" in (out / "README.md").read_text().lower()
    assert summaries[0].seconds["sampling_s"] > 0


def test_rerun_is_a_no_op_and_changed_inputs_are_refused(finished_run, tmp_path):
    config, state, *_ = finished_run
    again = generation.open_run(config)
    assert again.run_id == state.run_id
    assert plan(again.requests, again.decisions, 1) == []
    other = small_manifest(
        tmp_path / "other.parquet",
        [{"request_id": "x", "labels": ["No Finding"], "num_samples": 1, "anatomy_template": "phantom-2"}],
    )
    before = sorted(p.name for p in config.out.rglob("*"))
    with pytest.raises(RunConflict, match="manifest_sha256"):
        generation.open_run(replace(config, manifest=other))
    with pytest.raises(RunConflict, match="policy_digest"):
        strict = QualityPolicy.from_dict({"classifier": {"present": 0.9}})
        generation.open_run(replace(config, policy=strict))
    with pytest.raises(RunConflict, match=r"different sampler \(sampler settings: sampler dpmsolver\+\+ -> unipc\)"):
        generation.open_run(replace(config, sampler=replace(config.sampler, sampler="unipc")))
    assert sorted(p.name for p in config.out.rglob("*")) == before


def test_a_run_pinned_before_a_sampler_setting_existed_resumes_at_its_default(finished_run):
    """run.json written before healthy guidance existed: the run drew at its default (off), so it resumes with it
    off; one asked to resume with it on is refused, naming the setting."""
    config, state, *_ = finished_run
    path = config.out / "run.json"
    original = path.read_text()
    record = json.loads(original)
    del record["identity"]["sampler"]["healthy_guidance_scale"]
    path.write_text(json.dumps(record))
    try:
        unguided = replace(config, sampler=replace(config.sampler, healthy_guidance_scale=1.0))
        assert generation.open_run(unguided).run_id == state.run_id
        guided = replace(config, sampler=replace(config.sampler, healthy_guidance_scale=2.0))
        with pytest.raises(RunConflict, match=r"sampler settings: healthy_guidance_scale 1.0 -> 2.0"):
            generation.open_run(guided)
    finally:
        path.write_text(original)


def test_audit_accepts_the_run_and_catches_damage(finished_run, tmp_path):
    import shutil

    config, *_ = finished_run
    assert audit_run(config.out).consistent, audit_run(config.out).to_text()
    copy = tmp_path / "copy"
    shutil.copytree(config.out, copy)
    first = pq.read_table(copy / "samples.parquet").to_pylist()[0]
    (copy / first["image_path"]).write_bytes(b"not a png")
    (copy / first["dicom_path"]).unlink()
    (copy / "images" / "stray.png").write_bytes(b"x")
    report = audit_run(copy, manifest=config.manifest)
    assert not report.consistent
    assert report.changed_files == [f"{first['image_path']} (sample {first['sample_id']})"]
    assert report.missing_files == [f"{first['dicom_path']} (sample {first['sample_id']})"]
    assert report.unexpected_files == ["images/stray.png"]
    assert "NOT consistent" in report.to_text()


def test_bad_manifest_is_refused_before_anything_is_written(tmp_path):
    bad = write_manifest(
        [{"request_id": "a", "labels": ["Broken Heart"], "num_samples": 1, "anatomy_template": "phantom-1"}],
        tmp_path / "bad.parquet",
    )
    with pytest.raises(ManifestInvalid, match="Broken Heart"):
        generation.open_run(RunConfig(manifest=bad, out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_sample_seed_follows_the_manifest(tmp_path):
    requests = load_requests(small_manifest(tmp_path / "m.parquet"))
    assert Sample(requests[0], 5, 2).seed == 15 and Sample(requests[0], 5, 2).sample_id == "cardio-r0005"
    assert np.isfinite(Sample(requests[0], 0, 0).seed)


def test_dicom_files_hold_the_png_pixels_and_say_they_are_synthetic(finished_run):
    import pydicom

    from xreal.data.dicom import read_dicom_pixels

    config, *_ = finished_run
    rows = pq.read_table(config.out / "samples.parquet").to_pylist()
    for row in rows:
        ds = pydicom.dcmread(config.out / row["dicom_path"])
        png = to_uint16(dataset.read_image(config.out / row["image_path"]))
        assert np.array_equal(read_dicom_pixels(config.out / row["dicom_path"]), png)
        assert "SYNTHETIC" in ds.ImageComments and row["request_id"] in ds.ImageComments
        assert ds.PatientID == "" and "DERIVED" in ds.ImageType
    uids = [pydicom.dcmread(config.out / r["dicom_path"]).SOPInstanceUID for r in rows]
    assert len(set(uids)) == len(uids)


def test_the_dataset_loads_in_torchxrayvision_conventions(finished_run):
    config, *_ = finished_run
    table = pq.read_table(config.out / "samples.parquet").to_pandas()
    accepted = table[table.decision == "accepted"]
    ds = dataset.XRealDataset(config.out)
    assert len(ds) == len(accepted)
    assert "Effusion" in ds.pathologies and "Cardiomegaly" in ds.pathologies and "No Finding" not in ds.pathologies
    everything = dataset.XRealDataset(config.out, include_rejected=True)
    assert len(everything) == 4
    item = everything[0]
    assert item["img"].shape == (1, 64, 64) and item["img"].dtype == np.float32
    assert item["img"].min() >= -1024 and item["img"].max() <= 1024
    assert item["lab"][ds.pathologies.index("Cardiomegaly")] == 1.0 and item["lab"].sum() == 1.0
    assert item["sample_id"] == "cardio-r0000"
    flipped = dataset.XRealDataset(config.out, include_rejected=True, transform=lambda img: img[:, :, ::-1])
    assert np.array_equal(flipped[0]["img"], item["img"][:, :, ::-1])


def test_the_dataset_loads_with_hugging_face_imagefolder(finished_run, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config, *_ = finished_run
    accepted = [r for r in pq.read_table(config.out / "samples.parquet").to_pylist() if r["decision"] == "accepted"]
    assert accepted
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(config.out / "images"), split="train", cache_dir=str(config.out.parent / "hf")
    )
    assert sorted(loaded["sample_id"]) == sorted(r["sample_id"] for r in accepted)
    assert loaded[0]["image"].size == (64, 64)


def test_devices_are_parsed_and_handed_out_one_batch_at_a_time(monkeypatch):
    import threading

    from xreal.core.errors import XRealError

    assert generation.parse_devices("cpu") == ["cpu"]
    monkeypatch.setattr(generation.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(generation.torch.cuda, "device_count", lambda: 2)
    assert generation.parse_devices("cuda") == ["cuda:0", "cuda:1"]
    assert generation.parse_devices("cuda:1, cuda:0") == ["cuda:1", "cuda:0"]
    with pytest.raises(XRealError, match="'gpu7' is not a device"):
        generation.parse_devices("gpu7")
    monkeypatch.setattr(generation.torch.cuda, "is_available", lambda: False)
    with pytest.raises(XRealError, match="CUDA is not available"):
        generation.parse_devices("cuda:0")

    pool = generation.DevicePool(["cuda:0", "cuda:1"])
    first, second = pool.acquire(), pool.acquire()
    assert {first, second} == {"cuda:0", "cuda:1"}
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    waiter.join(0.2)
    assert got == []  # both devices busy: the third batch waits
    pool.release(first)
    waiter.join(2)
    assert got == [first]


def test_audit_run_command_exit_codes_and_json(finished_run, tmp_path):
    import shutil

    from click.testing import CliRunner

    from xreal.cli import cli

    config, *_ = finished_run
    result = CliRunner().invoke(cli, ["audit", "run", str(config.out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["consistent"] and report["samples"] == 4 and report["counts"]["requested"] == 4
    copy = tmp_path / "copy"
    shutil.copytree(config.out, copy)
    (copy / "samples.parquet").unlink()
    result = CliRunner().invoke(cli, ["audit", "run", str(copy)])
    assert result.exit_code == 1 and "samples.parquet is missing" in result.output


def test_a_second_writer_is_refused_while_a_run_holds_the_directory(tmp_path):
    out = tmp_path / "out"
    with generation.run_lock(out):
        assert "pid" in (out / ".lock").read_text()
        with pytest.raises(RunConflict, match=r"being written by another run \(pid"), generation.run_lock(out):
            pass
    with generation.run_lock(out):  # released when the first run ended
        pass
    assert not out.exists()  # the lock made the folder and nothing else wrote to it


def test_the_dataset_relabels_like_a_torchxrayvision_dataset(finished_run):
    from xreal.core.weights import import_xrv

    xrv = import_xrv()
    config, *_ = finished_run
    ds = dataset.XRealDataset(config.out, include_rejected=True)
    cardiomegaly = ds.labels[:, ds.pathologies.index("Cardiomegaly")].copy()
    xrv.datasets.relabel_dataset(xrv.datasets.default_pathologies, ds, silent=True)
    assert list(ds.pathologies) == list(xrv.datasets.default_pathologies)
    assert np.array_equal(ds.labels[:, ds.pathologies.index("Cardiomegaly")], cardiomegaly)
    assert np.isnan(ds.labels[:, ds.pathologies.index("Mass")]).all()  # a label this dataset never asked for
    assert ds[0]["lab"].shape == (len(xrv.datasets.default_pathologies),)


def test_the_lock_is_empty_once_released(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with generation.run_lock(out):
        assert (out / ".lock").read_text().startswith("pid ")
    assert (out / ".lock").read_text() == ""


def test_damaged_records_get_errors_that_name_the_file(finished_run, tmp_path):
    import shutil

    from xreal.core.errors import XRealError
    from xreal.judges.judging import load_judges
    from xreal.model.bundle import DEMO_BUNDLE, verify_bundle

    config, *_ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(config.out, copy)
    (copy / "dataset.json").write_text('{"counts": ')
    report = audit_run(copy)
    assert not report.consistent and f"{copy / 'dataset.json'}: damaged dataset record" in report.problems[0]
    (copy / "run.json").write_text("not json")
    moved = replace(config, out=copy)
    with pytest.raises(XRealError, match=r"run\.json: damaged run record"):
        generation.open_run(moved)
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, bundle)
    (bundle / "xreal_bundle.json").write_text("{")
    with pytest.raises(XRealError, match=r"xreal_bundle\.json: damaged model bundle record"):
        verify_bundle(bundle)
    (bundle / "judges" / "judges.json").write_text("[")
    with pytest.raises(XRealError, match=r"judges\.json: damaged judge set record"):
        load_judges(bundle / "judges")


def test_an_image_with_nan_pixels_is_rejected_and_recorded_without_a_file(tmp_path):
    from xreal.run.policy import Decision

    nan_image = np.full((64, 64), np.nan, dtype=np.float32)
    assert generation.storable(Decision(True, "passed"), nan_image) == Decision(
        False, "NaN or infinite pixels: not stored"
    )
    assert generation.storable(Decision(True, "passed"), np.zeros((64, 64))) == Decision(True, "passed")
    sample = dataset.GeneratedSample(
        sample_id="x-r0000",
        request_id="x",
        replica=0,
        round=0,
        seed=1,
        labels=("Cardiomegaly",),
        boxes=[],
        anatomy_source="template:phantom-1",
        split=None,
        tags=(),
        settings={"steps": 6},
        image=nan_image,
        healthy=nan_image,
        anatomy=np.zeros((64, 64), np.uint8),
        pathology=np.ones((64, 64), bool),
        scores={},
        accepted=False,
        reason="NaN or infinite pixels: not stored",
    )
    options = dataset.WriteOptions(formats="both", keep_rejected=True, dataset_id="d")
    table = dataset.write_shard(tmp_path, "s", [sample], options).to_pylist()
    assert table[0]["image_path"] is None and table[0]["dicom_path"] is None and table[0]["healthy_path"] is None
    assert table[0]["content_sha256"] and (tmp_path / "shards" / "s.parquet").is_file()
    assert not (tmp_path / "rejected").exists()


def test_the_written_pathology_mask_is_the_one_that_conditioned_the_image(tmp_path):
    from conftest import box_label_map

    from xreal.core.masks import read_binary_mask, resize_mask, write_mask_file

    write_mask_file(tmp_path / "anatomy.png", box_label_map(128, 128))
    lesion = np.zeros((128, 128), bool)
    lesion[60, 40] = True  # one pixel that nearest-neighbour downsampling to 64 px would drop
    write_mask_file(tmp_path / "lesion.png", lesion)
    path = write_manifest(
        [
            {
                "request_id": "tiny",
                "labels": ["Lung Lesion"],
                "num_samples": 1,
                "anatomy_path": "anatomy.png",
                "pathology_mask_path": "lesion.png",
                "steps": 2,
                "anatomy_steps": 1,
            }
        ],
        tmp_path / "m.parquet",
    )
    config = RunConfig(manifest=path, out=tmp_path / "out", keep_rejected=True)
    state = generation.open_run(config)
    generation.run_batch(config, make_batches(plan(state.requests, {}, 1), 1)[0], "cpu", state.run_id)
    written = read_binary_mask(tmp_path / "out" / "masks" / "tiny.pathology.png")
    assert written.shape == (64, 64) and written.sum() == 1
    assert np.array_equal(written, resize_mask(lesion, 64, rule="any"))


def test_another_model_under_an_existing_run_is_refused(finished_run, tmp_path):
    import shutil

    from xreal.core.errors import XRealError
    from xreal.core.records import record_bundle_files, verify_bundle
    from xreal.model.bundle import DEMO_BUNDLE, load_pipeline, save_bundle

    config, *_ = finished_run
    other = tmp_path / "other-bundle"
    save_bundle(load_pipeline(), other)  # the same model in float32: other files, other digest
    shutil.copytree(DEMO_BUNDLE / "judges", other / "judges")
    with pytest.raises(XRealError, match=r"judges/classifier.safetensors, .* are not in the bundle's record"):
        verify_bundle(other)  # files added to a bundle after it was saved are refused until recorded
    record_bundle_files(other)
    with pytest.raises(RunConflict, match="model_digest"):
        generation.open_run(replace(config, model=other))
    same = tmp_path / "same-bundle"
    shutil.copytree(DEMO_BUNDLE, same)  # identical content elsewhere is the same model: resumes
    assert generation.open_run(replace(config, model=same)).run_id
