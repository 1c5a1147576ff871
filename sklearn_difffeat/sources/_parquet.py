"""Parquet tables of encoded images, image paths or texts, read a row range at a time with pyarrow."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._base import Shard, ShardInputs, Source, resolve_files, row_problems

_BATCH_ROWS = 1024  # rows per Arrow batch while reading a shard: bounds the decoded column held at once


def _column_kind(path: str, column: str) -> str:
    """``"bytes"`` (binary), ``"struct"`` (the Hugging Face ``{bytes, path}`` image struct) or ``"strings"``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if column not in schema.names:
        raise ValueError(f"{path} has no column {column!r}; its columns are {schema.names}.")
    kind = schema.field(column).type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "strings"
    raise ValueError(f"Column {column!r} of {path} has type {kind}: expected binary (encoded image files), a "
                     "{bytes, path} image struct, or strings (image paths or texts).")


class ParquetSource(Source):
    """A column of one or more parquet files: encoded images (binary, or the Hugging Face ``{bytes, path}``
    struct), image paths or texts (strings).

    Parameters
    ----------
    files : str, path-like or list
        A file, a brace pattern (``part-{000..015}.parquet``), a folder of ``.parquet`` files or a list.
    column : str
        The column to extract.
    modality : {"images", "texts"} or None
        What a string column holds (required for one); binary and struct columns are images. Relative image
        paths are read from the table's folder.

    Shards are row ranges of one file, read with ``ParquetFile.iter_batches`` over the row groups they overlap,
    never the whole file. Ids are ``file.parquet#row`` (row within the file), or the path for a path column.
    """

    def __init__(self, files, column: str, modality: str | None = None):
        import pyarrow.parquet as pq

        self.files = resolve_files(files, ".parquet", "parquet files")
        self.column = column
        self.kinds = [_column_kind(path, column) for path in self.files]
        if "strings" in self.kinds and len(set(self.kinds)) > 1:
            raise ValueError(f"Column {column!r} holds strings in some files and image bytes in others.")
        if self.kinds[0] != "strings":
            if modality == "texts":
                raise ValueError(f"Column {column!r} holds encoded images, but the extractor takes texts.")
            modality = "images"
        elif modality not in ("images", "texts"):
            raise ValueError(f"Column {column!r} holds strings: pass modality='images' (paths) or 'texts'.")
        self.modality = modality
        self.rows = [pq.ParquetFile(path).metadata.num_rows for path in self.files]

    def __len__(self) -> int:
        return sum(self.rows)

    def shards(self, shard_size: int) -> list:
        shards, start = [], 0
        for path, kind, rows in zip(self.files, self.kinds, self.rows):
            for first in range(0, rows, shard_size):
                size = min(rows, first + shard_size) - first
                shards.append(ParquetShard(start, size, path, first, self.column, kind, self.modality))
                start += size
        return shards


@dataclass
class ParquetShard(Shard):
    start: int
    size: int
    path: str
    first_row: int  # within the file
    column: str
    kind: str
    modality: str | None

    def values(self) -> list:
        """The column's values of the shard's rows, read by the row groups they fall in."""
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.path) as table:
            groups, group_start, skip = [], 0, None
            for g in range(table.metadata.num_row_groups):
                rows = table.metadata.row_group(g).num_rows
                if group_start < self.first_row + self.size and group_start + rows > self.first_row:
                    groups.append(g)
                    skip = self.first_row - group_start if skip is None else skip
                group_start += rows
            values = []
            for batch in table.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=[self.column]):
                column = batch.column(0)
                if skip:
                    column, skip = column.slice(min(skip, len(column))), max(0, skip - len(column))
                values.extend(column.slice(0, self.size - len(values)).to_pylist())
                if len(values) == self.size:
                    break
        if len(values) != self.size:
            raise ValueError(f"{self.path}: expected rows {self.first_row}..{self.first_row + self.size - 1}, read "
                             f"{len(values)} (did the file change since extraction started?).")
        return values

    def read(self) -> ShardInputs:
        values = self.values()
        failed = row_problems(values, self.modality)
        items = [None if i in failed else self._item(v) for i, v in enumerate(values)]
        if self.kind == "strings" and self.modality != "texts":
            ids = [item if item is not None else self._row_id(i) for i, item in enumerate(items)]
        else:
            ids = [self._row_id(i) for i in range(self.size)]
        return ShardInputs(items, ids, failed)

    def ids(self) -> list:
        if self.kind == "strings" and self.modality != "texts":
            return self.read().ids
        return [self._row_id(i) for i in range(self.size)]

    def _row_id(self, i: int) -> str:
        return f"{self.path}#{self.first_row + i}"

    def _item(self, value):
        if self.kind == "strings" and self.modality != "texts" and not os.path.isabs(value):
            return os.path.join(os.path.dirname(self.path), value)  # relative paths are read from the table's folder
        return value
