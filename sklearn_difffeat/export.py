"""Export stored features in manifest order, with the input ids beside them, for use outside the library.

Two formats, both written in chunks of rows, so memory stays bounded at any number of inputs:

* ``.npy``: a float32 ``(n_inputs, n_features)`` array (written through ``numpy.lib.format.open_memmap``), plus
  ``<stem>.ids.parquet`` with ``id``, ``position``, ``key``, ``status`` per row;
* ``.parquet``: one table with ``id``, ``position``, ``key``, ``status`` and ``features``, a fixed-size list of
  float32. One list column rather than one column per feature: a DiT-XL/2 export at 28 blocks has 32,256
  features, and parquet (like pandas) handles tens of thousands of columns badly (the footer describes every
  column of every row group), while a fixed-size list is one contiguous float32 buffer per row group that
  ``numpy`` gets back without a copy per value.

Rows of failed inputs are NaN (their status says ``failed``). Both files carry, in their parquet metadata under
``sklearn_difffeat``, the manifest's metadata and the exported blocks, timesteps, width and feature prefix:
columns run block by block, then timestep by timestep, ``width`` columns each, as ``transform`` orders them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.base import clone

from .backbones.base import resolve_blocks
from .manifest import METADATA_KEY, extractor_from_manifest, read_manifest_info

__all__ = ["export_features"]

CHUNK_BYTES = 256 << 20  # features held in memory per chunk, at most (and at most MAX_CHUNK_ROWS rows)
MAX_CHUNK_ROWS = 8192
_ID_FIELDS = [("id", pa.string()), ("position", pa.int64()), ("key", pa.string()), ("status", pa.string())]
_ABSENT_KEY = "0" * 32  # read in place of a failed input's missing key; its row is set to NaN in any case


def export_features(manifest, output, store=None, *, blocks=None, timesteps=None, extractor=None,
                    chunk_rows: int | None = None, progress: bool = False) -> list[Path]:
    """Write the features of a manifest's inputs, in its order, to ``output`` (``.npy`` or ``.parquet``).

    Parameters
    ----------
    manifest : path-like
        A manifest written by :func:`~sklearn_difffeat.extract` or ``sklearn-difffeat extract``.
    output : path-like
        ``*.npy`` (with ``<stem>.ids.parquet`` beside it) or ``*.parquet``.
    store : path-like or None
        The feature store; None uses the one the manifest names.
    blocks, timesteps : list or None
        A subset of what the manifest's extractor extracted (its ``block`` and, with ``cache_depth``, every
        block up to that depth; its ``timestep``), in the column order wanted. None: all of ``block`` /
        ``timestep``.
    extractor : fitted extractor or None
        The extractor that extracted them; None rebuilds it from the manifest.
    chunk_rows : int or None
        Rows read and written at a time; None: as many as fit in 256 MiB, at most 8,192.
    progress : bool
        A progress bar over rows.

    Returns
    -------
    list of Path
        The files written.
    """
    from tqdm.auto import tqdm

    manifest, output = Path(manifest), Path(output)
    info = read_manifest_info(manifest)
    store = Path(store if store is not None else info["store"])
    if output.suffix not in (".npy", ".parquet"):
        raise ValueError(f"output must end in .npy or .parquet, got {output.name!r}.")
    if extractor is None:
        extractor = extractor_from_manifest(info, store)
    reader = _reader(extractor, store, blocks, timesteps)
    layout = reader.feature_layout()
    info = {**info, "blocks": list(layout.blocks), "timesteps": list(layout.timesteps), "width": layout.width,
            "prefix": layout.prefix}
    source = pq.ParquetFile(manifest)
    n, n_features = source.metadata.num_rows, layout.n_features
    chunk = chunk_rows or max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (4 * n_features)))
    sink = _NpySink(output, n, n_features, info) if output.suffix == ".npy" else _ParquetSink(output, n_features,
                                                                                             info)
    absent, start = [0, None], 0
    with tqdm(total=n, disable=not progress, desc="export", unit="row") as bar:
        try:
            for batch in source.iter_batches(batch_size=chunk, columns=[name for name, _ in _ID_FIELDS]):
                values = _read(reader, store, batch, absent)
                sink.write(start, batch, values)
                start += len(values)
                bar.update(len(values))
        except BaseException:
            sink.abort()
            raise
    if absent[0]:
        warnings.warn(f"{absent[0]} inputs the manifest lists as extracted have no complete features in the store "
                      f"{store} (first: {absent[1]!r}); their rows are NaN.", UserWarning, stacklevel=2)
    return sink.close()


def _reader(extractor, store, blocks, timesteps):
    """A fitted clone of ``extractor`` whose ``read_stored`` reads the chosen subset from ``store``."""
    base = clone(extractor).set_params(cache=os.fspath(store), verbose=0).fit()
    layout = base.feature_layout()
    extracted = list(layout.blocks)
    if base.cache_depth is not None:  # a pass deeper than every block stored every block up to its depth
        depth = resolve_blocks(base.cache_depth, base.n_blocks_, name="cache_depth")[0]
        if depth > max(extracted):
            extracted += [b for b in range(depth + 1) if b not in extracted]
    chosen_blocks = list(layout.blocks)
    if blocks is not None:
        chosen_blocks = resolve_blocks(blocks, base.n_blocks_, name="block")
        others = [b for b in chosen_blocks if b not in extracted]
        if others:
            raise ValueError(f"block {others} was not extracted: the manifest's extractor extracted blocks "
                             f"{sorted(extracted)} (0 = embedding; negatives count from {base.n_blocks_}).")
    chosen_steps = list(layout.timesteps)
    if timesteps is not None:
        chosen_steps = []
        for t in timesteps:
            match = [s for s in layout.timesteps if s == t]
            if not match:
                raise ValueError(f"timestep {t:g} was not extracted: the manifest's extractor extracted timesteps "
                                 f"{list(layout.timesteps)}.")
            chosen_steps.append(match[0])
    return base.set_params(block=chosen_blocks, timestep=chosen_steps, cache_depth=None).fit()


def _read(reader, store, batch: pa.RecordBatch, absent: list) -> np.ndarray:
    """Features of a manifest chunk: NaN rows for failed inputs (counted in ``absent`` if others are missing)."""
    failed = np.asarray(batch.column("status").to_pylist(), dtype=object) == "failed"
    keys = np.asarray([k if k is not None else _ABSENT_KEY for k in batch.column("key").to_pylist()], dtype="S32")
    values = reader.read_stored(keys, store)
    values[failed] = np.nan
    missing = np.flatnonzero(~failed & np.isnan(values).any(axis=1))
    if len(missing):
        absent[0] += len(missing)
        absent[1] = absent[1] or batch.column("id")[int(missing[0])].as_py()
    return values


def _metadata(info: dict) -> dict:
    return {METADATA_KEY: json.dumps(info).encode()}


class _NpySink:
    """``output.npy`` through a memory map, and ``<stem>.ids.parquet``; both renamed into place at the end."""

    def __init__(self, output: Path, n: int, n_features: int, info: dict):
        from numpy.lib.format import open_memmap

        self.output, self.ids = output, output.with_name(output.stem + ".ids.parquet")
        self.temporary = [_temporary(self.output), _temporary(self.ids)]
        self.array = open_memmap(self.temporary[0], mode="w+", dtype=np.float32, shape=(n, n_features))
        self.writer = pq.ParquetWriter(self.temporary[1], pa.schema(_ID_FIELDS, metadata=_metadata(info)))

    def write(self, start: int, batch: pa.RecordBatch, values: np.ndarray) -> None:
        self.array[start:start + len(values)] = values
        self.array.flush()  # hand the chunk to the file: dirty pages never pile up past one chunk
        self.writer.write_table(pa.Table.from_batches([batch]))

    def close(self) -> list[Path]:
        self.array.flush()
        del self.array
        self.writer.close()
        os.replace(self.temporary[0], self.output)
        os.replace(self.temporary[1], self.ids)
        return [self.output, self.ids]

    def abort(self) -> None:
        self.writer.close()
        del self.array
        for path in self.temporary:
            path.unlink(missing_ok=True)


class _ParquetSink:
    """One parquet table: the id columns and the features as a fixed-size list, one row group per chunk."""

    def __init__(self, output: Path, n_features: int, info: dict):
        self.output, self.temporary, self.n_features = output, _temporary(output), n_features
        fields = [*_ID_FIELDS, ("features", pa.list_(pa.float32(), n_features))]
        self.schema = pa.schema(fields, metadata=_metadata(info))
        self.writer = pq.ParquetWriter(self.temporary, self.schema)

    def write(self, start: int, batch: pa.RecordBatch, values: np.ndarray) -> None:
        features = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), self.n_features)
        columns = [batch.column(name) for name, _ in _ID_FIELDS] + [features]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))

    def close(self) -> list[Path]:
        self.writer.close()
        os.replace(self.temporary, self.output)
        return [self.output]

    def abort(self) -> None:
        self.writer.close()
        self.temporary.unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
