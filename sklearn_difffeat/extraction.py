"""Sharded, resumable extraction into a feature store, in this process or on a Dask cluster.

Extraction is a set of idempotent shard tasks: each runs the extractor on a slice of the inputs and appends its
own segments to the store, skipping samples already stored. Run in this process (one device) or with a
``dask.distributed.Client`` (one worker per GPU, many machines). A task carries the extractor's parameters and
its slice of the inputs, never the weights: each worker loads the model once and keeps it for every shard it
runs. A worker lost mid-shard has its task rerun elsewhere by Dask, and since tasks skip what is stored, the
result is that of an uninterrupted run. Searches then read the store without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.base import clone

from .extractors import BaseDiffusionFeatureExtractor, DiTFeatureExtractor, TransformReport, open_store
from .manifest import ManifestWriter, default_manifest_path
from .store import KEY_LENGTH, FeatureStore

__all__ = ["ExtractionResult", "extract", "shard_ids"]


@dataclass
class ExtractionResult:
    """What an extraction did, and how to read its features back in input order.

    Attributes
    ----------
    extractor : the fitted extractor (parameters only; its ``cache`` is the store).
    store : FeatureStore
    keys : (n,) array of the inputs' content keys, in input order.
    computed, already_stored : numbers of samples that needed the model, and that the store already held.
    failed : {input position: reason} for inputs that could not be read (their feature rows are NaN).
    manifest : Path or None
        The manifest of the run (each input's id, key and status; see :meth:`export`), or None without one.
    """

    extractor: BaseDiffusionFeatureExtractor
    store: FeatureStore
    keys: np.ndarray
    computed: int = 0
    already_stored: int = 0
    failed: dict = field(default_factory=dict)
    manifest: Path | None = None

    def features(self) -> np.ndarray:
        """(n, n_features) float32, in input order, read from the store (NaN rows for failed inputs); see
        :meth:`~sklearn_difffeat.DiTFeatureExtractor.read_stored`."""
        return self.extractor.read_stored(self.keys, self.store)

    def export(self, path, blocks=None, timesteps=None, *, chunk_rows=None) -> list[Path]:
        """Write the features in input order, with each input's id, to ``path`` (``.npy`` plus
        ``<stem>.ids.parquet``, or one ``.parquet``), reading the store in chunks; see
        :func:`sklearn_difffeat.export.export_features`. ``blocks`` / ``timesteps`` choose a subset of what was
        extracted. Returns the files written."""
        from .export import export_features

        if self.manifest is None:
            raise ValueError("This extraction ran with manifest=False: there is no manifest to export from.")
        return export_features(self.manifest, path, self.store.directory, blocks=blocks, timesteps=timesteps,
                               extractor=self.extractor, chunk_rows=chunk_rows)

    def summary(self) -> str:
        return (f"{self.computed} samples computed, {self.already_stored} already stored, {len(self.failed)} "
                "failed")


def extract(extractor, inputs, store=None, *, client=None, shard_size: int = 2048, progress: bool = True,
            retries: int = 2, manifest=None) -> ExtractionResult:
    """Extract features of ``inputs`` into a feature store, shard by shard.

    Parameters
    ----------
    extractor : DiTFeatureExtractor or TextDiffusionFeatureExtractor
        Its parameters say what to extract (model, blocks, timesteps, ...). On a cluster the model must be named
        (hub id, folder, ``embedded:NAME``) so that workers load it themselves.
    inputs : sequence of samples
        Image file paths, arrays, PIL images, or texts, as the extractor's ``transform`` takes them. On a
        cluster, prefer file paths: each task then carries paths, and workers read the files.
    store : str, path-like or None
        The store folder. None uses the extractor's ``cache``.
    client : dask.distributed.Client or None
        None runs the shards here, one after the other. With a client, shards run on its workers (use one worker
        and one thread per GPU, e.g. dask-cuda's ``LocalCUDACluster``).
    shard_size : int, default=2048
        Samples per task. A lost task recomputes at most its unfinished segment.
    progress : bool, default=True
        A progress bar over samples.
    retries : int, default=2
        Dask retries of a task that raised (a lost worker's tasks are rescheduled by Dask in any case).
    manifest : path-like, None or False, default=None
        Where to write the manifest (a parquet table: each input's id, position, content key and status, and the
        extractor's parameters; see :mod:`sklearn_difffeat.manifest`). None: ``<store>/.manifests/extract-<UTC
        time>.parquet``; False: none.

    Returns
    -------
    ExtractionResult
        Counts, unreadable inputs (listed, not raised: one bad file does not stop the run) and
        :meth:`ExtractionResult.features` to read the features back in input order.
    """
    from tqdm.auto import tqdm

    if not isinstance(extractor, BaseDiffusionFeatureExtractor):
        raise TypeError(f"extractor must be a DiTFeatureExtractor or TextDiffusionFeatureExtractor, got "
                        f"{type(extractor).__name__}.")
    folder = store if store is not None else extractor.cache
    if folder is None:
        raise ValueError("extract() needs a store folder: pass store=... or give the extractor a cache.")
    if isinstance(folder, FeatureStore):
        folder = folder.directory
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    extractor = clone(extractor).set_params(cache=os.fspath(folder), verbose=0)
    n = len(inputs)
    if n == 0:
        raise ValueError("No inputs given (0 samples).")
    shards = [(start, min(n, start + shard_size)) for start in range(0, n, shard_size)]
    keys = np.empty(n, dtype=f"S{KEY_LENGTH}")
    result = ExtractionResult(extractor=extractor, store=open_store(folder), keys=keys)
    bar = tqdm(total=n, disable=not progress, desc="extract", unit="sample")
    paths = isinstance(extractor, DiTFeatureExtractor)  # image inputs given as strings are paths; texts are not
    with bar:
        if client is not None and not isinstance(extractor.model, (str, os.PathLike)):
            raise ValueError("On a Dask cluster the model must be a hub id, a folder or 'embedded:NAME', so "
                             "that each worker loads it; modules in memory would travel in every task.")
        extractor.fit()  # check the parameters here, before any shard runs
        writer = _manifest_writer(manifest, extractor, folder, n)
        if client is None:
            for start, stop in shards:
                report = _run_shard(extractor, _slice(inputs, start, stop))
                _collect(result, start, report, bar, writer, shard_ids(inputs, start, stop, paths=paths))
        else:
            from dask.distributed import as_completed

            futures = {
                client.submit(_run_shard, extractor, _slice(inputs, start, stop), pure=False, retries=retries,
                              key=f"difffeat-shard-{start}-{os.urandom(4).hex()}"): (start, stop)
                for start, stop in shards
            }
            for future in as_completed(futures):
                start, stop = futures[future]
                _collect(result, start, future.result(), bar, writer, shard_ids(inputs, start, stop, paths=paths))
                future.release()
        result.manifest = writer.finish() if writer is not None else None
    bar.set_postfix_str(result.summary())
    return result


def shard_ids(inputs, start: int, stop: int, *, paths: bool = True) -> list[str]:
    """The manifest ids of ``inputs[start:stop]``: a file input's path (when ``paths``: strings are file paths,
    not texts), else the input's position."""
    items = _slice(inputs, start, stop)
    if hasattr(items, "iloc"):  # a Series, or a one-column DataFrame
        items = (items.iloc[:, 0] if items.ndim == 2 else items).to_numpy()
    return [os.fspath(item) if paths and isinstance(item, (str, os.PathLike)) else str(start + i)
            for i, item in enumerate(items)]


def _manifest_writer(manifest, extractor, store, n: int) -> ManifestWriter | None:
    if manifest is False:
        return None
    path = default_manifest_path(store) if manifest is None else Path(manifest)
    return ManifestWriter(path, extractor, store, n)


def _slice(inputs, start, stop):
    if hasattr(inputs, "iloc"):
        return inputs.iloc[start:stop]
    return inputs[start:stop]


def _run_shard(extractor, inputs) -> TransformReport:
    """One task: extract a shard into the store (skipping what is stored); return the work report."""
    import multiprocessing

    if multiprocessing.current_process().daemon and extractor.num_workers != 0:
        # Dask runs workers as daemon processes, which may not start the DataLoader's decoding processes; the
        # worker then decodes in-process (start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False to lift it).
        extractor.set_params(num_workers=0)
    if not hasattr(extractor, "n_features_out_"):
        extractor = extractor.fit()
    _, report = extractor.transform_with_report(inputs, on_error="record")
    return report


def _collect(result: ExtractionResult, start: int, report: TransformReport, bar, manifest=None, ids=()) -> None:
    stop = start + len(report.keys)
    result.keys[start:stop] = report.keys
    result.computed += report.computed
    result.already_stored += report.stored
    result.failed.update({start + p: message for p, message in report.failed.items()})
    if manifest is not None:
        manifest.add(start, ids, report)
    bar.update(stop - start)
