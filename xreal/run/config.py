"""What a generation run is, and every check it makes before it starts (no torch, no Prefect).

A run is pinned by content, not paths: the manifest, every file it names, the
model bundle's and the judge set's whole records, the feature bank of the
memorisation rule (when the policy enables it), the policy, the sampler
settings and the output options (:meth:`RunConfig.identity`, kept in ``run.json``). :func:`preflight`
checks all of it and the output folder without writing anything; ``xreal
generate`` calls it before Prefect starts, :func:`xreal.run.generation.open_run`
before it pins the run.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from xreal.core.errors import XRealError
from xreal.core.files import read_json, record_digest, sha256_file
from xreal.core.records import DEMO_BUNDLE, bundle_digest, judge_files, judges_digest
from xreal.core.settings import DEFAULT_SETTINGS, SamplerSettings
from xreal.judges.memorisation import bank_judges_digest, feature_bank_digest
from xreal.manifest.schema import Request, load_requests, manifest_root, pin_inputs
from xreal.run.policy import QualityPolicy

FORMATS = ("png", "dicom", "both")
LOCK_FILE = ".lock"
RUN_FILE = "run.json"
# 2: the identity pins the bundle's and judge set's whole records and the files the manifest names;
# 3: and the run's sampler settings (samples.parquet records each sample's sampler)
RUN_FORMAT = 3
PRECISIONS = ("float32", "float64", "bfloat16")


class RunConflict(XRealError):
    """The output directory belongs to a different run (another manifest, model, judges, policy or format)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run writes. Devices and batch size only decide how fast."""

    manifest: Path
    out: Path
    model: Path = DEMO_BUNDLE
    policy: QualityPolicy = field(default_factory=QualityPolicy)
    formats: str = "png"
    keep_rejected: bool = False
    healthy_twins: bool = True
    precision: str = "float32"
    root: Path | None = None  # where manifest paths may point; default the manifest's folder
    sampler: SamplerSettings = DEFAULT_SETTINGS  # the run's sampler settings; a manifest row's own columns win

    def __post_init__(self):
        self.sampler.check("the run's sampler settings")
        if self.precision not in PRECISIONS:
            raise XRealError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.formats not in FORMATS:
            raise XRealError(f"format must be one of {', '.join(FORMATS)}, got {self.formats!r}")

    @cached_property
    def judges_source(self) -> str:
        """The judge set: the policy's choice, else the one that ships with the model bundle."""
        if self.policy.judges:
            return self.policy.judges
        bundled = self.model / "judges"
        if (bundled / "judges.json").is_file():
            return str(bundled)
        raise XRealError(
            f"{self.model}: the model bundle ships no judges; name a judge set in the policy "
            "(judges: torchxrayvision, or a judge set folder)"
        )

    @cached_property
    def judge_files(self) -> dict[str, str]:
        """The judges' weight files and sha256 (torchxrayvision's checked against the lock)."""
        return judge_files(self.judges_source, self.policy.anatomy.enabled, self.policy.realism.enabled)

    @property
    def memorisation_bank(self) -> Path | None:
        """The feature bank folder the policy's memorisation rule judges with; None when the rule is off."""
        rule = self.policy.memorisation
        return Path(rule.bank) if rule.enabled and rule.bank else None

    def memorisation_digest(self) -> str | None:
        """The feature bank's digest, its files checked and its judge set this run's (None when the rule is off)."""
        if self.memorisation_bank is None:
            return None
        source = self.judges_source
        return feature_bank_digest(self.memorisation_bank, bank_judges_digest(source), source)

    @property
    def manifest_root(self) -> Path:
        return manifest_root(self.manifest, self.root)

    def identity(self, inputs: dict[str, str]) -> dict[str, Any]:
        """What makes two runs the same run: content hashes, not paths.

        ``inputs``: the files the manifest names and their sha256 (:func:`xreal.manifest.schema.pin_inputs`).
        The bundle's, the judge set's and the feature bank's files are checked against their records here.
        """
        return {
            "manifest_sha256": sha256_file(self.manifest),
            "inputs_digest": record_digest(inputs),
            "model_digest": bundle_digest(self.model),
            "judges": judges_digest(self.judges_source, self.policy.anatomy.enabled, self.policy.realism.enabled),
            "policy_digest": self.policy.digest(),
            "sampler": self.sampler.to_dict(),
            "memorisation_bank": self.memorisation_digest(),
            "formats": self.formats,
            "keep_rejected": self.keep_rejected,
            "healthy_twins": self.healthy_twins,
            "precision": self.precision,
        }


