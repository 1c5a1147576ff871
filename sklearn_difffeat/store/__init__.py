"""The segment feature store: per-sample feature rows shared by extractors, folds, processes and machines.

A store folder holds one subfolder per *namespace*; a namespace names everything that determines a feature row
except the sample (model fingerprint, block, timestep, pooling, dtype, ...), and a key is the sample's
32-character hex fingerprint. Each writer (a process, a Dask task) appends whole *segments*: it writes the data
file under a temporary name, syncs it to disk, renames it, syncs the folder, then writes the index the same way.
The index appears last, so a segment is complete exactly when its index exists, and readers only ever look at
indexes. Hence: no locks, any number of concurrent writers, a killed writer or a power loss loses only the
unfinished segment, readers never see partial data, it works on a shared network filesystem (rename within a
folder is atomic there too), and the number of files grows with n / segment size. A write that fails (full disk,
read-only folder, ...) raises :class:`StoreWriteError` and leaves nothing of the segment behind.

Reads memory-map the segments and gather whole batches of rows. A segment whose index or data is damaged
(unreadable, truncated, wrong shape, checksum of keys and data mismatched) is ignored with a warning, and rows
that are not finite are treated as absent, so bad files cost a recomputation, never wrong values or a crash.
Errors of the process rather than the files (too many open files, out of memory) are not damage: the store
closes its memory maps and retries once, then raises :class:`StoreReadError`. Several segments may hold the same
key (two writers raced on it); they hold the same values, and :meth:`FeatureStore.compact` merges segments and
drops the duplicates. Namespace names are checked on every call, so nothing outside the store folder is touched.

A small registry maps model *identities* (what names a model without loading it) to what loading it resolved
(e.g. the weights' fingerprint), so that stored features can be read without loading the weights
(:meth:`FeatureStore.record_identity`, :meth:`FeatureStore.lookup_identity`).

The package is split into durable file writes and OS-error classes (``_files``), the file format (``_format``:
layout, names, segment files, checksums), the in-memory key index of a namespace (``_index``), the identity
registry (``_identity``) and the facade (``_store``: :class:`FeatureStore`, :class:`SegmentWriter`).
"""

from ._format import KEY_LENGTH, StoreReadError, StoreWriteError, stable_hash
from ._store import FeatureStore, SegmentWriter

__all__ = ["KEY_LENGTH", "FeatureStore", "SegmentWriter", "StoreReadError", "StoreWriteError", "stable_hash"]
