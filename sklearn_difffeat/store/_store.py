"""The segment feature store: per-sample feature rows shared by extractors, folds, processes and machines.

Layout of a store folder::

    store.json                          settings (segment size), written once
    <namespace>/namespace.json          what the namespace holds (model, block, timestep, ...), for people
    <namespace>/<segment>.npy           a float32 (rows, width) array, written by one writer
    <namespace>/<segment>.json          its index: the rows' sample keys, shape and a checksum

A namespace names everything that determines a feature row except the sample (model fingerprint, block,
timestep, pooling, dtype, ...); a key is the sample's 32-character hex fingerprint. Each writer (a process, a
Dask task) appends whole *segments*: it writes the data file under a temporary name, renames it, then writes the
index the same way. The index appears last, so a segment is complete exactly when its index exists, and
readers only ever look at indexes. Hence: no locks, any number of concurrent writers, a killed writer loses only
its unfinished segment, readers never see partial data, it works on a shared network filesystem (rename within
a folder is atomic there too), and the number of files grows with n / segment size.

Reads memory-map the segments and gather whole batches of rows. A segment whose index or data is damaged
(unreadable JSON, wrong size, wrong shape, checksum mismatch) is ignored with a warning, and rows that are not
finite are treated as absent, so bad files cost a recomputation, never wrong values. Several segments may hold
the same key (two writers raced on it); they hold the same values, and :meth:`FeatureStore.compact` merges
segments and drops the duplicates.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

__all__ = ["FeatureStore", "StoreWriteError", "stable_hash"]

FORMAT = "sklearn-difffeat-store"
VERSION = 1
STORE_FILE = "store.json"
NAMESPACE_FILE = "namespace.json"
KEY_LENGTH = 32  # hex characters of a sample fingerprint (128 bits)
DEFAULTS = {"segment_rows": 4096, "segment_seconds": 60.0, "segment_bytes": 256 << 20}
_STALE_SECONDS = 3600  # compact() removes unfinished files older than this (their writer is long gone)
_OPEN_MAPS = 128  # memory maps kept open per store (each holds a file descriptor)


def stable_hash(*parts, size: int = 10) -> str:
    """Hex digest of JSON-serialisable parts; identical across processes and machines."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(payload, digest_size=size).hexdigest()


def _locked(method):
    """Run a FeatureStore method under the store's lock."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


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
        if not isinstance(text, str) or len(text) != KEY_LENGTH or any(c not in "0123456789abcdef" for c in text):
            raise ValueError(f"keys[{i}] = {key!r} is not a {KEY_LENGTH}-character lower-case hex fingerprint.")
        out[i] = text.encode("ascii")
    return out


class _Segment:
    """One complete segment as its index describes it."""

    __slots__ = ("checked", "data", "keys", "name", "sha256", "width")

    def __init__(self, name, data, keys, width, sha256):
        self.name, self.data, self.keys, self.width, self.sha256 = name, data, keys, width, sha256
        self.checked = False  # the checksum is verified on the first read, by each process


class _Namespace:
    """What this process has loaded of one namespace: its segments and a sorted key -> (segment, row) map."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.segments: list[_Segment] = []
        self.seen: set[str] = set()  # index files already looked at (good or bad)
        self.sorted_keys = np.empty(0, dtype=f"S{KEY_LENGTH}")
        self.segment_of = np.empty(0, dtype=np.int64)
        self.row_of = np.empty(0, dtype=np.int64)

    def rebuild(self):
        if not self.segments:
            self.sorted_keys = np.empty(0, dtype=f"S{KEY_LENGTH}")
            self.segment_of = self.row_of = np.empty(0, dtype=np.int64)
            return
        keys = np.concatenate([s.keys for s in self.segments])
        segment = np.concatenate([np.full(len(s.keys), i) for i, s in enumerate(self.segments)])
        rows = np.concatenate([np.arange(len(s.keys)) for s in self.segments])
        self.sorted_keys, first = np.unique(keys, return_index=True)  # one location per key (duplicates agree)
        self.segment_of, self.row_of = segment[first], rows[first]

    def locate(self, keys: np.ndarray):
        """(found, segment index, row) for each key."""
        if len(self.sorted_keys) == 0:
            zeros = np.zeros(len(keys), dtype=np.int64)
            return np.zeros(len(keys), dtype=bool), zeros, zeros
        pos = np.minimum(np.searchsorted(self.sorted_keys, keys), len(self.sorted_keys) - 1)
        found = self.sorted_keys[pos] == keys
        return found, self.segment_of[pos], self.row_of[pos]


