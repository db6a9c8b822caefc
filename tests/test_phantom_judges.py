import json

import numpy as np
import pytest
import torch

from xreal.judges.phantom_judges import (
    PhantomSegmenter,
    anatomy_dice,
    classify,
    dice,
    load_weights,
    phantom_classifier,
    save_weights,
    train_phantom_segmenter,
)
from xreal.phantom import renderer as phantom


def test_dice():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    label_map = phantom.anatomy_template(1, 64)
    assert anatomy_dice(label_map, label_map) == {"right lung": 1.0, "left lung": 1.0, "heart": 1.0}


def test_segmenter_learns_phantom_anatomy_and_round_trips(tmp_path):
    model = train_phantom_segmenter(size=64, count=64, steps=40, seed=5)
    cases = phantom.generate(8, 64, seed=77)
    found = model.segment(cases.images)
    assert found.shape == (8, 64, 64) and set(np.unique(found)) <= {0, 1, 2, 3}
    accuracy = (found == cases.anatomy).mean()
    assert accuracy > (cases.anatomy == 0).mean()  # better than calling everything background
    save_weights(model, tmp_path / "s.safetensors")
    restored = load_weights(PhantomSegmenter(), tmp_path / "s.safetensors")
    assert np.array_equal(restored.segment(cases.images), found)


def test_classifier_carries_its_labels_and_takes_xrv_input():
    model = phantom_classifier()
    assert model.pathologies == list(phantom.PHANTOM_PATHOLOGIES)
    scores = classify(model.eval(), np.random.default_rng(0).random((2, 64, 64), dtype=np.float32))
    assert set(scores) == set(phantom.PHANTOM_PATHOLOGIES)
    assert all(s.shape == (2,) and ((s >= 0) & (s <= 1)).all() for s in scores.values())
    assert torch.is_grad_enabled()


def test_judges_trained_on_upsampled_phantoms_judge_generated_images_upsampled_the_same_way(tmp_path):
    """A set trained on 64 px phantoms seen at 128 px records 128 as its size; judging a 64 px image through it
    upsamples it bilinearly, exactly as training did."""
    from xreal.judges.judging import classifier_input, load_judges, resize_inputs
    from xreal.judges.phantom_judges import train_phantom_judges

    folder = train_phantom_judges(
        tmp_path / "judges",
        size=64,
        input_size=128,
        segmenter_steps=2,
        classifier_steps=2,
        train_count=16,
        held_out_count=16,
    )
    judges = load_judges(str(folder))
    assert judges.image_size == 128 and "upsampled to 128" in (folder / "judges.json").read_text()
    images = phantom.generate(3, 64, seed=8).images
    inputs = judges.classifier_inputs(images)
    assert inputs.shape == (3, 1, 128, 128)
    assert torch.allclose(inputs, resize_inputs(classifier_input(images), 128))
    # The segmenter stays at the phantoms' 64 px: it gets the classifier's input shrunk back.
    assert judges.segmenter_size == 64 and judges.segment(images).shape == (3, 64, 64)
    assert resize_inputs(inputs, 128) is inputs and resize_inputs(inputs, None) is inputs


def test_random_blur_smooths_about_half_a_batch_and_leaves_the_rest_untouched():
    from xreal.judges.phantom_judges import random_blur

    batch = torch.from_numpy(phantom.generate(64, 64, seed=12).images)[:, None]
    out = random_blur(2.0)(batch, np.random.default_rng(0))
    assert out.shape == batch.shape and not torch.equal(out, batch)
    changed = (out - batch).abs().flatten(1).amax(1) > 0
    assert 20 <= int(changed.sum()) <= 44  # probability 0.5 of 64

    def roughness(x):
        return (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)

    assert (roughness(out[changed]) < roughness(batch[changed])).all()  # blurred, not just altered
    assert torch.equal(out[~changed], batch[~changed])
    again = random_blur(2.0)(batch, np.random.default_rng(0))
    assert torch.equal(again, out)  # the batch's rng decides everything


def test_the_judge_card_reports_the_classifier_on_blurred_phantoms_beside_the_plain(tmp_path):
    from xreal.judges.judging import judges_card
    from xreal.judges.phantom_judges import train_phantom_judges

    folder = train_phantom_judges(
        tmp_path / "judges", size=64, segmenter_steps=2, classifier_steps=2, train_count=16, held_out_count=24
    )
    record = json.loads((folder / "judges.json").read_text())
    blurred = record["metrics"]["blurred_1px"]
    assert set(blurred) == set(phantom.PHANTOM_PATHOLOGIES)
    assert all(0.0 <= v["specificity"] <= 1.0 for v in blurred.values())
    assert "half of them blurred by up to 1.5 px" in record["trained_on"]
    card = judges_card(folder)
    assert "blurred: sensitivity" in card
    row = next(line for line in card.splitlines() if line.startswith("| Edema |"))
    assert row.count("|") == 6  # label, plain sensitivity and specificity, blurred sensitivity and specificity


