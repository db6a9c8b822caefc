"""The memorisation judge: is a generated image a near copy of a training image?

A *feature bank* holds the judge set's features (:meth:`JudgeSet.features`: ``features2``,
the FXD convention) of every training image, L2-normalised, with the image ids and
a data-driven threshold tau (EchoNet-Synthetic's recipe): the 95th percentile,
over training images, of each one's highest cosine similarity to any held-out
real image. A generated image whose highest similarity to a training image
reaches tau is more like that image than real images of other patients usually
are: a likely copy. Such a filter catches exact and near-exact copies and misses
some near-duplicates: it is an audit, not a privacy guarantee.

A bank is a folder: ``bank.safetensors`` (features, float16), ``ids.json``
(image ids, in the features' order) and ``bank.json`` (tau, counts, where the
images came from, the judge set's digest and every file's sha256), written
last. Build one with :func:`build_feature_bank` (``xreal evaluate bank``); a
run's policy names it (``memorisation.bank``) and :func:`load_feature_bank`
checks every file before it is used. Reading and checking a bank needs no torch.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from xreal.core.errors import XRealError
from xreal.core.files import (
    atomic_path,
    checksum_problems,
    read_json,
    record_digest,
    resolve_under,
    sha256_file,
    write_json,
)
from xreal.core.images import read_image
from xreal.core.records import judges_digest as judge_set_digest

BANK_FORMAT = 1
BANK_RECORD = "bank.json"
BANK_FEATURES = "bank.safetensors"
BANK_IDS = "ids.json"
PERCENTILE = 95.0
HELD_OUT_SPLITS = ("validate", "test")
FAISS_MIN_BANK = 50_000  # above this many bank rows, faiss (when importable) searches instead of numpy


class FeatureBankError(XRealError):
    """A feature bank that is missing, damaged, or built with another judge set; or one that cannot be built."""


# --- nearest neighbours -------------------------------------------------------------


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (an all-zero row stays zero)."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0).astype(np.float32)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def nearest_similarity(query: np.ndarray, bank: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``query``, the index of its most similar row of ``bank`` and their cosine similarity.

    Both are ``[N, D]`` and L2-normalised by the caller (:func:`normalise`), so
    the inner product is the cosine. Products run in float32 blocks of at most
    ``chunk`` x ``chunk``, never the whole matrix; a bank over
    :data:`FAISS_MIN_BANK` rows is searched with ``faiss.IndexFlatIP`` when faiss
    is importable. Ties go to the lower bank index. Returns ``(int64 [N], float32 [N])``.
    """
    query = np.ascontiguousarray(query, dtype=np.float32)
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"query {query.shape} and bank {bank.shape} must be [N, D] with the same D")
    if len(bank) == 0:
        raise ValueError("the bank is empty: there is no nearest row")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    index = np.zeros(len(query), dtype=np.int64)
    similarity = np.full(len(query), -np.inf, dtype=np.float32)
    faiss = _faiss() if len(bank) > FAISS_MIN_BANK else None
    if faiss is not None:
        search = faiss.IndexFlatIP(bank.shape[1])
        search.add(bank)
        for start in range(0, len(query), chunk):
            found, rows = search.search(query[start : start + chunk], 1)
            similarity[start : start + chunk], index[start : start + chunk] = found[:, 0], rows[:, 0]
        return index, similarity
    for start in range(0, len(query), chunk):
        block = query[start : start + chunk]
        best, where = similarity[start : start + chunk], index[start : start + chunk]  # views: updated in place
        for offset in range(0, len(bank), chunk):
            products = block @ bank[offset : offset + chunk].T
            top = products.argmax(axis=1)
            value = products[np.arange(len(block)), top]
            better = value > best
            best[better], where[better] = value[better], top[better] + offset
    return index, similarity


# --- the bank -----------------------------------------------------------------------


