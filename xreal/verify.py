"""Check mounted model files before work starts: bundles, their judge sets and the weight cache.

Containers mount models and torchxrayvision weights instead of baking them in;
``xreal verify`` (the image's entrypoint runs it) proves what is mounted is what
was recorded, and names every file that is not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from xreal.errors import XRealError
from xreal.judging import verify_judge_set
from xreal.model import verify_bundle
from xreal.weights import weights_status


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
        try:
            record = verify_bundle(folder)
            checked.append(f"{folder}: model bundle ok ({len(record['files'])} files)")
            if (folder / "judges").is_dir():
                judges = verify_judge_set(folder / "judges")
                checked.append(f"{folder / 'judges'}: judge set ok ({len(judges['files'])} files)")
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
