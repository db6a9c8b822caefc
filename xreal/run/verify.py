"""Check mounted model files before work starts: bundles, their judge sets and the weight cache.

Containers mount models and torchxrayvision weights instead of baking them in;
``xreal verify`` (the image's entrypoint runs it) proves what is mounted is what
was recorded, and names every file that is not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from xreal.core.errors import XRealError
from xreal.core.files import read_json, record_digest
from xreal.core.records import (
    bundle_digest,
    judges_autoencoder_mismatch,
    judges_digest,
    verify_bundle,
    verify_judge_set,
)
from xreal.core.weights import weights_status


def bundles_in(folder: str | os.PathLike[str]) -> list[Path]:
    """The model bundles directly inside ``folder`` (folders with a ``model_index.json``)."""
    folder = Path(folder)
    return sorted(p.parent for p in folder.glob("*/model_index.json")) if folder.is_dir() else []


def verify_files(
    models: Sequence[str | os.PathLike[str]],
    cache_dir: str | os.PathLike[str] | None = None,
    require_weights: Sequence[str] = (),
) -> list[str]:
    """Check each bundle (and its ``judges/``) and the weight cache against their recorded sha256.

    Returns one line per thing checked; raises :class:`XRealError` naming every
    problem: a damaged or unrecorded file, a missing required weight set.
    """
    checked, problems = [], []
    for folder in map(Path, models):
        record = None
        try:
            record = verify_bundle(folder)
            digest = record_digest(record)
            checked.append(f"{folder}: model bundle ok ({len(record['files'])} files, digest {digest})")
        except XRealError as exc:
            problems.append(str(exc))
        if (folder / "judges").is_dir():  # checked on its own too: its problems are named, not only its bundle's
            try:
                judges = verify_judge_set(folder / "judges")
                digest = record_digest(judges)
                checked.append(f"{folder / 'judges'}: judge set ok ({len(judges['files'])} files, digest {digest})")
                if record is not None and (mismatch := judges_autoencoder_mismatch(folder, folder / "judges")):
                    checked.append(f"warning: {mismatch}")
            except XRealError as exc:
                problems.append(str(exc))
    for row in weights_status(cache_dir):
        if row["present"] and row["matches"] is False:
            problems.append(f"{row['file']}: sha256 differs from the weight lock; the file is damaged or replaced")
        elif row["present"] and not row["recorded"]:
            hint = f"record it with `xreal weights record {row['name']}`"
            problems.append(f"{row['file']}: not in the weight lock; {hint}")
        elif row["present"]:
            checked.append(f"{row['file']}: weights ok")
        elif row["name"] in require_weights:
            problems.append(f"{row['file']}: required weights are missing; get them with `xreal weights fetch`")
    if problems:
        raise XRealError("verification failed:\n  " + "\n  ".join(problems))
    return checked


def verify_run_models(run: str | os.PathLike[str]) -> list[str]:
    """Check that the model bundle and judge set a run recorded are, whole, the ones that made it.

    The digests come from the run's ``run.json``, outside the bundle, so an
    edit anywhere in the bundle or judge set, its records included, is found.
    """
    run = Path(run)
    record = read_json(run / "run.json", "run record", keys=("identity", "model", "judges", "policy"))
    identity, checked, problems = record["identity"], [], []
    policy = record["policy"] if isinstance(record["policy"], dict) else {}
    parts = [bool(policy.get(part, {}).get("enabled", True)) for part in ("anatomy", "realism")]
    for what, pinned, compute in (
        (f"model bundle {record['model']}", identity.get("model_digest"), lambda: bundle_digest(record["model"])),
        (f"judge set {record['judges']}", identity.get("judges"), lambda: judges_digest(record["judges"], *parts)),
    ):
        try:
            digest = compute()
        except XRealError as exc:
            problems.append(str(exc))
            continue
        if digest != pinned:
            problems.append(f"{what}: digest {digest} is not the {pinned} that {run} was made with")
        else:
            checked.append(f"{what}: the one {run} was made with (digest {digest})")
    if problems:
        raise XRealError("verification failed:\n  " + "\n  ".join(problems))
    return checked
