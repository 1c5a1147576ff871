"""The scikit-learn internals the search relies on (sklearn_difffeat._sklearn_compat), checked against the
installed scikit-learn: each test fails with a message naming what changed."""

import contextlib
import inspect
import re
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import sklearn
from sklearn.exceptions import FitFailedWarning
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV

from sklearn_difffeat._sklearn_compat import (
    FORMAT_RESULTS_PARAMS,
    NON_FINITE_WARNING,
    BaseSearchCV,
    all_fits_failed,
    exception_line,
    failed_fit_like,
    failed_fits,
    failure_summary,
    first_fit_error,
    fit_context,
    rank_failed_last,
    silenced_fitting_line,
    silenced_non_finite_warning,
    with_failed_candidates,
)

from search_estimators import Breaks, Table


def changed(what):
    return f"scikit-learn {sklearn.__version__} changed {what}; update sklearn_difffeat/_sklearn_compat.py"


def data(n=8):
    return np.zeros((n, 1)), np.zeros(n)


# Two splits of different test sizes, so `n_test_samples` tells the split of an entry of `out`.
SPLITS = [(np.arange(3, 8), np.arange(3)), (np.arange(3), np.arange(3, 8))]


def _land(est, X, y):
    return est.score(X, y)


# ---- signatures ------------------------------------------------------------------------------------------------


def test_hooks_keep_the_signatures_the_search_overrides():
    params = list(inspect.signature(BaseSearchCV._format_results).parameters)[1:]
    assert tuple(params) == FORMAT_RESULTS_PARAMS, changed(f"BaseSearchCV._format_results' parameters to {params}")

    run = list(inspect.signature(BaseSearchCV._run_search).parameters.values())[1:]
    assert run and run[0].name == "evaluate_candidates", changed("BaseSearchCV._run_search's first parameter")
    extra = [p.name for p in run[1:] if p.kind is not p.KEYWORD_ONLY or p.default is p.empty]
    assert not extra, changed(f"BaseSearchCV._run_search: a subclass must now accept {extra}")

    scorers = list(inspect.signature(BaseSearchCV._get_scorers).parameters)
    assert scorers == ["self"], changed(f"BaseSearchCV._get_scorers' parameters to {scorers}")
    scorer, metric = GridSearchCV(Table(), {"x": [0]})._get_scorers()
    assert callable(scorer) and metric == "score", changed("what BaseSearchCV._get_scorers returns")

    assert "prefer_skip_nested_validation" in inspect.signature(fit_context).parameters, changed(
        "sklearn.base._fit_context's parameters"
    )
    inherited = {"estimator", "scoring", "n_jobs", "refit", "cv", "verbose", "pre_dispatch", "error_score",
                 "return_train_score"}
    missing = inherited - set(BaseSearchCV._parameter_constraints)
    assert not missing, changed(f"BaseSearchCV._parameter_constraints (no longer has {sorted(missing)})")


# ---- the evaluate_candidates contract, on a minimal BaseSearchCV subclass --------------------------------------


class CountingSplits:
    """A fixed splitter that counts its `split` calls."""

    def __init__(self, splits):
        self.splits = splits
        self.calls = 0

    def split(self, X=None, y=None, groups=None):
        self.calls += 1
        return iter(self.splits)

    def get_n_splits(self, X=None, y=None, groups=None):
        return len(self.splits)


class Probe(BaseSearchCV):
    """Evaluates `batches` one `evaluate_candidates` call each, as the search does, recording what it sees."""

    def __init__(self, estimator, batches, *, scoring=None, verbose=0, error_score=np.nan,
                 return_train_score=False, splits=SPLITS, quiet=False, own_scorer=True):
        super().__init__(estimator=estimator, scoring=scoring, cv=len(splits), refit=False, verbose=verbose,
                         error_score=error_score, return_train_score=return_train_score)
        self.batches = batches
        self.splits = splits
        self.quiet = quiet
        self.own_scorer = own_scorer

    def _get_scorers(self):
        if self.own_scorer:
            return _land, "score"  # as the search swaps in its default scorer
        return super()._get_scorers()

    def _format_results(self, candidate_params, n_splits, out, more_results=None):
        self.formatted_ = (list(candidate_params), n_splits, list(out), dict(more_results))
        return super()._format_results(candidate_params, n_splits, out, more_results)

    def _run_search(self, evaluate_candidates):
        self.evaluate_params_ = list(inspect.signature(evaluate_candidates).parameters)
        self.splitter_ = CountingSplits(self.splits)
        self.returned_, self.errors_ = [], []
        for step, batch in enumerate(self.batches):
            quiet = silenced_fitting_line(self) if self.quiet and step > 0 else contextlib.nullcontext()
            try:
                with quiet:
                    self.returned_.append(
                        evaluate_candidates(batch, cv=self.splitter_, more_results={"step": [step] * len(batch)})
                    )
            except ValueError as err:
                self.errors_.append(err)


