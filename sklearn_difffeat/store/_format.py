"""The on-disk format of a feature store: layout, constants, atomic writes, segment files and their indexes.

Layout of a store folder::

    store.json                          settings (segment size), written once
    <namespace>/namespace.json          what the namespace holds (model, block, timestep, ...), for people
    <namespace>/<segment>.npy           a float32 (rows, width) array, written by one writer
    <namespace>/<segment>.json          its index: the rows' sample keys, shape and a SHA-256 of the data
    <namespace>/.<file>.<random>.part   a file being written (renamed into place when complete)

A segment's data file is renamed into place before its index, so a segment is complete exactly when its index
exists. Everything here works on files alone and keeps nothing in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

FORMAT = "sklearn-difffeat-store"
VERSION = 1
STORE_FILE = "store.json"
NAMESPACE_FILE = "namespace.json"
KEY_LENGTH = 32  # hex characters of a sample fingerprint (128 bits)
_HEX = frozenset("0123456789abcdef")


class StoreWriteError(OSError):
    """A segment could not be written (read-only folder, full disk, ...)."""


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
    """One complete segment as its index describes it."""

    __slots__ = ("data", "keys", "name", "sha256", "width")

    def __init__(self, name: str, data: Path, keys: np.ndarray, width: int, sha256: str):
        self.name, self.data, self.keys, self.width, self.sha256 = name, data, keys, width, sha256


# ---- writing ------------------------------------------------------------------------------------------------
def write_atomic(path: Path, payload) -> None:
    """Write ``payload`` (bytes, or a function of the open file) to a hidden temporary file beside ``path``, then
    rename it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "wb") as handle:
            payload(handle) if callable(payload) else handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_settings(directory: Path, settings: dict) -> None:
    """Save the store's segment settings in its ``store.json``."""
    write_atomic(directory / STORE_FILE, json.dumps({"format": FORMAT, "version": VERSION, **settings},
                                                    indent=1).encode())


def write_segment(folder: Path, keys: np.ndarray, values: np.ndarray) -> str:
    """Write one segment into an existing namespace folder: its data, then its index. Returns the segment name."""
    name = f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    values = np.ascontiguousarray(values, dtype=np.float32)
    write_atomic(folder / f"{name}.npy", lambda handle: np.save(handle, values, allow_pickle=False))
    index = {"format": FORMAT, "version": VERSION, "rows": len(keys), "width": int(values.shape[1]),
             "dtype": "float32", "sha256": hashlib.sha256(values).hexdigest(),
             "keys": [k.decode("ascii") for k in keys.tolist()]}
    write_atomic(folder / f"{name}.json", json.dumps(index).encode())  # last: completes the segment
    return name


def append_segment(directory: Path, namespace: str, keys: np.ndarray, values: np.ndarray, settings: dict,
                   description: dict | None = None) -> str:
    """Write one segment to a namespace, creating the store and namespace files it needs first.

    ``settings`` are saved when the store has no ``store.json`` yet, ``description`` when the namespace has no
    ``namespace.json``. Raises :class:`StoreWriteError` when anything cannot be written.
    """
    folder = directory / namespace
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (directory / STORE_FILE).exists():
            write_settings(directory, settings)
        if description is not None and not (folder / NAMESPACE_FILE).exists():
            write_atomic(folder / NAMESPACE_FILE, json.dumps(description, indent=1, default=str).encode())
        return write_segment(folder, keys, values)
    except OSError as exc:
        raise StoreWriteError(f"Could not write a segment to {folder}: {type(exc).__name__}: {exc}") from exc


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
    """The store's namespace folders, sorted by name."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


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


def load_index(path: Path) -> Segment:
    """Read and check a segment's index; raises ``OSError`` or ``ValueError`` saying what is wrong."""
    try:
        index = json.loads(path.read_text())
        keys = as_keys(index["keys"])
        rows, width = int(index["rows"]), int(index["width"])
        sha256 = str(index["sha256"])
    except KeyError as exc:
        raise ValueError(f"the field {exc} is missing") from exc
    except TypeError as exc:
        raise ValueError(f"a field has the wrong type: {exc}") from exc
    if index.get("format") != FORMAT or len(keys) != rows or index.get("dtype") != "float32":
        raise ValueError("inconsistent index")
    data = path.with_suffix(".npy")
    if not data.is_file():
        raise ValueError("its data file is missing")
    return Segment(path.stem, data, keys, width, sha256)


def open_data(segment: Segment, verify: bool) -> np.ndarray:
    """The segment's rows as a read-only memory map; raises ``OSError`` or ``ValueError`` if they do not match
    the index. ``verify`` also checks the SHA-256 of the data (it reads the whole file)."""
    data = np.load(segment.data, mmap_mode="r", allow_pickle=False)
    if data.dtype != np.float32 or data.shape != (len(segment.keys), segment.width):
        raise ValueError(f"shape {data.shape} and dtype {data.dtype} do not match the index")
    if verify and hashlib.sha256(data).hexdigest() != segment.sha256:
        raise ValueError("checksum mismatch")
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
