"""The segment feature store: per-sample feature rows shared by extractors, folds, processes and machines.

A store folder holds one subfolder per *namespace*; a namespace names everything that determines a feature row
except the sample (model fingerprint, block, timestep, pooling, dtype, ...), and a key is the sample's
32-character hex fingerprint. Each writer (a process, a Dask task) appends whole *segments*: it writes the data
file under a temporary name, renames it, then writes the index the same way. The index appears last, so a
segment is complete exactly when its index exists, and readers only ever look at indexes. Hence: no locks, any
number of concurrent writers, a killed writer loses only its unfinished segment, readers never see partial data,
it works on a shared network filesystem (rename within a folder is atomic there too), and the number of files
grows with n / segment size.

Reads memory-map the segments and gather whole batches of rows. A segment whose index or data is damaged
(unreadable JSON, wrong size, wrong shape, checksum mismatch) is ignored with a warning, and rows that are not
finite are treated as absent, so bad files cost a recomputation, never wrong values. Several segments may hold
the same key (two writers raced on it); they hold the same values, and :meth:`FeatureStore.compact` merges
segments and drops the duplicates.

The package is split into the file format (``_format``: layout, atomic writes, segment files, checksums), the
in-memory key index of a namespace (``_index``) and the facade (``_store``: :class:`FeatureStore`,
:class:`SegmentWriter`).
"""

from ._format import KEY_LENGTH, StoreWriteError
from ._store import FeatureStore, SegmentWriter, stable_hash

__all__ = ["KEY_LENGTH", "FeatureStore", "SegmentWriter", "StoreWriteError", "stable_hash"]
