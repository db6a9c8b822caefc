"""Pretrained torchxrayvision weights, loaded only after their sha256 matches a lock file.

torchxrayvision loads whatever file it finds under its cache folder, with no
checksum, and its DenseNet weight files are whole pickled modules: loading
one runs its code. Every loader here checks the file against the hash
recorded in a JSON lock file first, then lets torchxrayvision load it through
its own code. The first ``fetch`` of a file trusts the download (HTTPS from
torchxrayvision's GitHub releases); keep the lock under version control so
every later fetch and load is checked against it.

Downloads are not process-safe: fill the cache before starting workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from xreal.core.errors import XRealError
from xreal.core.files import atomic_path, sha256_file

LOCK_NAME = "xreal-weights.lock.json"
LOCK_VERSION = 1
PROJECT_WEIGHTS = ("densenet121-res224-all", "101-elastic", "chestx_det")
BY_HAND = "recorded by hand"

# PSPNet keeps its URL inside its constructor, not in a table; tests check it against the installed source.
PSPNET_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/pspnet_chestxray_best_model_4.pth"


class WeightsError(XRealError):
    """A weight file that is missing, unrecorded, or does not match its recorded sha256."""


@dataclass(frozen=True)
class Weights:
    """One torchxrayvision weight set: its name, role, download URL and how torchxrayvision loads it."""

    name: str
    kind: str  # "classifier", "autoencoder" or "segmenter"
    url: str
    loaded_as: str

    @property
    def file(self) -> str:
        """The file name torchxrayvision looks for in its cache folder (``os.path.basename(url)``)."""
        return self.url.rsplit("/", 1)[-1]


def import_xrv():
    """torchxrayvision, imported without letting it silence every warning in the process."""
    with warnings.catch_warnings():
        import torchxrayvision as xrv
        import torchxrayvision.baseline_models.chestx_det
    return xrv


def known_weights() -> dict[str, Weights]:
    """Every weight set this module can verify, keyed by torchxrayvision's weights name."""
    xrv = import_xrv()
    table = {}
    for name, entry in xrv.models.model_urls.items():
        if name.startswith("densenet"):  # the short aliases ("all", "nih", ...) name the same files
            table[name] = Weights(name, "classifier", entry["weights_url"], "pickled module (runs code)")
        elif name.startswith("resnet"):
            table[name] = Weights(name, "classifier", entry["weights_url"], "state dict, unrestricted unpickling")
    for name, entry in xrv.autoencoders.model_urls.items():
        table[name] = Weights(name, "autoencoder", entry["weights_url"], "state dict, weights_only")
    table["chestx_det"] = Weights("chestx_det", "segmenter", PSPNET_URL, "state dict, weights_only")
    return table


def weights_info(name: str) -> Weights:
    """The table entry for ``name``; unknown names raise a WeightsError listing the known ones."""
    table = known_weights()
    if name not in table:
        raise WeightsError(f"unknown weights {name!r}; known weights: {', '.join(table)}")
    return table[name]


def default_cache_dir() -> Path:
    """``$XREAL_WEIGHTS_DIR`` if set, else torchxrayvision's own folder (``~/.torchxrayvision/models_data``)."""
    if os.environ.get("XREAL_WEIGHTS_DIR"):
        return Path(os.environ["XREAL_WEIGHTS_DIR"]).expanduser()
    return Path(import_xrv().utils.get_cache_dir()).expanduser()


