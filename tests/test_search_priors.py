"""The search's priors (sklearn_difffeat.search_priors): where it starts, and the cache depth it announces.

Stand-in extractors (`search_estimators.FakeExtractor`) keep these tests free of models: they follow the
extractors' contract (`block` with the library's block convention, `cache`, `cache_depth`, `n_blocks_` after
`fit`, ValueError for a block or cache depth the model does not have).
"""

import subprocess
import sys

import numpy as np
import pytest
from sklearn.base import BaseEstimator
from sklearn.model_selection import GridSearchCV
from sklearn.utils._param_validation import InvalidParameterError

from sklearn_difffeat.search import BlockTimestepSearchCV
from sklearn_difffeat.search_priors import DiffFeatPriors, SearchPriors

from search_estimators import FakeExtractor, Model, Table


def data(n=8):
    return np.zeros((n, 1)), np.zeros(n)


def model(cache="store/", depth=8, **kw):
    return Model(image=FakeExtractor(depth=depth, cache=cache), **kw)


def fit_search(estimator, grid, **kw):
    kw.setdefault("cv", 2)
    return BlockTimestepSearchCV(estimator, grid, **kw).fit(*data())


def rows(search):
    """{block: mean test score} of every evaluated candidate."""
    res = search.cv_results_
    return {p["image__block"]: s for p, s in zip(res["params"], res["mean_test_score"])}


def test_diff_feat_start_rules():
    axes = {
        "features__image__block": list(range(0, 29)),
        "features__image__timestep": [0, 100, 200, 300],
        "features__text__block": [0, 4, 8, -1],
        "features__text__timestep": [0.5, 0.0, 0.25],
        "text__block": [2, 9, 5],  # no -1: the largest value
        "ditfeatureextractor__block": [2, 4, 6],  # image branch without 12: the middle value
        "clf__alpha": [1, 2, 3, 4, 5],
        "x": [{"a": 1}, {"b": 2}, {"c": 3}],  # values that do not order: the middle
    }
    assert DiffFeatPriors().start(BaseEstimator(), axes) == {
        "features__image__block": 12,
        "features__image__timestep": 200,
        "features__text__block": -1,
        "features__text__timestep": 0.0,
        "text__block": 9,
        "ditfeatureextractor__block": 4,
        "clf__alpha": 3,
        "x": {"b": 2},
    }
    assert SearchPriors().start(BaseEstimator(), axes) == {}
    assert SearchPriors().shared_params(BaseEstimator(), axes) == {}


@pytest.mark.filterwarnings("ignore:.*evaluated candidates have non-finite scores")
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
def test_start_only_on_blocks_the_model_has():
    # The README's grids were written for 28- and 12-block models; here the models have 8 and 4 blocks.
    est = Model(image=FakeExtractor(depth=8), text=FakeExtractor(depth=4))
    start = DiffFeatPriors().start(est, {"image__block": range(1, 29), "text__block": range(1, 13)})
    assert start == {"image__block": 5, "text__block": 4}  # middle of 1..8 (no 12), deepest of 1..4
    # and a search from there finds the known peak (7, 3) without a failing start
    s = fit_search(est, {"image__block": list(range(1, 29)), "text__block": list(range(1, 13))})
    assert s.start_params_ == {"image__block": 5, "text__block": 4}
    assert s.best_params_ == {"image__block": 7, "text__block": 3} and s.best_score_ == 0.0
    # text block 5 (beyond the 4-block model) was tried next to the start and failed alone
    failed = [p for p, v in zip(s.cv_results_["params"], s.cv_results_["mean_test_score"]) if np.isnan(v)]
    assert failed and all(p["text__block"] > 4 for p in failed)


@pytest.mark.filterwarnings("ignore:.*evaluated candidates have non-finite scores")
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
@pytest.mark.filterwarnings("ignore:One or more of the test scores are non-finite")  # the GridSearchCV reference
def test_cache_depth_is_the_deepest_block_the_model_has():
    # [6, 7, 8, 99] on an 8-block model: the announcement is 8, so 6, 7 and 8 fit and only 99 fails.
    grid = {"image__block": [6, 7, 8, 99]}
    s = fit_search(model(), grid, start={"image__block": 8})  # its neighbours: 7 and 99
    assert s.shared_params_ == {"image__cache_depth": 8}
    assert all(p["image__cache_depth"] == 8 for p in s.cv_results_["params"])
    assert s.best_estimator_.image.cache_depth == 8
    scores = rows(s)
    assert scores[6] == -1.0 and scores[7] == 0.0 and scores[8] == -1.0 and np.isnan(scores[99])
    assert s.best_params_["image__block"] == 7
    # reference: the grid search with the same depth given explicitly
    ref = GridSearchCV(
        Model(image=FakeExtractor(cache="store/", cache_depth=8)), grid, cv=2
    ).fit(*data())
    assert ref.best_params_["image__block"] == 7
    np.testing.assert_array_equal(ref.cv_results_["mean_test_score"], [scores[b] for b in grid["image__block"]])

    # negative indices count from the end: -1 is block 8
    assert DiffFeatPriors().shared_params(model(), {"image__block": [-3, -2, -1]}) == {"image__cache_depth": 8}
    assert DiffFeatPriors().shared_params(model(), {"image__block": [1, 2, -9]}) == {"image__cache_depth": 2}
    # the README's range(1, 29) on the 8-block model
    assert DiffFeatPriors().shared_params(model(), {"image__block": range(1, 29)}) == {"image__cache_depth": 8}
    # no block of the axis exists in the model: nothing to announce
    assert DiffFeatPriors().shared_params(model(), {"image__block": [20, 30]}) == {}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
