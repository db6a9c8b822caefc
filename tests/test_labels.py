import pytest

from xreal.core.errors import LabelError
from xreal.core.labels import (
    ANATOMY_IDS,
    CHEXPERT_LABELS,
    NO_FINDING,
    Anatomy,
    canonical_label,
    canonical_labels,
    prompt_for,
)


def test_vocabulary_is_the_14_chexpert_labels():
    assert len(CHEXPERT_LABELS) == 14
    assert NO_FINDING in CHEXPERT_LABELS
    assert {"Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Support Devices"} <= set(CHEXPERT_LABELS)


@pytest.mark.parametrize(
    "spelling", ["pleural effusion", "PLEURAL EFFUSION", "Pleural_Effusion", " pleural  effusion "]
)
def test_labels_match_case_insensitively(spelling):
    assert canonical_label(spelling) == "Pleural Effusion"


def test_unknown_label_lists_the_valid_ones():
    with pytest.raises(LabelError) as err:
        canonical_label("Cardiomegally")
    message = str(err.value)
    assert "'Cardiomegally'" in message
    assert all(label in message for label in CHEXPERT_LABELS)


def test_label_sets_are_ordered_deduplicated_and_consistent():
    assert canonical_labels(["edema", "Cardiomegaly", "EDEMA"]) == ("Cardiomegaly", "Edema")
    assert canonical_labels([]) == (NO_FINDING,)
    with pytest.raises(LabelError, match="No Finding"):
        canonical_labels(["No Finding", "Edema"])


def test_prompt_is_the_positive_labels_and_empty_for_no_finding():
    assert prompt_for(["edema", "cardiomegaly"]) == "Cardiomegaly Edema"
    assert prompt_for(["No Finding"]) == ""


def test_anatomy_ids():
    assert [int(a) for a in Anatomy] == [0, 1, 2, 3]
    assert Anatomy.RIGHT_LUNG == 1 and Anatomy.HEART == 3
    assert {0, 1, 2, 3} == ANATOMY_IDS
