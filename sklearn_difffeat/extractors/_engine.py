"""One ``transform`` call, run as a stream: what the image and text extractors share beyond their estimator API.

An extractor says how to key its input, how to turn samples into batches and how to compute pooled features for
a batch (:class:`BatchResult`). A :class:`TransformRun` does the rest:

1. key every sample by its content (done by the extractor, in parallel, without decoding) and fold identical
   samples together;
2. serve what the feature store already holds, per (block, timestep);
3. stream the rest through the extractor's batches (decoded in worker processes, or read from the store),
   computing every missing timestep of a batch while its clean input is at hand;
4. copy results back asynchronously, so the device computes batch k + 1 while the host stores batch k, and
   append them to the store segment by segment, so an interrupted run keeps what it finished. Segments are
   written by a thread of their own (``_writes``), so that a segment's fsyncs never hold up the stream.

A sample that cannot be read fails alone: it is left out of its batch, so nothing of it (no latent, no feature)
is ever computed or stored, and its row is NaN. A store that cannot be written is handled as the run says
(``on_store_error``): where the store is the point of the run (``extract``), the error fails the run; where it is
an optimisation (``transform`` with a ``cache``), the run warns once and goes on without storing.

Host memory stays bounded by the batch size and the prefetch depth; only the keys and the output grow with n.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from ..store import FeatureStore, StoreWriteError
from ._noise import key_words
from ._parallel import torch_threads_beside
from ._writes import StoreWrites


@dataclass(frozen=True)
class FeatureLayout:
    """Which features an extractor's parameters produce, in which column order, and where they are stored.

    Columns run block by block (in ``blocks`` order), then timestep by timestep (in ``timesteps`` order), each
    (block, timestep) pair a run of ``width`` columns.

    Attributes
    ----------
    blocks : tuple of int
        Resolved block indices (in ``[0, n_blocks]``).
    timesteps : tuple of int or float
        The timesteps, as validated for the model.
    width : int
        Columns of one (block, timestep) feature.
    namespaces : dict
        ``{(block, timestep): name}`` of the feature store namespace that holds that feature.
    descriptions : dict
        ``{namespace name: description}``: everything besides the sample that determines the stored feature.
    prefix : str
        The extractor's feature-name prefix (``"dit"``, ``"text"``).
    feature_names : ndarray of str objects
        Column names like ``dit_b12_t500_0``: prefix, block, timestep, index within the feature.
    n_features : int
        Number of columns.
    """

    blocks: tuple
    timesteps: tuple
    width: int
    namespaces: dict
    descriptions: dict
    prefix: str

    @property
    def n_features(self) -> int:
        return len(self.blocks) * len(self.timesteps) * self.width

    @property
    def feature_names(self) -> np.ndarray:
        return np.asarray([f"{self.prefix}_b{b}_t{t:g}_{j}" for b in self.blocks for t in self.timesteps
                           for j in range(self.width)], dtype=object)


@dataclass
class TransformReport:
    """What a transform did with each input.

    Each input position is counted once, in exactly one of ``computed``, ``stored`` and ``failed``, so that
    ``computed + stored + len(failed) == n_samples`` (an input repeated within the call counts at each position).

    Attributes
    ----------
    keys : ndarray of shape (n_samples,)
        Content key of each input (32 hex characters as bytes), in input order: the store's key of its features.
    computed : int
        Inputs whose features needed the model (at least one of their (block, timestep) features was not stored).
    stored : int
        Inputs the feature store served alone.
    failed : dict
        ``{input position: message}`` for inputs that could not be read (their feature rows are NaN). Each message
        names its own input: its position (in the whole input, for a shard of one) and, for a file, its path.
    from_store : ndarray of shape (n_samples,) or None
        True for each input whose features the store served alone (no model pass for it).
    """

    keys: np.ndarray
    computed: int = 0
    stored: int = 0
    failed: dict = field(default_factory=dict)
    from_store: np.ndarray | None = None


@dataclass
class Batch:
    """A batch of distinct samples on its way to the device: ``rows`` index the run's distinct samples."""

    rows: np.ndarray
    payload: object  # the extractor's input: pixels, latents, token ids ...


