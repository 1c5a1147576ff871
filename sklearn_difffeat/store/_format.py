"""The on-disk format of a feature store: layout, names, segment files and their indexes, errors.

Layout of a store folder::

    store.json                          settings (segment size), written once
    <namespace>/namespace.json          what the namespace holds (model, block, timestep, ...), for people
    <namespace>/<segment>.npy           a float32 (rows, width) array, written by one writer
    <namespace>/<segment>.json          its index: the rows' sample keys, shape and a SHA-256 of keys and data
    <namespace>/.<file>.<random>.part   a file being written (renamed into place when complete)
    .identities/<id>-<resolved>.json    records of model identities (see ``_identity``)

A segment's data file is renamed into place before its index, so a segment is complete exactly when its index
exists. Writes are durable (``_files``), so a power loss can never leave an index whose data did not reach the
disk. Everything here works on files alone and keeps nothing in memory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import ntpath
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from ._files import is_transient, make_folder, os_error_text, write_atomic

FORMAT = "sklearn-difffeat-store"
VERSION = 2  # 2: the index checksum covers the keys too ("sha256_keys_data"); 1: data only ("sha256")
STORE_FILE = "store.json"
NAMESPACE_FILE = "namespace.json"
KEY_LENGTH = 32  # hex characters of a sample fingerprint (128 bits)
_HEX = frozenset("0123456789abcdef")


class StoreWriteError(OSError):
    """Something could not be written to a feature store (read-only folder, full disk, file too large, ...).

    Its message names the store folder, the namespace and the OS error; ``errno`` is the OS error's number.
    """


class StoreReadError(OSError):
    """A feature store could not be read for a reason that is not damage (too many open files, out of memory);
    nothing was dropped, and the same read may succeed later. ``errno`` is the OS error's number."""


def caused_by(error_type: type[OSError], message: str, exc: BaseException) -> OSError:
    """``error_type(message)`` carrying the errno of the OS error ``exc`` that caused it (None for an error without
    one, such as ``MemoryError``), for ``raise ... from exc``."""
    error = error_type(message)
    error.errno = getattr(exc, "errno", None)
    return error


class SegmentDamaged(ValueError):
    """A segment's index or data cannot be read or does not match: its rows count as absent."""


def stable_hash(*parts, size: int = 10) -> str:
    """Hex digest of JSON-serialisable parts; identical across processes and machines."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(payload, digest_size=size).hexdigest()


# ---- names --------------------------------------------------------------------------------------------------
def namespace_problem(name: str) -> str | None:
    """What makes ``name`` unusable as a namespace folder name, or None if it is fine."""
    if not name:
        return "it is empty"
    if name.startswith("."):
        return "it starts with '.' (such names are the store's own; '.' and '..' name the store and its parent)"
    for char, label in (("/", "'/'"), ("\\", "a backslash"), ("\0", "a NUL character")):
        if char in name:
            return f"it contains {label}"
    if os.path.isabs(name) or ntpath.splitdrive(name)[0]:
        return "it is an absolute path or names a drive"
    return None


def check_namespace(value, argument: str = "namespace") -> str:
    """Return ``value`` if it names one folder inside the store; else raise naming ``argument`` and the value.

    Every entry point checks its namespace here, so that nothing outside the store folder is ever read, written
    or deleted.
    """
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str naming a namespace, got {type(value).__name__} {value!r}.")
    problem = namespace_problem(value)
    if problem is not None:
        raise ValueError(f"{argument}={value!r} is not a valid namespace name: {problem}. A namespace is one folder "
                         "name inside the store: not empty, not starting with '.', without '/', backslash, NUL or a "
                         "drive ('C:').")
    return value


def as_keys(keys) -> np.ndarray:
    """Sample keys as an array of 32-byte ASCII hex strings; errors name the first bad key."""
    array = np.asarray(keys)
    if array.ndim != 1:
        raise ValueError(f"keys must be a 1-D sequence, got shape {array.shape}.")
    if array.dtype.kind == "S" and array.dtype.itemsize == KEY_LENGTH:
        return array
    out = np.empty(len(array), dtype=f"S{KEY_LENGTH}")
    for i, key in enumerate(array.tolist()):
        text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        if not isinstance(text, str) or len(text) != KEY_LENGTH or not _HEX.issuperset(text):
            raise ValueError(f"keys[{i}] = {key!r} is not a {KEY_LENGTH}-character lower-case hex fingerprint.")
        out[i] = text.encode("ascii")
    return out


class Segment:
    """One complete segment as its index describes it. ``sha256`` covers the keys then the data when
    ``keys_checked`` (indexes of format version 2), the data alone otherwise (version 1)."""

    __slots__ = ("data", "keys", "keys_checked", "name", "sha256", "width")

    def __init__(self, name: str, data: Path, keys: np.ndarray, width: int, sha256: str, keys_checked=True):
        self.name, self.data, self.keys, self.width, self.sha256 = name, data, keys, width, sha256
        self.keys_checked = keys_checked


def checksum(keys: np.ndarray, data) -> str:
    """SHA-256 of the keys (32 ASCII bytes each, in row order) then of the float32 data."""
    digest = hashlib.sha256(as_keys(keys).tobytes())
    digest.update(data)
    return digest.hexdigest()


# ---- writing ------------------------------------------------------------------------------------------------
def write_settings(directory: Path, settings: dict, durable: bool = True) -> None:
    """Save the store's segment settings in its ``store.json``."""
    text = json.dumps({"format": FORMAT, "version": VERSION, **settings}, indent=1)
    write_atomic(directory / STORE_FILE, text.encode(), durable=durable)


