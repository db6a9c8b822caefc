"""The records that pin a model bundle and a judge set: read, check every file against its sha256, digest.

A bundle's ``xreal_bundle.json`` and a judge set's ``judges.json`` list every
file with its sha256, besides what the files mean (labels, sizes, thresholds).
The digest of such a record pins both, so a run and a dataset can name exactly
which model and judges made it. Nothing here imports torch: a run checks
these before it loads any model (:func:`xreal.run.config.preflight`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from xreal.core.errors import XRealError
from xreal.core.files import checksum_problems, read_json, record_digest, sha256_file, write_json

BUNDLE_FILE = "xreal_bundle.json"
MODEL_CARD = "MODEL_CARD.md"
DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "demo"
JUDGES_FILE = "judges.json"


class JudgeError(XRealError):
    """A judge set that is missing, damaged or does not fit the images."""


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --- model bundles ------------------------------------------------------------------


def read_bundle_record(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / BUNDLE_FILE
    if not path.is_file():
        raise XRealError(f"{folder}: not an xreal model bundle (no {BUNDLE_FILE})")
    return read_json(path, "model bundle record", keys=("files", "preset", "image_size"))


def bundle_files(folder: Path) -> list[Path]:
    """The files a bundle's checksums cover: everything (its judge set included) but its record and model card."""
    return sorted(
        p
        for p in Path(folder).rglob("*")
        if p.is_file() and p.name not in (BUNDLE_FILE, MODEL_CARD) and not p.name.startswith(".")
    )


