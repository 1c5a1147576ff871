"""Where a block x timestep search starts, and what it tells the extractors: the search's priors.

`BlockTimestepSearchCV` climbs any grid of ordered axes and knows nothing of extractors. What is specific to
Diff-Feat lives here, in an object the search is handed through its `priors` parameter:

- `start(estimator, axes)`: the starting point, {axis name: value} for the axes the priors have an opinion on
  (the search takes the middle value of the others);
- `shared_params(estimator, axes)`: parameters set on every candidate besides the grid axes (they appear in
  `cv_results_["params"]` like one-valued axes).

`SearchPriors` is the neutral base (no opinion, nothing shared; the same as `priors=None`); subclass it to write
your own. `DiffFeatPriors` is the default: the paper's priors and the cache-depth announcement.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from sklearn.base import BaseEstimator, clone

from ._grid import index_of

__all__ = ["DiffFeatPriors", "SearchPriors"]


class SearchPriors:
    """Neutral priors: start in the middle of every axis, share nothing. Subclass and override either method."""

    def start(self, estimator: BaseEstimator, axes: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        """Starting values, {name: value} for some or all axes; `axes` maps each name to its list of values."""
        return {}

    def shared_params(self, estimator: BaseEstimator, axes: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        """Parameters (not axes of the grid) that every candidate gets, as {name: value}."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _branch(name):
    """'text', 'image' or None, from the parameter path (see docs/search.md)."""
    lowered = name.lower()
    if "text" in lowered:
        return "text"
    parents = lowered.split("__")[:-1]
    if "image" in lowered or any(p.startswith("dit") for p in parents):
        return "image"
    return None


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _block_owner(estimator, name):
    """(path, estimator) owning the `block` parameter that the axis `name` sets, or None if `name` is not one."""
    if not name.endswith("block"):
        return None
    prefix = name[: -len("block")]
    if not prefix:
        return type(estimator).__name__, estimator
    if not prefix.endswith("__"):
        return None  # e.g. "textblock": not the `block` parameter of a sub-estimator
    path = prefix[:-2]
    owner = estimator.get_params().get(path)
    return None if owner is None or not hasattr(owner, "get_params") else (path, owner)


def _model_depth(owner):
    """(`n_blocks_` of a fitted clone of `owner`, None) or (None, the error) when it cannot be had.

    Extractors expose `n_blocks_` after `fit`, which only loads the model (shared within a process, so this costs
    no second load).
    """
    try:
        probe = clone(owner)
        own = probe.get_params(deep=False)
        # The deepest block is valid for any depth, and the probe must touch no cache and print nothing.
        probe.set_params(**{k: v for k, v in {"block": -1, "cache": None, "verbose": 0}.items() if k in own})
        probe.fit()
        return int(probe.n_blocks_), None
    except Exception as err:  # any failure only means "depth unknown": the candidates report their own errors
        return None, err


def _in_model(value, n_blocks):
    """Whether `value` is a block of a model with `n_blocks` blocks: 0..n from the embedding, -(n+1)..-1 from
    the end (the library's block convention)."""
    return _is_int(value) and -(n_blocks + 1) <= value <= n_blocks


class DiffFeatPriors(SearchPriors):
    """The Diff-Feat priors and the cache-depth announcement, read from parameter names.

    Start (Lan, Zheng, Yin 2025): image block 12 (else the middle value), the middle image timestep, the deepest
    text block (`-1` if listed, else the largest value), the smallest text timestep (no noise). An axis is on the
    text branch when its name contains `text`, on the image branch when it contains `image` or a path part starts
    with `dit`; other axes get the middle value. For a block axis whose estimator tells its model's depth
    (`n_blocks_` after `fit`, as the extractors do), only the blocks the model has are considered, so a grid
    written for a deeper model still starts on a block that exists.

    Shared parameters: for an axis `<prefix>block` whose estimator `<prefix>` has a feature cache
    (`<prefix>cache` not None) and leaves `<prefix>cache_depth` at None, every candidate gets
    `<prefix>cache_depth` = the deepest block of the axis that exists in the model, so the first backbone pass at a
    timestep stores every block the search can visit. Blocks beyond the model's depth are left out of the
    announcement and fail only their own candidates.
    """

    def start(self, estimator: BaseEstimator, axes: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        chosen = {}
        for name, values in axes.items():
            candidates = values
            owned = _block_owner(estimator, name)
            if owned is not None:
                n_blocks, _ = _model_depth(owned[1])
                if n_blocks is not None:
                    candidates = [v for v in values if _in_model(v, n_blocks)] or values
            chosen[name] = candidates[self._prior_index(name, candidates)]
        return chosen

    @staticmethod
    def _prior_index(name, values):
        middle = len(values) // 2
        lowered, branch = name.lower(), _branch(name)
        try:
            if branch == "image" and lowered.endswith("block"):
                i = index_of(values, 12)
                return middle if i is None else i
            if branch == "text" and lowered.endswith("block"):
                # -1 is "the deepest block" in the block convention, so it beats the largest listed value.
                i = index_of(values, -1)
                return values.index(max(values)) if i is None else i
            if branch == "text" and lowered.endswith("timestep"):
                return values.index(min(values))
        except TypeError:  # values that do not order (max/min): fall back to the middle
            pass
        return middle

    def shared_params(self, estimator: BaseEstimator, axes: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        params = estimator.get_params()
        shared = {}
        for name, values in axes.items():
            owned = _block_owner(estimator, name)
            if owned is None:
                continue
            prefix = name[: -len("block")]
            depth_param, cache_param = prefix + "cache_depth", prefix + "cache"
            # Only an estimator with a cache gains from passes that go deeper than asked; an explicit depth is
            # the user's choice.
            if depth_param not in params or params[depth_param] is not None or params.get(cache_param) is None:
                continue
            if not any(_is_int(v) for v in values):
                continue
            n_blocks, err = _model_depth(owned[1])
            if n_blocks is None:
                warnings.warn(
                    f"DiffFeatPriors could not read the model depth of {owned[0]!r} ({type(err).__name__}: {err}); "
                    f"the search leaves {depth_param} unset.",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            valid = [v + n_blocks + 1 if v < 0 else v for v in values if _in_model(v, n_blocks)]
            if valid:
                shared[depth_param] = max(valid)
        return shared
