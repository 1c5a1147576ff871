"""Machinery shared by the image and text extractors.

A subclass says how to load its backbone, how to validate and fingerprint its input, and how to compute pooled
features for a batch at one timestep. This base does the rest: parameter checks, resolving block indices,
per-sample random generators, the loop over timesteps and batches, the on-disk cache, halving the batch on
CUDA out-of-memory, progress, feature names, and keeping weights out of pickles.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from collections import OrderedDict

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ..cache import FeatureCache, stable_hash

# Loaded backbones, shared by every extractor in the process: clones made by GridSearchCV, or set_params
# between fits, reuse the weights instead of reading them again. Small, because each entry may hold GBs.
_BACKBONES: OrderedDict = OrderedDict()
_MAX_BACKBONES = 2


def cached_backbone(key, load, keepalive=None):
    """Return the backbone stored under ``key``, loading it with ``load()`` on a miss (LRU of 2).

    ``keepalive`` is held with the entry: when a key contains ``id(obj)``, holding ``obj`` stops Python from
    reusing that id for another object while the entry exists.
    """
    if key in _BACKBONES:
        _BACKBONES.move_to_end(key)
        return _BACKBONES[key][1]
    backbone = load()
    _BACKBONES[key] = (keepalive, backbone)
    while len(_BACKBONES) > _MAX_BACKBONES:
        _BACKBONES.popitem(last=False)
    return backbone


def clear_backbone_cache():
    """Drop every loaded backbone (frees their memory; the next transform reloads)."""
    _BACKBONES.clear()


def sample_generator(random_state: int, fingerprint: str, draw: int) -> torch.Generator:
    """A CPU generator seeded by (random_state, sample content, draw) only.

    Seeding by content rather than position makes a sample's noise independent of batch size, batch
    composition, order and device; reusing it for every timestep gives common random numbers.
    """
    digest = hashlib.blake2b(f"{random_state}|{fingerprint}|{draw}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def pool_tokens(hidden: torch.Tensor, pooling: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool (B, N, D) token states to (B, D) ("mean", "max", "first") or (B, N*D) ("none").

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


def resolve_blocks(block, num_blocks: int) -> list[int]:
    """Normalise ``block`` (int or list; negatives count from the end) to indices in [0, num_blocks]."""
    requested = [block] if isinstance(block, numbers.Integral) else list(block)
    if not requested:
        raise ValueError("block is an empty list; give at least one block index.")
    resolved = []
    for value in requested:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"block must be an int or a list of ints, got {value!r}.")
        index = int(value) + num_blocks + 1 if value < 0 else int(value)
        if not 0 <= index <= num_blocks:
            raise ValueError(
                f"block={value} is out of range for a model with {num_blocks} blocks: valid values are "
                f"0..{num_blocks} (0 = embedding, k = output of block k) or -{num_blocks + 1}..-1 from the end."
            )
        if index in resolved:
            raise ValueError(f"block lists {value} twice (as block {index}).")
        resolved.append(index)
    return resolved


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple, np.ndarray, range)) else [value]


def single_column(X, what: str):
    """Unwrap the one-column DataFrame a ColumnTransformer passes for a column given as a list (``["image"]``)."""
    if hasattr(X, "iloc") and getattr(X, "ndim", 1) == 2:
        if X.shape[1] != 1:
            raise ValueError(f"Expected one column of {what}, got a DataFrame with {X.shape[1]} columns.")
        return X.iloc[:, 0]
    return X


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class BaseDiffusionFeatureExtractor(TransformerMixin, BaseEstimator):
    """Shared base; see :class:`DiTFeatureExtractor` and :class:`TextDiffusionFeatureExtractor`."""

    _feature_prefix = "feat"

    _parameter_constraints: dict = {
        "block": ["array-like", Interval(numbers.Integral, None, None, closed="neither")],
        "pooling": [StrOptions({"mean", "max", "none", "first"})],
        "n_noise_draws": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": [Interval(numbers.Integral, 0, None, closed="left")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "device": [str, torch.device, None],
        "dtype": [StrOptions({"auto", "float32", "bfloat16", "float16"})],
        "cache": [str, os.PathLike, None],
        "cache_depth": [Interval(numbers.Integral, None, None, closed="neither"), None],
        "verbose": ["verbose"],
    }

    # ---- hooks for subclasses -------------------------------------------------------------------------
    def _backbone_options(self) -> tuple:
        """Parameters besides ``model`` and ``device`` that change the loaded backbone (e.g. compile)."""
        return ()

    def _load_backbone(self, device: torch.device):
        """Load the backbone on ``device`` (called at most once per key per process)."""
        raise NotImplementedError

    def _check_timesteps(self, backbone) -> list:
        """Validated list of timesteps."""
        raise NotImplementedError

    def _prepare(self, X, backbone):
        """Validate X; return (items, fingerprints): one item and one content fingerprint per sample."""
        raise NotImplementedError

    def _check_model_params(self, backbone) -> None:
        """Check subclass parameters whose valid range depends on the loaded model."""

    def _feature_width(self, backbone) -> int:
        """Width of one pooled (block, timestep) feature."""
        raise NotImplementedError

    def _batch_features(self, backbone, items, fingerprints, timestep, blocks, state) -> dict:
        """Pooled features {block: (B, width) float32 tensor} averaged over noise draws.

        ``state`` is a dict that lives for one ``transform`` call (e.g. to encode each image once).
        """
        raise NotImplementedError

    def _cache_namespace_parts(self, backbone, timestep) -> tuple:
        """Everything besides the sample and block that determines a cached feature."""
        return (
            backbone.fingerprint,
            self._feature_prefix,
            self.pooling,
            float(timestep),
            self.n_noise_draws,
            self.random_state,
        )

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
        backbone = self._backbone()
        resolve_blocks(self.block, backbone.num_blocks)
        self._check_timesteps(backbone)
        self._check_model_params(backbone)
        self._check_cache_depth(backbone)
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
        backbone = self._backbone()
        blocks = resolve_blocks(self.block, backbone.num_blocks)
        timesteps = self._check_timesteps(backbone)
        items, fingerprints = self._prepare(X, backbone)
        width = self._feature_width(backbone)
        n = len(items)
        out = np.empty((n, len(blocks), len(timesteps), width), dtype=np.float32)
        cache = FeatureCache(self.cache) if self.cache is not None else None
        # With a cache, a pass may go deeper than asked (cache_depth) so that later requests for other blocks
        # at this timestep (by a search, say) are served without another pass.
        depth = max(blocks)
        if cache is not None and self.cache_depth is not None:
            depth = max(depth, self._check_cache_depth(backbone))
        computed_blocks = sorted(set(blocks) | (set(range(depth + 1)) if depth > max(blocks) else set()))

        # Serve what the cache holds first, so that the progress bar counts only real work.
        plan = []
        for ti, t in enumerate(timesteps):
            namespace = stable_hash(*self._cache_namespace_parts(backbone, t)) if cache is not None else None
            todo = []
            for i, fp in enumerate(fingerprints):
                stored = cache.load(namespace, fp, [f"b{b}" for b in blocks]) if cache is not None else None
                if stored is not None:
                    for bi, b in enumerate(blocks):
                        out[i, bi, ti] = stored[f"b{b}"]
                else:
                    todo.append(i)
            plan.append((ti, t, namespace, todo))

        state: dict = {}
        total = sum(len(todo) for *_, todo in plan)
        progress = tqdm(total=total, disable=not self.verbose or total == 0, desc=type(self).__name__, unit="sample")
        with progress:
            for ti, t, namespace, todo in plan:
                batches = self._compute_in_batches(backbone, items, fingerprints, todo, t, computed_blocks, state)
                for idx, feats in batches:
                    for bi, b in enumerate(blocks):
                        out[idx, bi, ti] = feats[b]
                    if cache is not None:  # per batch, so an interrupted extraction keeps what it finished
                        for row, i in enumerate(idx):
                            cache.store(namespace, fingerprints[i], {f"b{b}": feats[b][row] for b in computed_blocks})
                    progress.update(len(idx))
        return out.reshape(n, -1)

    def _compute_in_batches(self, backbone, items, fingerprints, todo, timestep, blocks, state):
        """Yield (indices, {block: (B, width) ndarray}) for the samples in ``todo``.

        ``batch_size`` is a maximum: on CUDA out-of-memory the batch is halved and the same samples retried.
        """
        batch_size = self.batch_size
        start = 0
        while start < len(todo):
            idx = todo[start : start + batch_size]
            try:
                feats = self._batch_features(
                    backbone, [items[i] for i in idx], [fingerprints[i] for i in idx], timestep, blocks, state
                )
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                torch.cuda.empty_cache()
                continue
            yield np.asarray(idx), {b: f.float().cpu().numpy() for b, f in feats.items()}
            start += len(idx)

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

    # ---- helpers --------------------------------------------------------------------------------------
    def _backbone(self):
        device = resolve_device(self.device)
        model = self.model
        source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else id(model)
        key = (type(self).__name__, device, source, *self._backbone_options())
        return cached_backbone(key, lambda: self._load_backbone(device), keepalive=model)

    def _check_cache_depth(self, backbone):
        if self.cache_depth is None:
            return None
        return resolve_blocks(self.cache_depth, backbone.num_blocks)[0]

    def _autocast(self, device: torch.device):
        dtype = resolve_dtype(self.dtype, device)
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