def test_evaluate_candidates_contract():
    probe = Probe(Table(table=(10.0, 20.0, 30.0)), [[{"x": 0}], [{"x": 1}, {"x": 2}]],
                  return_train_score=True).fit(*data())
    assert {"cv", "more_results"} <= set(probe.evaluate_params_), changed(
        f"evaluate_candidates' parameters to {probe.evaluate_params_}"
    )
    assert probe.splitter_.calls == 2, changed("evaluate_candidates: it no longer splits the given cv at every call")
    assert probe.cv_results_ is probe.returned_[-1], changed(
        "evaluate_candidates: its result is no longer the dict fit keeps as cv_results_"
    )
    assert probe.scorer_ is _land, changed("BaseSearchCV.fit: it no longer takes its scorer from _get_scorers")
    assert list(probe.cv_results_["step"]) == [0, 1, 1], changed("how more_results reach cv_results_")

    candidates, n_splits, out, more = probe.formatted_
    assert candidates == [{"x": 0}, {"x": 1}, {"x": 2}] and n_splits == 2 and more == {"step": [0, 1, 1]}, changed(
        "the arguments BaseSearchCV.fit passes to _format_results"
    )
    keys = {"fit_error", "test_scores", "train_scores", "n_test_samples", "fit_time", "score_time"}
    assert len(out) == 6 and all(keys <= set(fit) for fit in out), changed(
        f"the entries of `out` (keys now {sorted(out[0])})"
    )
    layout = [(fit["test_scores"], fit["n_test_samples"]) for fit in out]
    assert layout == [(10.0, 3), (10.0, 5), (20.0, 3), (20.0, 5), (30.0, 3), (30.0, 5)], changed(
        f"the order of `out` (no longer candidate-major: {layout})"
    )
    assert not failed_fits(out, 3, 2).any()


def test_the_fitting_line_follows_verbose_at_each_call(capsys):
    batches = [[{"x": 0}], [{"x": 1}]]
    Probe(Table(table=(1.0, 2.0)), batches, verbose=1).fit(*data())
    lines = re.findall(r"Fitting 2 folds for each of 1 candidates", capsys.readouterr().out)
    assert len(lines) == 2, changed("the 'Fitting N folds ...' line of evaluate_candidates")
    probe = Probe(Table(table=(1.0, 2.0)), batches, verbose=1, quiet=True).fit(*data())
    lines = re.findall(r"Fitting 2 folds for each of 1 candidates", capsys.readouterr().out)
    assert len(lines) == 1 and probe.verbose == 1, changed(
        "evaluate_candidates: it no longer reads search.verbose at each call for its 'Fitting ...' line"
    )


# ---- failed fits -----------------------------------------------------------------------------------------------


def test_all_fits_failed_is_a_recognisable_value_error():
    with pytest.raises(ValueError) as caught:
        GridSearchCV(Breaks(broken=(0, 1)), {"x": [0, 1]}, cv=2).fit(*data())
    assert all_fits_failed(caught.value), changed(f"the 'All the N fits failed' error: {caught.value}")
    assert failure_summary(caught.value) == "ValueError: x=0 is broken | ValueError: x=1 is broken", changed(
        f"the layout of the 'fits failed' details: {caught.value}"
    )
    assert not all_fits_failed(ValueError("x must be positive")) and not all_fits_failed(RuntimeError("All the 2 "
                                                                                                        "fits failed"))