class FeatureStore:
    """A folder of feature segments. Safe to share between threads, processes and machines.

    Parameters
    ----------
    directory : str or path-like
        The store folder; created on the first write.
    segment_rows, segment_seconds, segment_bytes : optional
        When a writer closes a segment: after this many rows, this many seconds since its first row, or this
        many bytes, whichever comes first (a killed writer loses at most that much work). Default: the values
        saved in the store's ``store.json``, else 4096 rows, 60 s, 256 MiB. :meth:`create` saves them for every
        later writer, in any process.
    """

    def __init__(self, directory, *, segment_rows=None, segment_seconds=None, segment_bytes=None):
        if directory is None or os.fspath(directory) == "":
            raise ValueError("A feature store needs a folder path; got an empty path.")
        self.directory = Path(directory).expanduser()
        self.settings = dict(DEFAULTS)
        saved = self.directory / STORE_FILE
        if saved.is_file():
            try:
                self.settings.update({k: v for k, v in json.loads(saved.read_text()).items() if k in DEFAULTS})
            except (OSError, ValueError):
                warnings.warn(f"Ignoring the unreadable {saved}; using default segment sizes.", stacklevel=2)
        explicit = {"segment_rows": segment_rows, "segment_seconds": segment_seconds, "segment_bytes": segment_bytes}
        self.settings.update({k: v for k, v in explicit.items() if v is not None})
        self._namespaces: dict[str, _Namespace] = {}
        self._maps: OrderedDict = OrderedDict()
        self._warned: set = set()
        # One store object may serve several threads (e.g. a Dask worker running tasks in threads): the loaded
        # indexes and the open maps change under this lock.
        self._lock = threading.RLock()

    @classmethod
    def create(cls, directory, **settings) -> FeatureStore:
        """Create (or reopen) a store and save its segment settings for every writer that opens it later."""
        store = cls(directory, **settings)
        store.directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(store.directory / STORE_FILE, json.dumps({"format": FORMAT, "version": VERSION,
                                                                  **store.settings}, indent=1).encode())
        return store

    def __repr__(self):
        return f"FeatureStore({str(self.directory)!r})"

    def __reduce__(self):  # pickles as its folder and settings: loaded indexes and maps are per process
        return (_reopen, (str(self.directory), self.settings))

    # ---- reading ----------------------------------------------------------------------------------------
    def namespaces(self) -> dict[str, dict]:
        """Every namespace in the store, with the description its first writer gave (``{}`` if none)."""
        if not self.directory.is_dir():
            return {}
        out = {}
        for folder in sorted(p for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                out[folder.name] = json.loads((folder / NAMESPACE_FILE).read_text())
            except (OSError, ValueError):
                out[folder.name] = {}
        return out

    @_locked
    def count(self, namespace: str) -> int:
        """Number of distinct keys stored in the namespace's complete segments."""
        return len(self._refresh(namespace).sorted_keys)

    @_locked
    def keys(self, namespace: str) -> np.ndarray:
        """The distinct keys stored in the namespace (sorted, as ASCII bytes)."""
        return self._refresh(namespace).sorted_keys.copy()

    @_locked
    def contains(self, namespace: str, keys) -> np.ndarray:
        """Boolean mask: which keys have a row in the namespace (not yet checked for damage)."""
        return self._refresh(namespace).locate(as_keys(keys))[0]

    @_locked
    def read(self, namespace: str, keys, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(values, found)``: float32 rows ``(len(keys), width)`` for the keys that are stored, and which are.

        Rows of absent keys are left as zeros. ``width`` (when known) rejects segments of another width, e.g.
        features written by another version of a model configuration. Damaged segments and non-finite rows
        count as absent.
        """
        keys = as_keys(keys)
        ns = self._refresh(namespace)
        for _attempt in range(2):  # a segment found damaged is dropped, and the lookup repeated once
            found, segment_ids, rows = ns.locate(keys)
            if width is not None:
                wrong = [i for i, s in enumerate(ns.segments) if s.width != width]
                if wrong:
                    self._drop(ns, wrong, f"rows of width {ns.segments[wrong[0]].width}, expected {width}")
                    continue
            if width is None:
                width = ns.segments[0].width if ns.segments else 0
            values = np.zeros((len(keys), width), dtype=np.float32)
            damaged = []
            for seg_id in np.unique(segment_ids[found]):
                where = np.flatnonzero(found & (segment_ids == seg_id))
                data = self._rows(ns, ns.segments[seg_id])
                if data is None:
                    damaged.append(int(seg_id))
                    continue
                order = np.argsort(rows[where], kind="stable")  # ascending rows read the file forwards
                values[where[order]] = data[rows[where][order]]
            if not damaged:
                break
            self._drop(ns, damaged, "checksum or shape mismatch")
        finite = np.isfinite(values).all(axis=1)
        if (found & ~finite).any():
            self._warn_once(("nonfinite", namespace), f"{int((found & ~finite).sum())} stored rows in namespace "
                            f"{namespace} are not finite; they are treated as absent and recomputed.")
        return values, found & finite

    # ---- writing ----------------------------------------------------------------------------------------
    def writer(self, namespace: str, width: int, description: dict | None = None) -> SegmentWriter:
        """A writer that buffers rows and appends them as segments (use as a context manager)."""
        return SegmentWriter(self, namespace, width, description)

    def write(self, namespace: str, keys, values, description: dict | None = None) -> None:
        """Append ``values`` (n, width) for ``keys`` as one segment, now."""
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or len(values) != len(keys):
            raise ValueError(f"values must have shape (len(keys), width) = ({len(keys)}, w), got {values.shape}.")
        with self.writer(namespace, values.shape[1], description) as writer:
            writer.add(keys, values)

    def _write_segment(self, namespace: str, keys: np.ndarray, values: np.ndarray, description) -> None:
        folder = self.directory / namespace
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not (self.directory / STORE_FILE).exists():
                _write_atomic(self.directory / STORE_FILE, json.dumps({"format": FORMAT, "version": VERSION,
                                                                         **self.settings}, indent=1).encode())
            if description is not None and not (folder / NAMESPACE_FILE).exists():
                _write_atomic(folder / NAMESPACE_FILE, json.dumps(description, indent=1, default=str).encode())
            name = f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            values = np.ascontiguousarray(values, dtype=np.float32)
            _write_atomic(folder / f"{name}.npy", lambda handle: np.save(handle, values, allow_pickle=False))
            index = {"format": FORMAT, "version": VERSION, "rows": len(keys), "width": int(values.shape[1]),
                     "dtype": "float32", "sha256": hashlib.sha256(values).hexdigest(),
                     "keys": [k.decode("ascii") for k in keys.tolist()]}
            _write_atomic(folder / f"{name}.json", json.dumps(index).encode())  # last: completes the segment
        except OSError as exc:
            raise StoreWriteError(f"Could not write a segment to {folder}: {type(exc).__name__}: {exc}") from exc

    # ---- maintenance ------------------------------------------------------------------------------------
    @_locked
    def clear(self, namespace: str | None = None) -> None:
        """Delete one namespace, or every namespace and the store's settings."""
        if namespace is not None:
            targets = [self.directory / namespace]
        elif self.directory.is_dir():
            targets = [p for p in self.directory.iterdir() if p.is_dir()]
        else:
            targets = []
        for folder in targets:
            for index in folder.glob("*.json"):  # indexes first: a reader never sees a segment without data
                index.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            self._namespaces.pop(folder.name, None)
        if namespace is None:
            (self.directory / STORE_FILE).unlink(missing_ok=True)
        self._maps.clear()

    @_locked
    def compact(self, namespace: str | None = None) -> None:
        """Merge each namespace's segments into as few as the segment size allows, dropping duplicate keys,
        damaged segments and files of writers that died more than an hour ago. Safe while others read or write:
        new segments are complete before old ones are removed, and a reader that loses a segment recomputes."""
        for name in [namespace] if namespace else list(self.namespaces()):
            ns = self._refresh(name)
            old = list(ns.segments)
            chunk = max(1, int(self.settings["segment_rows"]))
            keys, width = ns.sorted_keys, (old[0].width if old else 0)
            for start in range(0, len(keys), chunk):
                values, found = self.read(name, keys[start:start + chunk], width)
                if found.any():
                    self._write_segment(name, keys[start:start + chunk][found], values[found], None)
            now = time.time()
            for segment in old:
                (ns.folder / f"{segment.name}.json").unlink(missing_ok=True)
                (ns.folder / f"{segment.name}.npy").unlink(missing_ok=True)
            for path in ns.folder.iterdir():
                stale = now - path.stat().st_mtime > _STALE_SECONDS
                orphan = path.suffix == ".npy" and not path.with_suffix(".json").exists()
                if stale and (path.name.startswith(".") or orphan):
                    path.unlink(missing_ok=True)
            self._namespaces.pop(name, None)
            self._maps.clear()

    # ---- internals --------------------------------------------------------------------------------------
    def _refresh(self, namespace: str) -> _Namespace:
        """Load the indexes of segments completed since the last look."""
        if not namespace or "/" in namespace or namespace.startswith("."):
            raise ValueError(f"Invalid namespace name {namespace!r}.")
        ns = self._namespaces.setdefault(namespace, _Namespace(self.directory / namespace))
        try:
            names = [p for p in os.listdir(ns.folder) if p.endswith(".json") and not p.startswith(".")]
        except FileNotFoundError:
            names = []
        added = False
        for file in names:
            if file == NAMESPACE_FILE or file in ns.seen:
                continue
            ns.seen.add(file)
            segment = self._load_index(ns.folder, file)
            if segment is not None:
                ns.segments.append(segment)
                added = True
        if added:
            ns.rebuild()
        return ns

    def _load_index(self, folder: Path, file: str) -> _Segment | None:
        path = folder / file
        try:
            index = json.loads(path.read_text())
            keys = as_keys(index["keys"])
            rows, width = int(index["rows"]), int(index["width"])
            if index.get("format") != FORMAT or len(keys) != rows or index.get("dtype") != "float32":
                raise ValueError("inconsistent index")
            data = path.with_suffix(".npy")
            if not data.is_file():
                raise ValueError("its data file is missing")
            return _Segment(path.stem, data, keys, width, str(index["sha256"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._warn_once(path, f"Ignoring the damaged feature-store index {path} ({exc}); its rows are recomputed.")
            return None

    def _rows(self, ns: _Namespace, segment: _Segment):
        """The segment's data as a read-only memory map, checked once per process; None if damaged."""
        key = str(segment.data)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        try:
            data = np.load(segment.data, mmap_mode="r", allow_pickle=False)
            if data.dtype != np.float32 or data.shape != (len(segment.keys), segment.width):
                raise ValueError(f"shape {data.shape} and dtype {data.dtype} do not match the index")
            if not segment.checked:
                if hashlib.sha256(data).hexdigest() != segment.sha256:
                    raise ValueError("checksum mismatch")
                segment.checked = True
        except (OSError, ValueError) as exc:
            self._warn_once(segment.data, f"Ignoring the damaged feature-store segment {segment.data} ({exc}); "
                            "its rows are recomputed.")
            return None
        self._maps[key] = data
        while len(self._maps) > _OPEN_MAPS:
            self._maps.popitem(last=False)
        return data

    def _drop(self, ns: _Namespace, segment_ids, reason: str):
        for i in segment_ids:
            self._warn_once(ns.segments[i].data, f"Ignoring feature-store segment {ns.segments[i].data}: {reason}.")
        keep = set(range(len(ns.segments))) - set(segment_ids)
        ns.segments = [s for i, s in enumerate(ns.segments) if i in keep]
        ns.rebuild()

    def _warn_once(self, what, message: str):
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


class SegmentWriter:
    """Buffers rows for one namespace and writes them as segments (see :class:`FeatureStore`).

    Rows reach disk when a segment fills (rows, bytes or seconds: the store's settings), on :meth:`flush` and
    on leaving the ``with`` block, also after an exception, so an interrupted extraction keeps what it
    finished. Raises :class:`StoreWriteError` when the folder cannot be written.
    """

    def __init__(self, store: FeatureStore, namespace: str, width: int, description=None):
        self.store, self.namespace, self.width, self.description = store, namespace, int(width), description
        self._keys, self._values, self._rows, self._since = [], [], 0, None

    def add(self, keys, values) -> None:
        keys = as_keys(keys)
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (len(keys), self.width):
            raise ValueError(f"Expected values of shape ({len(keys)}, {self.width}), got {values.shape}.")
        self._keys.append(keys)
        self._values.append(values)
        self._rows += len(keys)
        self._since = self._since or time.monotonic()
        settings = self.store.settings
        if (self._rows >= settings["segment_rows"] or self._rows * self.width * 4 >= settings["segment_bytes"]
                or time.monotonic() - self._since >= settings["segment_seconds"]):
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        keys, values = np.concatenate(self._keys), np.concatenate(self._values)
        self._keys, self._values, self._rows, self._since = [], [], 0, None
        self.store._write_segment(self.namespace, keys, values, self.description)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.flush()
        return False


def _reopen(directory, settings):
    return FeatureStore(directory, **settings)


def _write_atomic(path: Path, payload) -> None:
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
