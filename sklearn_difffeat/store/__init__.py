"""The segment feature store: per-sample feature rows shared by extractors, folds, processes and machines.

See :mod:`sklearn_difffeat.store._store` for the facade and docs/store.md for the design.
"""

from ._store import KEY_LENGTH, FeatureStore, SegmentWriter, StoreWriteError, as_keys, stable_hash

__all__ = ["KEY_LENGTH", "FeatureStore", "SegmentWriter", "StoreWriteError", "as_keys", "stable_hash"]
