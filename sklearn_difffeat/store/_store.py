"""The feature store's facade: :class:`FeatureStore` (reads, maintenance, per-process caches, the identity
registry) and :class:`SegmentWriter` (buffers rows into segments). The file format is in ``_format`` (durable
writes in ``_files``), the in-memory key index in ``_index``, the identity registry in ``_identity``.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from . import _identity
from ._files import is_transient, make_folder, os_error_text
from ._format import (
    STORE_FILE,
    Segment,
    SegmentDamaged,
    StoreReadError,
    StoreWriteError,
    append_segment,
    as_keys,
    caused_by,
    check_namespace,
    delete_namespace,
    delete_segment,
    namespace_folders,
    open_data,
    read_description,
    read_settings,
    remove_abandoned,
    write_settings,
)
from ._index import NamespaceIndex

DEFAULTS = {"segment_rows": 4096, "segment_seconds": 60.0, "segment_bytes": 256 << 20}
_STALE_SECONDS = 3600  # compact() removes unfinished files older than this (their writer is long gone)
_OPEN_MAPS = 128  # memory maps kept open per store (each holds a file descriptor)


def _locked(method):
    """Run a FeatureStore method under the store's lock."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


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
    durable : bool, default True
        Sync each file to disk before renaming it into place, and its folder after, so that a power loss keeps
        every segment that was complete. False skips the syncs (faster on slow disks); a power loss may then
        leave damaged segments, which reads detect and recompute. Not saved: each process chooses.
    """

    def __init__(self, directory, *, segment_rows=None, segment_seconds=None, segment_bytes=None, durable=True):
        if directory is None or os.fspath(directory) == "":
            raise ValueError("A feature store needs a folder path; got an empty path.")
        self.directory = Path(directory).expanduser()
        self.durable = bool(durable)
        self.settings = dict(DEFAULTS)
        try:
            self.settings.update({k: v for k, v in read_settings(self.directory).items() if k in DEFAULTS})
        except (OSError, ValueError):
            warnings.warn(f"Ignoring the unreadable {self.directory / STORE_FILE}; using default segment sizes.",
                          stacklevel=2)
        explicit = {"segment_rows": segment_rows, "segment_seconds": segment_seconds, "segment_bytes": segment_bytes}
        self.settings.update({k: v for k, v in explicit.items() if v is not None})
        self._namespaces: dict[str, NamespaceIndex] = {}
        self._maps: OrderedDict = OrderedDict()
        self._warned: set = set()
        # One store object may serve several threads (e.g. a Dask worker running tasks in threads): the loaded
        # indexes and the open maps change under this lock.
        self._lock = threading.RLock()

    @classmethod
    def create(cls, directory, **settings) -> FeatureStore:
        """Create (or reopen) a store and save its segment settings for every writer that opens it later."""
        store = cls(directory, **settings)
        try:
            make_folder(store.directory, store.durable)
            write_settings(store.directory, store.settings, store.durable)
        except OSError as exc:
            raise caused_by(StoreWriteError, f"Could not create the feature store {store.directory}: "
                                             f"{os_error_text(exc)}", exc) from exc
        return store

    def __repr__(self):
        return f"FeatureStore({str(self.directory)!r})"

    def __reduce__(self):  # pickles as its folder and settings: loaded indexes and maps are per process
        return (_reopen, (str(self.directory), self.settings, self.durable))

    # ---- reading ----------------------------------------------------------------------------------------
    def namespaces(self) -> dict[str, dict]:
        """Every namespace in the store, with the description its first writer gave (``{}`` if none)."""
        return {folder.name: read_description(folder) for folder in namespace_folders(self.directory)}

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

        Rows of absent keys are left as zeros. ``width`` (default: that of the namespace's first segment)
        rejects segments of another width, e.g. features written by another version of a model configuration.
        Damaged segments and non-finite rows count as absent, with a warning. Raises :class:`StoreReadError`
        when the files cannot be opened for a reason that is not damage (too many open files, ...).
        """
        keys = as_keys(keys)
        ns = self._refresh(namespace)
        while True:  # each pass that does not break drops at least one segment, so this ends
            if width is None:
                width = ns.segments[0].width if ns.segments else 0
            wrong = [i for i, s in enumerate(ns.segments) if s.width != width]
            if wrong:
                self._drop(ns, wrong, f"rows of width {ns.segments[wrong[0]].width}, expected {width}")
                continue
            found, segment_ids, rows = ns.locate(keys)
            values, damaged = self._gather(ns, found, segment_ids, rows, width)
            if not damaged:
                break
            self._drop(ns, damaged, "unreadable")  # then look again: another segment may hold those keys
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
        """Append ``values`` (n, width) for ``keys`` as one segment, now. Raises :class:`StoreWriteError` if it
        cannot be written; then nothing of it is visible to readers."""
        check_namespace(namespace)
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or len(values) != len(keys):
            raise ValueError(f"values must have shape (len(keys), width) = ({len(keys)}, w), got {values.shape}.")
        with self.writer(namespace, values.shape[1], description) as writer:
            writer.add(keys, values)

    # ---- model identities -------------------------------------------------------------------------------
    @_locked
    def record_identity(self, identity: dict, resolved: dict) -> None:
        """Record that loading the model named by ``identity`` (e.g. hub id and revision, or a folder's file
        names, sizes and times, plus options such as the dtype) resolved ``resolved`` (e.g. the weights'
        fingerprint, the number of blocks, the width), so that later reads need not load the model.

        Both are JSON-serialisable dicts the store does not interpret. Atomic, durable, idempotent and safe with
        any number of concurrent writers. Raises :class:`StoreWriteError` if it cannot be written.
        """
        _identity.record(self.directory, identity, resolved, self._warn_once, self.durable)

    @_locked
    def lookup_identity(self, identity: dict) -> dict | None:
        """What loading the model named by ``identity`` resolved, or None if it was never recorded.

        Damaged records are ignored with a warning. If loads of one identity resolved different values, the
        record made last wins (see docs/store.md).
        """
        return self._retry_transient(lambda: _identity.lookup(self.directory, identity, self._warn_once),
                                     "the model-identity records")

    # ---- maintenance ------------------------------------------------------------------------------------
    @_locked
    def clear(self, namespace: str | None = None) -> None:
        """Delete one namespace, or everything: every namespace, the identity records and the settings."""
        if namespace is not None:
            targets = [self.directory / check_namespace(namespace)]
        elif self.directory.is_dir():
            targets = [p for p in self.directory.iterdir() if p.is_dir()]
        else:
            targets = []
        for folder in targets:
            delete_namespace(folder)
            self._namespaces.pop(folder.name, None)
        if namespace is None:
            (self.directory / STORE_FILE).unlink(missing_ok=True)
        self._maps.clear()

    @_locked
    def compact(self, namespace: str | None = None) -> None:
        """Merge each namespace's segments into as few as the segment size allows, dropping duplicate keys,
        damaged segments and files of writers that died more than an hour ago. Safe while others read or write:
        new segments are complete before old ones are removed, and a reader that loses a segment recomputes."""
        for name in [check_namespace(namespace)] if namespace is not None else list(self.namespaces()):
            ns = self._refresh(name)
            old = list(ns.segments)
            chunk = max(1, int(self.settings["segment_rows"]))
            keys, width = ns.sorted_keys, (old[0].width if old else 0)
            for start in range(0, len(keys), chunk):
                values, found = self.read(name, keys[start:start + chunk], width)
                if found.any():
                    append_segment(self.directory, name, keys[start:start + chunk][found], values[found],
                                   self.settings, durable=self.durable)
            for segment in old:
                delete_segment(ns.folder, segment.name)
            remove_abandoned(ns.folder, _STALE_SECONDS)
            self._namespaces.pop(name, None)
            self._maps.clear()
        if namespace is None and (self.directory / _identity.IDENTITY_FOLDER).is_dir():
            remove_abandoned(self.directory / _identity.IDENTITY_FOLDER, _STALE_SECONDS)

    # ---- internals --------------------------------------------------------------------------------------
    def _refresh(self, namespace: str) -> NamespaceIndex:
        """The namespace's index, with the segments completed since the last look."""
        ns = self._namespaces.setdefault(check_namespace(namespace), NamespaceIndex(self.directory / namespace))

        def damaged(path, exc):
            self._warn_once(path, f"Ignoring the damaged feature-store index {path} ({exc}); its rows are recomputed.")

        self._retry_transient(lambda: ns.refresh(damaged), f"the segment indexes of namespace {namespace!r}")
        return ns

    def _gather(self, ns: NamespaceIndex, found, segment_ids, rows, width: int):
        """``(values, damaged)``: the found keys' rows, and the positions of the segments found damaged."""
        values = np.zeros((len(found), width), dtype=np.float32)
        damaged = []
        for seg_id in np.unique(segment_ids[found]):
            where = np.flatnonzero(found & (segment_ids == seg_id))
            data = self._rows(ns, ns.segments[seg_id])
            if data is None:
                damaged.append(int(seg_id))
                continue
            order = np.argsort(rows[where], kind="stable")  # ascending rows read the file forwards
            values[where[order]] = data[rows[where][order]]
        return values, damaged

    def _rows(self, ns: NamespaceIndex, segment: Segment):
        """The segment's data as a read-only memory map, its checksum verified once per process; None if damaged."""
        key = str(segment.data)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        verify = segment.name not in ns.verified
        try:
            data = self._retry_transient(lambda: open_data(segment, verify), f"the segment {segment.data}")
        except SegmentDamaged as exc:
            self._warn_once(segment.data, f"Ignoring the damaged feature-store segment {segment.data} ({exc}); "
                            "its rows are recomputed.")
            return None
        ns.verified.add(segment.name)
        self._maps[key] = data
        while len(self._maps) > _OPEN_MAPS:
            self._maps.popitem(last=False)
        return data

    def _retry_transient(self, action, what: str):
        """``action()``; after a transient OS error (too many open files, out of memory, ...), close the store's
        memory maps (each holds a file descriptor and address space) and run it once more, then raise
        :class:`StoreReadError`. Such an error says nothing about the files, so nothing is dropped: a dropped
        healthy segment would be recomputed for nothing, and deleted by :meth:`compact`."""
        for attempt in (1, 2):
            try:
                return action()
            except (OSError, MemoryError) as exc:
                if not is_transient(exc):
                    raise
                if attempt == 2:
                    raise caused_by(StoreReadError, f"Could not read {what} in the feature store {self.directory}: "
                                    f"{os_error_text(exc)}, even after closing the store's memory maps. This is not "
                                    "damage and nothing was dropped; retry with fewer files open or more memory (e.g. "
                                    "a higher `ulimit -n`).", exc) from exc
                self._maps.clear()

    def _drop(self, ns: NamespaceIndex, segment_ids, reason: str):
        for i in segment_ids:
            self._warn_once(ns.segments[i].data, f"Ignoring feature-store segment {ns.segments[i].data}: {reason}.")
        ns.drop(segment_ids)

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
        self.store, self.namespace, self.width = store, check_namespace(namespace), int(width)
        self.description = description
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
        """Write the buffered rows as one segment; raises :class:`StoreWriteError` (and drops them) if it fails."""
        if not self._rows:
            return
        keys, values = np.concatenate(self._keys), np.concatenate(self._values)
        self._keys, self._values, self._rows, self._since = [], [], 0, None
        append_segment(self.store.directory, self.namespace, keys, values, self.store.settings, self.description,
                       self.store.durable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.flush()
        return False


def _reopen(directory, settings, durable=True):
    return FeatureStore(directory, durable=durable, **settings)
