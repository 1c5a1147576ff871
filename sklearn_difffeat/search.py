"""Heuristic local search over ordered hyper-parameter axes (Diff-Feat's block x timestep search).

`BlockTimestepSearchCV` climbs a grid of ordered axes (e.g. image block, image timestep, text block, text
timestep) from a prior starting point, one neighbourhood at a time, instead of scoring the whole grid. It is a
`BaseSearchCV`, so cross-validation, scoring, refit, `cv_results_` and joblib parallelism are scikit-learn's.
It works on any estimator: nothing here knows about the extractors. Where to start and what to tell the
estimator comes from the priors it is handed (`sklearn_difffeat.search_priors`).
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator
from sklearn.exceptions import FitFailedWarning
from sklearn.model_selection import BaseCrossValidator, KFold
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import type_of_target

from ._climb import IMPROVE, LOCAL_OPTIMUM, MAX_EVALUATIONS, PLATEAU, START, Climb, Progress, decide
from ._grid import check_axes, grid_point
from ._sklearn_compat import (
    BaseSearchCV,
    FrozenSplits,
    HasMethods,
    Interval,
    StrOptions,
    all_fits_failed,
    failed_fits,
    failure_summary,
    first_fit_error,
    fit_context,
    rank_failed_last,
    silenced_fitting_line,
    silenced_non_finite_warning,
    warn_non_finite,
    with_failed_candidates,
)
from .search_priors import DiffFeatPriors, SearchPriors

__all__ = ["BlockTimestepSearchCV"]


class _FitState:
    """What one `fit` hands to the `BaseSearchCV` hooks it overrides (`_run_search`, `_format_results`,
    `_get_scorers`), which scikit-learn calls with fixed signatures.

    It lives on the search only during `fit`. scikit-learn ships the search itself with each fit task (as
    `caller`), so it pickles as an empty state: tasks sent to joblib or Dask workers stay small and never carry
    the running results or the splits.
    """

    def __init__(self, axes=None, start=None, shared=None, cv=None, scorer=None):
        self.axes, self.start, self.shared, self.cv, self.scorer = axes, start, shared, cv, scorer
        self.formatted = None  # the latest arguments of _format_results: scikit-learn's running lists
        self.results = None  # the latest results dict, the very object `BaseSearchCV.fit` keeps as cv_results_

    def __reduce__(self):
        return (_FitState, ())


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
        Starting point; axes it leaves out get the prior of `priors`. Each value must be one of its axis's
        values.
    priors : "diff-feat", None or object, default="diff-feat"
        Where the search starts and which parameters every candidate gets besides the axes: an object with
        `start(estimator, axes)` and `shared_params(estimator, axes)` (see `sklearn_difffeat.search_priors`).
        "diff-feat" is `DiffFeatPriors()`: the paper's priors, read from the axis names, and the extractors'
        cache depth. None: the middle of every axis, nothing shared.
    scoring, refit, n_jobs, pre_dispatch, error_score, return_train_score
        As in `GridSearchCV`. With multi-metric scoring, `refit` must name the metric to climb.
        For multi-label indicator targets, `scoring=None` means mean average precision
        (`sklearn_difffeat.metrics.map_scorer`). A candidate with a failed fit (on any fold) or a NaN score
        never counts as an improvement and ranks last, whatever `error_score`; when every candidate is such,
        `fit` raises. With `error_score="raise"` the first failure raises.
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
    verbose : int, default=0
        0: silent. 1: one progress bar for the whole search (candidates evaluated of those planned so far, the
        grid size, the best score), without scikit-learn's per-step "Fitting ..." lines. 2 and more: no bar, a
        line per step, and scikit-learn's own messages as `GridSearchCV(verbose=verbose)` prints them.

    Attributes
    ----------
    cv_results_, best_params_, best_score_, best_index_, best_estimator_, scorer_, n_splits_, refit_time_,
    multimetric_
        As in `GridSearchCV`; `cv_results_` rows are in evaluation order and carry a `search_step` column.
        The shared parameters appear in every row's params, so `best_params_` rebuilds `best_estimator_`.
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
        The starting point used, on the grid's axes.
    shared_params_ : dict
        The parameters the priors gave every candidate besides the axes.
    """

    _parameter_constraints: dict = {
        **BaseSearchCV._parameter_constraints,
        "param_grid": [dict],
        "start": [dict, None],
        "priors": [StrOptions({"diff-feat"}), HasMethods(["start", "shared_params"]), None],
        "max_evaluations": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "patience": [Interval(numbers.Integral, 0, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "random_state": ["random_state"],
    }

    search_path_: list[dict[str, Any]]
    stopped_reason_: str
    n_evaluations_: int
    grid_size_: int
    start_params_: dict[str, Any]
    shared_params_: dict[str, Any]

    def __init__(
        self,
        estimator: BaseEstimator,
        param_grid: dict[str, Iterable[Any]],
        *,
        start: dict[str, Any] | None = None,
        priors: Literal["diff-feat"] | SearchPriors | None = "diff-feat",
        scoring: str | Callable | list | tuple | dict | None = None,
        cv: int | BaseCrossValidator | Iterable | None = 5,
        refit: bool | str | Callable = True,
        n_jobs: int | None = None,
        max_evaluations: int | None = None,
        patience: int = 0,
        tol: float = 0.0,
        random_state: int | np.random.RandomState | None = None,
        verbose: int = 0,
        pre_dispatch: int | str = "2*n_jobs",
        error_score: Literal["raise"] | float = np.nan,
        return_train_score: bool = False,
    ) -> None:
        super().__init__(estimator=estimator, scoring=scoring, n_jobs=n_jobs, refit=refit, cv=cv, verbose=verbose,
                         pre_dispatch=pre_dispatch, error_score=error_score, return_train_score=return_train_score)
        self.param_grid = param_grid
        self.start = start
        self.priors = priors
        self.max_evaluations = max_evaluations
        self.patience = patience
        self.tol = tol
        self.random_state = random_state

    # ---- what fit resolves before scikit-learn's BaseSearchCV.fit runs ------------------------------------
    def _resolved_priors(self):
        if self.priors is None:
            return SearchPriors()
        return DiffFeatPriors() if isinstance(self.priors, str) else self.priors

    def _start_point(self, axes, priors):
        """Where the climb starts: `start` over the priors' choice over the middle of every axis."""
        from_priors = priors.start(self.estimator, dict(axes))
        return grid_point(axes, [(f"{priors!r}.start", from_priors), ("start", self.start or {})])

    def _shared_params(self, axes, priors):
        shared = dict(priors.shared_params(self.estimator, dict(axes)))
        known, names = self.estimator.get_params(), {name for name, _ in axes}
        for name in shared:
            if name in names:
                raise ValueError(f"priors={priors!r} shares {name!r}, which is an axis of param_grid.")
            if name not in known:
                raise ValueError(f"priors={priors!r} shares {name!r}, which is not a parameter of the estimator.")
        return shared

    def _resolved_scoring_and_cv(self, y):
        """The default scorer and frozen splitter for this `y` (None: scikit-learn's own from the parameters)."""
        try:
            multilabel = y is not None and type_of_target(y) == "multilabel-indicator"
        except ValueError:
            multilabel = False
        scorer, cv = None, None
        if multilabel and self.scoring is None:
            from sklearn_difffeat.metrics import map_scorer  # lazy: metrics is optional for non-multi-label use

            scorer = map_scorer
        if multilabel and (self.cv is None or isinstance(self.cv, numbers.Integral)):
            # StratifiedKFold (sklearn's classifier default) rejects multi-label targets. scikit-learn's own
            # check_cv gives the same number of splits (KFold(cv) for these targets), so n_splits_ agrees.
            cv = FrozenSplits(KFold(5 if self.cv is None else self.cv, shuffle=True, random_state=self.random_state))
        elif hasattr(self.cv, "split"):
            cv = FrozenSplits(self.cv)
        # An int gives scikit-learn's unshuffled K-fold and an iterable is listed once by check_cv: both are the
        # same at every step, so scikit-learn's own splitter serves them.
        return scorer, cv

    @fit_context(prefer_skip_nested_validation=False)
    def fit(self, X: ArrayLike, y: ArrayLike | None = None, **params: Any) -> BlockTimestepSearchCV:
        """Run the local search, then refit the best candidate on all of (X, y) if `refit`.

        Parameters are those of `GridSearchCV.fit`.
        """
        axes = check_axes(self.param_grid)
        priors = self._resolved_priors()
        start = self._start_point(axes, priors)
        shared = self._shared_params(axes, priors)
        scorer, cv = self._resolved_scoring_and_cv(y)
        self._fit_state = _FitState(axes, start, shared, cv, scorer)
        try:
            return super().fit(X, y, **params)
        finally:
            del self._fit_state

    # ---- BaseSearchCV hooks ------------------------------------------------------------------------------
    def _get_scorers(self):
        state = getattr(self, "_fit_state", None)
        if state is not None and state.scorer is not None:
            return state.scorer, "score"
        return super()._get_scorers()

    def _format_results(self, candidate_params, n_splits, out, more_results=None):
        state = getattr(self, "_fit_state", None)
        if state is None or state.axes is None:
            return super()._format_results(candidate_params, n_splits, out, more_results)
        state.formatted = (candidate_params, n_splits, out, more_results)
        with silenced_non_finite_warning():  # said once, at the end of the search, instead of at every step
            state.results = self._ranked(super()._format_results(candidate_params, n_splits, out, more_results))
        return state.results

    def _ranked(self, results):
        """`results` with each candidate that has a failed fit ranked last, whatever `error_score`."""
        _, n_splits, out, _ = self._fit_state.formatted
        return rank_failed_last(results, failed_fits(out, len(out) // n_splits, n_splits) > 0)

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
        state = self._fit_state
        self.grid_size_ = int(np.prod([len(values) for _, values in state.axes]))
        self.shared_params_ = dict(state.shared)
        limit = self.max_evaluations if self.max_evaluations is not None else self.grid_size_
        rng = None if self.random_state is None else check_random_state(self.random_state)
        climb = Climb(state.axes, state.shared, state.start, limit=limit, rng=rng,
                      evaluate_candidates=evaluate_candidates, progress=Progress(self.verbose, self.grid_size_))
        if state.shared:
            self._say(f"every candidate also gets {state.shared}")
        try:
            self._start(climb)
            reason = None
            while reason is None:
                reason = self._step(climb)
        finally:
            climb.progress.close()
        self._finish(climb, reason)

    def _start(self, climb):
        best = self._evaluate(climb, [climb.current])[0]
        climb.progress.done(1, 0, best)
        self.start_params_ = climb.params(climb.current)
        climb.move_to(climb.current, best, START)
        self.search_path_ = climb.path
        self._say(f"start at {self.start_params_} score={best:.6g}")

    def _step(self, climb):
        """Score the unvisited neighbours of the current point and move to the best one; the reason the climb
        stops, or None."""
        found = climb.unvisited_neighbours()
        budget = climb.limit - len(climb.scores)
        if not found:
            return LOCAL_OPTIMUM
        if budget <= 0:
            return MAX_EVALUATIONS
        batch = found[:budget]
        climb.step += 1
        self._say(f"step {climb.step}: {len(batch)} neighbour(s) of {climb.params(climb.current)}")
        new = self._evaluate(climb, batch)
        j = int(np.argmax(new))  # first in neighbour order on ties
        climb.progress.done(len(batch), climb.step, max(climb.best, new[j]))
        move = decide(new[j], climb.best, tol=self.tol, cut_short=len(batch) < len(found), waited=climb.waited,
                       patience=self.patience)
        if move not in (IMPROVE, PLATEAU):
            return move
        climb.move_to(batch[j], new[j], move)
        self._say(f"step {climb.step}: {move} to {climb.params(climb.current)} score={new[j]:.6g}")
        return None

    def _evaluate(self, climb, points):
        """Score `points` in one `evaluate_candidates` call, as the climbed metric; -inf for a candidate with a failed
        fit (on any fold, whatever `error_score`) or a nan score, so that it never wins."""
        state, step, n = self._fit_state, climb.step, len(points)
        candidates = [climb.candidate(p) for p in points]
        climb.progress.plan(n, step)
        # At verbose=1 the progress bar replaces scikit-learn's "Fitting ..." line.
        quiet = silenced_fitting_line(self) if self.verbose == 1 else contextlib.nullcontext()
        try:
            with quiet:
                results = climb.evaluate_candidates(candidates, cv=state.cv, more_results={"search_step": [step] * n})
        except ValueError as err:
            if self.error_score == "raise" or not all_fits_failed(err):
                raise
            new = self._failed_step(climb, points, candidates, err)
        else:
            new = np.asarray(results[f"mean_test_{self._climb_metric(results)}"][-n:], dtype=float)
            _, n_splits, out, _ = state.formatted
            new = np.where(np.isnan(new) | (failed_fits(out, n, n_splits) > 0), -np.inf, new)
        climb.scores.update(zip(points, new.tolist()))
        return new

    def _failed_step(self, climb, points, candidates, err):
        """A step whose fits all failed, which scikit-learn raises for: an error at the start, where there is
        nothing to climb from; elsewhere a warning, the step's rows in cv_results_, and -inf scores."""
        summary = failure_summary(err)
        if climb.step == 0:
            raise ValueError(
                f"The search's start point {candidates[0]} failed on every CV fold, so there is nothing to "
                f"climb from: {summary}. Fix the estimator, or pass `start=` a point of the grid that fits "
                "(error_score='raise' shows the full traceback)."
            ) from err
        warnings.warn(
            f"Step {climb.step} of the search: every fit of its {len(points)} candidate(s) failed, so none of them "
            f"is a move: {[climb.params(p) for p in points]}: {summary}",
            FitFailedWarning,
            stacklevel=4,
        )
        self._restore_failed_rows(candidates, climb.step, summary)
        return np.full(len(points), -np.inf)  # nothing beats the best, so this step ends the climb

    def _restore_failed_rows(self, candidates, step, error):
        """Put the rows of a step whose fits all failed into cv_results_, as scikit-learn shows failed fits.

        `evaluate_candidates` drops them when it raises. They go into the very dict `BaseSearchCV.fit` goes on to
        rank, pick `best_params_` from and keep as `cv_results_`. Such a step always ends the climb (no move onto
        a -inf score), so no later `evaluate_candidates` call rebuilds the results without them.
        """
        state = self._fit_state
        with silenced_non_finite_warning():
            state.formatted = with_failed_candidates(state.formatted, candidates, error, self.error_score,
                                                     {"search_step": [step] * len(candidates)})
            fresh = self._ranked(super()._format_results(*state.formatted))
        state.results.clear()
        state.results.update(fresh)

    def _finish(self, climb, reason):
        climb.check_some_score(first_fit_error(self._fit_state.formatted[2]))
        warn_non_finite(self._fit_state.results, stacklevel=5)
        climb.path[-1]["stopped"] = reason
        self.stopped_reason_ = reason
        self.n_evaluations_ = len(climb.scores)
        names = [name for name, _ in climb.axes]
        self._say(f"stopped ({reason}) after {self.n_evaluations_} of {self.grid_size_} candidates; axes {names}")

    def _say(self, message):
        """A line of the `verbose >= 2` log."""
        if self.verbose >= 2:
            print(f"[BlockTimestepSearchCV] {message}")