@pytest.mark.filterwarnings("ignore:One or more of the (test|train) scores are non-finite")
def test_a_batch_whose_fits_all_fail_raises_and_leaves_no_rows():
    batches = [[{"x": 0}], [{"x": 1}, {"x": 2}], [{"x": 0}]]  # the middle batch fails on every fit
    probe = Probe(Breaks(table=(1.0, 2.0, 3.0), broken=(1, 2)), batches).fit(*data())
    assert len(probe.errors_) == 1 and all_fits_failed(probe.errors_[0]), changed(
        "evaluate_candidates: a batch whose fits all fail no longer raises 'All the N fits failed'"
    )
    assert [p["x"] for p in probe.cv_results_["params"]] == [0, 0], changed(
        "evaluate_candidates: the rows of a batch whose fits all failed are no longer dropped"
    )


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
@pytest.mark.filterwarnings("ignore:One or more of the (test|train) scores are non-finite")
@pytest.mark.parametrize("scoring, return_train_score", [(None, False), ({"land": _land, "neg": _land}, True)])
def test_failed_fit_like_matches_scikit_learns_own_failed_fits(scoring, return_train_score):
    # x=1 fails on both splits, x=0 fits: scikit-learn keeps both and scores the failures `error_score`.
    probe = Probe(Breaks(table=(1.0, 2.0), broken=(1,)), [[{"x": 0}, {"x": 1}]], error_score=-7.0,
                  scoring=scoring, return_train_score=return_train_score, own_scorer=False)
    with pytest.warns(FitFailedWarning):
        probe.fit(*data())
    _, n_splits, out, _ = probe.formatted_
    assert list(failed_fits(out, 2, n_splits)) == [0, n_splits], changed("`fit_error` in `out`")
    for split in range(n_splits):
        theirs = out[n_splits + split]
        mine = failed_fit_like(out[split], theirs["fit_error"], -7.0)
        assert set(mine) == set(theirs), changed(f"the keys of a failed fit's entry of `out`: {sorted(theirs)}")
        for key in mine:
            if key not in ("fit_time", "score_time"):  # timings are whatever the failed fit took
                assert mine[key] == theirs[key], changed(f"a failed fit's {key!r} in `out`: {theirs[key]!r}")


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
@pytest.mark.filterwarnings("ignore:One or more of the (test|train) scores are non-finite")
@pytest.mark.parametrize("scoring", [None, {"land": _land, "neg": _land}])
def test_with_failed_candidates_rebuilds_the_rows_scikit_learn_drops(scoring):
    est = Breaks(table=(1.0, 2.0), broken=(1,))
    kw = dict(scoring=scoring, error_score=-7.0, return_train_score=True, own_scorer=False)
    # The reference: x=1 fails beside x=0 in one call, so scikit-learn keeps its row.
    ref = Probe(est, [[{"x": 0}, {"x": 1}]], **kw).fit(*data())
    # x=1 fails alone in a call of its own, which raises and drops it; its row is rebuilt.
    probe = Probe(est, [[{"x": 0}], [{"x": 1}]], **kw).fit(*data())
    rows = with_failed_candidates(probe.formatted_, [{"x": 1}], "ValueError: x=1 is broken", -7.0, {"step": [0]})
    rebuilt = BaseSearchCV._format_results(probe, *rows)
    assert set(rebuilt) == set(ref.cv_results_), changed(f"the columns of cv_results_: {sorted(ref.cv_results_)}")
    for key, theirs in ref.cv_results_.items():
        if not key.endswith("_time"):  # timings are whatever the fits took
            np.testing.assert_array_equal(rebuilt[key], theirs, err_msg=changed(f"how a failed fit shows in {key}"))


def _complex_data():
    rng = np.random.RandomState(0)
    return (rng.uniform(size=10) + 1j * rng.uniform(size=10)).reshape(-1, 2), rng.uniform(size=5)


def _formatted(fail):
    try:
        fail()
    except Exception:  # any error: its formatted traceback is the point
        return traceback.format_exc()
    raise AssertionError("did not raise")


def _chained():
    try:
        {}["missing"]
    except KeyError as err:
        raise RuntimeError("while reading\nline two of the message") from err


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
@pytest.mark.filterwarnings("ignore:One or more of the (test|train) scores are non-finite")
def test_exception_line_of_real_tracebacks():
    text = _formatted(lambda: Ridge().fit(*_complex_data()))
    assert not re.match(r"^[A-Za-z_][\w.]*: ", text.strip().splitlines()[-1])  # the last line is data
    assert exception_line(text) == "ValueError: Complex data not supported"
    assert exception_line(_formatted(_chained)) == "RuntimeError: while reading"
    assert exception_line("ValueError: x=1 is broken") == "ValueError: x=1 is broken"  # a rebuilt row's error
    assert exception_line("no traceback at all") == "no traceback at all"
    with pytest.raises(ValueError) as caught:  # every fit fails: scikit-learn's message quotes each traceback
        GridSearchCV(Ridge(), {"alpha": [1.0]}, cv=2).fit(*_complex_data())
    assert failure_summary(caught.value) == "ValueError: Complex data not supported", changed(
        f"the layout of the 'fits failed' details: {caught.value}"
    )
    probe = Probe(Breaks(table=(1.0, 2.0), broken=(1,)), [[{"x": 0}, {"x": 1}]], own_scorer=False)
    with pytest.warns(FitFailedWarning):
        probe.fit(*data())
    assert first_fit_error(probe.formatted_[2]) == "ValueError: x=1 is broken"
    assert first_fit_error(probe.formatted_[2][:2]) is None