@pytest.mark.filterwarnings("error:Mean of empty slice")
def test_a_label_the_held_out_phantoms_lack_is_recorded_as_not_measured(tmp_path):
    """Six held-out phantoms (seed 2026) have no oedema, atelectasis or pneumothorax: their sensitivity is not
    measured (null, "not measured" on the card), never NaN; the specificity of every label still is."""
    from xreal.judges.judging import judges_card
    from xreal.judges.phantom_judges import train_phantom_judges

    folder = train_phantom_judges(
        tmp_path / "judges", size=64, segmenter_steps=2, classifier_steps=2, train_count=16, held_out_count=6
    )
    metrics = json.loads((folder / "judges.json").read_text())["metrics"]
    absent = {"Edema", "Atelectasis", "Pneumothorax"}
    assert {label for label, value in metrics["sensitivity"].items() if value is None} == absent
    assert {label for label, v in metrics["blurred_1px"].items() if v["sensitivity"] is None} == absent
    assert all(0.0 <= value <= 1.0 for value in metrics["specificity"].values())
    rows = {line.split(" | ")[0][2:]: line for line in judges_card(folder).splitlines() if line.startswith("| ")}
    assert rows["Edema"].count("not measured") == 2  # plain and blurred sensitivity
    assert "not measured" not in rows["Cardiomegaly"]


def test_a_classifier_trained_through_an_autoencoder_sees_each_phantom_twice_with_its_labels(monkeypatch):
    """``round_trip`` adds every training phantom once more as the autoencoder gives it back, labels unchanged."""
    from xreal.judges import phantom_judges
    from xreal.judges.judging import classifier_input, resize_inputs

    seen = {}

    def fit(model, inputs, targets, *args, **kwargs):
        seen.update(inputs=inputs, targets=targets)
        return model.eval()

    monkeypatch.setattr(phantom_judges, "fit", fit)
    phantom_judges.train_phantom_classifier(64, count=12, steps=1, seed=4, input_size=128, round_trip=lambda x: 1 - x)
    cases = phantom.generate(12, 64, seed=4)
    assert seen["inputs"].shape == (24, 1, 128, 128)
    assert torch.equal(seen["inputs"][:12], resize_inputs(classifier_input(cases.images), 128))
    assert torch.equal(seen["inputs"][12:], resize_inputs(classifier_input(1 - cases.images), 128))
    assert torch.equal(seen["targets"][12:], seen["targets"][:12])
    expected = [[float(label in labels) for label in phantom.PHANTOM_PATHOLOGIES] for labels in cases.labels]
    assert seen["targets"][:12].tolist() == expected
    with pytest.raises(ValueError, match=r"shape \(11, 64, 64\) for \(12, 64, 64\)"):
        phantom_judges.train_phantom_classifier(64, count=12, steps=1, seed=4, round_trip=lambda x: x[1:])


def test_the_judge_card_reports_the_classifier_on_phantoms_through_the_autoencoder(tmp_path):
    from xreal.judges.judging import judges_card
    from xreal.judges.phantom_judges import train_phantom_judges

    calls = []

    def round_trip(images):
        calls.append(images.shape)
        return np.clip(images + 0.05, 0.0, 1.0)

    folder = train_phantom_judges(
        tmp_path / "judges",
        size=64,
        segmenter_steps=2,
        classifier_steps=2,
        feature_steps=2,
        train_count=16,
        held_out_count=24,
        round_trip=round_trip,
        through_autoencoder={"bundle": "demo", "vae_sha256": "ab" * 32},
    )
    assert calls == [(16, 64, 64), (24, 64, 64)]  # the training phantoms, then the held-out ones
    record = json.loads((folder / "judges.json").read_text())
    returned = record["metrics"]["through_autoencoder"]
    assert set(returned) == set(phantom.PHANTOM_PATHOLOGIES)
    assert all(0.0 <= v["sensitivity"] <= 1.0 and 0.0 <= v["specificity"] <= 1.0 for v in returned.values())
    assert record["through_autoencoder"] == {"bundle": "demo", "vae_sha256": "ab" * 32}
    assert (
        "each also through the autoencoder of demo, vae sha256 abababababab), feature network" in record["trained_on"]
    )
    card = judges_card(folder)
    assert "blurred: sensitivity" in card and "autoencoder: sensitivity" in card
    row = next(line for line in card.splitlines() if line.startswith("| Edema |"))
    assert row.count("|") == 8  # label, plain, blurred and autoencoder sensitivity and specificity


