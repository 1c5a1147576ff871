"""The estimator shared by the image and text extractors: parameters, the scikit-learn API, and the hooks a
subclass fills in (loading its backbone, validating and keying its input, batching it and computing pooled
features for a batch). One transform call runs as a :class:`~._engine.TransformRun`.
"""

from __future__ import annotations

import numbers
import os

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .._sklearn_compat import Interval, StrOptions, fit_context
from ..backbones.base import resolve_blocks
from ..store import FeatureStore, stable_hash
from ._engine import Batch, BatchResult, FeatureLayout, TransformRun, read_stored_into
from ._identity import ModelIdentity, ResolvedModel
from ._inputs import check_offset
from ._runtime import cached_backbone, default_workers, open_store, resolve_device, resolve_dtype


class BaseDiffusionFeatureExtractor(TransformerMixin, BaseEstimator):
    """Base of :class:`DiTFeatureExtractor` and :class:`TextDiffusionFeatureExtractor` (not used directly).

    Holds what both share: the common parameters, ``fit``, ``transform`` and :meth:`transform_with_report`,
    :meth:`feature_layout`, :meth:`read_stored`, feature names and the process-wide loaded backbone.
    """

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
    # Hooks that validate parameters or describe the layout take a ``backbone`` argument that is a
    # :class:`~._identity.ResolvedModel` (the values read from a loaded backbone, or recorded in the store):
    # they may read only its fields.
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
        """``timestep`` validated for this model, as a list (ints or floats) in the order given."""
        raise NotImplementedError

    def _check_model_params(self, backbone) -> None:
        """Check subclass parameters whose valid range depends on the loaded model."""

    def _feature_width(self, backbone) -> int:
        """Columns of one pooled (block, timestep) feature."""
        raise NotImplementedError

    def _namespace_description(self, backbone, timestep) -> dict:
        """Everything besides the sample and the block that determines a stored feature."""
        return {
            "extractor": self._feature_prefix, "model": backbone.fingerprint, "timestep": timestep,
            "pooling": self.pooling, "n_noise_draws": self.n_noise_draws, "random_state": self.random_state,
            "dtype": str(backbone.dtype).replace("torch.", ""),
        }

    def _samples(self, X, backbone, offset: int):
        """Validate X as a container; return an object with ``len()``, ``keys(workers, errors)`` (content keys; a
        sample that cannot be keyed raises, or its reason is recorded in the ``errors`` dict when one is given) and
        ``failure(position, reason)`` (the message naming the sample as input ``offset + position``)."""
        raise NotImplementedError

    def _batches(self, run: TransformRun, samples, backbone, todo: np.ndarray):
        """Yield :class:`Batch` es covering the distinct samples ``todo`` (indices into ``run.keys``); report
        unreadable samples with ``run.fail(row, reason)`` and leave them out of their batch."""
        raise NotImplementedError

    def _compute(self, run: TransformRun, backbone, batch: Batch, plan) -> BatchResult:
        """Features of ``batch`` for each ``(timestep index, timestep)`` of ``plan``, for the rows of the batch
        that miss that timestep, at every block of ``run.computed_blocks``; and any extra rows to store (e.g.
        clean latents)."""
        raise NotImplementedError

    # ---- sklearn API ----------------------------------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.requires_fit = True
        tags.non_deterministic = False
        return tags

    @fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Check the parameters against the model. Nothing is learned from X.

        The model is loaded, unless the cache holds a record of it (see docs/store.md): then only its recorded
        depth, width, fingerprint, ... are read."""
        self._check_cache_param()
        backbone = self._resolved()
        resolve_blocks(self.block, backbone.num_blocks)
        self._check_timesteps(backbone)
        self._check_model_params(backbone)
        self._cache_depth(backbone)
        self.n_blocks_ = backbone.num_blocks
        self.feature_width_ = self._feature_width(backbone)
        self.n_features_out_ = self._layout(backbone).n_features
        return self

    def transform(self, X):
        """Pooled features, float32 array of shape (n_samples, n_blocks * n_timesteps * width).

        Column order: for each block (in the order given), for each timestep (in the order given), the pooled
        feature of that (block, timestep); see :meth:`feature_layout`. An input that cannot be read raises a
        ``ValueError`` naming it (:meth:`transform_with_report` can record it instead).
        """
        return self.transform_with_report(X)[0]

    def transform_with_report(self, X, *, on_error="raise", on_store_error="warn", offset=0):
        """Features, as :meth:`transform` returns them, and a report of what the call did.

        Parameters
        ----------
        X : images or texts
            What :meth:`transform` takes.
        on_error : {"raise", "record"}, default="raise"
            What an input that cannot be read (a missing or undecodable image file, an empty or invalid text) does:
            ``"raise"`` raises a ``ValueError`` naming it; ``"record"`` lists it in the report's ``failed``, gives
            it a row of NaN, stores nothing of it and goes on with the other inputs. Invalid containers and
            parameters raise in both cases.
        on_store_error : {"warn", "raise"}, default="warn"
            What a ``cache`` that cannot be written (full disk, read-only folder, file-size limit) does: ``"warn"``
            warns once and goes on computing without storing (the store is an optimisation here); ``"raise"``
            raises the store's ``StoreWriteError`` (for runs whose point is to fill the store, as
            :func:`~sklearn_difffeat.extract`). Segments completed before the error stay in both cases.
        offset : int or 1-D array of int, default=0
            Position of ``X[0]`` in a larger input that ``X`` is a part of (or the position of each sample of
            ``X``, for a part that is not contiguous): messages name inputs by their position in the whole input.
            The report's positions stay positions in ``X``.

        Returns
        -------
        features : ndarray of shape (n_samples, n_features_out_), float32
            The features (a plain array, whatever ``set_output`` says).
        report : TransformReport
            Each input's content key (its key in the feature store), how many distinct samples needed the model
            and how many the store served alone, and the unreadable inputs by position.
        """
        check_is_fitted(self, "n_features_out_")
        if on_error not in ("raise", "record"):
            raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}.")
        if on_store_error not in ("warn", "raise"):
            raise ValueError(f"on_store_error must be 'warn' or 'raise', got {on_store_error!r}.")
        offset = check_offset(offset)
        resolved = self._resolved()
        samples, run = self._plan(X, resolved, on_error, on_store_error, offset)
        if len(run.todo) == 0:  # the store served everything: no model needed
            return run.execute(iter(()), None, desc=type(self).__name__, verbose=self.verbose)
        backbone = self._backbone()
        loaded = ResolvedModel.of(backbone)
        if loaded != resolved:  # a record that disagrees with the weights: trust the weights
            self._record(loaded)
            samples, run = self._plan(X, loaded, on_error, on_store_error, offset)
        batches = self._batches(run, samples, backbone, run.todo)
        return run.execute(batches, lambda batch, plan: self._compute(run, backbone, batch, plan),
                           desc=type(self).__name__, verbose=self.verbose)

    def feature_layout(self, blocks=None) -> FeatureLayout:
        """Which features the parameters produce: blocks, timesteps, width, column names and store namespaces.

        Parameters
        ----------
        blocks : int, list of int or None, default=None
            Blocks to describe, indexed as the ``block`` parameter; None describes ``block`` itself.

        Returns
        -------
        FeatureLayout
            ``blocks`` (resolved to ``[0, n_blocks_]``), ``timesteps``, ``width`` (columns per (block,
            timestep)), ``feature_names`` (those of :meth:`get_feature_names_out` for ``blocks=None``),
            ``namespaces`` ({(block, timestep): feature store namespace}) and ``descriptions`` ({namespace:
            what determines its features}). Namespaces change with every parameter that changes features, and
            only with those.
        """
        check_is_fitted(self, "n_features_out_")
        return self._layout(self._resolved(), blocks)

    def read_stored(self, keys, store=None) -> np.ndarray:
        """The stored features of samples given by their content keys, in :meth:`transform`'s column order.

        Reads the feature store only: no model pass, no input. Keys come from
        :meth:`transform_with_report` or :func:`~sklearn_difffeat.extract`.

        Parameters
        ----------
        keys : array-like of shape (n_samples,)
            Content keys (32 lower-case hex characters, as str or bytes).
        store : FeatureStore, str, path-like or None, default=None
            The store to read; None reads the extractor's ``cache``.

        Returns
        -------
        ndarray of shape (n_samples, n_features_out_), float32
            A row of NaN for each key whose features are not all stored.
        """
        check_is_fitted(self, "n_features_out_")
        if store is None:
            if self.cache is None:
                raise ValueError("read_stored needs a feature store: pass store=... or set the extractor's cache.")
            store = self.cache
        if not isinstance(store, FeatureStore):
            store = open_store(store)
        layout = self.feature_layout()
        n = len(keys)
        out = np.empty((n, len(layout.blocks), len(layout.timesteps), layout.width), dtype=np.float32)
        complete = read_stored_into(layout, store, keys, out, np.arange(n))
        out[~complete.all(axis=1)] = np.nan
        return out.reshape(n, -1)

    def _plan(self, X, resolved, on_error: str, on_store_error: str, offset):
        samples = self._samples(X, resolved, offset)
        return samples, self._start_run(resolved, samples, on_error, on_store_error)

    def _start_run(self, backbone, samples, on_error: str, on_store_error: str) -> TransformRun:
        """Key the samples and start a run over them; each pass computes the requested blocks, or with a cache and
        ``cache_depth``, every block up to that depth."""
        blocks = resolve_blocks(self.block, backbone.num_blocks)
        store = open_store(self.cache) if self.cache is not None else None
        depth = self._cache_depth(backbone) if store is not None else None
        # Every block up to cache_depth, also when it is a requested block (cache_depth=-1 with block=-1).
        computed = sorted(set(blocks) | (set(range(depth + 1)) if depth is not None else set()))
        layout = self._layout(backbone, computed)
        unreadable = {} if on_error == "record" else None
        keys = samples.keys(self._workers(), unreadable)
        device = self._placement()[0]
        return TransformRun.plan(keys, blocks, layout, store, self.batch_size, device, on_error, unreadable,
                                 samples.failure, on_store_error)

    def _layout(self, backbone, blocks=None) -> FeatureLayout:
        """The :class:`FeatureLayout` of ``blocks`` (default: the requested ones) for this model."""
        blocks = resolve_blocks(self.block, backbone.num_blocks) if blocks is None else (
            resolve_blocks(blocks, backbone.num_blocks, name="blocks"))
        timesteps = self._check_timesteps(backbone)
        width = self._feature_width(backbone)
        namespaces, descriptions = {}, {}
        for t in timesteps:
            base = self._namespace_description(backbone, t)
            for b in blocks:
                description = {**base, "block": b, "width": width}
                name = f"{self._feature_prefix}-b{b}-t{t:g}-{stable_hash(description)}"
                namespaces[b, t], descriptions[name] = name, description
        return FeatureLayout(blocks=tuple(blocks), timesteps=tuple(timesteps), width=width, namespaces=namespaces,
                             descriptions=descriptions, prefix=self._feature_prefix)

    def get_feature_names_out(self, input_features=None):
        """Names like ``dit_b12_t500_0``: prefix, block, timestep, index within the pooled feature.

        Parameters
        ----------
        input_features : ignored
            Present for the scikit-learn API.

        Returns
        -------
        ndarray of str objects, shape (n_features_out_,)
        """
        check_is_fitted(self, "n_features_out_")
        return self.feature_layout().feature_names

    def get_backbone(self):
        """The loaded backbone this extractor runs (loaded on first use), for inspection: its modules (to hook
        or count passes), tokenizer, depth and width. Shared by every extractor of the process with the same
        model, device and dtype, so treat it as read-only."""
        return self._backbone()

    # ---- helpers --------------------------------------------------------------------------------------
    def _backbone(self):
        model = self.model
        device, dtype = self._placement()
        source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else id(model)
        key = (type(self).__name__, source, device, dtype, *self._backbone_options())
        return cached_backbone(key, lambda: self._load_backbone(device, dtype), keepalive=model)

    def _placement(self):
        """(device, dtype) the backbone runs in, resolved without loading it."""
        named = isinstance(self.model, (str, os.PathLike))
        modules = None if named else self._in_memory_modules()
        first = next(modules[0].parameters()) if modules else None
        device = resolve_device(self.device, first.device if first is not None else None)
        return device, resolve_dtype(self.dtype, device, first.dtype if first is not None else None)

    def _resolved(self) -> ResolvedModel:
        """What the layout needs from the model: from the cache's record of its identity when there is one (no
        load), else from the loaded backbone, then recorded for the next reader."""
        identity = self._identity()
        resolved = identity.lookup() if identity is not None else None
        if resolved is None:
            resolved = ResolvedModel.of(self._backbone())
            if identity is not None:
                identity.record(resolved)
        return resolved

    def _record(self, resolved: ResolvedModel) -> None:
        identity = self._identity()
        if identity is not None:
            identity.record(resolved)

    def _identity(self) -> ModelIdentity | None:
        """The model's identity in the cache; None without a cache or for modules given in memory."""
        if self.cache is None or not isinstance(self.model, (str, os.PathLike)):
            return None
        dtype = str(self._placement()[1]).replace("torch.", "")
        return ModelIdentity(open_store(self.cache), type(self).__name__, self.model, dtype)

    def _workers(self) -> int:
        return default_workers() if self.num_workers is None else self.num_workers

    def _check_cache_param(self):
        if self.cache is not None and os.fspath(self.cache) == "":
            raise ValueError("cache='' is not a folder; give a folder path for the feature store, or None.")

    def _cache_depth(self, backbone):
        if self.cache_depth is None:
            return None
        return resolve_blocks(self.cache_depth, backbone.num_blocks, name="cache_depth")[0]
