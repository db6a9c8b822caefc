import pytest

from xreal.run.policy import PolicyError, QualityPolicy

LABELS = ["Cardiomegaly", "Pleural Effusion", "Lung Opacity", "Consolidation"]


def scores(**probabilities):
    row = {"sanity_nonfinite": 0.0, "sanity_std": 0.2, "sanity_saturated": 0.0}
    row.update({f"p_{k}": 0.1 for k in ("cardiomegaly", "pleural_effusion", "lung_opacity", "consolidation")})
    row.update({f"p_{k}": v for k, v in probabilities.items()})
    row.update({"dice_right_lung": 0.9, "dice_left_lung": 0.9, "dice_heart": 0.8, "realism_distance": 10.0})
    return row


def test_requested_label_must_be_present_and_others_absent():
    policy = QualityPolicy()
    assert policy.decide(scores(cardiomegaly=0.8), ["Cardiomegaly"], LABELS, 20.0).accepted
    missing = policy.decide(scores(cardiomegaly=0.3), ["Cardiomegaly"], LABELS, 20.0)
    assert not missing.accepted and "Cardiomegaly not detected (0.30 < 0.5)" in missing.reason
    extra = policy.decide(scores(cardiomegaly=0.8, pleural_effusion=0.7), ["Cardiomegaly"], LABELS, 20.0)
    assert not extra.accepted and "unrequested Pleural Effusion detected" in extra.reason
    healthy = policy.decide(scores(consolidation=0.9), ["No Finding"], LABELS, 20.0)
    assert not healthy.accepted and "unrequested Consolidation" in healthy.reason


def test_broader_labels_implied_by_a_requested_one_are_not_counted_against_it():
    policy = QualityPolicy()
    decision = policy.decide(scores(consolidation=0.9, lung_opacity=0.9), ["Consolidation"], LABELS, 20.0)
    assert decision.accepted, decision.reason


def test_labels_the_classifier_does_not_know_are_noted_not_rejected():
    decision = QualityPolicy().decide(scores(), ["Fracture"], LABELS, 20.0)
    assert decision.accepted and "Fracture not judged" in decision.reason


def test_sanity_anatomy_and_realism_rules():
    policy = QualityPolicy()
    blank = {**scores(), "sanity_std": 0.001}
    assert "blank or constant" in policy.decide(blank, ["No Finding"], LABELS, 20.0).reason
    nan = {**scores(), "sanity_nonfinite": 0.5}
    assert "NaN" in policy.decide(nan, ["No Finding"], LABELS, 20.0).reason
    heart = {**scores(), "dice_heart": 0.3}
    assert "heart Dice 0.30 < 0.6" in policy.decide(heart, ["No Finding"], LABELS, 20.0).reason
    far = {**scores(), "realism_distance": 50.0}
    assert "unlike real images" in policy.decide(far, ["No Finding"], LABELS, 20.0).reason
    assert policy.decide(far, ["No Finding"], LABELS, None).accepted  # no threshold known: not judged


def test_yaml_overrides_and_per_label_thresholds(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nclassifier:\n  present: 0.6\n  labels:\n    cardiomegaly: {present: 0.2}\n"
        "anatomy: {enabled: false}\nrealism: {max_distance: 5}\nretries: {max_rounds: 5}\n"
    )
    policy = QualityPolicy.from_yaml(path)
    assert policy.classifier.present_for("Cardiomegaly") == 0.2
    assert policy.classifier.present_for("Consolidation") == 0.6
    assert policy.retries.max_rounds == 5
    row = {**scores(cardiomegaly=0.3), "dice_heart": 0.1}
    decision = policy.decide(row, ["Cardiomegaly"], LABELS, 20.0)
    assert not decision.accepted and decision.reason.startswith("unlike real images")  # anatomy is off
    assert policy.digest() != QualityPolicy().digest()
    assert QualityPolicy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sanity: {min_sdt: 0.1}\n", "unknown key(s) min_sdt"),
        ("classifier: {present: 1.5}\n", "classifier.present: expected a number in [0, 1]"),
        ("classifier: {labels: {Broken Heart: {present: 0.3}}}\n", "Broken Heart"),
        ("anatomy: {min_dice: {spleen: 0.5}}\n", "unknown structure(s) spleen"),
        ("retries: {max_rounds: 0}\n", "max_rounds: expected a whole number from 1 to 20"),
        ("version: 7\n", "version 7 is not supported"),
        ("- a list\n", "a policy is a mapping"),
    ],
)
def test_bad_policies_name_the_key_and_the_problem(tmp_path, text, message):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as error:
        QualityPolicy.from_yaml(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)
