"""Hugging Face ``datasets.Dataset`` columns, read lazily by row ranges and never decoded by ``datasets``.

In datasets 4+, ``ds["image"]`` is a lazy ``datasets.arrow_dataset.Column`` (a view of the dataset and a column
name), not a list. It is read here through the dataset's Arrow format, a range of rows at a time: an ``Image``
column yields the stored ``{"bytes": ..., "path": ...}`` dicts (what ``Image(decode=False)`` gives), a binary
column bytes, a string column strings. No PIL image is built, so a sample's key hashes the encoded file as stored,
the same key as the same file on disk. ``datasets`` is imported only when such an object is passed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ._base import Shard, ShardInputs, Source, row_problems

_STRINGS = ("string", "large_string")
_BINARY = ("binary", "large_binary")


class HuggingFaceColumn:
    """One column of a ``datasets.Dataset`` as a lazily read sequence of raw stored values.

    ``len``, ``read(start, stop)`` (a list of rows) and ``col[i]``, which reads the ``chunk_rows`` rows around
    ``i`` at once and keeps them (one chunk per thread), so that walking the column in order reads it chunk by
    chunk. Pickles as the dataset does: a dataset memory-mapped from its Arrow files travels as file names.
    """

    chunk_rows = 256

    def __init__(self, dataset, column: str):
        if column not in dataset.column_names:
            raise ValueError(f"The dataset has no column {column!r}; its columns are {dataset.column_names}.")
        self.column = column
        self.feature = dataset.features[column]
        self._rows = dataset.select_columns([column]).with_format("arrow")
        self._chunk = threading.local()

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def in_memory(self) -> bool:
        """True when the dataset lives in this process's memory (it would pickle whole), not in Arrow files."""
        return not self._rows.cache_files

    def read(self, start: int, stop: int) -> list:
        return self._rows[start:stop].column(0).to_pylist()

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} is out of range for a column of {len(self)} rows")
        chunk = self._chunk
        start = getattr(chunk, "start", None)
        if start is None or not start <= index < start + len(chunk.rows):
            chunk.start = index - index % self.chunk_rows
            chunk.rows = self.read(chunk.start, min(len(self), chunk.start + self.chunk_rows))
        return chunk.rows[index - chunk.start]

    def __getstate__(self):
        return {"column": self.column, "feature": self.feature, "_rows": self._rows}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._chunk = threading.local()


def _dataset_column(data, column: str | None):
    """(dataset, column name) of a ``Column``, or of a ``Dataset`` and a column (needed unless it has one)."""
    import datasets

    column_type = getattr(datasets.arrow_dataset, "Column", ())
    if column_type and isinstance(data, column_type):
        if not isinstance(data.source, datasets.Dataset):
            raise ValueError("A nested column (ds['a']['b']) cannot be read lazily; select the field into a column "
                             "of its own first (e.g. ds.flatten()).")
        return data.source, data.column_name
    if isinstance(data, datasets.Dataset):
        if column is None:
            if len(data.column_names) != 1:
                raise ValueError(f"The dataset has columns {data.column_names}: name the one to extract (pass "
                                 "ds['image'], or HuggingFaceSource(ds, column='image')).")
            column = data.column_names[0]
        return data, column
    if isinstance(data, (datasets.IterableDataset, getattr(datasets.iterable_dataset, "IterableColumn", ()))):
        raise ValueError("A streaming (iterable) dataset has no length or random access; load it as a Dataset "
                         "(load_dataset(..., streaming=False) or load_from_disk), or convert it to parquet.")
    raise ValueError(f"Expected a datasets.Dataset or one of its columns (ds['image']), got {type(data).__name__}.")


def _check_feature(column: HuggingFaceColumn, modality: str | None) -> str | None:
    """The modality of the column's values (``modality`` says what strings are); raises for types no extractor
    takes, or another modality than ``modality``."""
    import datasets

    feature = column.feature
    dtype = getattr(feature, "dtype", None) if isinstance(feature, datasets.Value) else None
    if isinstance(feature, datasets.Image) or dtype in _BINARY:
        kind = "images"
    elif dtype in _STRINGS:
        if modality not in ("images", "texts"):
            raise ValueError(f"Column {column.column!r} holds strings: pass modality='images' (paths) or 'texts'.")
        kind = modality
    else:
        raise ValueError(f"Column {column.column!r} holds {feature}: expected an Image feature, binary (encoded "
                         "image files), or strings (image paths or texts).")
    if modality is not None and kind != modality:
        raise ValueError(f"Column {column.column!r} holds images ({feature}), but the extractor takes texts.")
    return kind


def lazy_column(X, modality: str = "images") -> HuggingFaceColumn | None:
    """``X`` as a :class:`HuggingFaceColumn` when it is a Hugging Face ``Column`` or one-column ``Dataset``,
    else None."""
    if type(X).__module__.split(".")[0] != "datasets":
        return None
    column = HuggingFaceColumn(*_dataset_column(X, None))
    _check_feature(column, modality)
    return column


class HuggingFaceSource(Source):
    """A column of a Hugging Face ``datasets.Dataset``: ``ds["image"]``, or the dataset and a column name.

    Shards are row ranges read with :meth:`HuggingFaceColumn.read`; ids are row indices. A shard of a dataset held
    in memory (``Dataset.from_dict``, no Arrow files) carries its rows when pickled; one memory-mapped from Arrow
    files carries file names only, and the worker reads its rows.
    """

    def __init__(self, data, column: str | None = None, modality: str | None = None):
        self.column = HuggingFaceColumn(*_dataset_column(data, column))
        self.modality = _check_feature(self.column, modality)

    def __len__(self) -> int:
        return len(self.column)

    def shards(self, shard_size: int) -> list:
        n = len(self.column)
        return [HuggingFaceShard(start, min(n, start + shard_size) - start, self.column, self.modality)
                for start in range(0, n, shard_size)]


@dataclass
class HuggingFaceShard(Shard):
    start: int
    size: int
    column: HuggingFaceColumn | None
    modality: str | None
    rows: list | None = None  # the rows themselves, once pickled from a dataset held in memory

    def read(self) -> ShardInputs:
        rows = self.rows if self.rows is not None else self.column.read(self.start, self.start + self.size)
        failed = row_problems(rows, self.modality)
        return ShardInputs([None if i in failed else v for i, v in enumerate(rows)], self.ids(), failed)

    def ids(self) -> list:
        return [str(self.start + i) for i in range(self.size)]

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.column is not None and self.column.in_memory:
            rows = self.column.read(self.start, self.start + self.size) if self.rows is None else self.rows
            state.update(column=None, rows=rows)
        return state