def test_judges_trained_through_an_autoencoder_measure_with_a_feature_network_that_never_saw_it(tmp_path):
    """The classifier that learnt to read the decoder's texture as nothing does not give the features: realism and
    ``xreal evaluate`` read a network trained without the autoencoder, checksummed like every other file."""
    from xreal.judges.judging import JudgeError, load_judges
    from xreal.judges.phantom_judges import train_phantom_judges

    common = dict(size=64, segmenter_steps=2, classifier_steps=3, feature_steps=2, train_count=16, held_out_count=16)
    folder = train_phantom_judges(tmp_path / "judges", round_trip=lambda x: 1 - x, **common)
    record = json.loads((folder / "judges.json").read_text())
    assert record["features"]["file"] == "features.safetensors" and "features.safetensors" in record["files"]
    assert "classifier 16 (seed 2025, 3 steps" in record["trained_on"]  # each network trains as long as asked
    assert "feature network and realism reference 16 (seed 2025, 2 steps" in record["trained_on"]
    judges = load_judges(str(folder))
    images = phantom.generate(3, 64, seed=9).images
    inputs = judges.classifier_inputs(images)
    with torch.no_grad():
        own, classifier = judges.feature_network.features2(inputs).numpy(), judges.classifier.features2(inputs).numpy()
    assert np.array_equal(judges.features(images), own) and not np.allclose(own, classifier)
    distances = [row["realism_distance"] for row in judges.score(images)]
    assert np.allclose(distances, judges.realism.distance(torch.from_numpy(own)), rtol=1e-5)

    plain = load_judges(str(train_phantom_judges(tmp_path / "plain", **common)))
    assert plain.feature_network is None and "features" not in json.loads((tmp_path / "plain/judges.json").read_text())
    with torch.no_grad():
        assert np.array_equal(
            plain.features(images), plain.classifier.features2(plain.classifier_inputs(images)).numpy()
        )

    (folder / "features.safetensors").write_bytes((folder / "classifier.safetensors").read_bytes())
    with pytest.raises(JudgeError, match=r"features\.safetensors"):
        load_judges(str(folder))


def test_train_judges_trains_through_the_named_bundles_autoencoder_and_names_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from xreal.cli import cli
    from xreal.core.files import sha256_file
    from xreal.judges import phantom_judges
    from xreal.model.bundle import DEMO_BUNDLE

    calls = []
    monkeypatch.setattr(phantom_judges, "train_phantom_judges", lambda out, **kw: calls.append(kw) or out)
    command = ["train", "judges", "--out", str(tmp_path / "judges"), "--autoencoder", str(DEMO_BUNDLE)]
    refused = CliRunner().invoke(cli, [*command, "--size", "128"])
    assert refused.exit_code == 2 and "--autoencoder" in refused.output and "64 px" in refused.output
    assert not calls

    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 0, result.output
    (kwargs,) = calls
    assert "classifier_steps" not in kwargs and "feature_steps" not in kwargs  # the function's recipe
    vae = sha256_file(next((DEMO_BUNDLE / "vae").glob("*.safetensors")))
    assert kwargs["through_autoencoder"] == {"bundle": str(DEMO_BUNDLE), "vae_sha256": vae}
    # The round trip is the bundle's autoencoder: it gives a phantom back close to itself.
    images = phantom.generate(8, 64, seed=31).images
    returned = kwargs["round_trip"](images)
    assert returned.shape == images.shape and returned.min() >= 0.0 and returned.max() <= 1.0
    psnr = 10 * np.log10(1.0 / ((returned - images) ** 2).mean(axis=(1, 2)))
    assert psnr.mean() > 25.0  # 28 here; the bundle's held-out figure is 30 dB


def test_a_checkpoint_ensemble_is_the_mean_probability_of_its_members_calibrated_as_one():
    from torchxrayvision.models import op_norm

    from xreal.judges.judging import CheckpointEnsemble

    torch.manual_seed(0)
    members = [phantom_classifier().eval() for _ in range(3)]
    ensemble = CheckpointEnsemble(members).eval()
    assert ensemble.pathologies == list(phantom.PHANTOM_PATHOLOGIES)
    inputs = torch.rand(4, 1, 64, 64) * 2048 - 1024
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(m(inputs)) for m in members]).mean(0)
        assert torch.allclose(torch.sigmoid(ensemble(inputs)), mean, atol=1e-6)  # uncalibrated: logits, as a member
        assert not torch.allclose(mean, torch.sigmoid(members[0](inputs)), atol=1e-3)  # the members do differ
        thresholds = torch.linspace(0.2, 0.8, len(ensemble.pathologies))
        ensemble.op_threshs = thresholds
        assert torch.allclose(ensemble(inputs), op_norm(mean, thresholds), atol=1e-6)
        assert torch.equal(ensemble.features2(inputs), members[-1].features2(inputs))
    assert set(classify(ensemble, np.full((2, 64, 64), 0.5, np.float32))) == set(ensemble.pathologies)
    members[0].op_threshs = thresholds
    with pytest.raises(ValueError, match="calibrated as a whole"):
        CheckpointEnsemble(members)


