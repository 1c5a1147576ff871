"""Sharded, resumable extraction into a feature store, in this process or on a Dask cluster.

Extraction is a set of idempotent shard tasks: each runs the extractor on a shard of the inputs and appends its
own segments to the store, skipping samples already stored. Run in this process (one device) or with a
``dask.distributed.Client`` (one worker per GPU, many machines). A task carries the extractor's parameters and
its shard's descriptor (see :mod:`sklearn_difffeat.sources`: a slice of a list, or a few bytes naming a tar range,
a parquet row range, a dataset row range, which the worker reads itself), never the weights: each worker loads
the model once and keeps it for every shard it runs. A worker lost mid-shard has its task rerun elsewhere by
Dask, and since tasks skip what is stored, the result is that of an uninterrupted run. Searches then read the
store without a GPU.

An input that cannot be read is a listed failure (its row is NaN, nothing of it is stored), and does not stop the
run; a store that cannot be written does: filling the store is the point of an extraction, so the store's
``StoreWriteError`` is raised, and what was stored before it stays.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.base import clone

from ._cores import usable_cores
from .extractors import BaseDiffusionFeatureExtractor, DiTFeatureExtractor, TransformReport, open_store
from .manifest import ManifestWriter, default_manifest_path
from .sources import Shard, as_source
from .store import KEY_LENGTH, FeatureStore

__all__ = ["ExtractionResult", "extract"]


@dataclass
class ExtractionResult:
    """What an extraction did, and how to read its features back in input order.

    Attributes
    ----------
    extractor : the fitted extractor (parameters only; its ``cache`` is the store).
    store : FeatureStore
    keys : (n,) array of the inputs' content keys, in input order.
    computed, already_stored : numbers of inputs that needed the model, and that the store already held.
    failed : {input position: reason} for inputs that could not be read (their feature rows are NaN); each reason
        names its input: by its path or position, and by its id where that says more (``shard.tar/key``).
    ids : (n,) object array of str: each input's id (a path, ``shard.tar/key``, ``table.parquet#row``, or the
        position), in input order.
    manifest : Path or None
        The manifest of the run (each input's id, key and status; see :meth:`export`), or None without one.

    Each input position counts once: ``computed + already_stored + len(failed) == len(keys)``.
    """

    extractor: BaseDiffusionFeatureExtractor
    store: FeatureStore
    keys: np.ndarray
    computed: int = 0
    already_stored: int = 0
    failed: dict = field(default_factory=dict)
    ids: np.ndarray | None = None
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
    inputs : sequence of samples, Hugging Face dataset column, or Source
        Image file paths, encoded image bytes, arrays, PIL images, or texts, as the extractor's ``transform``
        takes them; a ``datasets.Dataset`` column (``ds["image"]``, read a shard at a time); or a source from
        :mod:`sklearn_difffeat.sources` (webdataset tar shards, parquet columns). A task carries a slice of a
        sequence, so on a cluster prefer paths or a source: its tasks carry a few bytes and workers read the data.
    store : str, path-like or None
        The store folder. None uses the extractor's ``cache``.
    client : dask.distributed.Client or None
        None runs the shards here, one after the other. With a client, shards run on its workers (use one worker
        and one thread per GPU, e.g. dask-cuda's ``LocalCUDACluster``).
    shard_size : int, default=2048
        Samples per task (a task holds about this many samples in memory). A lost task recomputes at most its
        unfinished segment.
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
        Counts, input ids, unreadable inputs (listed by id, not raised: one bad file or text does not stop the run)
        and :meth:`ExtractionResult.features` to read the features back in input order.

    Raises
    ------
    StoreWriteError
        When the store cannot be written (full disk, file-size limit, read-only folder); it names the store and
        the system's error. Segments completed before it stay, so a rerun resumes from them.
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
    modality = "images" if isinstance(extractor, DiTFeatureExtractor) else "texts"
    source = as_source(inputs, modality)
    if source.modality not in (None, modality):
        raise ValueError(f"The inputs are {source.modality}, but {type(extractor).__name__} takes {modality}.")
    shards = source.shards(shard_size)
    n = sum(shard.size for shard in shards)
    if n == 0:
        raise ValueError("No inputs given (0 samples).")
    keys = np.empty(n, dtype=f"S{KEY_LENGTH}")
    result = ExtractionResult(extractor=extractor, store=open_store(folder), keys=keys,
                              ids=np.empty(n, dtype=object))
    bar = tqdm(total=n, disable=not progress, desc="extract", unit="sample")
    with bar:
        if client is not None and not isinstance(extractor.model, (str, os.PathLike)):
            raise ValueError("On a Dask cluster the model must be a hub id, a folder or 'embedded:NAME', so "
                             "that each worker loads it; modules in memory would travel in every task.")
        extractor.fit()  # check the parameters here, before any shard runs
        writer = None if manifest is False else ManifestWriter(
            default_manifest_path(folder) if manifest is None else Path(manifest), extractor, folder, n)
        if client is None:
            for shard in shards:
                _collect(result, shard.start, _run_shard(extractor, shard), bar, writer)
        else:
            from dask.distributed import as_completed

            futures = {
                client.submit(_run_shard, extractor, shard, pure=False, retries=retries,
                              key=f"difffeat-shard-{shard.start}-{os.urandom(4).hex()}"): shard.start
                for shard in shards
            }
            try:
                for future in as_completed(futures):
                    _collect(result, futures[future], future.result(), bar, writer)
                    future.release()
            finally:  # after an error (a store that cannot be written), stop the shards still queued or running
                client.cancel([future for future in futures if not future.done()])
        result.manifest = writer.finish() if writer is not None else None
    bar.set_postfix_str(result.summary())
    return result


def _run_shard(extractor, shard: Shard) -> tuple[TransformReport, list]:
    """One task: read a shard and extract it into the store (skipping what is stored); return the work report
    over the whole shard (positions in the shard) and the shard's input ids. A store that cannot be written raises
    (``on_store_error="raise"``)."""
    _tune_dask_worker()
    if not hasattr(extractor, "n_features_out_"):
        extractor = extractor.fit()
    items, ids, unreadable = shard.read()
    # Samples the source could not produce have no content: a key of their own (never stored) keeps their rows NaN.
    report = TransformReport(keys=np.array([_unreadable_key(i) for i in ids], dtype=f"S{KEY_LENGTH}"),
                             failed=dict(unreadable), from_store=np.zeros(len(ids), dtype=bool))
    good = [i for i in range(len(ids)) if i not in unreadable]
    if good:
        whole = len(good) == len(ids)
        inputs = items if whole else [items[i] for i in good]
        # Messages name each input by its position in the whole input, also when some could not be read.
        positions = shard.start if whole else shard.start + np.asarray(good)
        _, done = extractor.transform_with_report(inputs, on_error="record", on_store_error="raise",
                                                  offset=positions)
        report.keys[good] = done.keys
        report.computed, report.stored = done.computed, done.stored
        report.from_store[good] = done.from_store
        report.failed.update({good[p]: message for p, message in done.failed.items()})
    return report, ids


def _unreadable_key(input_id: str) -> bytes:
    return hashlib.sha256(f"unreadable:{input_id}".encode()).hexdigest()[:KEY_LENGTH].encode("ascii")


def dask_worker_config(daemon: bool = False) -> dict:
    """Settings for ``dask.config.set`` under which a ``LocalCluster`` (or dask-cuda's ``LocalCUDACluster``)
    starts worker processes fit for extraction; the command's ``--local-workers`` and ``--local-gpus`` use them::

        with dask.config.set(dask_worker_config()):
            cluster = LocalCluster(n_workers=2, threads_per_worker=1)

    * ``distributed.worker.daemon``: ``False`` (the default here) lets a worker's extractor start DataLoader
      decoding processes; a daemon worker decodes in a pool of threads instead;
    * ``OMP_WAIT_POLICY=PASSIVE`` joins the environment the nanny gives its workers (unless this process's
      environment sets the variable): torch's OpenMP threads then sleep, rather than spin, while they wait for
      work. A worker decodes its next images while torch computes on the same cores, and a spinning thread takes
      a core from a decoder, or from a torch thread that the others wait for at the end of every operation
      (measured in ``benchmarks/bench_scale.py``, one worker decoding in two threads: 1.18x the speed of one
      decoding thread in-process without it, 1.54x with it).
      OpenMP reads the variable once, when torch is loaded, so it must be in a worker's environment at its start.
      It changes how threads wait, not what they compute: features are the same.
    """
    import dask
    import distributed  # noqa: F401  (its import puts the nanny's defaults into Dask's config)

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    if "OMP_WAIT_POLICY" not in os.environ:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return {"distributed.worker.daemon": daemon, "distributed.nanny.pre-spawn-environ": environ}


_WORKER_TUNED = []  # once per process


def _tune_dask_worker() -> None:
    """In a Dask worker, once per process, undo two settings a Dask nanny gives every worker
    (``distributed.nanny.pre-spawn-environ``) that slow torch on a CPU to about half its speed:

    * ``OMP_NUM_THREADS=1``: torch computes on one thread. When torch has one thread, it gets the cores this
      process may run on (``os.sched_getaffinity``), shared evenly by the workers on this machine. A worker pinned
      to fewer cores (``taskset``), or whose torch already has more than one thread, is left as it is;
    * ``MALLOC_TRIM_THRESHOLD_=65536``: glibc then maps and unmaps every allocation above 128 KiB afresh (page
      faults on each of torch's activation buffers: measured 1.8x the wall time of a CPU extraction). The mmap
      threshold is raised to 32 MiB and the trim threshold to 128 MiB, glibc's own bounds.
    """
    if _WORKER_TUNED:
        return
    _WORKER_TUNED.append(True)
    try:
        from distributed import get_client, get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not in a Dask worker
        return
    import torch

    if torch.get_num_threads() == 1:
        cores = usable_cores()
        workers = get_client().scheduler_info(n_workers=-1)["workers"].values()
        local = sum(1 for info in workers if info.get("host") == worker.ip) or 1
        if cores // local > 1:
            torch.set_num_threads(cores // local)
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") and sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc
            return
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD


def _names(message: str, input_id) -> bool:
    """Whether ``message`` already names the input ``input_id`` (as it is, or quoted as a path is)."""
    return str(input_id) in message or repr(str(input_id)) in message


def _collect(result: ExtractionResult, start: int, shard_result: tuple[TransformReport, list], bar,
             manifest: ManifestWriter | None = None) -> None:
    report, ids = shard_result
    stop = start + len(report.keys)
    result.keys[start:stop] = report.keys
    result.ids[start:stop] = ids
    result.computed += report.computed
    result.already_stored += report.stored
    # Each reason names its input: by its id (a tar member, a parquet row), unless the message names it already.
    result.failed.update({start + p: message if _names(message, ids[p]) else f"{ids[p]}: {message}"
                          for p, message in sorted(report.failed.items())})
    if manifest is not None:
        manifest.add(start, ids, report)
    bar.update(stop - start)
