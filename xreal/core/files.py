"""Small file-system helpers shared by every writer: atomic writes and safe paths."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from xreal.core.errors import XRealError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


class PathError(XRealError, ValueError):
    """A path that is missing, unreadable or outside the allowed root."""


# Ids that become file names (request ids, image ids, sample ids): letters, digits, '.', '_' and '-', starting
# with a letter or digit, so no id can name a folder, climb out of one, hide a file or end in a newline.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ID_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_safe_id(value: object) -> bool:
    """Whether ``value`` is an id that may become (part of) a file name; the whole string must match."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_id(value: object, what: str) -> str:
    """``value`` if it is a safe id (:data:`ID_PATTERN`), else a :class:`PathError` naming ``what`` and the rule."""
    if not is_safe_id(value):
        raise PathError(f"{what} {str(value)[:80]!r} is not a usable id: it must be {ID_RULE}")
    return value  # type: ignore[return-value]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    Nothing is ever visible under the final name until it is complete: on an
    exception the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part" + final.suffix, dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; the final file gets the usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success rename it to ``path`` (absent or empty).

    On an exception the temporary folder and everything in it are removed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes the folder private
    try:
        yield staging
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def resolve_under(
    root: str | os.PathLike[str], path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None
) -> Path:
    """Resolve ``path`` (relative to ``base``, default ``root``) and refuse anything outside ``root``.

    Symbolic links are followed before the check, so a link pointing outside
    the root is refused too. Absolute paths are allowed only inside the root.
    """
    if str(path).strip() == "":
        raise PathError("empty path")
    if "\x00" in str(path) or "\x00" in str(base or "") or "\x00" in str(root):
        raise PathError(f"path {str(path)!r} holds a NUL byte")
    allowed = Path(root).resolve()
    candidate = (Path(base or allowed) / path).resolve()
    if candidate != allowed and allowed not in candidate.parents:
        raise PathError(f"path {str(path)!r} is outside the allowed root {str(allowed)!r}")
    return candidate


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike[str], what: str, keys: Iterable[str] = ()) -> Any:
    """Read a JSON record; a damaged one raises an error naming the file and what it should be.

    With ``keys``, the record must be an object holding each of them.
    """
    try:
        record = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XRealError(f"{path}: damaged {what}, not valid JSON ({exc})") from None
    keys = list(keys)
    if keys and not isinstance(record, dict):
        raise XRealError(f"{path}: damaged {what}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise XRealError(f"{path}: damaged {what}: no {', '.join(repr(k) for k in missing)}")
    return record


def record_digest(record: Any) -> str:
    """sha256 of a JSON record's whole content (keys sorted): pins a record and, through it, the files it hashes."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def checksum_problems(folder: str | os.PathLike[str], files: Any) -> list[str]:
    """What is wrong with the files of ``folder`` against their recorded sha256 (empty when all match)."""
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return ["its record's 'files' is not a mapping of file names to sha256"]
    problems = []
    for name, digest in files.items():
        try:
            path = resolve_under(folder, name)
        except PathError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its checksum")
    return problems


def missing_csv_columns(path: str | os.PathLike[str], columns: Iterable[str]) -> list[str]:
    """The ``columns`` a CSV file's header lacks (gzip or not); reads only its header record.

    Only the header is parsed (by :mod:`csv`, which reads quoted newlines as pyarrow does with
    ``newlines_in_values``), so rows holding multi-line values, or rows longer than a read block, cannot make the
    header unreadable. An empty or undecodable file raises ``pyarrow.ArrowInvalid``, as pyarrow's reader would.
    """
    import csv
    import io

    import pyarrow as pa

    with pa.input_stream(os.fspath(path), compression="detect") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        try:
            header = next(csv.reader(text), None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise pa.ArrowInvalid(f"CSV header unreadable ({exc})") from None
        finally:
            text.detach()
    if not header:
        raise pa.ArrowInvalid("Empty CSV file")
    return [name for name in columns if name not in header]