def record_bundle_files(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Record the sha256 of every file of a bundle again (after its judge set was retrained into it)."""
    folder = Path(folder)
    record = read_bundle_record(folder)
    record["files"] = {p.relative_to(folder).as_posix(): sha256_file(p) for p in bundle_files(folder)}
    write_json(folder / BUNDLE_FILE, record)
    return record


def verify_bundle(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file of a bundle against its recorded sha256, and that it holds no file the record does not
    list; return the record."""
    folder = Path(folder)
    record = read_bundle_record(folder)
    problems = checksum_problems(folder, record["files"])
    if isinstance(record["files"], dict):
        unrecorded = [p.relative_to(folder).as_posix() for p in bundle_files(folder)]
        unrecorded = [name for name in unrecorded if name not in record["files"]]
        if unrecorded:
            problems.append(
                f"{_few(unrecorded)} {'is' if len(unrecorded) == 1 else 'are'} not in the bundle's record (added "
                "after it was saved: remove them; keep a judge set outside the bundle and name it in the policy, "
                "or train it into the bundle with `xreal train judges --out BUNDLE/judges`)"
            )
    if problems:
        raise XRealError(f"{folder}: model bundle is damaged: {'; '.join(problems)}")
    return record


def bundle_digest(folder: str | os.PathLike[str]) -> str:
    """A digest of a bundle's whole content: its record (labels, sizes, training, licence) with every file's
    sha256, every file checked first. Datasets record it, so a bundle can be checked from outside itself."""
    return record_digest(verify_bundle(folder))


# --- judge sets ---------------------------------------------------------------------


JUDGE_PARTS = ("classifier", "segmenter", "realism")
OPTIONAL_JUDGE_PARTS = ("features",)  # a feature network of its own (else the classifier's features)


def read_judges_record(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / JUDGES_FILE
    if not path.is_file():
        raise JudgeError(f"{folder}: not a judge set (no {JUDGES_FILE})")
    return read_json(path, "judge set record", keys=("files", *JUDGE_PARTS))


def verify_judge_set(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file of a phantom judge set against its recorded sha256; return the record.

    Every weight file the record names must be one of its checksummed files: a
    record pointing a judge at an unlisted file is refused.
    """
    record = read_judges_record(folder)
    problems = checksum_problems(folder, record["files"])
    for part in (*JUDGE_PARTS, *(p for p in OPTIONAL_JUDGE_PARTS if p in record)):
        spec = record[part]
        name = spec.get("file") if isinstance(spec, dict) else None
        if not isinstance(name, str) or name not in record["files"]:
            problems.append(f"{part} file {name!r} is not among the checksummed files")
    members = record["classifier"].get("members") if isinstance(record["classifier"], dict) else None
    if members is not None and not (type(members) is int and members > 0):  # a checkpoint ensemble's size
        problems.append(f"{JUDGES_FILE}: classifier 'members' must be a whole number above 0: {members!r}")
    if problems:
        raise JudgeError(f"{folder}: judge set is damaged: {'; '.join(problems)}; refusing to use it")
    return record


def autoencoder_weights(bundle: str | os.PathLike[str]) -> tuple[str, str] | None:
    """A bundle's autoencoder weight file, relative to it, and its recorded sha256 (None if it records none)."""
    files = read_bundle_record(bundle)["files"]
    found = sorted(
        (name, sha) for name, sha in files.items() if name.startswith("vae/") and name.endswith(".safetensors")
    )
    return found[0] if found else None


def judges_autoencoder_mismatch(bundle: str | os.PathLike[str], judges: str | os.PathLike[str]) -> str | None:
    """Why the judge set ``judges`` does not fit ``bundle``: it was trained through another autoencoder than the
    bundle's (see ``xreal train judges --autoencoder``). None when it fits, or was not trained through one."""
    through = read_judges_record(judges).get("through_autoencoder")
    if not isinstance(through, dict) or not through.get("vae_sha256"):
        return None
    weights = autoencoder_weights(bundle)
    if weights is not None and weights[1] == through["vae_sha256"]:
        return None
    has = f"its autoencoder's sha256 is {weights[1][:12]}" if weights else "it records no autoencoder weights"
    return (
        f"{judges} was trained through another autoencoder than {bundle}'s (vae sha256 "
        f"{str(through['vae_sha256'])[:12]}, from {through.get('bundle', 'an unnamed bundle')}; {has}): it may read "
        f"that decoder's texture as findings; retrain it with `xreal train judges --autoencoder {bundle}` "
        "(the demo bundle's: `make demo-judges`)"
    )


def judges_digest(source: str | os.PathLike[str], anatomy: bool = True, realism: bool = True) -> str:
    """A digest of everything that decides how a judge set scores: for a judge set folder, its whole record
    (labels, thresholds, operating points, architecture and every file's sha256); for torchxrayvision, the
    weight files and the torchxrayvision version (whose code holds the operating points)."""
    if str(source) == "torchxrayvision":
        from importlib import metadata

        files = xrv_judge_files(anatomy=anatomy, realism=realism)
        return record_digest({"files": files, "torchxrayvision": metadata.version("torchxrayvision")})
    return record_digest(verify_judge_set(source))


XRV_CLASSIFIER = "densenet121-res224-all"
XRV_SEGMENTER = "chestx_det"
XRV_AUTOENCODER = "101-elastic"


def xrv_weight_names(classifier: str, anatomy: bool, realism: bool) -> list[str]:
    """The torchxrayvision weights a judge set needs: the classifier, plus what anatomy and realism use."""
    return [classifier] + [XRV_SEGMENTER] * anatomy + [XRV_AUTOENCODER] * realism


def xrv_judge_files(
    classifier: str = XRV_CLASSIFIER,
    anatomy: bool = True,
    realism: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    lock: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """The weight files torchxrayvision judges need and their sha256, each checked against the lock."""
    from xreal.core import weights

    names = xrv_weight_names(classifier, anatomy, realism)
    return {p.name: sha256_file(p) for p in (weights.verify_weights(n, cache_dir=cache_dir, lock=lock) for n in names)}


def judge_files(source: str | os.PathLike[str], anatomy: bool = True, realism: bool = True) -> dict[str, str]:
    """The weight files of the judge set :func:`load_judges` would load, with their sha256."""
    if str(source) == "torchxrayvision":
        return xrv_judge_files(anatomy=anatomy, realism=realism)
    return read_judges_record(source)["files"]