def check_out_directory(out: Path, locked: bool = True) -> None:
    """Refuse an ``--out`` no run can write: a file, a folder under a file or on a read-only disk, or (``locked``)
    one another run holds. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise RunConflict(f"--out {out} is a file, not a folder; choose a folder for the run")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise XRealError(f"--out {out}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise XRealError(f"--out {out}: {existing} is not writable (read-only disk or permissions)")
    if locked and (out / LOCK_FILE).is_file():
        with open(out / LOCK_FILE) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = handle.read().strip() or "another process"
                raise RunConflict(
                    f"{out} is being written by another run ({holder}); wait for it or use another --out"
                ) from None
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Preflight:
    """What :func:`preflight` found: the run's requests (their files pinned), identity, and existing record."""

    requests: list[Request]
    inputs: dict[str, str]
    identity: dict[str, Any]
    record: dict[str, Any] | None


def preflight(config: RunConfig, check_lock: bool = False) -> Preflight:
    """Every check a run makes before it starts, writing nothing: the output folder, the manifest and the files
    it names, the bundle's, judge set's and feature bank's checksums (the bank built with the run's judge set),
    and (for an existing run) that it is the same run.

    ``xreal generate`` calls it before Prefect starts, so a refusal takes about a second.
    """
    check_out_directory(config.out, locked=check_lock)
    requests, inputs = pin_inputs(load_requests(config.manifest, config.root), config.manifest_root)
    for request in requests:  # a row's steps or anatomy steps against the run's sampler settings
        request.settings(config.sampler).check(f"{config.manifest}: request {request.request_id!r}")
    identity = config.identity(inputs)
    path = config.out / RUN_FILE
    record = None
    if path.is_file():
        record = read_json(path, "run record (delete the run directory or use another --out)", keys=("run_id",))
        if record.get("run_format") != RUN_FORMAT:
            raise RunConflict(
                f"{config.out} holds a run of another xreal run format ({record.get('run_format')!r}, this xreal "
                f"writes {RUN_FORMAT}); finish it with the xreal that started it, or use a new --out"
            )
        pinned = record.get("identity") if isinstance(record.get("identity"), dict) else {}
        if isinstance(pinned.get("sampler"), dict):  # a setting added since the run started ran at its default
            pinned = {**pinned, "sampler": {**DEFAULT_SETTINGS.to_dict(), **pinned["sampler"]}}
        changed = [key for key, value in identity.items() if pinned.get(key) != value]
        if changed:
            details = ""
            if "inputs_digest" in changed and isinstance(record.get("inputs"), dict):
                before = record["inputs"]
                moved = sorted(k for k in before.keys() | inputs.keys() if before.get(k) != inputs.get(k))
                details = f" (files that differ: {', '.join(moved[:10])}{' ...' if len(moved) > 10 else ''})"
            if "sampler" in changed and isinstance(pinned.get("sampler"), dict):
                was, now = pinned["sampler"], identity["sampler"]
                moved = [f"{k} {was.get(k)} -> {now[k]}" for k in now if was.get(k) != now[k]]
                details += f" (sampler settings: {', '.join(moved)})"
            raise RunConflict(
                f"{config.out} holds a run of a different {', '.join(changed)}{details}; it was left untouched. "
                "Use a new --out directory for the new run (or rerun with the original settings and files to resume)."
            )
    elif config.out.exists() and any(p.name != LOCK_FILE for p in config.out.iterdir()):
        raise RunConflict(f"{config.out} exists and is not an xreal run directory; choose an empty or new --out")
    return Preflight(requests, inputs, identity, record)