def test_a_classifier_trained_to_several_step_counts_is_the_ensemble_of_its_snapshots_at_each():
    """Each member is exactly the network a run stopped at that step would give: the snapshots of one run."""
    from xreal.judges.judging import CheckpointEnsemble
    from xreal.judges.phantom_judges import train_phantom_classifier

    common = dict(size=64, count=12, seed=4, blur_sigma=1.0)
    ensemble = train_phantom_classifier(steps=[3, 1], **common)
    assert isinstance(ensemble, CheckpointEnsemble) and len(ensemble.members) == 2
    for member, steps in zip(ensemble.members, (1, 3), strict=True):
        alone = train_phantom_classifier(steps=steps, **common)
        assert not isinstance(alone, CheckpointEnsemble) and not member.training
        kept, trained = member.state_dict(), alone.state_dict()
        assert kept.keys() == trained.keys() and all(torch.equal(kept[k], trained[k]) for k in kept)
    first, last = (m.state_dict()["classifier.weight"] for m in ensemble.members)
    assert not torch.equal(first, last)
    for bad in ([], [0, 2], 0, [1500, "x"], 2.0):
        with pytest.raises(ValueError, match="whole numbers above 0"):
            train_phantom_classifier(steps=bad, **common)


def test_a_judge_set_with_a_checkpoint_ensemble_saves_loads_and_scores_the_same(tmp_path):
    from xreal.core.records import verify_judge_set
    from xreal.judges.judging import CheckpointEnsemble, JudgeError, load_judges
    from xreal.judges.phantom_judges import train_phantom_judges

    folder = train_phantom_judges(
        tmp_path / "judges",
        size=64,
        segmenter_steps=2,
        classifier_steps=[2, 3],
        train_count=16,
        held_out_count=24,
    )
    record = json.loads((folder / "judges.json").read_text())
    assert record["classifier"]["members"] == 2
    assert record["segmenter"]["config"] == {"width": 16, "classes": 4}  # a retrain writes the same record
    assert "classifier and realism reference 16 (seed 2025, mean of its snapshots at 2, 3 steps" in record["trained_on"]
    judges = load_judges(str(folder))
    assert isinstance(judges.classifier, CheckpointEnsemble) and len(judges.classifier.members) == 2
    assert torch.equal(judges.classifier.op_threshs, torch.tensor(record["classifier"]["op_threshs"]))
    images = phantom.generate(4, 64, seed=21).images
    again = load_judges(str(folder))
    assert judges.score(images) == again.score(images)
    with torch.no_grad():  # the set's features (no feature network here) are the run's last snapshot's
        last = judges.classifier.members[-1].features2(judges.classifier_inputs(images)).numpy()
    assert np.array_equal(judges.features(images), last)

    for members in (0, "2", 2.0):
        record["classifier"]["members"] = members
        (folder / "judges.json").write_text(json.dumps(record))
        with pytest.raises(JudgeError, match=rf"judges\.json: classifier 'members' must be .*{members!r}"):
            load_judges(str(folder))
        with pytest.raises(JudgeError, match="classifier 'members'"):  # the check a run makes before it starts
            verify_judge_set(folder)
    single = {key: value for key, value in record["classifier"].items() if key != "members"}
    for spec, described in (({**single, "members": 3}, "3 networks"), (single, "one network")):
        (folder / "judges.json").write_text(json.dumps({**record, "classifier": spec}))
        with pytest.raises(JudgeError, match=rf"classifier\.safetensors does not hold the classifier .*{described}"):
            load_judges(str(folder))


def test_train_judges_takes_the_classifier_steps_as_one_count_or_the_snapshots_of_an_ensemble(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from xreal.cli import cli
    from xreal.judges import phantom_judges

    calls = []
    monkeypatch.setattr(phantom_judges, "train_phantom_judges", lambda out, **kw: calls.append(kw) or out)
    command = ["train", "judges", "--out", str(tmp_path / "judges")]
    for given, steps in (("1500", [1500]), ("2500,3000,4000", [2500, 3000, 4000])):
        result = CliRunner().invoke(cli, [*command, "--classifier-steps", given, "--feature-steps", "7"])
        assert result.exit_code == 0, result.output
        assert calls.pop()["classifier_steps"] == steps
    for bad in ("0", "1500,x", ""):
        refused = CliRunner().invoke(cli, [*command, "--classifier-steps", bad])
        assert refused.exit_code == 2 and "--classifier-steps" in refused.output and repr(bad) in refused.output
    assert not calls