def npy_header(values: np.ndarray) -> bytes:
    """The ``.npy`` header ``np.save`` writes before ``values``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(values))
    return buffer.getvalue()


def write_segment(folder: Path, keys: np.ndarray, values: np.ndarray, durable: bool = True) -> str:
    """Write one segment into an existing namespace folder: its data, then its index. Returns the segment name.

    If anything fails, both files are removed again (when the OS lets us): no partial segment is left.
    """
    name = f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    keys = as_keys(keys)
    values = np.ascontiguousarray(values, dtype=np.float32)
    index = {"format": FORMAT, "version": VERSION, "rows": len(keys), "width": int(values.shape[1]),
             "dtype": "float32", "sha256_keys_data": checksum(keys, values),
             "keys": [k.decode("ascii") for k in keys.tolist()]}
    try:
        write_atomic(folder / f"{name}.npy", npy_header(values), values, durable=durable)
        write_atomic(folder / f"{name}.json", json.dumps(index).encode(), durable=durable)  # completes it
    except BaseException:
        with contextlib.suppress(OSError):
            delete_segment(folder, name)
        raise
    return name


def append_segment(directory: Path, namespace: str, keys: np.ndarray, values: np.ndarray, settings: dict,
                   description: dict | None = None, durable: bool = True) -> str:
    """Write one segment to a namespace, creating the store and namespace files it needs first.

    ``settings`` are saved when the store has no ``store.json`` yet, ``description`` when the namespace has no
    ``namespace.json``. Raises :class:`StoreWriteError` naming the folder, the namespace and the OS error when
    anything cannot be written; what was stored before is left as it was.
    """
    folder = directory / check_namespace(namespace)
    try:
        make_folder(folder, durable)
        if not (directory / STORE_FILE).exists():
            write_settings(directory, settings, durable)
        if description is not None and not (folder / NAMESPACE_FILE).exists():
            text = json.dumps(description, indent=1, default=str)
            write_atomic(folder / NAMESPACE_FILE, text.encode(), durable=durable)
        return write_segment(folder, keys, values, durable)
    except OSError as exc:
        raise caused_by(StoreWriteError, f"Could not write a segment of namespace {namespace!r} to the feature "
                                         f"store {directory}: {os_error_text(exc)}", exc) from exc


# ---- reading ------------------------------------------------------------------------------------------------
def read_settings(directory: Path) -> dict:
    """The settings saved in the store's ``store.json`` (``{}`` if it has none); raises if it is unreadable."""
    path = directory / STORE_FILE
    if not path.is_file():
        return {}
    settings = json.loads(path.read_text())
    if not isinstance(settings, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return settings


def namespace_folders(directory: Path) -> list[Path]:
    """The store's namespace folders, sorted by name (the store's own folders start with '.')."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and namespace_problem(p.name) is None)


def read_description(folder: Path) -> dict:
    """What a namespace holds, as its first writer described it (``{}`` if it has no readable description)."""
    try:
        return json.loads((folder / NAMESPACE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def segment_indexes(folder: Path) -> list[str]:
    """File names of the complete segments' indexes in a namespace folder (none if the folder is missing)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [name for name in names if name.endswith(".json") and not name.startswith(".") and name != NAMESPACE_FILE]


def _damage_or_transient(read):
    """Make ``read`` raise either a transient error as it is (see :func:`is_transient`) or :class:`SegmentDamaged`.

    Parsing bytes from disk fails in many ways (``EOFError`` for an empty ``.npy``, ``tokenize.TokenError`` or
    ``SyntaxError`` for a damaged header, ``OverflowError`` for absurd numbers, ``OSError`` for an unreadable
    file, ...): each means this file cannot be used, except the errors that come from the process's state.
    """

    @functools.wraps(read)
    def wrapper(*args, **kwargs):
        try:
            return read(*args, **kwargs)
        except SegmentDamaged:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise
            raise SegmentDamaged(f"{type(exc).__name__}: {exc}") from exc

    return wrapper


@_damage_or_transient
def load_index(path: Path) -> Segment:
    """Read and check a segment's index; raises :class:`SegmentDamaged` saying what is wrong, or a transient
    ``OSError``."""
    with open(path, "rb") as handle:
        index = json.loads(handle.read())
    if not isinstance(index, dict):
        raise SegmentDamaged("the index is not a JSON object")
    keys_checked = "sha256" not in index  # version 1 indexes checksum the data alone, under "sha256"
    try:
        keys = as_keys(index["keys"])
        rows, width = int(index["rows"]), int(index["width"])
        sha256 = str(index["sha256_keys_data" if keys_checked else "sha256"])
    except KeyError as exc:
        raise SegmentDamaged(f"the field {exc} is missing") from exc
    if index.get("format") != FORMAT or len(keys) != rows or index.get("dtype") != "float32":
        raise SegmentDamaged("inconsistent index")
    data = path.with_suffix(".npy")
    if not data.is_file():
        raise SegmentDamaged("its data file is missing")
    return Segment(path.stem, data, keys, width, sha256, keys_checked)


@_damage_or_transient
def open_data(segment: Segment, verify: bool) -> np.ndarray:
    """The segment's rows as a read-only memory map; raises :class:`SegmentDamaged` if the file does not match
    the index, or a transient ``OSError``. ``verify`` also checks the checksum (it reads the whole file)."""
    expected = (len(segment.keys), segment.width)
    with open(segment.data, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version not in ((1, 0), (2, 0)):
            raise SegmentDamaged(f"unsupported .npy format version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        if fortran_order or dtype != np.dtype(np.float32) or shape != expected:
            raise SegmentDamaged(f"an array of shape {shape} and dtype {dtype} where the index says {expected} "
                                 "float32")
        offset, size = handle.tell(), os.fstat(handle.fileno()).st_size
        if size != offset + 4 * expected[0] * expected[1]:
            raise SegmentDamaged(f"{size} bytes where shape {expected} needs {offset + 4 * np.prod(expected)}")
        data = np.memmap(handle, dtype=np.float32, mode="r", offset=offset, shape=expected)
    if verify:
        digest = checksum(segment.keys, data) if segment.keys_checked else hashlib.sha256(data).hexdigest()
        if digest != segment.sha256:
            raise SegmentDamaged("checksum mismatch")
    return data


# ---- removing -----------------------------------------------------------------------------------------------
def delete_segment(folder: Path, name: str) -> None:
    """Remove a segment: its index first, so that no reader finds an index without its data."""
    (folder / f"{name}.json").unlink(missing_ok=True)
    (folder / f"{name}.npy").unlink(missing_ok=True)


def delete_namespace(folder: Path) -> None:
    """Remove a namespace folder, indexes first (see :func:`delete_segment`)."""
    for index in folder.glob("*.json"):
        index.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def remove_abandoned(folder: Path, older_than: float) -> None:
    """Remove the unfinished files (temporary files, data without an index) last changed ``older_than`` seconds
    ago or earlier: their writers are gone."""
    now = time.time()
    for path in folder.iterdir():
        try:
            stale = now - path.stat().st_mtime > older_than
        except FileNotFoundError:  # a writer renamed its temporary file into place (or removed it) meanwhile
            continue
        orphan = path.suffix == ".npy" and not path.with_suffix(".json").exists()
        if stale and (path.name.startswith(".") or orphan):
            path.unlink(missing_ok=True)
