"""Heuristic local search over ordered hyper-parameter axes (Diff-Feat's block x timestep search).

`BlockTimestepSearchCV` climbs a grid of ordered axes (e.g. image block, image timestep, text block, text
timestep) from a prior starting point, one neighbourhood at a time, instead of scoring the whole grid. It is a
`BaseSearchCV`, so cross-validation, scoring, refit, `cv_results_` and joblib parallelism are scikit-learn's.
It works on any estimator: nothing here knows about the extractors.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping

import numpy as np
from sklearn.base import _fit_context, clone
from sklearn.model_selection import KFold
from sklearn.model_selection._search import BaseSearchCV
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.metadata_routing import get_routing_for_object
from sklearn.utils.multiclass import type_of_target

__all__ = ["BlockTimestepSearchCV"]

LOCAL_OPTIMUM = "local_optimum"
MAX_EVALUATIONS = "max_evaluations"


def _same(a, b):
    """Equality that tolerates values whose `==` is not a plain bool (arrays, estimators)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def _index_of(values, value):
    for i, v in enumerate(values):
        if _same(v, value):
            return i
    return None


def _check_axes(param_grid):
    """Return [(name, values)] in the given order, with clear errors naming the faulty axis."""
    if not isinstance(param_grid, Mapping) or len(param_grid) == 0:
        raise ValueError("param_grid must be a non-empty dict mapping parameter names to ordered values.")
    axes = []
    for name, values in param_grid.items():
        if not isinstance(name, str):
            raise ValueError(f"param_grid keys must be parameter names (str), got {name!r}.")
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
            raise ValueError(
                f"param_grid[{name!r}] must be an ordered sequence of values (list, tuple, range, 1-D array), "
                f"got {type(values).__name__}."
            )
        values = list(values)
        if not values:
            raise ValueError(f"param_grid[{name!r}] is empty: each axis needs at least one value.")
        for i, v in enumerate(values):
            j = _index_of(values[:i], v)
            if j is not None:
                raise ValueError(f"param_grid[{name!r}] has the duplicate value {v!r} (positions {j} and {i}).")
        axes.append((name, values))
    return axes


def _branch(name):
    """'text', 'image' or None, from the parameter path (see docs/search.md)."""
    lowered = name.lower()
    if "text" in lowered:
        return "text"
    parents = lowered.split("__")[:-1]
    if "image" in lowered or any(p.startswith("dit") for p in parents):
        return "image"
    return None


def _prior_index(name, values):
    """Index of the paper's prior for one axis: image block 12, middle image t, deepest text block, text t=0."""
    middle = len(values) // 2
    lowered, branch = name.lower(), _branch(name)
    try:
        if branch == "image" and lowered.endswith("block"):
            i = _index_of(values, 12)
            return middle if i is None else i
        if branch == "text" and lowered.endswith("block"):
            # -1 is "the deepest block" in our block convention, so it beats the largest listed value.
            i = _index_of(values, -1)
            return values.index(max(values)) if i is None else i
        if branch == "text" and lowered.endswith("timestep"):
            return values.index(min(values))
    except TypeError:  # values that do not order (max/min): fall back to the middle
        pass
    return middle


def _announce_cache_depths(estimator, axes):
    """Tell cached extractors the deepest block the search may ask for.

    For an axis ``<prefix>block`` whose estimator also has ``<prefix>cache_depth`` left at None, return a
    clone with that depth set: each backbone pass at a timestep then stores every block the search can visit,
    so moving along the block axis costs no new pass. Other estimators are returned unchanged.
    """
    params = estimator.get_params()
    depths = {}
    for name, values in axes:
        if not name.endswith("block"):
            continue
        depth_param = name[: -len("block")] + "cache_depth"
        if depth_param in params and params[depth_param] is None:
            ints = [int(v) for v in values if isinstance(v, numbers.Integral)]
            if ints:  # -1 (deepest) covers any negative index, which needs the model's depth to compare
                depths[depth_param] = -1 if min(ints) < 0 else max(ints)
    return clone(estimator).set_params(**depths) if depths else estimator


class _FrozenSplits:
    """Splits computed once and reused, so every search step scores candidates on the same folds.

    `evaluate_candidates` calls `cv.split` at each step; a shuffling splitter without an integer seed would
    otherwise give each step different folds and make scores of different steps incomparable.
    """

    def __init__(self, cv):
        self.cv = cv
        self._splits = None

    def split(self, X=None, y=None, groups=None):
        if self._splits is None:
            self._splits = list(self.cv.split(X, y, groups))
        return iter(self._splits)

    def get_n_splits(self, X=None, y=None, groups=None):
        return self.cv.get_n_splits(X, y, groups)

    def get_metadata_routing(self):
        return get_routing_for_object(self.cv)  # so `groups` still reaches a group-aware splitter


