"""The extraction engine shared by the image and text extractors.

A subclass says how to load its backbone, how to validate and key its input, how to turn samples into batches
and how to compute pooled features for a batch. This base does the rest, in one streaming pass:

1. key every sample by its content (parallel hashing; no decoding), and fold identical samples together;
2. serve what the feature store already holds, per (block, timestep);
3. stream the rest through the subclass's batches (decoded in worker processes, or read from the store),
   computing every missing timestep of a batch while its clean input is at hand;
4. copy results back asynchronously, so the device computes batch k + 1 while the host stores batch k, and
   append them to the store segment by segment, so an interrupted run keeps what it finished.

Host memory stays bounded by the batch size and the prefetch depth; only the keys and the output grow with n.
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ..backbones.base import resolve_blocks
from ..store import FeatureStore, StoreWriteError, stable_hash
from ._noise import key_words
from ._runtime import cached_backbone, default_workers, open_store, resolve_device, resolve_dtype
from ._runtime import clear_backbone_cache as clear_backbone_cache  # still importable from its former place

KEY_BYTES = 16  # 128-bit sample keys, written as 32 hex characters


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


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple, np.ndarray, range)) else [value]


def single_column(X, what: str):
    """Unwrap the one-column DataFrame a ColumnTransformer passes for a column given as a list (``["image"]``)."""
    if hasattr(X, "iloc") and getattr(X, "ndim", 1) == 2:
        if X.shape[1] != 1:
            raise ValueError(f"Expected one column of {what}, got a DataFrame with {X.shape[1]} columns.")
        return X.iloc[:, 0]
    return X


@dataclass
class Batch:
    """A batch of unique samples on its way to the device: ``rows`` index the call's unique samples."""

    rows: np.ndarray
    payload: object  # the subclass's input: pixels, latents, token ids ...


@dataclass
class _Run:
    """State of one ``transform`` call."""

    keys: np.ndarray  # (U,) unique sample keys
    first: np.ndarray  # (U,) position of each unique sample in the input
    inverse: np.ndarray  # (n,) unique row of each input position
    missing: np.ndarray  # (U, T) which (sample, timestep) features still need computing
    blocks: list  # requested blocks
    computed_blocks: list  # blocks each pass produces (requested, or every block up to cache_depth)
    timesteps: list
    out: np.ndarray  # (n, len(blocks), T, width)
    store: FeatureStore | None
    namespaces: dict  # (block, timestep index) -> namespace
    descriptions: dict  # namespace -> description
    rows_per_pass: int
    device: torch.device
    writers: dict = field(default_factory=dict)
    keep_going: bool = False  # record unreadable samples instead of raising
    failures: dict = field(default_factory=dict)  # unique row -> message (only when failures are kept)
    store_failed: bool = False


