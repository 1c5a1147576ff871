"""What one process has loaded of a namespace: its complete segments and a sorted key -> (segment, row) map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._format import KEY_LENGTH, Segment, SegmentDamaged, load_index, segment_indexes


class NamespaceIndex:
    """The segments of one namespace folder known to this process, and where each key's row is.

    Not thread-safe on its own: the store that owns it serialises access.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.segments: list[Segment] = []
        self.seen: set[str] = set()  # index files already looked at (good or bad)
        self.verified: set[str] = set()  # segments whose data matched their checksum in this process
        self.sorted_keys = np.empty(0, dtype=f"S{KEY_LENGTH}")
        self.segment_of = np.empty(0, dtype=np.int64)
        self.row_of = np.empty(0, dtype=np.int64)

    def refresh(self, on_damaged) -> None:
        """Load the indexes of segments completed since the last look; call ``on_damaged(path, error)`` for each
        damaged one, which is then skipped like a good one already loaded.

        A transient error (too many open files, ...) propagates; the segments loaded before it are kept and the
        index that failed is looked at again on the next refresh.
        """
        added = []
        try:
            for file in segment_indexes(self.folder):
                if file in self.seen:
                    continue
                try:
                    segment = load_index(self.folder / file)
                except SegmentDamaged as exc:
                    self.seen.add(file)
                    on_damaged(self.folder / file, exc)
                    continue
                self.seen.add(file)
                added.append(segment)
        finally:
            if added:
                self.add(added)

    def add(self, segments: list[Segment]) -> None:
        """Take in more segments."""
        self.segments.extend(segments)
        self.rebuild()

    def drop(self, segment_ids) -> None:
        """Forget the segments at these positions (found damaged or of the wrong width); their keys become absent
        unless another segment holds them."""
        drop = set(segment_ids)
        self.segments = [s for i, s in enumerate(self.segments) if i not in drop]
        self.rebuild()

    def rebuild(self) -> None:
        """Recompute the sorted key map from the segments."""
        if not self.segments:
            self.sorted_keys = np.empty(0, dtype=f"S{KEY_LENGTH}")
            self.segment_of = self.row_of = np.empty(0, dtype=np.int64)
            return
        keys = np.concatenate([s.keys for s in self.segments])
        segment = np.concatenate([np.full(len(s.keys), i) for i, s in enumerate(self.segments)])
        rows = np.concatenate([np.arange(len(s.keys)) for s in self.segments])
        self.sorted_keys, first = np.unique(keys, return_index=True)  # one location per key (duplicates agree)
        self.segment_of, self.row_of = segment[first], rows[first]

    def locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(found, segment position, row)`` for each key (``as_keys`` form); the last two are 0 where absent."""
        if len(self.sorted_keys) == 0:
            zeros = np.zeros(len(keys), dtype=np.int64)
            return np.zeros(len(keys), dtype=bool), zeros, zeros
        pos = np.minimum(np.searchsorted(self.sorted_keys, keys), len(self.sorted_keys) - 1)
        found = self.sorted_keys[pos] == keys
        return found, np.where(found, self.segment_of[pos], 0), np.where(found, self.row_of[pos], 0)