class BlockTimestepSearchCV(BaseSearchCV):
    """Hill-climbing search over ordered parameter axes, with cross-validation.

    Starts from a prior point of the grid (by default the Diff-Feat priors: image block 12, middle image
    timestep, deepest text block, text timestep 0), scores all unvisited neighbours of the current point in one
    parallel batch, moves to the best one while it improves the best score by more than `tol`, and stops at a
    local optimum or when `max_evaluations` is reached. No candidate is evaluated twice.

    Parameters
    ----------
    estimator : estimator object
        Any scikit-learn estimator; cloned for every fit.
    param_grid : dict of str -> sequence
        Ordered axes: parameter name -> its values in search order (neighbours are adjacent positions).
    start : dict of str -> value, default=None
        Starting point; axes it leaves out get their default prior (see docs/search.md). Each value must be
        one of its axis's values.
    scoring, refit, n_jobs, verbose, pre_dispatch, error_score, return_train_score
        As in `GridSearchCV`. With multi-metric scoring, `refit` must name the metric to climb.
        For multi-label indicator targets, `scoring=None` means mean average precision
        (`sklearn_difffeat.metrics.map_scorer`).
    cv : int, cross-validation generator or iterable, default=5
        As in `GridSearchCV`, except that an int with multi-label indicator targets means
        `KFold(cv, shuffle=True, random_state=random_state)`. Splits are computed once per `fit` and shared by
        all candidates.
    max_evaluations : int, default=None
        Largest number of candidates to evaluate (the start counts). None: no limit.
    patience : int, default=0
        Number of consecutive non-improving moves (to the best neighbour just evaluated) allowed before
        stopping. 0 is plain hill climbing.
    tol : float, default=0.0
        A move must beat the best score so far by more than `tol` to count as an improvement.
    random_state : int, RandomState or None, default=None
        Seeds the default multi-label KFold and, when not None, shuffles the neighbour order (which breaks ties
        and picks the neighbours evaluated when `max_evaluations` cuts a batch short).

    Attributes
    ----------
    cv_results_, best_params_, best_score_, best_index_, best_estimator_, scorer_, n_splits_, refit_time_,
    multimetric_
        As in `GridSearchCV`; `cv_results_` rows are in evaluation order and carry a `search_step` column.
    search_path_ : list of dict
        The points the search moved through: `step`, `params`, `score`, `move` ('start', 'improve' or
        'plateau'), `n_evaluations` (cumulative) and `stopped` (None except on the last entry, where it is
        `stopped_reason_`).
    stopped_reason_ : str
        'local_optimum' (no neighbour improves, patience spent) or 'max_evaluations'.
    n_evaluations_ : int
        Number of candidates evaluated (rows of `cv_results_`).
    grid_size_ : int
        Number of points of the full grid.
    start_params_ : dict
        The starting point used.
    """

    _parameter_constraints: dict = {
        **BaseSearchCV._parameter_constraints,
        "param_grid": [dict],
        "start": [dict, None],
        "max_evaluations": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "patience": [Interval(numbers.Integral, 0, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        estimator,
        param_grid,
        *,
        start=None,
        scoring=None,
        cv=5,
        refit=True,
        n_jobs=None,
        max_evaluations=None,
        patience=0,
        tol=0.0,
        random_state=None,
        verbose=0,
        pre_dispatch="2*n_jobs",
        error_score=np.nan,
        return_train_score=False,
    ):
        super().__init__(
            estimator=estimator,
            scoring=scoring,
            n_jobs=n_jobs,
            refit=refit,
            cv=cv,
            verbose=verbose,
            pre_dispatch=pre_dispatch,
            error_score=error_score,
            return_train_score=return_train_score,
        )
        self.param_grid = param_grid
        self.start = start
        self.max_evaluations = max_evaluations
        self.patience = patience
        self.tol = tol
        self.random_state = random_state

    def _start_point(self, axes):
        point = [_prior_index(name, values) for name, values in axes]
        names = [name for name, _ in axes]
        for name, value in (self.start or {}).items():
            if name not in names:
                raise ValueError(f"start names {name!r}, which is not an axis of param_grid; axes: {names}.")
            k = names.index(name)
            i = _index_of(axes[k][1], value)
            if i is None:
                raise ValueError(f"start[{name!r}]={value!r} is not among param_grid[{name!r}]={axes[k][1]!r}.")
            point[k] = i
        return tuple(point)

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None, **params):
        """Run the local search, then refit the best candidate on all of (X, y) if `refit`.

        Parameters are those of `GridSearchCV.fit`.
        """
        self._axes = _check_axes(self.param_grid)
        self._start = self._start_point(self._axes)

        try:
            multilabel = y is not None and type_of_target(y) == "multilabel-indicator"
        except ValueError:
            multilabel = False
        scoring, cv = self.scoring, self.cv
        if multilabel and scoring is None:
            from sklearn_difffeat.metrics import map_scorer  # lazy: metrics is optional for non-multi-label use

            scoring = map_scorer
        if multilabel and (cv is None or isinstance(cv, numbers.Integral)):
            # StratifiedKFold (sklearn's classifier default) rejects multi-label targets.
            cv = KFold(5 if cv is None else cv, shuffle=True, random_state=self.random_state)
        if hasattr(cv, "split"):
            cv = _FrozenSplits(cv)
        elif cv is not None and not isinstance(cv, numbers.Integral):
            cv = list(cv)  # a one-shot generator of splits would be exhausted after the first step

        # BaseSearchCV.fit reads self.scoring / self.cv / self.estimator; swap in the resolved ones only for its
        # duration.
        saved = self.scoring, self.cv, self.estimator
        self.scoring, self.cv = scoring, cv
        self.estimator = _announce_cache_depths(self.estimator, self._axes)
        try:
            return super().fit(X, y, **params)
        finally:
            self.scoring, self.cv, self.estimator = saved
            del self._axes, self._start

    def _climb_metric(self, results):
        if isinstance(self.refit, str) and f"mean_test_{self.refit}" in results:
            return self.refit
        if "mean_test_score" in results:
            return "score"
        raise ValueError(
            "With multi-metric scoring, refit must name the metric the search climbs "
            f"(one of the scoring keys); got refit={self.refit!r}."
        )

    def _run_search(self, evaluate_candidates):
        axes = self._axes
        names = [name for name, _ in axes]
        rng = None if self.random_state is None else check_random_state(self.random_state)
        self.grid_size_ = int(np.prod([len(values) for _, values in axes]))
        limit = self.max_evaluations if self.max_evaluations is not None else self.grid_size_

        def params_of(point):
            return {name: values[i] for (name, values), i in zip(axes, point)}

        scores = {}  # point -> mean test score of the climbed metric; doubles as the visited set
        step = 0

        def evaluate(points):
            results = evaluate_candidates(
                [params_of(p) for p in points], more_results={"search_step": [step] * len(points)}
            )
            metric = self._climb_metric(results)
            new = np.asarray(results[f"mean_test_{metric}"][-len(points):], dtype=float)
            # A failed fit (error_score=nan) must never look like an improvement.
            new = np.where(np.isnan(new), -np.inf, new)
            scores.update(zip(points, new.tolist()))
            return new

        current = self._start
        best = evaluate([current])[0]
        self.start_params_ = params_of(current)
        self.search_path_ = [self._path_entry(0, params_of(current), best, "start", len(scores))]
        waited = 0
        while True:
            neighbours = []
            for k, (_, values) in enumerate(axes):
                for d in (-1, 1):
                    i = current[k] + d
                    if 0 <= i < len(values):
                        p = (*current[:k], i, *current[k + 1:])
                        if p not in scores:
                            neighbours.append(p)
            if rng is not None:
                neighbours = [neighbours[i] for i in rng.permutation(len(neighbours))]
            budget = limit - len(scores)
            if not neighbours:
                reason = LOCAL_OPTIMUM
                break
            if budget <= 0:
                reason = MAX_EVALUATIONS
                break
            batch = neighbours[:budget]
            step += 1
            new = evaluate(batch)
            j = int(np.argmax(new))  # first in neighbour order on ties
            if new[j] > best + self.tol:
                move, waited, best = "improve", 0, new[j]
            elif len(batch) < len(neighbours):
                reason = MAX_EVALUATIONS  # an unevaluated neighbour might still have improved
                break
            elif waited < self.patience:
                move, waited = "plateau", waited + 1
            else:
                reason = LOCAL_OPTIMUM
                break
            current = batch[j]
            self.search_path_.append(self._path_entry(step, params_of(current), new[j], move, len(scores)))
            if self.verbose > 0:
                print(f"[BlockTimestepSearchCV] step {step}: {move} to {params_of(current)} score={new[j]:.6g}")

        self.search_path_[-1]["stopped"] = reason
        self.stopped_reason_ = reason
        self.n_evaluations_ = len(scores)
        if self.verbose > 0:
            print(f"[BlockTimestepSearchCV] stopped ({reason}) after {self.n_evaluations_} of "
                  f"{self.grid_size_} candidates; axes {names}")

    @staticmethod
    def _path_entry(step, params, score, move, n_evaluations):
        score = float("nan") if score == -np.inf else float(score)
        return {"step": step, "params": params, "score": score, "move": move,
                "n_evaluations": n_evaluations, "stopped": None}
