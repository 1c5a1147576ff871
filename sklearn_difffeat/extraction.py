"""Sharded, resumable extraction into a feature store, in this process or on a Dask cluster.

Extraction is a set of idempotent shard tasks: each runs the extractor on a slice of the inputs and appends its
own segments to the store, skipping samples already stored. Run in this process (one device) or with a
``dask.distributed.Client`` (one worker per GPU, many machines). A task carries the extractor's parameters and
its slice of the inputs, never the weights: each worker loads the model once and keeps it for every shard it
runs. A worker lost mid-shard has its task rerun elsewhere by Dask, and since tasks skip what is stored, the
result is that of an uninterrupted run. Searches then read the store without a GPU.

An input that cannot be read is a listed failure (its row is NaN, nothing of it is stored), and does not stop the
run; a store that cannot be written does: filling the store is the point of an extraction, so the store's
``StoreWriteError`` is raised, and what was stored before it stays.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone

from .extractors import BaseDiffusionFeatureExtractor, TransformReport, open_store
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
    failed : {input position: message} for inputs that could not be read (their feature rows are NaN).

    Each input position counts once: ``computed + already_stored + len(failed) == len(keys)``.
    """

    extractor: BaseDiffusionFeatureExtractor
    store: FeatureStore
    keys: np.ndarray
    computed: int = 0
    already_stored: int = 0
    failed: dict = field(default_factory=dict)

    def features(self) -> np.ndarray:
        """(n, n_features) float32, in input order, read from the store (NaN rows for failed inputs); see
        :meth:`~sklearn_difffeat.DiTFeatureExtractor.read_stored`."""
        return self.extractor.read_stored(self.keys, self.store)

    def summary(self) -> str:
        return (f"{self.computed} samples computed, {self.already_stored} already stored, {len(self.failed)} "
                "failed")


def extract(extractor, inputs, store=None, *, client=None, shard_size: int = 2048, progress: bool = True,
            retries: int = 2) -> ExtractionResult:
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

    Returns
    -------
    ExtractionResult
        Counts, unreadable inputs (listed, not raised: one bad file or text does not stop the run) and
        :meth:`ExtractionResult.features` to read the features back in input order.

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
    n = len(inputs)
    if n == 0:
        raise ValueError("No inputs given (0 samples).")
    shards = [(start, min(n, start + shard_size)) for start in range(0, n, shard_size)]
    keys = np.empty(n, dtype=f"S{KEY_LENGTH}")
    result = ExtractionResult(extractor=extractor, store=open_store(folder), keys=keys)
    bar = tqdm(total=n, disable=not progress, desc="extract", unit="sample")
    with bar:
        if client is None:
            extractor.fit()
            for start, stop in shards:
                _collect(result, start, _run_shard(extractor, _slice(inputs, start, stop), start), bar)
        else:
            if not isinstance(extractor.model, (str, os.PathLike)):
                raise ValueError("On a Dask cluster the model must be a hub id, a folder or 'embedded:NAME', so "
                                 "that each worker loads it; modules in memory would travel in every task.")
            from dask.distributed import as_completed

            extractor.fit()  # check the parameters here, before any task is sent
            futures = {
                client.submit(_run_shard, extractor, _slice(inputs, start, stop), start, pure=False, retries=retries,
                              key=f"difffeat-shard-{start}-{os.urandom(4).hex()}"): start
                for start, stop in shards
            }
            try:
                for future in as_completed(futures):
                    _collect(result, futures[future], future.result(), bar)
                    future.release()
            finally:  # after an error (a store that cannot be written), stop the shards still queued or running
                client.cancel([future for future in futures if not future.done()])
    bar.set_postfix_str(result.summary())
    return result


def _slice(inputs, start, stop):
    if hasattr(inputs, "iloc"):
        return inputs.iloc[start:stop]
    return inputs[start:stop]


def _run_shard(extractor, inputs, offset: int) -> TransformReport:
    """One task: extract a shard (inputs ``offset`` onwards) into the store, skipping what is stored; return the
    work report. A store that cannot be written raises (``on_store_error="raise"``)."""
    _tune_dask_worker()
    if not hasattr(extractor, "n_features_out_"):
        extractor = extractor.fit()
    _, report = extractor.transform_with_report(inputs, on_error="record", on_store_error="raise", offset=offset)
    return report


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
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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


def _collect(result: ExtractionResult, start: int, report: TransformReport, bar) -> None:
    stop = start + len(report.keys)
    result.keys[start:stop] = report.keys
    result.computed += report.computed
    result.already_stored += report.stored
    result.failed.update({start + p: message for p, message in report.failed.items()})
    bar.update(stop - start)