@dataclass
class FeatureBank:
    """A checked feature bank, loaded: normalised features of training images, their ids, and tau."""

    folder: Path
    record: dict[str, Any]
    features: np.ndarray  # float32 [N, D], unit rows
    image_ids: list[str] = field(repr=False)

    @property
    def tau(self) -> float:
        """The threshold: the bank's 95th percentile of training-to-held-out nearest similarity."""
        return float(self.record["tau"])

    @cached_property
    def digest(self) -> str:
        """Digest of ``bank.json``'s whole record, which pins every file by sha256: runs record it."""
        return record_digest(self.record)

    def __len__(self) -> int:
        return len(self.image_ids)

    def nearest(self, features: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The id of the most similar training image and the cosine similarity, for each row of ``features``."""
        index, similarity = nearest_similarity(normalise(features), self.features)
        return [self.image_ids[i] for i in index], similarity

    def provenance(self) -> dict[str, Any]:
        """What a run records about the bank it judged with (:func:`bank_provenance`)."""
        return _provenance(self.folder, self.record)


def _missing_bank(folder: Path) -> FeatureBankError:
    return FeatureBankError(
        f"no feature bank at {folder}; build one with `xreal evaluate bank TRAINING_SET --out {folder}`"
    )


def bank_files(folder: Path) -> list[str]:
    """Every file under a bank folder but its record and hidden files, relative, sorted."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != BANK_RECORD and not p.name.startswith(".")
    )


def verify_feature_bank(
    folder: str | os.PathLike[str], judges_digest: str | None = None, judges_source: str | None = None
) -> dict[str, Any]:
    """Check a bank without loading it: its record, every file against its sha256, no unlisted file, and (given
    ``judges_digest``, see :func:`bank_judges_digest`) that it was built with that judge set, which
    ``judges_source`` names in the error. Returns the record."""
    folder = Path(folder)
    if not (folder / BANK_RECORD).is_file():
        raise _missing_bank(folder)
    record = read_json(
        folder / BANK_RECORD,
        "feature bank record (rebuild it with `xreal evaluate bank`)",
        keys=("bank_format", "tau", "counts", "judges", "feature_size", "files"),
    )
    if record["bank_format"] != BANK_FORMAT:
        raise FeatureBankError(
            f"{folder}: feature bank format {record['bank_format']!r}; this xreal reads {BANK_FORMAT}: rebuild it"
        )
    problems = checksum_problems(folder, record["files"])
    if isinstance(record["files"], dict):
        for name in (BANK_FEATURES, BANK_IDS):
            if name not in record["files"]:
                problems.append(f"its record does not list {name}")
        unlisted = [name for name in bank_files(folder) if name not in record["files"]]
        problems += [f"{name} is not in the bank's record (added after it was built: remove it)" for name in unlisted]
    if problems:
        raise FeatureBankError(f"{folder}: feature bank is damaged: {'; '.join(problems)}; refusing to use it")
    built = record["judges"] if isinstance(record["judges"], dict) else {}
    if judges_digest is not None and built.get("digest") != judges_digest:
        wanted = f"{judges_source!r} " if judges_source is not None else ""
        raise FeatureBankError(
            f"{folder}: the feature bank was built with the judge set {built.get('source')!r} (digest "
            f"{str(built.get('digest'))[:12]}), not with the judge set {wanted}that judges here (digest "
            f"{judges_digest[:12]}); rebuild the bank with it (`xreal evaluate bank TRAINING_SET --judges "
            f"{judges_source or 'SRC'} --out DIR`)"
        )
    return record


def _provenance(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": str(folder),
        "digest": record_digest(record),
        "tau": record["tau"],
        "count": record["counts"]["bank"],
    }