def test_no_announcement_without_cache_or_with_an_explicit_depth():
    grid = {"image__block": [6, 7, 8, 99]}
    for est in (model(cache=None), Model(image=FakeExtractor(cache="store/", cache_depth=5))):
        assert DiffFeatPriors().shared_params(est, grid) == {}
    with pytest.warns(UserWarning, match="non-finite"):
        s = fit_search(model(cache=None), grid, start={"image__block": 8})
    assert s.shared_params_ == {} and "param_image__cache_depth" not in s.cv_results_
    assert s.best_params_ == {"image__block": 7}


def test_unknown_depth_warns_and_announces_nothing():
    est = Model(image=FakeExtractor(cache="store/", broken=True))
    with pytest.warns(UserWarning, match=r"could not read the model depth of 'image' \(RuntimeError: weights"):
        assert DiffFeatPriors().shared_params(est, {"image__block": [1, 2]}) == {}
    # the start falls back to the plain priors, silently
    assert DiffFeatPriors().start(est, {"image__block": [1, 2, 12]}) == {"image__block": 12}


def test_no_priors_starts_in_the_middle_and_shares_nothing():
    grid = {"image__block": list(range(1, 9)), "text__block": [1, 2, 3, 4]}
    est = Model(image=FakeExtractor(cache="store/"), text=FakeExtractor(depth=4, cache="store/"))
    s = fit_search(est, grid, priors=None, max_evaluations=1)
    assert s.start_params_ == {"image__block": 5, "text__block": 3}  # values[len // 2]
    assert s.shared_params_ == {} and s.cv_results_["params"] == [s.start_params_]
    d = fit_search(est, grid, max_evaluations=1)  # the default priors, for contrast
    assert d.start_params_ == {"image__block": 5, "text__block": 4}
    assert d.shared_params_ == {"image__cache_depth": 8, "text__cache_depth": 4}


class MyPriors(SearchPriors):
    def __init__(self, start=None, shared=None):
        self.start_values = start or {}
        self.shared = shared or {}

    def start(self, estimator, axes):
        return self.start_values

    def shared_params(self, estimator, axes):
        return self.shared


def test_custom_priors_are_used():
    table = (0.0, 1.0, 2.0, 3.0, 2.5)
    s = fit_search(Table(), {"x": range(5)}, priors=MyPriors(start={"x": 1}, shared={"table": table}))
    assert s.start_params_ == {"x": 1}
    assert s.best_params_ == {"x": 3, "table": table} and s.best_score_ == 3.0
    assert s.best_estimator_.table == table
    assert [p["x"] for p in s.cv_results_["params"]] == [1, 0, 2, 3, 4]
    # `start` overrides the priors
    assert fit_search(Table(table=table), {"x": range(5)}, priors=MyPriors(start={"x": 1}),
                      start={"x": 4}).start_params_ == {"x": 4}


@pytest.mark.parametrize(
    "priors, error, match",
    [
        (MyPriors(start={"x": 9}), ValueError, r"MyPriors\(\)\.start\['x'\]=9 is not among param_grid\['x'\]"),
        (MyPriors(start={"y": 0}), ValueError, r"MyPriors\(\)\.start names 'y', which is not an axis"),
        (MyPriors(shared={"x": 1}), ValueError, r"shares 'x', which is an axis of param_grid"),
        (MyPriors(shared={"depth": 1}), ValueError, r"shares 'depth', which is not a parameter of the estimator"),
        (object(), InvalidParameterError, "priors"),
        ("paper", InvalidParameterError, "priors"),
    ],
)
def test_bad_priors(priors, error, match):
    with pytest.raises(error, match=match):
        fit_search(Table(table=(0.0, 1.0)), {"x": [0, 1]}, priors=priors)


def test_search_module_imports_no_extractor_or_torch():
    code = (
        "import sys, sklearn_difffeat.search; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('sklearn_difffeat.extractors')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