def _paths(cache_dir: str | os.PathLike[str] | None, lock: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return folder, Path(lock) if lock is not None else folder / LOCK_NAME


def read_lock(lock: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """The ``files`` table of a lock file (empty when the file does not exist)."""
    try:
        data = json.loads(Path(lock).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read weights lock {lock}: {exc}") from None
    files = data.get("files") if isinstance(data, dict) and data.get("version") == LOCK_VERSION else None
    entries = files.values() if isinstance(files, dict) else [None]
    if not all(isinstance(entry, dict) and isinstance(entry.get("sha256"), str) for entry in entries):
        raise WeightsError(f"{lock} is not a version {LOCK_VERSION} xreal weights lock")
    return files


def _record(lock: Path, file: str, sha256: str, source: str) -> None:
    files = read_lock(lock)
    files[file] = {"sha256": sha256, "source": source, "recorded": datetime.now(UTC).isoformat(timespec="seconds")}
    with atomic_path(lock) as tmp:
        tmp.write_text(json.dumps({"version": LOCK_VERSION, "files": dict(sorted(files.items()))}, indent=2) + "\n")


def _missing(weights: Weights, folder: Path) -> WeightsError:
    return WeightsError(
        f"weight file {weights.file} for {weights.name!r} is not in {folder}; "
        f"fetch it with `xreal weights fetch {weights.name} --cache-dir {folder}`"
    )


def verify_weights(
    name: str, cache_dir: str | os.PathLike[str] | None = None, lock: str | os.PathLike[str] | None = None
) -> Path:
    """The path of the weight file for ``name``, after checking its sha256 against the lock."""
    weights = weights_info(name)
    folder, lock = _paths(cache_dir, lock)
    path = folder / weights.file
    if not path.is_file():
        raise _missing(weights, folder)
    entry = read_lock(lock).get(weights.file)
    if entry is None:
        raise WeightsError(
            f"weight file {path} is not recorded in {lock}; run `xreal weights fetch {name} --cache-dir {folder}`, "
            f"or, for a file you copied by hand and trust, `xreal weights record {name} --cache-dir {folder}`"
        )
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise WeightsError(
            f"refusing to load {path}: its sha256 is {actual} but {lock} expects {entry['sha256']}; "
            "torchxrayvision weight files are pickled code, so a changed file is never loaded"
        )
    return path


def _checked(name: str, kind: str, cache_dir, lock) -> tuple[str, str]:
    weights = weights_info(name)
    if weights.kind != kind:
        raise WeightsError(f"{name!r} is {weights.kind} weights, not {kind} weights")
    return name, str(verify_weights(name, cache_dir, lock).parent)


def load_classifier(
    name: str = "densenet121-res224-all",
    cache_dir: str | os.PathLike[str] | None = None,
    lock: str | os.PathLike[str] | None = None,
):
    """A pretrained torchxrayvision classifier (DenseNet or ResNet) in eval mode, from a verified file."""
    name, folder = _checked(name, "classifier", cache_dir, lock)
    return import_xrv().models.get_model(name, cache_dir=folder).eval()


def load_autoencoder(
    name: str = "101-elastic",
    cache_dir: str | os.PathLike[str] | None = None,
    lock: str | os.PathLike[str] | None = None,
):
    """torchxrayvision's pretrained ResNet autoencoder in eval mode, from a verified file."""
    name, folder = _checked(name, "autoencoder", cache_dir, lock)
    return import_xrv().autoencoders.ResNetAE(weights=name, cache_dir=folder).eval()


def load_segmenter(
    name: str = "chestx_det",
    cache_dir: str | os.PathLike[str] | None = None,
    lock: str | os.PathLike[str] | None = None,
):
    """torchxrayvision's ChestX-Det PSPNet (14 anatomical structures) in eval mode, from a verified file."""
    name, folder = _checked(name, "segmenter", cache_dir, lock)
    return import_xrv().baseline_models.chestx_det.PSPNet(cache_dir=folder).eval()


def _urlopen(url: str) -> IO[bytes]:
    return urllib.request.urlopen(url, timeout=60)


def fetch_weights(
    names: Iterable[str] = PROJECT_WEIGHTS,
    cache_dir: str | os.PathLike[str] | None = None,
    lock: str | os.PathLike[str] | None = None,
    opener: Callable[[str], IO[bytes]] = _urlopen,
) -> list[Path]:
    """Download weight files into the cache and record their sha256; a recorded hash must match.

    A file already present and matching the lock is kept. A download goes to a
    temporary name next to its final one and is moved into place only when its
    hash is accepted. Not process-safe: run it before starting workers.
    """
    wanted = [weights_info(name) for name in names]
    folder, lock = _paths(cache_dir, lock)
    paths = []
    for weights in wanted:
        path = folder / weights.file
        expected = read_lock(lock).get(weights.file, {}).get("sha256")
        if expected and path.is_file() and sha256_file(path) == expected:
            paths.append(path)
            continue
        with atomic_path(path) as tmp:
            digest = hashlib.sha256()
            try:
                with opener(weights.url) as response, open(tmp, "wb") as out:
                    while block := response.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            except OSError as exc:
                raise WeightsError(f"could not download {weights.url}: {exc}") from None
            actual = digest.hexdigest()
            if expected and actual != expected:
                raise WeightsError(
                    f"downloaded {weights.file} from {weights.url} has sha256 {actual} but {lock} expects "
                    f"{expected}; not installed"
                )
        if not expected:
            _record(lock, weights.file, actual, weights.url)
        paths.append(path)
    return paths


def record_weights(
    names: Iterable[str],
    cache_dir: str | os.PathLike[str] | None = None,
    lock: str | os.PathLike[str] | None = None,
    replace: bool = False,
) -> dict[str, str]:
    """Record the sha256 of weight files placed in the cache by hand; returns name -> sha256.

    A file already recorded with another hash is refused unless ``replace``.
    """
    wanted = [weights_info(name) for name in names]
    folder, lock = _paths(cache_dir, lock)
    hashes = {}
    for weights in wanted:
        path = folder / weights.file
        if not path.is_file():
            raise _missing(weights, folder)
        actual = sha256_file(path)
        expected = read_lock(lock).get(weights.file, {}).get("sha256")
        if expected and actual != expected and not replace:
            raise WeightsError(
                f"{path} has sha256 {actual} but {lock} already records {expected}; "
                "pass --replace only if you trust the new file"
            )
        if actual != expected:
            _record(lock, weights.file, actual, BY_HAND)
        hashes[weights.name] = actual
    return hashes


def weights_status(
    cache_dir: str | os.PathLike[str] | None = None, lock: str | os.PathLike[str] | None = None
) -> list[dict]:
    """One row per project weight set, and per other known set found in the cache or the lock.

    Rows: name, file, present, recorded, matches (None unless present and recorded).
    """
    folder, lock = _paths(cache_dir, lock)
    recorded = read_lock(lock)
    table = known_weights()
    rows, seen = [], set()
    for name in [*PROJECT_WEIGHTS, *table]:
        weights = table[name]
        path = folder / weights.file
        present = path.is_file()
        if weights.file in seen or not (name in PROJECT_WEIGHTS or present or weights.file in recorded):
            continue
        seen.add(weights.file)
        entry = recorded.get(weights.file)
        matches = sha256_file(path) == entry["sha256"] if present and entry else None
        rows.append(
            {"name": name, "file": weights.file, "present": present, "recorded": entry is not None, "matches": matches}
        )
    return rows