def bank_provenance(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What a run records about a bank (path, digest, tau, count of training images), the bank checked first."""
    return _provenance(Path(folder), verify_feature_bank(folder))


def feature_bank_digest(
    folder: str | os.PathLike[str], judges_digest: str | None = None, judges_source: str | None = None
) -> str:
    """The digest of a checked bank's record (:attr:`FeatureBank.digest`), without loading its features."""
    return record_digest(verify_feature_bank(folder, judges_digest, judges_source))


def bank_judges_digest(source: str | os.PathLike[str]) -> str:
    """The digest of what a bank depends on in a judge set: its classifier (for a judge set folder, the whole
    record, as :func:`xreal.core.records.judges_digest`; for torchxrayvision, the classifier's weights)."""
    return judge_set_digest(source, anatomy=False, realism=False)


def load_feature_bank(
    folder: str | os.PathLike[str], judges_digest: str | None = None, judges_source: str | None = None
) -> FeatureBank:
    """Load a bank, checked first (:func:`verify_feature_bank`, whose arguments these are)."""
    folder = Path(folder)
    record = verify_feature_bank(folder, judges_digest, judges_source)
    try:
        features = load_file(folder / BANK_FEATURES)["features"]
        ids = json.loads((folder / BANK_IDS).read_text())
    except (OSError, KeyError, ValueError) as exc:  # checksums matched, so the builder wrote something unusable
        raise FeatureBankError(f"{folder}: unreadable feature bank ({type(exc).__name__}: {exc}); rebuild it") from None
    count, size = record["counts"].get("bank"), record["feature_size"]
    if features.shape != (count, size) or not isinstance(ids, list) or len(ids) != count:
        raise FeatureBankError(
            f"{folder}: feature bank holds features {features.shape} and {len(ids)} ids, its record says "
            f"{count} x {size}; rebuild it"
        )
    return FeatureBank(folder, record, normalise(features.astype(np.float32)), [str(i) for i in ids])


# --- building -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Images:
    """Rows of a training index to embed: where they are, and what to call them in errors."""

    folder: Path
    index: Path
    rows: Any  # pandas DataFrame, with the index's row numbers as its index

    def batches(self, batch_size: int):
        """Images ``[B, H, W]`` in row order, ``batch_size`` at a time; a bad file is refused naming its row."""
        for start in range(0, len(self.rows), batch_size):
            chunk = self.rows.iloc[start : start + batch_size]
            images = []
            for number, row in chunk.iterrows():
                where = f"{self.index} row {number} (image_id {row.image_id!r})"
                try:
                    image = read_image(resolve_under(self.folder, row.image_path))
                except XRealError as exc:
                    raise FeatureBankError(f"{where}: {exc}") from None
                if image.shape != (row.height, row.width):
                    raise FeatureBankError(
                        f"{where}: {row.image_path} is {image.shape[0]}x{image.shape[1]}, "
                        f"the index says {row.height}x{row.width}"
                    )
                images.append(image)
            yield np.stack(images)


def _index_path(folder: Path, what: str) -> Path:
    from xreal.data.training_index import INDEX_FILE

    path = folder / INDEX_FILE
    if not path.is_file():
        raise FeatureBankError(
            f"{folder}: no {INDEX_FILE}, so not a training set ({what}); write one with `xreal ingest ...` "
            "or `xreal phantom`"
        )
    return path


def _read_index(path: Path):
    from xreal.data.training_index import read_training_index

    return read_training_index(path).reset_index(drop=True)


def _image_size(images: _Images, what: str) -> list[int]:
    """The one image size of a set of rows; mixed sizes are refused, naming two rows that differ."""
    sizes = images.rows[["height", "width"]].drop_duplicates()
    if len(sizes) > 1:
        (a, first), (b, second) = list(sizes.iterrows())[:2]
        raise FeatureBankError(
            f"{images.index}: {what} of mixed sizes (row {a} is {first.height}x{first.width}, row {b} is "
            f"{second.height}x{second.width}); a bank is built from images of one size (resize them to one first)"
        )
    return [int(sizes.iloc[0].height), int(sizes.iloc[0].width)]


def _embed(judges, images: _Images, batch_size: int, bar) -> np.ndarray:
    """Normalised features of every image, in row order, as stored (float16), then back to float32."""
    out = np.zeros((len(images.rows), judges.feature_size), dtype=np.float16)
    done = 0
    for batch in images.batches(batch_size):
        out[done : done + len(batch)] = normalise(judges.features(batch)).astype(np.float16)
        done += len(batch)
        bar.update(len(batch))
    return out


def build_feature_bank(
    training_set: str | os.PathLike[str],
    judges_source: str,
    out: str | os.PathLike[str],
    held_out: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> Path:
    """Embed a training set's images into a feature bank at ``out`` and fit its threshold tau; return ``out``.

    The bank holds the training images: every row of the training set when
    ``held_out`` (another training set folder, all of whose rows are the
    held-out real images) is given; else its ``split == train`` rows, its
    ``validate`` and ``test`` rows being the held-out images. Images are read
    ``batch_size`` at a time. tau is the 95th percentile, over bank images, of
    each one's highest cosine similarity to any held-out image. The files are
    written atomically, ``bank.json`` last.
    """
    from tqdm.auto import tqdm

    from xreal.judges.judging import load_judges

    if batch_size < 1:
        raise FeatureBankError(f"batch size must be at least 1, got {batch_size}")
    training_set, out = Path(training_set), Path(out)
    index_path = _index_path(training_set, "the training images")
    frame = _read_index(index_path)
    if held_out is None:
        held_path = index_path
        bank_rows = frame[frame.split == "train"]
        held_rows = frame[frame.split.isin(HELD_OUT_SPLITS)]
        held = _Images(training_set, index_path, held_rows)
        if len(held_rows) == 0:
            raise FeatureBankError(
                f"{index_path}: no rows with split validate or test, so no held-out real images to fit tau with; "
                "give a held-out training set (--held-out INDEX_DIR)"
            )
    else:
        held_path = _index_path(Path(held_out), "the held-out images")
        held = _Images(Path(held_out), held_path, _read_index(held_path))
        bank_rows = frame
        if len(held.rows) == 0:
            raise FeatureBankError(f"{held_path}: no rows, so no held-out real images to fit tau with")
    if len(bank_rows) == 0:
        raise FeatureBankError(f"{index_path}: no training images for the bank (no rows with split train)")
    bank = _Images(training_set, index_path, bank_rows)
    image_size = _image_size(bank, "training images")
    _image_size(held, "held-out images")
    if out.exists() and not out.is_dir():
        raise FeatureBankError(f"--out {out} is a file; choose a folder for the feature bank")
    if out.is_dir():
        foreign = [name for name in bank_files(out) if name not in (BANK_FEATURES, BANK_IDS)]
        if foreign:
            raise FeatureBankError(
                f"--out {out} holds files that are not a feature bank's ({', '.join(foreign[:5])}); "
                "choose an empty or new folder"
            )

    judges = load_judges(judges_source, anatomy=False, realism=False)
    bar = tqdm(total=len(held.rows) + len(bank.rows), desc="feature bank", unit="img", disable=not progress)
    held_features = _embed(judges, held, batch_size, bar).astype(np.float32)
    features = np.zeros((len(bank.rows), judges.feature_size), dtype=np.float16)
    nearest = np.zeros(len(bank.rows), dtype=np.float32)
    done = 0
    for batch in bank.batches(batch_size):
        stored = normalise(judges.features(batch)).astype(np.float16)  # tau is fitted on the features as stored
        features[done : done + len(batch)] = stored
        nearest[done : done + len(batch)] = nearest_similarity(stored.astype(np.float32), held_features)[1]
        done += len(batch)
        bar.update(len(batch))
    bar.close()
    tau = float(np.percentile(nearest, PERCENTILE))

    with atomic_path(out / BANK_FEATURES) as tmp:
        save_file({"features": features}, str(tmp), metadata={"format": "xreal feature bank", "dtype": "float16"})
    with atomic_path(out / BANK_IDS) as tmp:
        tmp.write_text(json.dumps([str(i) for i in bank.rows.image_id]) + "\n")
    record = {
        "bank_format": BANK_FORMAT,
        "tau": tau,
        "percentile": PERCENTILE,
        "similarity": f"cosine of L2-normalised {judges.feature_source} features2 (FXD convention)",
        "counts": {"bank": len(bank.rows), "held_out": len(held.rows)},
        "ids_file": BANK_IDS,
        "training_set": {
            "path": str(training_set.resolve()),
            "index_sha256": sha256_file(index_path),
            "rows": "all" if held_out is not None else "split train",
        },
        "held_out": {
            "path": str(Path(held_path).parent.resolve()),
            "index_sha256": sha256_file(held_path),
            "rows": "all" if held_out is not None else "split validate and test",
        },
        "judges": {"source": str(judges_source), "kind": judges.kind, "digest": bank_judges_digest(judges_source)},
        "image_size": image_size,
        "feature_size": int(features.shape[1]),
        "feature_dtype": "float16",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "xreal_version": _xreal_version(),
        "files": {name: sha256_file(out / name) for name in (BANK_FEATURES, BANK_IDS)},
    }
    write_json(out / BANK_RECORD, record)  # last: a folder with bank.json holds a whole bank
    return out


def _xreal_version() -> str:
    try:
        return metadata.version("xreal")
    except metadata.PackageNotFoundError:
        return "unknown"
