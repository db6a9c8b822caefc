"""The quality policy: which judges run, their thresholds, and how hard to retry for a short request.

A policy is a small YAML file; every key is optional and defaults are below
(``xreal generate --policy FILE``; ``manifests/README.md`` documents it)::

    version: 1
    judges: null            # a phantom judge set folder or "torchxrayvision"; null: the model bundle's own
    sanity:     {enabled: true, min_std: 0.02, max_saturated: 0.25}
    classifier: {enabled: true, present: 0.5, absent: 0.5, check_absent: true,
                 labels: {Lung Lesion: {present: 0.4}}}    # per-label overrides
    anatomy:    {enabled: true, min_dice: {right lung: 0.7, left lung: 0.7, heart: 0.6}}
    realism:    {enabled: true, max_distance: null}       # null: the judge set's calibrated threshold
    memorisation: {enabled: false, bank: null, max_similarity: null}  # bank: a feature bank folder;
                                                          # null max_similarity: the bank's tau
    retries:    {max_rounds: 3}                           # 1 = no redraws

Classifier scores are calibrated so that 0.5 is each label's operating point
(torchxrayvision's ``op_threshs``): a requested label must score at least
``present``; every other label the classifier knows must stay below ``absent``,
except broader labels a requested one implies (Lung Opacity under
Consolidation, Enlarged Cardiomediastinum under Cardiomegaly).

The memorisation rule (off by default) rejects a likely copy of a training
image: one whose cosine similarity to the nearest image of a feature bank
(:mod:`xreal.judges.memorisation`, ``xreal evaluate bank``) reaches
``max_similarity``, by default the bank's data-driven tau. It catches exact and
near-exact copies, not every near-duplicate: an audit, not a privacy guarantee.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xreal.core.errors import XRealError
from xreal.core.labels import NO_FINDING, STRUCTURES, canonical_label, score_key

POLICY_VERSION = 1

IMPLIED_BY = {
    "Lung Opacity": {"Edema", "Consolidation", "Pneumonia", "Atelectasis", "Lung Lesion"},
    "Enlarged Cardiomediastinum": {"Cardiomegaly"},
}


class PolicyError(XRealError):
    """A policy file that cannot be read or holds an unknown key or a bad value."""


@dataclass(frozen=True)
class SanityRule:
    enabled: bool = True
    min_std: float = 0.02
    max_saturated: float = 0.25


@dataclass(frozen=True)
class LabelThresholds:
    present: float | None = None
    absent: float | None = None


@dataclass(frozen=True)
class ClassifierRule:
    enabled: bool = True
    present: float = 0.5
    absent: float = 0.5
    check_absent: bool = True
    labels: dict[str, LabelThresholds] = field(default_factory=dict)

    def present_for(self, label: str) -> float:
        override = self.labels.get(label)
        return self.present if override is None or override.present is None else override.present

    def absent_for(self, label: str) -> float:
        override = self.labels.get(label)
        return self.absent if override is None or override.absent is None else override.absent


@dataclass(frozen=True)
class AnatomyRule:
    enabled: bool = True
    min_dice: dict[str, float] = field(default_factory=lambda: {"right lung": 0.7, "left lung": 0.7, "heart": 0.6})


@dataclass(frozen=True)
class RealismRule:
    enabled: bool = True
    max_distance: float | None = None


@dataclass(frozen=True)
class MemorisationRule:
    enabled: bool = False
    bank: str | None = None  # a feature bank folder
    max_similarity: float | None = None  # None: the bank's tau

    def __post_init__(self):
        if self.enabled and not self.bank:
            raise PolicyError(
                "memorisation.bank: the memorisation rule is enabled but names no feature bank; set it to a bank "
                "folder (build one with `xreal evaluate bank TRAINING_SET --out DIR`)"
            )


@dataclass(frozen=True)
class Retries:
    max_rounds: int = 3


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str


@dataclass(frozen=True)
class QualityPolicy:
    """Which judges decide, with what thresholds; see the module docstring for the YAML form."""

    judges: str | None = None
    sanity: SanityRule = SanityRule()
    classifier: ClassifierRule = ClassifierRule()
    anatomy: AnatomyRule = AnatomyRule()
    realism: RealismRule = RealismRule()
    memorisation: MemorisationRule = MemorisationRule()
    retries: Retries = Retries()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str = "policy") -> QualityPolicy:
        raw = dict(raw or {})
        version = raw.pop("version", POLICY_VERSION)
        if version != POLICY_VERSION:
            raise PolicyError(f"{where}: version {version!r} is not supported (this xreal reads version 1)")
        try:
            return _build(cls, raw, "")
        except PolicyError as exc:
            raise PolicyError(f"{where}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> QualityPolicy:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise PolicyError(f"{path}: cannot read the policy ({exc})") from None
        if raw is not None and not isinstance(raw, dict):
            raise PolicyError(f"{path}: a policy is a mapping of sections, got {type(raw).__name__}")
        return cls.from_dict(raw, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The policy as a mapping :meth:`from_dict` reads back; the memorisation section only when it is not the
        default, so policies written before it existed keep their digest (and their runs resume)."""
        values = dataclasses.asdict(self)
        if self.memorisation == MemorisationRule():
            del values["memorisation"]
        return {"version": POLICY_VERSION, **values}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def decide(
        self,
        scores: Mapping[str, Any],
        labels: Sequence[str],
        judge_labels: Sequence[str],
        realism_threshold=None,
        memorisation_threshold=None,
    ) -> Decision:
        """Accept or reject one image from its judge scores and the labels it was asked to show.

        ``scores`` are floats, except ``memorisation_nearest``: the id of the
        training image nearest to it, which a near-copy reason names.
        ``realism_threshold`` and ``memorisation_threshold`` (a bank's tau) apply
        where the policy sets no limit of its own.
        """
        failures: list[str] = []
        notes: list[str] = []
        if self.sanity.enabled:
            if scores["sanity_nonfinite"] > 0:
                failures.append("image holds NaN or infinite pixels")
            if scores["sanity_std"] < self.sanity.min_std:
                failures.append(f"blank or constant image (std {scores['sanity_std']:.3f} < {self.sanity.min_std})")
            if scores["sanity_saturated"] > self.sanity.max_saturated:
                failures.append(
                    f"saturated ({scores['sanity_saturated']:.0%} of pixels clipped > {self.sanity.max_saturated:.0%})"
                )
        if self.classifier.enabled:
            failures += self._classifier_failures(scores, labels, judge_labels, notes)
        if self.anatomy.enabled and any(score_key("dice", s) in scores for s in STRUCTURES):
            for structure, minimum in self.anatomy.min_dice.items():
                value = scores.get(score_key("dice", structure), math.nan)
                if math.isnan(value):
                    notes.append(f"{structure} not compared (mostly under the pathology mask)")
                elif value < minimum:
                    failures.append(f"{structure} Dice {value:.2f} < {minimum}")
        if self.realism.enabled and "realism_distance" in scores:
            limit = self.realism.max_distance if self.realism.max_distance is not None else realism_threshold
            if limit is not None and not scores["realism_distance"] <= limit:
                failures.append(f"unlike real images (realism distance {scores['realism_distance']:.3g} > {limit:.3g})")
        if self.memorisation.enabled and "memorisation_similarity" in scores:
            limit = self.memorisation.max_similarity
            limit = limit if limit is not None else memorisation_threshold
            similarity = scores["memorisation_similarity"]
            if limit is not None and similarity >= limit:
                nearest = scores.get("memorisation_nearest")
                image = f"training image {nearest}" if nearest is not None else "a training image"
                failures.append(f"near copy of {image} (similarity {similarity:.3f} >= {limit:.3f})")
        if failures:
            return Decision(False, "; ".join(failures))
        return Decision(True, "; ".join(["passed", *notes]))

    def _classifier_failures(self, scores, labels, judge_labels, notes) -> list[str]:
        failures = []
        requested = {label for label in labels if label != NO_FINDING}
        known = set(judge_labels)
        for label in sorted(requested):
            if label not in known:
                notes.append(f"{label} not judged (the classifier does not know it)")
                continue
            p, need = scores[score_key("p", label)], self.classifier.present_for(label)
            if not p >= need:
                failures.append(f"{label} not detected ({p:.2f} < {need})")
        if self.classifier.check_absent:
            for label in sorted(known - requested):
                if IMPLIED_BY.get(label, set()) & requested:
                    continue
                p, limit = scores[score_key("p", label)], self.classifier.absent_for(label)
                if not p < limit:
                    failures.append(f"unrequested {label} detected ({p:.2f} >= {limit})")
        return failures


