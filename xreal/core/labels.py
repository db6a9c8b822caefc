"""The label vocabularies: CheXpert pathologies and CheXmask anatomy structures.

Pathologies use the 14 CheXpert labels, spelled as in the CheXpert and
MIMIC-CXR label tables. Anatomy label maps use small integer ids
(:class:`Anatomy`); images are in radiological convention, so the patient's
right lung is on the image's left.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

from xreal.core.errors import LabelError

NO_FINDING = "No Finding"

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

_BY_KEY = {" ".join(label.lower().split()): label for label in CHEXPERT_LABELS}


def canonical_label(name: str) -> str:
    """Return the CheXpert spelling of ``name``, matched case-insensitively.

    Underscores and repeated spaces count as single spaces, so
    ``"pleural_effusion"`` and ``"PLEURAL  EFFUSION"`` both name
    ``"Pleural Effusion"``.
    """
    if not isinstance(name, str):
        raise LabelError(f"pathology label must be a string, got {name!r}")
    key = " ".join(name.replace("_", " ").lower().split())
    try:
        return _BY_KEY[key]
    except KeyError:
        valid = ", ".join(CHEXPERT_LABELS)
        raise LabelError(f"unknown pathology label {name!r}; valid labels are: {valid}") from None


def canonical_labels(names: Iterable[str]) -> tuple[str, ...]:
    """Canonicalise a set of labels: CheXpert order, no duplicates, validated.

    An empty set means "No Finding"; "No Finding" together with a pathology
    is a contradiction and raises :class:`LabelError`.
    """
    found = {canonical_label(n) for n in names}
    if not found:
        return (NO_FINDING,)
    if NO_FINDING in found and len(found) > 1:
        others = ", ".join(label for label in CHEXPERT_LABELS if label in found and label != NO_FINDING)
        raise LabelError(f"'No Finding' cannot be combined with pathologies ({others})")
    return tuple(label for label in CHEXPERT_LABELS if label in found)


def prompt_for(labels: Iterable[str]) -> str:
    """The method's conditioning text: positive labels joined by spaces; "" for No Finding."""
    return " ".join(label for label in canonical_labels(labels) if label != NO_FINDING)


def slug(label: str) -> str:
    """A file-name-safe form of a label: ``"Pleural Effusion"`` -> ``"pleural_effusion"``."""
    return canonical_label(label).lower().replace(" ", "_")


class Anatomy(IntEnum):
    """Integer ids of an anatomy label map (the structures CheXmask segments).

    Where the heart overlaps a lung, the pixel is labelled heart.
    ``RIGHT_LUNG`` is the patient's right lung, on the image's left side.
    """

    BACKGROUND = 0
    RIGHT_LUNG = 1
    LEFT_LUNG = 2
    HEART = 3


ANATOMY_IDS: frozenset[int] = frozenset(int(a) for a in Anatomy)


# The anatomy judges compare, by name (score columns: ``dice_right_lung`` ...).
STRUCTURES = {"right lung": Anatomy.RIGHT_LUNG, "left lung": Anatomy.LEFT_LUNG, "heart": Anatomy.HEART}


def score_key(kind: str, name: str) -> str:
    """The column of a judge score: ``score_key("p", "Pleural Effusion") == "p_pleural_effusion"``."""
    return f"{kind}_{name.lower().replace(' ', '_')}"