@dataclass
class TimestepFeatures:
    """Features of one timestep for some rows of a batch: ``local`` indexes ``Batch.rows``; ``blocks`` maps each
    computed block to a (len(local), width) tensor."""

    local: np.ndarray
    blocks: dict


@dataclass
class ExtraRows:
    """Rows to store besides features (e.g. clean latents): ``values`` (len(local), w) for ``Batch.rows[local]``."""

    namespace: str
    description: dict
    local: np.ndarray
    values: torch.Tensor


@dataclass
class BatchResult:
    """What an extractor computes for a batch: ``features`` by timestep index, and extra rows to store."""

    features: dict = field(default_factory=dict)  # timestep index -> TimestepFeatures
    extra: list = field(default_factory=list)  # ExtraRows


def pool_tokens(hidden: torch.Tensor, pooling: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool (B, N, D) token states to (B, D) ("mean", "max", "first") or (B, N*D) ("none"), in float32.

    ``mask`` (B, N) marks real tokens; padding never enters a mean or max.
    """
    hidden = hidden.float()
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "none":
        return hidden.reshape(hidden.shape[0], -1)
    if mask is None:
        return hidden.mean(dim=1) if pooling == "mean" else hidden.amax(dim=1)
    mask = mask.to(hidden.device, torch.bool).unsqueeze(-1)
    if pooling == "mean":
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return hidden.masked_fill(~mask, float("-inf")).amax(dim=1)


def read_stored_into(layout: FeatureLayout, store: FeatureStore, keys, out: np.ndarray, rows: np.ndarray,
                     blocks=None) -> np.ndarray:
    """Copy the stored features of ``keys`` into ``out[rows[i], block index, timestep index]``.

    ``blocks`` (default: the layout's) must be among the layout's blocks and sets ``out``'s block axis. Returns
    (len(keys), n_timesteps) booleans: every block of that timestep was found.
    """
    blocks = layout.blocks if blocks is None else blocks
    complete = np.ones((len(keys), len(layout.timesteps)), dtype=bool)
    for ti, t in enumerate(layout.timesteps):
        for bi, b in enumerate(blocks):
            values, found = store.read(layout.namespaces[b, t], keys, layout.width)
            out[rows[found], bi, ti] = values[found]
            complete[:, ti] &= found
    return complete


class TransformRun:
    """State and steps of one ``transform`` call. Build it with :meth:`plan`, then :meth:`execute` it.

    ``keys`` (U,) are the distinct samples' keys, in order of first appearance; ``first`` (U,) their first input
    position; ``inverse`` (n,) the distinct row of each input position; ``missing`` (U, T) which (sample,
    timestep) features still need computing; ``todo`` the distinct rows with anything missing when planned.
    Failures are kept per distinct row as reasons; ``describe(position, reason)`` turns one into the message of
    an input position.
    """

    def __init__(self, keys, first, inverse, blocks, layout, store, rows_per_pass, device, on_error,
                 describe=None, on_store_error="warn"):
        self.keys, self.first, self.inverse = keys, first, inverse
        self.describe = describe or (lambda position, reason: reason)
        self.on_store_error = on_store_error
        self.blocks = blocks  # requested blocks: the output's block axis
        self.layout = layout  # layout of the blocks each pass computes (and stores)
        self.store = store
        self.rows_per_pass = rows_per_pass
        self.device = device
        self.on_error = on_error
        self.missing = np.ones((len(keys), len(layout.timesteps)), dtype=bool)
        self.out = np.empty((len(inverse), len(blocks), len(layout.timesteps), layout.width), dtype=np.float32)
        self.writes = StoreWrites(store) if store is not None else None
        self.failures: dict = {}  # distinct row -> reason
        self.store_failed = False
        self.todo = np.empty(0, dtype=np.int64)
        self.decoders = 0  # threads or processes decoding this run's inputs on this machine's cores meanwhile

    @property
    def timesteps(self) -> tuple:
        return self.layout.timesteps

    @property
    def computed_blocks(self) -> tuple:
        return self.layout.blocks

    @classmethod
    def plan(cls, keys, blocks, layout: FeatureLayout, store: FeatureStore | None, rows_per_pass: int,
             device: torch.device, on_error: str = "raise", unreadable: dict | None = None, describe=None,
             on_store_error: str = "warn") -> TransformRun:
        """Fold duplicate ``keys`` (one per input), and read what the store already holds.

        ``unreadable`` ({input position: reason}) lists inputs that could not even be keyed; ``describe`` and
        ``on_store_error`` ("warn" or "raise") are as the class says.
        """
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(first)  # work in input order: progress and resumption follow the data
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        unique, first, inverse = unique[order], first[order], rank[inverse.reshape(-1)]
        run = cls(unique, first, inverse, list(blocks), layout, store, rows_per_pass, device, on_error, describe,
                  on_store_error)
        if store is not None:
            run.missing = ~read_stored_into(layout, store, unique, run.out, first, blocks)
        for position, message in (unreadable or {}).items():
            run.fail(int(inverse[position]), message)
        run.todo = np.flatnonzero(run.missing.any(axis=1))
        return run

    def execute(self, batches, compute, desc: str, verbose) -> tuple[np.ndarray, TransformReport]:
        """Stream ``batches`` (:class:`Batch` es covering ``todo``) through ``compute(batch, plan)``, where
        ``plan`` lists the ``(timestep index, timestep)`` pairs the batch misses; return the features and the
        report."""
        total = int(self.missing.sum())
        progress = tqdm(total=total, disable=not verbose or total == 0, desc=desc, unit="sample")
        try:
            with progress, torch.inference_mode():
                self.stream(batches, compute, progress)
        finally:
            if hasattr(batches, "close"):  # stop decoding workers and threads now, also on an error
                batches.close()
            self.close_writers()
        return self.finish(), self.report()

    def stream(self, batches, compute, progress):
        pending: deque = deque()
        for batch in batches:
            need = self.missing[batch.rows]
            plan = [(ti, t) for ti, t in enumerate(self.timesteps) if need[:, ti].any()]
            pending.append(self.to_host(batch, compute(batch, plan)))
            if len(pending) > 1:  # the device already works on this batch while the host stores the last one
                self.store_results(pending.popleft(), progress)
        while pending:
            self.store_results(pending.popleft(), progress)

    def to_host(self, batch: Batch, result: BatchResult):
        """Start copying a batch's results to the host without waiting for the device."""
        copies = {}
        for ti, features in result.features.items():
            blocks = sorted(features.blocks)
            stacked = torch.stack([features.blocks[b] for b in blocks], dim=1).float()
            copies[ti] = (features.local, blocks, stacked.to("cpu", non_blocking=True))
        extra = [replace(rows, values=rows.values.float().to("cpu", non_blocking=True)) for rows in result.extra]
        event = None
        if self.device.type == "cuda":  # the copies are queued behind the batch's kernels; wait for them later
            event = torch.cuda.Event()
            event.record()
        return batch, copies, extra, event

    def store_results(self, item, progress):
        """Copy a batch's features into the output, and hand its rows over to the store's writer."""
        batch, copies, extra, event = item
        if event is not None:
            event.synchronize()
        rows_to_store = [(rows.namespace, rows.description, self.keys[batch.rows[rows.local]], rows.values.numpy())
                         for rows in extra]
        for ti, (local, computed, values) in copies.items():
            values = values.numpy()
            rows = batch.rows[local]
            t = self.timesteps[ti]
            for bi, b in enumerate(self.blocks):
                self.out[self.first[rows], bi, ti] = values[:, computed.index(b)]
            for j, b in enumerate(computed):
                namespace = self.layout.namespaces[b, t]
                rows_to_store.append((namespace, self.layout.descriptions[namespace], self.keys[rows], values[:, j]))
            self.missing[rows, ti] = False
            progress.update(len(rows))
        self.hand_over(rows_to_store)

    def hand_over(self, rows: list):
        """Give rows to the store's writer (a thread of its own), which raises the error of an earlier write."""
        if self.writes is None or self.store_failed:
            return
        try:
            self.writes.put(rows)
        except StoreWriteError as exc:
            self.store_unwritable(exc)

    def close_writers(self):
        """Write what the store's writer still buffers, and wait for it."""
        if self.writes is None:
            return
        try:
            self.writes.close()
        except StoreWriteError as exc:
            if not self.store_failed:
                self.store_unwritable(exc)

    def store_unwritable(self, exc: StoreWriteError):
        """The store cannot be written: raise (``on_store_error="raise"``), or warn once and store nothing more.
        Either way no later write is tried; complete segments already written stay."""
        self.store_failed = True
        if self.on_store_error == "raise":
            raise exc
        warnings.warn(f"{exc}. Features are computed and returned, but nothing is stored in the cache for the "
                      "rest of this call.", RuntimeWarning, stacklevel=5)

    def finish(self) -> np.ndarray:
        n = len(self.out)
        canonical = self.first[self.inverse]
        duplicates = np.flatnonzero(canonical != np.arange(n))
        if len(duplicates):  # identical samples were computed once: copy them to their other positions
            self.out[duplicates] = self.out[canonical[duplicates]]
        if self.failures:
            self.out[np.isin(self.inverse, list(self.failures))] = np.nan
        return self.out.reshape(n, -1)

    def report(self) -> TransformReport:
        """Counts by input position: failed, else computed (its distinct sample was planned for the model), else
        stored; each failure message names its own position (inputs with one key share the reason, not the
        name)."""
        failed_row = np.zeros(len(self.keys), dtype=bool)
        failed_row[list(self.failures)] = True
        computed_row = np.zeros(len(self.keys), dtype=bool)
        computed_row[self.todo] = True
        failed, computed = failed_row[self.inverse], (computed_row & ~failed_row)[self.inverse]
        return TransformReport(
            keys=self.keys[self.inverse],
            computed=int(computed.sum()),
            stored=int((~failed & ~computed).sum()),
            failed={int(p): self.describe(int(p), self.failures[self.inverse[p]]) for p in np.flatnonzero(failed)},
            from_store=~failed & ~computed,
        )

    def fail(self, row: int, reason: str):
        """A sample that cannot be read, for ``reason``: raise a ``ValueError`` naming its first input position,
        or (``on_error="record"``) record it and go on."""
        if self.on_error != "record":
            raise ValueError(self.describe(int(self.first[row]), reason))
        self.failures[row] = reason
        self.missing[row] = False

    def in_chunks(self, n: int, compute):
        """Call ``compute(slice)`` over row chunks of at most ``rows_per_pass``, halving it on CUDA out-of-memory
        (the chunk is retried; the smaller size is kept for the rest of the call)."""
        outputs, start = [], 0
        while start < n:
            stop = min(n, start + self.rows_per_pass)
            try:
                outputs.append(compute(slice(start, stop)))
            except torch.OutOfMemoryError:
                if self.rows_per_pass == 1:
                    raise
                self.rows_per_pass //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = stop
        return outputs

    def elementwise_threads(self):
        """A context for work whose result does not depend on torch's thread count (element-wise, such as the
        noise): while decoders run beside a CPU computation, torch computes it on the cores they leave (see
        ``_parallel.torch_threads_beside``). The model keeps torch's thread count: its results may change in the
        last bits with it (measured for a VAE encoder), and features must not change with the decoding path."""
        return torch_threads_beside(self.decoders if self.device.type == "cpu" else 0)

    def seed_words(self, rows: np.ndarray, device) -> torch.Tensor:
        """The key words (noise seeds) of distinct ``rows``, on ``device``."""
        return key_words(self.keys[rows]).to(device)