class ReversedRanks(GridSearchCV):
    def _format_results(self, candidate_params, n_splits, out, more_results=None):
        results = super()._format_results(candidate_params, n_splits, out, more_results)
        results["rank_test_score"] = results["rank_test_score"].max() + 1 - results["rank_test_score"]
        return results


def test_best_index_is_the_best_rank_test_of_the_formatted_results():
    search = ReversedRanks(Table(table=(1.0, 3.0, 2.0)), {"x": [0, 1, 2]}, cv=2).fit(*data())
    assert search.best_index_ == 0 and search.best_params_ == {"x": 0} and search.best_score_ == 1.0, changed(
        "BaseSearchCV.fit: best_index_ is no longer the lowest rank_test_<refit> of what _format_results returns"
    )


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
@pytest.mark.filterwarnings("ignore:One or more of the (test|train) scores are non-finite")
@pytest.mark.parametrize("scoring", [None, {"land": _land, "neg": lambda e, X, y: -e.score(X, y)}])
def test_rank_failed_last_ranks_as_scikit_learn_does_with_nan_error_score(scoring):
    est, grid = Breaks(table=(1.0, 2.0, 2.0, 0.5), broken=(1,)), {"x": [0, 1, 2, 3]}
    kw = dict(cv=2, scoring=scoring, refit=False)
    high = GridSearchCV(est, grid, error_score=9.0, **kw).fit(*data()).cv_results_
    reference = GridSearchCV(est, grid, error_score=np.nan, **kw).fit(*data()).cv_results_
    failed = np.array([False, True, False, False])
    ranked = rank_failed_last(dict(high), failed)
    for key in [k for k in reference if k.startswith("rank_test_")]:
        np.testing.assert_array_equal(ranked[key], reference[key], err_msg=changed(f"how {key} ranks"))
        assert ranked[key].dtype == reference[key].dtype and ranked[key][1] == 4
    untouched = rank_failed_last(dict(reference), failed)  # NaN already ranks last: nothing changes
    assert all(np.array_equal(untouched[k], reference[k]) for k in reference if k.startswith("rank_test_"))
    every = rank_failed_last(dict(high), np.ones(4, dtype=bool))
    assert all(list(every[k]) == [1, 1, 1, 1] for k in every if k.startswith("rank_test_"))


def test_non_finite_scores_warning_matches_and_is_silenced():
    search = GridSearchCV(Table(table=(1.0, np.nan)), {"x": [0, 1]}, cv=2)
    with pytest.warns(UserWarning) as record:
        search.fit(*data())
    messages = [str(w.message) for w in record]
    assert any(re.search(NON_FINITE_WARNING, m) for m in messages), changed(
        f"the non-finite scores warning of _format_results: {messages}"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with silenced_non_finite_warning():
            search.fit(*data())
    assert not [w for w in caught if re.search(NON_FINITE_WARNING, str(w.message))]


# ---- the checked range -----------------------------------------------------------------------------------------


def test_installed_scikit_learn_is_in_the_range_pyproject_allows():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    from packaging.requirements import Requirement  # a dependency of pytest

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    with open(pyproject, "rb") as f:
        dependencies = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
    (requirement,) = [r for r in dependencies if r.name == "scikit-learn"]
    assert any(spec.operator in ("<", "<=", "~=", "==") for spec in requirement.specifier), (
        f"pyproject.toml's {requirement} has no upper bound: give it one, the newest scikit-learn that "
        "tests/test_sklearn_compat.py passes with"
    )
    assert requirement.specifier.contains(sklearn.__version__, prereleases=True), (
        f"scikit-learn {sklearn.__version__} is outside pyproject.toml's {requirement}: run "
        "tests/test_sklearn_compat.py with it, update sklearn_difffeat/_sklearn_compat.py if needed, then the bound"
    )
