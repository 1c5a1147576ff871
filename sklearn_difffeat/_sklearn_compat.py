"""Every piece of scikit-learn's private API that `BlockTimestepSearchCV` relies on, in one place.

The search is a `BaseSearchCV` that calls `evaluate_candidates` once per step instead of once for the whole grid.
scikit-learn documents that pattern (`BaseSearchCV._run_search`) but keeps it private, so the search depends on
the following, which `tests/test_sklearn_compat.py` checks against the installed scikit-learn:

- Private names: `BaseSearchCV` (`sklearn.model_selection._search`), `_fit_context` (`sklearn.base`) and the
  parameter constraints `HasMethods`, `Interval`, `StrOptions` (`sklearn.utils._param_validation`), so that the
  search validates its parameters like any scikit-learn estimator.
- The hooks `BaseSearchCV.fit` calls on the subclass: `_run_search(evaluate_candidates)` (a subclass whose
  `_run_search` takes no `callback_ctx` is called with `evaluate_candidates` alone); `_get_scorers()` returning
  `(scorers, refit_metric)` (the search swaps in its multi-label default scorer there); and
  `_format_results(candidate_params, n_splits, out, more_results)` returning the results dict (the search keeps
  its arguments to tell which candidates have a failed fit and to restore the rows of a failed step).
- Ranking: `_format_results` ranks each metric with `rankdata(-mean, "min")` as int32, NaN means tied last, and
  `fit` picks `best_index_` as the lowest `rank_test_<refit metric>` of the dict the last call returned. The
  search rewrites those ranks so that a candidate with a failed fit ranks last whatever `error_score`
  (`rank_failed_last`), which reaches `best_index_`, `best_params_`, `best_score_` and the refit.
- `evaluate_candidates(candidate_params, cv=..., more_results=...)`: scores one batch on the given splitter
  (which it splits anew at every call: hence `FrozenSplits`), prints its "Fitting ..." line whenever
  `search.verbose > 0` at the time of the call, and returns the results of all calls so far, the very dict `fit`
  then ranks and keeps as `cv_results_` (so updating it in place reaches `cv_results_`).
- `out`, the per-fit results `_format_results` receives: one dict per (candidate, split), candidate-major, with
  `fit_error` (None or the formatted traceback, read by `exception_line`), `test_scores` (and `train_scores`),
  `n_test_samples`, `fit_time` and `score_time`; a failed fit scores `error_score`.
- Messages that have no class of their own: a batch whose fits all fail raises a plain `ValueError` "All the N
  fits failed" (its rows are then dropped from the results) whose details give each distinct traceback after a
  line of dashes; and `_format_results` warns "One or more of the test scores are non-finite" at every call once a
  candidate has failed.

`fit` also ships the search object itself with every fit task (as `caller`); the search keeps that payload small
(its per-fit state pickles empty), but nothing breaks if scikit-learn stops doing it.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import numpy as np
import sklearn
from scipy.stats import rankdata
from sklearn.utils.metadata_routing import get_routing_for_object

try:
    from sklearn.base import _fit_context
    from sklearn.model_selection._search import BaseSearchCV
    from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
except ImportError as err:  # only on a scikit-learn outside the range pyproject.toml allows
    raise ImportError(
        f"scikit-learn {sklearn.__version__} moved a private name that sklearn_difffeat's search uses ({err}); "
        "update sklearn_difffeat/_sklearn_compat.py."
    ) from err

__all__ = [
    "ALL_FITS_FAILED",
    "FORMAT_RESULTS_PARAMS",
    "NON_FINITE_WARNING",
    "BaseSearchCV",
    "FrozenSplits",
    "HasMethods",
    "Interval",
    "StrOptions",
    "all_fits_failed",
    "exception_line",
    "failed_fit_like",
    "failed_fits",
    "failure_summary",
    "first_fit_error",
    "fit_context",
    "rank_failed_last",
    "silenced_fitting_line",
    "silenced_non_finite_warning",
    "with_failed_candidates",
]

fit_context = _fit_context

# The parameters the search's `_format_results` override receives, in scikit-learn's order.
FORMAT_RESULTS_PARAMS = ("candidate_params", "n_splits", "out", "more_results")

ALL_FITS_FAILED = re.compile(r"All the \d+ fits failed")
NON_FINITE_WARNING = r"One or more of the (test|train) scores are non-finite"
_DETAILS = "Below are more details about the failures:"
_DELIMITER = re.compile(r"-{20,}\n")
_FRAME = re.compile(r'^\s*File "')
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(: |$)")  # "ValueError: ...", "mod.CustomError: ...", "KeyError"


def all_fits_failed(err: BaseException) -> bool:
    """Whether `err` is scikit-learn's "All the N fits failed" error (a plain ValueError)."""
    return isinstance(err, ValueError) and ALL_FITS_FAILED.search(str(err)) is not None


def exception_line(traceback_text: str) -> str:
    """The line naming the exception in a formatted traceback (a `fit_error` of `out`), "SomeError: message".

    It is the first unindented line after the last frame (`File "...", line N`): chained exceptions print their
    tracebacks one after the other, so the last frame belongs to the error that was raised, and the message may
    go on over more lines after it (scikit-learn's "Complex data not supported" quotes the data). Text without
    frames gives its last line that looks like "SomeError: message", else its last line.
    """
    lines = [ln for ln in traceback_text.strip().splitlines() if ln.strip()]
    frames = [i for i, ln in enumerate(lines) if _FRAME.match(ln)]
    if frames:
        # Skip the frame's source line (and 3.11's ^^^ markers), both indented.
        line = next((ln for ln in lines[frames[-1] + 1 :] if not ln[0].isspace()), None)
        if line is not None:
            return line.strip()
    named = [ln.strip() for ln in lines if _EXCEPTION_LINE.match(ln)]
    return named[-1] if named else (lines[-1].strip() if lines else "")