class BaseDiffusionFeatureExtractor(TransformerMixin, BaseEstimator):
    """Shared base; see :class:`DiTFeatureExtractor` and :class:`TextDiffusionFeatureExtractor`."""

    _feature_prefix = "feat"

    _parameter_constraints: dict = {
        "block": ["array-like", Interval(numbers.Integral, None, None, closed="neither")],
        "pooling": [StrOptions({"mean", "max", "none", "first"})],
        "n_noise_draws": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": [Interval(numbers.Integral, 0, None, closed="left")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "num_workers": [Interval(numbers.Integral, 0, None, closed="left"), None],
        "device": [str, torch.device, None],
        "dtype": [StrOptions({"auto", "float32", "bfloat16", "float16"})],
        "cache": [str, os.PathLike, None],
        "cache_depth": [Interval(numbers.Integral, None, None, closed="neither"), None],
        "verbose": ["verbose"],
    }

    # ---- hooks for subclasses -------------------------------------------------------------------------
    def _backbone_options(self) -> tuple:
        """Parameters besides model, device and dtype that change the loaded backbone (e.g. compile)."""
        return ()

    def _load_backbone(self, device: torch.device, dtype: torch.dtype):
        """Load the backbone and put it on ``device`` in ``dtype`` (called at most once per key per process)."""
        raise NotImplementedError

    def _in_memory_modules(self):
        """The torch modules of a ``model`` given as objects (their device and dtype are the defaults)."""
        raise NotImplementedError

    def _check_timesteps(self, backbone) -> list:
        raise NotImplementedError

    def _check_model_params(self, backbone) -> None:
        """Check subclass parameters whose valid range depends on the loaded model."""

    def _feature_width(self, backbone) -> int:
        raise NotImplementedError

    def _namespace_description(self, backbone, timestep) -> dict:
        """Everything besides the sample and the block that determines a stored feature."""
        return {
            "extractor": self._feature_prefix, "model": backbone.fingerprint, "timestep": timestep,
            "pooling": self.pooling, "n_noise_draws": self.n_noise_draws, "random_state": self.random_state,
            "dtype": str(backbone.dtype).replace("torch.", ""),
        }

    def _samples(self, X, backbone):
        """Validate X as a container; return an object with ``len()`` and ``keys(workers)``."""
        raise NotImplementedError

    def _batches(self, run: _Run, samples, backbone, todo: np.ndarray):
        """Yield :class:`Batch` es covering the unique samples ``todo`` (indices into ``run.keys``)."""
        raise NotImplementedError

    def _compute(self, run: _Run, backbone, batch: Batch, plan) -> dict:
        """Features of ``batch``: ``{ti: (local rows, {block: (k, width) tensor})}`` for each ``(ti, t)`` of
        ``plan``, for the rows of the batch that miss timestep ``ti``. May also return ``"extra"``: a list of
        ``(namespace, description, local rows, (k, w) tensor)`` to store (e.g. latents)."""
        raise NotImplementedError

    # ---- sklearn API ----------------------------------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.requires_fit = True
        tags.non_deterministic = False
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Check the parameters and load the backbone. Nothing is learned from X."""
        self._check_cache_param()
        backbone = self._backbone()
        resolve_blocks(self.block, backbone.num_blocks)
        self._check_timesteps(backbone)
        self._check_model_params(backbone)
        self._cache_depth(backbone)
        self.n_blocks_ = backbone.num_blocks
        self.feature_width_ = self._feature_width(backbone)
        self.n_features_out_ = len(self._feature_names(backbone))
        return self

    def transform(self, X):
        """Pooled features, float32 array of shape (n_samples, n_blocks * n_timesteps * width).

        Column order: for each block (in the order given), for each timestep (in the order given), the pooled
        feature of that (block, timestep).
        """
        check_is_fitted(self, "n_features_out_")
        return self._extract(X)[0]

    def _extract(self, X, keep_going: bool = False):
        """Features and a report of the work: ``{"keys": (n,) sample keys, "computed": samples that needed the
        backbone, "stored": samples served from the store alone, "failed": {input position: message}}``.

        With ``keep_going``, a sample that cannot be read is recorded (its row is NaN) instead of raising.
        """
        backbone = self._backbone()
        samples = self._samples(X, backbone)
        run = self._plan(backbone, samples, keep_going)
        todo = np.flatnonzero(run.missing.any(axis=1))
        total = int(run.missing.sum())
        progress = tqdm(total=total, disable=not self.verbose or total == 0, desc=type(self).__name__,
                        unit="sample")
        try:
            with progress, torch.inference_mode():
                self._stream(run, samples, backbone, todo, progress)
        finally:
            self._close_writers(run)
        failed_rows = np.array(sorted(run.failures), dtype=np.int64)
        report = {
            "keys": run.keys[run.inverse],
            "computed": len(todo) - len(failed_rows),
            "stored": len(run.keys) - len(todo),
            "failed": {int(p): run.failures[run.inverse[p]] for p in np.flatnonzero(np.isin(run.inverse, failed_rows))},
        }
        return self._finish(run), report

    def _plan(self, backbone, samples, keep_going: bool = False) -> _Run:
        """Key the samples, fold duplicates, and read what the store already holds."""
        blocks = resolve_blocks(self.block, backbone.num_blocks)
        timesteps = self._check_timesteps(backbone)
        width = self._feature_width(backbone)
        unreadable = {} if keep_going else None
        keys = samples.keys(self._workers(), unreadable)
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(first)  # work in input order: progress and resumption follow the data
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        unique, first, inverse = unique[order], first[order], rank[inverse.reshape(-1)]
        store = open_store(self.cache) if self.cache is not None else None
        depth = self._cache_depth(backbone) if store is not None else None
        computed = sorted(set(blocks) | (set(range(depth + 1)) if depth is not None and depth > max(blocks) else set()))
        named = self._feature_namespaces(backbone, computed)
        namespaces = {k: name for k, (name, _) in named.items()}
        descriptions = dict(named.values())
        out = np.empty((len(keys), len(blocks), len(timesteps), width), dtype=np.float32)
        missing = np.ones((len(unique), len(timesteps)), dtype=bool)
        if store is not None:
            for ti in range(len(timesteps)):
                stored = np.ones(len(unique), dtype=bool)
                for bi, b in enumerate(blocks):
                    values, found = store.read(namespaces[b, ti], unique, width)
                    out[first[found], bi, ti] = values[found]
                    stored &= found
                missing[:, ti] = ~stored
        run = _Run(keys=unique, first=first, inverse=inverse, missing=missing, blocks=blocks, computed_blocks=computed,
                   timesteps=timesteps, out=out, store=store, namespaces=namespaces, descriptions=descriptions,
                   rows_per_pass=self.batch_size, device=backbone.device, keep_going=keep_going)
        for position, message in (unreadable or {}).items():
            self._fail(run, int(inverse[position]), message)
        return run

    def _feature_namespaces(self, backbone, blocks) -> dict:
        """{(block, timestep index): (namespace, description)} of the store entries these parameters read."""
        width = self._feature_width(backbone)
        out = {}
        for ti, t in enumerate(self._check_timesteps(backbone)):
            base = self._namespace_description(backbone, t)
            for b in blocks:
                description = {**base, "block": b, "width": width}
                out[b, ti] = (f"{self._feature_prefix}-b{b}-t{t:g}-{stable_hash(description)}", description)
        return out

    def _stream(self, run: _Run, samples, backbone, todo, progress):
        pending: deque = deque()
        for batch in self._batches(run, samples, backbone, todo):
            need = run.missing[batch.rows]
            plan = [(ti, t) for ti, t in enumerate(run.timesteps) if need[:, ti].any()]
            results = self._compute(run, backbone, batch, plan)
            pending.append(self._to_host(run, batch, results))
            if len(pending) > 1:  # the device already works on this batch while the host stores the last one
                self._store_results(run, pending.popleft(), progress)
        while pending:
            self._store_results(run, pending.popleft(), progress)

    @staticmethod
    def _to_host(run: _Run, batch: Batch, results: dict):
        """Start copying a batch's results to the host without waiting for the device."""
        copies = {}
        for ti, (local, feats) in results.get("features", {}).items():
            stacked = torch.stack([feats[b] for b in sorted(feats)], dim=1).float()
            copies[ti] = (local, sorted(feats), stacked.to("cpu", non_blocking=True))
        extra = [(ns, desc, local, t.float().to("cpu", non_blocking=True)) for ns, desc, local, t in
                 results.get("extra", [])]
        event = None
        if run.device.type == "cuda":  # the copies are queued behind the batch's kernels; wait for them later
            event = torch.cuda.Event()
            event.record()
        return batch, copies, extra, event

    def _store_results(self, run: _Run, item, progress):
        batch, copies, extra, event = item
        if event is not None:
            event.synchronize()
        for ns, description, local, values in extra:
            self._write(run, ns, description, run.keys[batch.rows[local]], values.numpy())
        for ti, (local, computed, values) in copies.items():
            values = values.numpy()
            rows = batch.rows[local]
            for bi, b in enumerate(run.blocks):
                run.out[run.first[rows], bi, ti] = values[:, computed.index(b)]
            for j, b in enumerate(computed):
                ns = run.namespaces[b, ti]
                self._write(run, ns, run.descriptions[ns], run.keys[rows], values[:, j])
            run.missing[rows, ti] = False
            progress.update(len(rows))

    def _write(self, run: _Run, namespace, description, keys, values):
        if run.store is None or run.store_failed:
            return
        writer = run.writers.get(namespace)
        if writer is None:
            writer = run.writers[namespace] = run.store.writer(namespace, values.shape[1], description)
        try:
            writer.add(keys, values)
        except StoreWriteError as exc:
            self._store_unwritable(run, exc)

    def _close_writers(self, run: _Run):
        for writer in run.writers.values():
            if run.store_failed:
                break
            try:
                writer.flush()
            except StoreWriteError as exc:
                self._store_unwritable(run, exc)

    @staticmethod
    def _store_unwritable(run: _Run, exc):
        run.store_failed = True
        warnings.warn(f"{exc}. Features are computed and returned, but nothing is stored in the cache for the "
                      "rest of this call.", RuntimeWarning, stacklevel=4)

    @staticmethod
    def _finish(run: _Run):
        n = len(run.out)
        canonical = run.first[run.inverse]
        duplicates = np.flatnonzero(canonical != np.arange(n))
        if len(duplicates):  # identical samples were computed once: copy them to their other positions
            run.out[duplicates] = run.out[canonical[duplicates]]
        if run.failures:
            run.out[np.isin(run.inverse, list(run.failures))] = np.nan
        return run.out.reshape(n, -1)

    def _fail(self, run: _Run, row: int, message: str):
        """A sample that cannot be read: raise, or (sharded extraction) record it and go on."""
        if not run.keep_going:
            raise ValueError(message)
        run.failures[row] = message
        run.missing[row] = False

    def get_feature_names_out(self, input_features=None):
        """Names like ``dit_b12_t500_0``: prefix, block, timestep, index within the pooled feature."""
        check_is_fitted(self, "n_features_out_")
        return self._feature_names(self._backbone())

    def _feature_names(self, backbone):
        blocks = resolve_blocks(self.block, backbone.num_blocks)
        timesteps = self._check_timesteps(backbone)
        width = self._feature_width(backbone)
        return np.asarray(
            [f"{self._feature_prefix}_b{b}_t{t:g}_{j}" for b in blocks for t in timesteps for j in range(width)],
            dtype=object,
        )

    def get_backbone(self):
        """The loaded backbone this extractor runs (loaded on first use), for inspection: its modules (to hook
        or count passes), tokenizer, depth and width. Shared by every extractor of the process with the same
        model, device and dtype, so treat it as read-only."""
        return self._backbone()

    # ---- helpers --------------------------------------------------------------------------------------
    def _backbone(self):
        model = self.model
        in_memory = not isinstance(model, (str, os.PathLike))
        modules = self._in_memory_modules() if in_memory else None
        first = next(modules[0].parameters()) if modules else None
        device = resolve_device(self.device, first.device if first is not None else None)
        dtype = resolve_dtype(self.dtype, device, first.dtype if first is not None else None)
        source = id(model) if in_memory else os.fspath(model)
        key = (type(self).__name__, source, device, dtype, *self._backbone_options())
        return cached_backbone(key, lambda: self._load_backbone(device, dtype), keepalive=model)

    def _workers(self) -> int:
        return default_workers() if self.num_workers is None else self.num_workers

    def _check_cache_param(self):
        if self.cache is not None and os.fspath(self.cache) == "":
            raise ValueError("cache='' is not a folder; give a folder path for the feature store, or None.")

    def _cache_depth(self, backbone):
        if self.cache_depth is None:
            return None
        return resolve_blocks(self.cache_depth, backbone.num_blocks, name="cache_depth")[0]

    def _in_chunks(self, run: _Run, n: int, compute):
        """Call ``compute(slice)`` over row chunks of at most ``run.rows_per_pass``, halving it on CUDA
        out-of-memory (the chunk is retried; the smaller size is kept for the rest of the call)."""
        outputs, start = [], 0
        while start < n:
            stop = min(n, start + run.rows_per_pass)
            try:
                outputs.append(compute(slice(start, stop)))
            except torch.OutOfMemoryError:
                if run.rows_per_pass == 1:
                    raise
                run.rows_per_pass //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = stop
        return outputs

    @staticmethod
    def _seed_words(run: _Run, rows: np.ndarray, device) -> torch.Tensor:
        return key_words(run.keys[rows]).to(device)