def _build(kind, raw: Mapping[str, Any], where: str):
    """Build a policy dataclass from a mapping, naming any unknown key or wrong value."""
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise PolicyError(
            f"{where + ': ' if where else ''}unknown key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}"
        )
    values = {}
    for name, value in raw.items():
        default = getattr(kind(), name)
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise PolicyError(f"{key}: expected a mapping, got {value!r}")
            values[name] = _build(type(default), value, key)
        elif name == "labels":
            values[name] = _label_overrides(value, key)
        elif name == "min_dice":
            values[name] = _dice_minimums(value, key)
        else:
            values[name] = _scalar(value, default, name, key)
    return kind(**values)


def _scalar(value: Any, default: Any, name: str, key: str):
    if name == "judges":
        if value is not None and not isinstance(value, str):
            raise PolicyError(f"{key}: expected a judge set folder or 'torchxrayvision', got {value!r}")
        return value
    if name == "bank":
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise PolicyError(f"{key}: expected a feature bank folder, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise PolicyError(f"{key}: expected true or false, got {value!r}")
        return value
    if name == "max_rounds":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 20:
            raise PolicyError(f"{key}: expected a whole number from 1 to 20, got {value!r}")
        return value
    if value is None and default is None:  # optional thresholds
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise PolicyError(f"{key}: expected a non-negative number, got {value!r}")
    if name in ("present", "absent", "max_saturated", "max_similarity") and value > 1:
        raise PolicyError(f"{key}: expected a number in [0, 1], got {value!r}")
    return float(value)


def _label_overrides(value: Any, key: str) -> dict[str, LabelThresholds]:
    if not isinstance(value, dict):
        raise PolicyError(f"{key}: expected a mapping of label -> thresholds, got {value!r}")
    overrides = {}
    for label, thresholds in value.items():
        try:
            name = canonical_label(str(label))
        except XRealError as exc:
            raise PolicyError(f"{key}: {exc}") from None
        if not isinstance(thresholds, dict):
            raise PolicyError(f"{key}.{label}: expected a mapping with present and/or absent, got {thresholds!r}")
        overrides[name] = _build(LabelThresholds, thresholds, f"{key}.{label}")
    return overrides


def _dice_minimums(value: Any, key: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise PolicyError(f"{key}: expected a mapping of structure -> minimum Dice, got {value!r}")
    unknown = sorted(set(value) - set(STRUCTURES))
    if unknown:
        raise PolicyError(f"{key}: unknown structure(s) {', '.join(unknown)}; known: {', '.join(STRUCTURES)}")
    return {name: _scalar(v, 0.0, "present", f"{key}.{name}") for name, v in value.items()}