def failure_summary(err: BaseException) -> str:
    """The exception line (see `exception_line`) of each distinct traceback in a "fits failed" message, e.g.
    "ValueError: block=99 is out of range ...", joined by " | " (the whole message when it has no details)."""
    text = str(err)
    _, _, details = text.partition(_DETAILS)
    lines: list[str] = []
    for chunk in _DELIMITER.split(details):
        line = exception_line(chunk) if chunk.strip() else ""
        if line and line not in lines:
            lines.append(line)
    return " | ".join(lines) if lines else text.strip()


def first_fit_error(out: list[dict]) -> str | None:
    """The exception line of the first failed fit in `out`, or None when no fit failed."""
    return next((exception_line(f["fit_error"]) for f in out if f["fit_error"] is not None), None)


def failed_fits(out: list[dict], n_candidates: int, n_splits: int) -> np.ndarray:
    """For each of the last `n_candidates` candidates in `out`, how many of its `n_splits` fits failed."""
    fits = out[len(out) - n_candidates * n_splits :]
    return np.array(
        [sum(f["fit_error"] is not None for f in fits[i * n_splits : (i + 1) * n_splits]) for i in range(n_candidates)],
        dtype=int,
    )


def rank_failed_last(results: dict, failed: np.ndarray) -> dict:
    """Make the candidates in `failed` (a bool per row) rank last, tied, in every `rank_test_<metric>` of the
    results dict, whatever their mean (a numeric `error_score` may exceed every real score); `results` is updated
    in place and returned.

    scikit-learn ranks by mean score alone, NaN last: `rankdata(-mean, "min")` as int32, NaN taken as one below
    the lowest mean. The others keep that rank among themselves; with NaN `error_score` nothing changes.
    `BaseSearchCV.fit` then picks `best_index_` as the argmin of `rank_test_<refit metric>`.
    """
    for key in [k for k in results if k.startswith("rank_test_")]:
        means = np.where(failed, np.nan, np.asarray(results[f"mean_test_{key[len('rank_test_'):]}"], dtype=float))
        if np.isnan(means).all():
            results[key] = np.ones(len(means), dtype=np.int32)
        else:
            filled = np.nan_to_num(means, nan=np.nanmin(means) - 1)
            results[key] = rankdata(-filled, method="min").astype(np.int32, copy=False)
    return results


def with_failed_candidates(
    formatted: tuple, candidates: list[dict], error: str, error_score, more_results: dict
) -> tuple:
    """The arguments of a `_format_results` call (`formatted`) with rows appended for `candidates`, each of whose
    fits failed with `error` (see `failed_fit_like`); `more_results` holds the new rows' extra columns."""
    candidate_params, n_splits, out, previous = formatted
    template = out[:n_splits]  # the first candidate's fits: the keys of an entry, and each split's test size
    return (
        [*candidate_params, *candidates],
        n_splits,
        [*out, *(failed_fit_like(template[j], error, error_score) for _ in candidates for j in range(n_splits))],
        {key: [*previous[key], *more_results[key]] for key in previous},
    )


def failed_fit_like(template: dict, error: str, error_score) -> dict:
    """The entry of `out` scikit-learn would have made for a failed fit on `template`'s split: `error_score` for
    every score, `error` as `fit_error`, and no timing (NaN)."""
    fit = dict(template, fit_error=error, fit_time=np.nan, score_time=np.nan)
    for key in ("test_scores", "train_scores"):
        if key in fit:
            fit[key] = dict.fromkeys(fit[key], error_score) if isinstance(fit[key], dict) else error_score
    return fit


def warn_non_finite(results: dict, stacklevel: int) -> None:
    """One warning for a whole search that counts its candidates with non-finite scores, where
    `_format_results` warns at every call once one has failed (see `silenced_non_finite_warning`). `stacklevel` is
    `warnings.warn`'s, counted from here."""
    keys = [k for k in results if k.startswith(("mean_test_", "mean_train_"))]
    bad = {k: ~np.isfinite(np.asarray(results[k], dtype=float)) for k in keys}
    rows = np.logical_or.reduce(list(bad.values()))
    if rows.any():
        warnings.warn(
            f"{int(rows.sum())} of {rows.size} evaluated candidates have non-finite scores (failed fits or nan "
            f"scores) in {[k for k in keys if bad[k].any()]}, e.g. {results['params'][int(np.argmax(rows))]}; "
            "see cv_results_.",
            UserWarning,
            stacklevel=stacklevel,
        )


@contextlib.contextmanager
def silenced_non_finite_warning() -> Iterator[None]:
    """Silence `_format_results`' non-finite-score warning (the search says it once, at the end)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NON_FINITE_WARNING, category=UserWarning)
        yield


@contextlib.contextmanager
def silenced_fitting_line(search: BaseSearchCV) -> Iterator[None]:
    """Silence the "Fitting N folds for each of M candidates" line of the `evaluate_candidates` calls made inside.

    `evaluate_candidates` prints it whenever `search.verbose > 0` and has no other switch; the per-fit lines
    depend on the `verbose` that `fit` read at its start, so they are unaffected.
    """
    verbose = search.verbose
    search.verbose = 0
    try:
        yield
    finally:
        search.verbose = verbose


class FrozenSplits:
    """Splits computed once and reused, so every search step scores candidates on the same folds.

    `evaluate_candidates` calls `cv.split` at each call; a shuffling splitter without an integer seed would
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
