"""Extraction manifests: which input got which content key, and what extraction did with it.

A manifest is a parquet table with one row per input, in input order: ``id`` (a file's path, or the input's
position), ``position``, ``key`` (the 32 hex characters that key its features in the store; null for a failed
input), ``status`` (``computed``, ``stored`` or ``failed``) and ``error`` (why it failed). Its key-value metadata
(under ``sklearn_difffeat``) holds the extractor's class and parameters, the compute dtype, the store and the
library version, enough to rebuild the extractor and read the features back with :mod:`sklearn_difffeat.export`
(or by hand, from the store's namespaces).

Writing keeps memory bounded at any number of inputs: each shard's rows go to a small part file as the shard
completes (in any order, as Dask completes them), and at the end the parts are streamed into the manifest in
input order, one row group each, then removed. An interrupted run leaves its parts next to the manifest; a rerun
with the same manifest path replaces them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

__all__ = ["MANIFEST_SCHEMA", "ManifestWriter", "default_manifest_path", "extractor_from_manifest",
           "read_manifest_info"]

FORMAT = "sklearn-difffeat manifest"
VERSION = 1
METADATA_KEY = b"sklearn_difffeat"
STATUSES = ("computed", "stored", "failed")
MANIFEST_SCHEMA = pa.schema([("id", pa.string()), ("position", pa.int64()), ("key", pa.string()),
                             ("status", pa.string()), ("error", pa.string())])


def default_manifest_path(store, name: str = "extract") -> Path:
    """``<store>/.manifests/<name>-<UTC time>.parquet``, made unique with a counter if that name is taken.

    ``name`` keeps only letters, digits, ``.``, ``_`` and ``-`` (an input such as ``{000..099}.tar``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "extract"
    folder = Path(store) / ".manifests"  # a hidden folder: the store takes every other folder for a namespace
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path, count = folder / f"{name}-{stamp}.parquet", 1
    while path.exists() or _parts_folder(path).exists():
        count += 1
        path = folder / f"{name}-{stamp}-{count}.parquet"
    return path


class ManifestWriter:
    """Collects an extraction's rows shard by shard, then writes the manifest in input order.

    Parameters
    ----------
    path : path-like
        Where the manifest goes; its parts go to ``<path>.parts/`` meanwhile.
    extractor : fitted extractor
        Its class, parameters and compute dtype go into the metadata.
    store : path-like
        The store the features went to.
    n_inputs : int
    """

    def __init__(self, path, extractor, store, n_inputs: int):
        self.path = Path(path)
        self.parts = _parts_folder(self.path)
        self.n_inputs = n_inputs
        self.info = manifest_info(extractor, store, n_inputs)
        self.counts = dict.fromkeys(STATUSES, 0)
        self.starts: list[int] = []
        if self.parts.exists():  # left by an interrupted run: this run rewrites every part
            shutil.rmtree(self.parts)
        self.parts.mkdir(parents=True)

    def add(self, start: int, ids, report) -> None:
        """Write the part of the shard starting at input ``start``: ``ids`` and a ``TransformReport``."""
        n = len(report.keys)
        if len(ids) != n:
            raise ValueError(f"Shard at input {start}: {len(ids)} ids for {n} inputs.")
        status = np.where(report.from_store, "stored", "computed").astype(object)
        keys = np.char.decode(np.asarray(report.keys, dtype="S32"), "ascii").astype(object)
        errors = np.full(n, None, dtype=object)
        for position, message in report.failed.items():
            status[position], keys[position], errors[position] = "failed", None, str(message)
        table = pa.table({"id": pa.array([str(i) for i in ids], pa.string()),
                          "position": pa.array(np.arange(start, start + n, dtype=np.int64)),
                          "key": pa.array(keys, pa.string()), "status": pa.array(status, pa.string()),
                          "error": pa.array(errors, pa.string())}, schema=MANIFEST_SCHEMA)
        final = self.parts / f"part-{start:012d}.parquet"
        temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, final)  # a part exists whole or not at all
        self.starts.append(start)
        for name in STATUSES:
            self.counts[name] += int((status == name).sum())

    def finish(self) -> Path:
        """Stream the parts into the manifest in input order (one row group each), then remove them."""
        starts = sorted(self.starts)
        covered = sum(pq.ParquetFile(self._part(s)).metadata.num_rows for s in starts)
        if covered != self.n_inputs:
            raise RuntimeError(f"The manifest parts in {self.parts} cover {covered} of {self.n_inputs} inputs.")
        info = {**self.info, "counts": self.counts}
        schema = MANIFEST_SCHEMA.with_metadata({METADATA_KEY: json.dumps(info).encode()})
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with pq.ParquetWriter(temporary, schema) as writer:
            for start in starts:
                writer.write_table(pq.read_table(self._part(start), schema=MANIFEST_SCHEMA).replace_schema_metadata(
                    schema.metadata))
        os.replace(temporary, self.path)
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.path

    def _part(self, start: int) -> Path:
        return self.parts / f"part-{start:012d}.parquet"


def manifest_info(extractor, store, n_inputs: int) -> dict:
    """The metadata of a manifest: what rebuilds the extractor and finds its features."""
    from . import __version__

    params = extractor.get_params(deep=False)
    in_memory = not isinstance(params["model"], (str, os.PathLike))
    layout = extractor.feature_layout()
    dtype = next(iter(layout.descriptions.values()))["dtype"]
    return {
        "format": FORMAT, "version": VERSION, "library_version": __version__, "created": _utc_now(),
        "extractor": type(extractor).__name__,
        "params": {k: None if k == "model" and in_memory else _jsonable(v, k) for k, v in params.items()},
        "model_in_memory": in_memory, "dtype": dtype, "store": os.path.abspath(os.fspath(store)),
        "n_inputs": n_inputs,
    }


def read_manifest_info(path) -> dict:
    """The metadata of the manifest at ``path``; a ``ValueError`` naming the file if it is not a manifest."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Manifest {path} does not exist.")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path} is not a parquet manifest ({exc}).") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    info = json.loads(raw) if raw else {}
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is a parquet file but not an extraction manifest (no {METADATA_KEY.decode()} "
                         "metadata).")
    if info.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer version of sklearn-difffeat (manifest version "
                         f"{info['version']}); upgrade to read it.")
    return info


def extractor_from_manifest(info: dict, store):
    """An extractor with the manifest's parameters, reading ``store`` in the dtype the features were computed in
    (``dtype="auto"`` would resolve otherwise on a machine without a GPU), on the CPU."""
    from . import extractors

    if info.get("model_in_memory"):
        raise ValueError("The manifest's model was given as modules in memory, which a manifest cannot rebuild; "
                         "export from Python with ExtractionResult.export.")
    name = info["extractor"]
    if name not in ("DiTFeatureExtractor", "TextDiffusionFeatureExtractor"):
        raise ValueError(f"The manifest names an unknown extractor {name!r}.")
    cls = getattr(extractors, name)
    params = dict(info["params"])
    known = set(cls().get_params(deep=False))
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"The manifest's {name} has parameters this version does not know: {unknown}.")
    params.update(cache=os.fspath(store), dtype=info["dtype"], device="cpu", verbose=0)
    return cls(**params)


def _jsonable(value, name: str):
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, range, np.ndarray)):
        return [_jsonable(v, name) for v in value]
    if isinstance(value, (os.PathLike, torch.device)):
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    raise ValueError(f"The extractor parameter {name}={value!r} cannot be written to a manifest.")


def _parts_folder(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
