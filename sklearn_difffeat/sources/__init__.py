"""Input sources: where :func:`~sklearn_difffeat.extract` reads its samples from, a shard at a time.

A :class:`Source` has a length and splits itself into shard descriptors (``shards(shard_size)``): small picklable
objects (a slice of a list, a tar path and byte offset, a parquet file and row range, a dataset row range) that
read their samples where they run, as ``shard.read() -> (items, ids, failed)``. ``items`` are what the extractor
takes (encoded image bytes, Hugging Face image dicts, paths, arrays, texts); ``ids`` name each input for people
(a path, ``shard.tar/key``, ``table.parquet#row``, a row index); ``failed`` lists the samples the source itself
could not produce (a missing member, a null value) by position in the shard. ``shard.ids()`` gives the ids alone.

Sources: :class:`SequenceSource` (lists, arrays, Series), :class:`WebDatasetSource` (tar shards),
:class:`ParquetSource` (image bytes, paths or texts in a parquet column) and :class:`HuggingFaceSource` (a column
of a ``datasets.Dataset``). This package depends on no other part of the library.
"""

from ._base import SequenceShard, SequenceSource, Shard, ShardInputs, Source, as_source, resolve_files
from ._hf import HuggingFaceColumn, HuggingFaceShard, HuggingFaceSource, lazy_column
from ._parquet import ParquetShard, ParquetSource
from ._webdataset import WebDatasetShard, WebDatasetSource, index_tar, split_key

__all__ = [
    "HuggingFaceColumn", "HuggingFaceShard", "HuggingFaceSource", "ParquetShard", "ParquetSource", "SequenceShard",
    "SequenceSource", "Shard", "ShardInputs", "Source", "WebDatasetShard", "WebDatasetSource", "as_source",
    "index_tar", "lazy_column", "resolve_files", "split_key",
]
