"""BlockTimestepSearchCV on synthetic score landscapes with a known optimum."""

import re

import distributed
import joblib
import numpy as np
import pytest
from sklearn.exceptions import FitFailedWarning
from sklearn.model_selection import GridSearchCV, KFold

from sklearn_difffeat.metrics import map_scorer
from sklearn_difffeat.search import BlockTimestepSearchCV

from search_estimators import GRID, PEAK, Breaks, FoldSum, Landscape, NoisyMultiLabel, Table, landscape


def data(n=12):
    return np.zeros((n, 1)), np.zeros(n)


def search(estimator=None, grid=GRID, **kw):
    kw.setdefault("cv", 2)
    return BlockTimestepSearchCV(estimator if estimator is not None else landscape(), grid, **kw)


def test_finds_known_optimum_from_priors_with_few_evaluations():
    Landscape.n_fits = 0
    s = search().fit(*data())
    assert s.start_params_ == {"image__block": 12, "image__timestep": 400, "text__block": 12,
                               "text__timestep": 0.0}
    assert s.best_params_ == dict(zip(GRID, PEAK))
    assert s.best_score_ == pytest.approx(1.0)
    assert s.grid_size_ == 28 * 10 * 12 * 6
    assert s.n_evaluations_ <= s.grid_size_ / 4
    assert s.stopped_reason_ == "local_optimum"
    # one row per evaluated candidate, none twice, and exactly that many fits (+1 refit)
    params = s.cv_results_["params"]
    assert len(params) == s.n_evaluations_
    assert len({tuple(p.values()) for p in params}) == len(params)
    assert Landscape.n_fits == s.n_evaluations_ * s.n_splits_ + 1
    # rows in evaluation order: the start first, steps non-decreasing, the path's points in order
    assert params[0] == s.start_params_
    assert np.all(np.diff(s.cv_results_["search_step"]) >= 0)
    rows = [params.index(e["params"]) for e in s.search_path_]
    assert rows == sorted(rows)
    path_scores = [e["score"] for e in s.search_path_]
    assert path_scores == sorted(path_scores) and path_scores[-1] == pytest.approx(1.0)
    assert [e["stopped"] for e in s.search_path_] == [None] * (len(s.search_path_) - 1) + ["local_optimum"]
    assert s.search_path_[-1]["params"] == s.best_params_


def test_grid_search_reference_agrees():
    # Exhaustive reference over the same 20,160-point grid (one split keeps it to a few seconds).
    X, y = data()
    one_split = [(np.arange(6), np.arange(6, 12))]
    ref = GridSearchCV(landscape(), GRID, cv=one_split).fit(X, y)
    s = search(cv=one_split).fit(X, y)
    assert s.best_params_ == ref.best_params_ == dict(zip(GRID, PEAK))
    assert s.best_score_ == pytest.approx(ref.best_score_)


def test_stops_at_local_optimum_and_says_so():
    # a low peak next to the start, a high one far away
    local, far = (10, 500, 12, 0.0), (25, 0, 2, 0.5)
    s = search(landscape(peaks=((1.0, local), (5.0, far)))).fit(*data())
    assert s.best_params_ == dict(zip(GRID, local))
    assert s.best_score_ == pytest.approx(1.0)
    assert s.stopped_reason_ == "local_optimum"
    assert s.search_path_[-1]["stopped"] == "local_optimum"


def test_max_evaluations_is_honoured():
    for limit in (1, 5, 20):
        s = search(max_evaluations=limit).fit(*data())
        assert s.n_evaluations_ == len(s.cv_results_["params"]) == limit
        assert s.stopped_reason_ == "max_evaluations"
        assert s.search_path_[-1]["stopped"] == "max_evaluations"
    # a budget larger than the climb needs changes nothing
    free = search().fit(*data())
    capped = search(max_evaluations=free.n_evaluations_ + 3).fit(*data())
    assert capped.cv_results_["params"] == free.cv_results_["params"]
    assert capped.stopped_reason_ == "local_optimum"


def test_deterministic_and_random_state_shuffles_neighbour_order():
    a, b = search().fit(*data()), search().fit(*data())
    assert a.cv_results_["params"] == b.cv_results_["params"]
    c, d = search(random_state=3).fit(*data()), search(random_state=3).fit(*data())
    assert c.cv_results_["params"] == d.cv_results_["params"]
    assert c.best_params_ == a.best_params_
    assert c.cv_results_["params"] != a.cv_results_["params"]  # same points visited, other order
    # first batch: neighbours along axes in the given order, one step down then up
    first = [p for p, st in zip(a.cv_results_["params"], a.cv_results_["search_step"]) if st == 1]
    assert [(p["image__block"], p["image__timestep"]) for p in first[:4]] == [(11, 400), (13, 400), (12, 300),
                                                                            (12, 500)]


def test_refit_predict_and_persistence(tmp_path):
    X, y = data()
    s = search().fit(X, y)
    est = s.best_estimator_
    assert (est.image.block, est.image.timestep, est.text.block, est.text.timestep) == PEAK
    np.testing.assert_allclose(s.predict(X), 1.0)
    assert s.score(X, y) == pytest.approx(1.0)
    joblib.dump(est, tmp_path / "best.joblib")
    loaded = joblib.load(tmp_path / "best.joblib")
    np.testing.assert_array_equal(loaded.predict(X), est.predict(X))
    assert loaded.get_params()["image__block"] == 14

    no_refit = search(refit=False).fit(X, y)
    assert not hasattr(no_refit, "best_estimator_") and no_refit.best_params_ == s.best_params_


def test_patience_allows_plateau_moves():
    table = (0.0, 1.0, 0.5, 0.8, 2.0, 3.0)
    grid = {"x": range(len(table))}

    def run(p):
        return search(Table(table=table), grid, start={"x": 1}, patience=p).fit(*data())

    assert run(0).best_params_ == {"x": 1} and run(0).n_evaluations_ == 3
    assert run(1).best_params_ == {"x": 1}
    s = run(2)
    assert s.best_params_ == {"x": 5} and s.stopped_reason_ == "local_optimum"
    assert [e["move"] for e in s.search_path_] == ["start", "plateau", "plateau", "improve", "improve"]


@pytest.mark.filterwarnings("ignore:1 of 3 evaluated candidates have non-finite scores")
def test_tol_and_nan_scores():
    table = (0.0, 1.0, 1.05, np.nan)
    s = search(Table(table=table), {"x": range(4)}, start={"x": 1}, tol=0.1).fit(*data())
    assert s.best_params_ == {"x": 2} and s.search_path_[-1]["params"] == {"x": 1}  # +0.05 is within tol
    s = search(Table(table=table), {"x": range(4)}, start={"x": 2}).fit(*data())
    assert s.best_params_ == {"x": 2} and s.stopped_reason_ == "local_optimum"  # NaN never wins


def test_default_priors():
    grid = {
        "features__image__block": range(0, 29),
        "features__image__timestep": [0, 100, 200, 300],
        "features__text__block": [0, 4, 8, -1],
        "features__text__timestep": [0.5, 0.0, 0.25],
        "ditfeatureextractor__block": [2, 4, 6],
        "clf__alpha": [1, 2, 3, 4, 5],
    }

    class Many(Table):
        def set_params(self, **params):
            return self

    s = search(Many(), grid, max_evaluations=1).fit(*data())
    assert s.start_params_ == {
        "features__image__block": 12,
        "features__image__timestep": 200,  # middle: values[len // 2]
        "features__text__block": -1,  # deepest
        "features__text__timestep": 0.0,  # lowest noise
        "ditfeatureextractor__block": 4,  # image branch without 12: middle
        "clf__alpha": 3,
    }
    s = search(Many(), grid, start={"clf__alpha": 5}, max_evaluations=1).fit(*data())
    assert s.start_params_["clf__alpha"] == 5 and s.start_params_["features__image__block"] == 12


@pytest.mark.parametrize(
    "grid, start, match",
    [
        ({}, None, "non-empty"),
        ({"x": []}, None, r"param_grid\['x'\] is empty"),
        ({"x": [1, 2, 1]}, None, r"param_grid\['x'\] has the duplicate value 1"),
        ({"x": "abc"}, None, r"param_grid\['x'\] must be an ordered sequence"),
        ({"x": 3}, None, r"param_grid\['x'\] must be an ordered sequence"),
        ({"x": [0, 1]}, {"y": 0}, "'y', which is not an axis"),
        ({"x": [0, 1]}, {"x": 7}, r"start\['x'\]=7 is not among"),
    ],
)
def test_bad_param_grid_and_start(grid, start, match):
    with pytest.raises(ValueError, match=match):
        search(Table(table=(0.0, 1.0)), grid, start=start).fit(*data())


def test_bad_constructor_values():
    with pytest.raises(ValueError):
        search(max_evaluations=0).fit(*data())
    with pytest.raises(ValueError):
        search(patience=-1).fit(*data())


def _land(est, X, y):
    return est.score(X, y)


def _neg_land(est, X, y):
    return -est.score(X, y)


def test_multimetric_climbs_the_refit_metric():
    scoring = {"neg": _neg_land, "land": _land}
    s = search(scoring=scoring, refit="land").fit(*data())
    assert s.best_params_ == dict(zip(GRID, PEAK))
    assert s.best_score_ == pytest.approx(1.0)
    assert "mean_test_neg" in s.cv_results_
    with pytest.raises(ValueError, match="refit"):
        search(scoring=scoring, refit=False).fit(*data())


def test_default_map_scorer_and_kfold_on_multilabel():
    rng = np.random.default_rng(0)
    Y = (rng.random((120, 4)) < 0.3).astype(int)
    X = np.hstack([Y, rng.normal(size=Y.shape)])
    grid = {"block": list(range(0, 12)), "timestep": [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]}
    s = BlockTimestepSearchCV(NoisyMultiLabel(), grid, cv=3, random_state=0).fit(X, Y)
    assert s.scorer_ is map_scorer
    assert s.scoring is None and s.cv == 3  # the resolved defaults do not leak into the parameters
    ref = GridSearchCV(NoisyMultiLabel(), grid, scoring=map_scorer,
                       cv=KFold(3, shuffle=True, random_state=0)).fit(X, Y)
    assert s.best_params_ == ref.best_params_ == {"block": 5, "timestep": 300}
    assert s.best_score_ == pytest.approx(ref.best_score_)
    assert s.n_evaluations_ < s.grid_size_ / 2
    assert s.predict(X).shape == Y.shape


def test_dask_local_cluster_of_processes():
    grid = {"image__block": list(range(1, 9)), "image__timestep": [0, 100, 200, 300, 400],
            "text__block": [8, 10, 12], "text__timestep": [0.0, 0.2]}
    X, y = data()
    serial = search(grid=grid, cv=2).fit(X, y)
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        with joblib.parallel_config(backend="dask"):
            dask = search(grid=grid, cv=2, n_jobs=-1).fit(X, y)
        assert len(client.scheduler_info()["workers"]) == 2
    assert dask.cv_results_["params"] == serial.cv_results_["params"]
    np.testing.assert_allclose(dask.cv_results_["mean_test_score"], serial.cv_results_["mean_test_score"])
    assert dask.best_params_ == serial.best_params_


# ---- failed fits -----------------------------------------------------------------------------------------------


def _by_x(results, key):
    return {p["x"]: v for p, v in zip(results["params"], results[key])}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
@pytest.mark.filterwarnings("ignore:One or more of the (test|train) scores are non-finite")  # GridSearchCV's
@pytest.mark.parametrize(
    "scoring, refit, return_train_score",
    [(None, True, False), ({"land": _land, "neg": _neg_land}, "land", True)],
)
def test_a_failed_last_neighbour_is_a_non_improving_move(scoring, refit, return_train_score):
    # Climbing 0 -> 1 -> 2 -> 3, the only neighbour left is 4, which fails alone: that step ends the search.
    est = Breaks(table=(0.0, 1.0, 2.0, 3.0, 4.0), broken=(4,))
    kw = dict(scoring=scoring, refit=refit, return_train_score=return_train_score)
    with (
        pytest.warns(UserWarning, match=r"1 of 5 evaluated candidates have non-finite scores .*'mean_test_"),
        pytest.warns(FitFailedWarning, match=r"Step 4 of the search: every fit .* \[\{'x': 4\}\]: ValueError: "
                                             r"x=4 is broken"),
    ):
        s = search(est, {"x": range(5)}, start={"x": 0}, **kw).fit(*data())
    assert s.best_params_ == {"x": 3} and s.best_estimator_.x == 3
    assert s.stopped_reason_ == "local_optimum" and s.n_evaluations_ == 5
    assert s.search_path_[-1]["params"] == {"x": 3} and s.search_path_[-1]["stopped"] == "local_optimum"
    assert _by_x(s.cv_results_, "search_step") == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}
    # The failed row reads as GridSearchCV's for the same failure: scores, ranks, train scores.
    ref = GridSearchCV(est, {"x": range(5)}, cv=2, **kw).fit(*data())
    metrics = ["score"] if scoring is None else list(scoring)
    keys = [f"{part}_test_{m}" for m in metrics for part in ("mean", "std", "rank", "split0", "split1")]
    keys += [f"mean_train_{m}" for m in metrics if return_train_score]
    for key in keys:
        mine, theirs = _by_x(s.cv_results_, key), _by_x(ref.cv_results_, key)
        np.testing.assert_array_equal([mine[x] for x in range(5)], [theirs[x] for x in range(5)], err_msg=key)
    assert np.isnan(_by_x(s.cv_results_, "mean_fit_time")[4])  # no timing for a fit that never ran here


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
@pytest.mark.filterwarnings("ignore:.*evaluated candidates have non-finite scores")
def test_failed_neighbours_are_never_moved_onto():
    # patience would allow a plateau move, but the only neighbour (3) failed: stop at 2
    s = search(Breaks(table=(0.0, 1.0, 1.0, 9.0), broken=(3,)), {"x": range(4)}, start={"x": 0}, patience=2)
    s.fit(*data())
    assert [e["params"]["x"] for e in s.search_path_] == [0, 1, 2]
    assert s.stopped_reason_ == "local_optimum" and s.best_params_ == {"x": 1}
    # a failing neighbour beside a working one (a mixed step) is skipped the same way
    s = search(Breaks(table=(0.0, 1.0, 0.5, 9.0), broken=(2,)), {"x": range(4)}, start={"x": 1}).fit(*data())
    assert [e["params"]["x"] for e in s.search_path_] == [1] and s.n_evaluations_ == 3
    # with a numeric error_score the failed row scores it in cv_results_ (as in GridSearchCV), yet is no move
    s = search(Breaks(table=(0.0, 1.0, 0.5, 9.0), broken=(2,)), {"x": range(4)}, start={"x": 1},
               error_score=5.0, refit=False).fit(*data())
    assert _by_x(s.cv_results_, "mean_test_score")[2] == 5.0
    assert [e["params"]["x"] for e in s.search_path_] == [1] and s.stopped_reason_ == "local_optimum"


def test_a_failed_start_says_which_point_and_why():
    est = Breaks(table=(0.0, 1.0, 2.0), broken=(1,))
    with pytest.raises(ValueError, match=r"start point \{'x': 1\} failed on every CV fold.*ValueError: x=1 is broken"):
        search(est, {"x": range(3)}).fit(*data())
    with pytest.raises(ValueError, match=r"^x=1 is broken$"):  # error_score='raise': the estimator's own error
        search(est, {"x": range(3)}, error_score="raise").fit(*data())
    with pytest.raises(ValueError, match=r"^x=2 is broken$"):  # ... also for a neighbour
        search(Breaks(table=(0.0, 1.0, 2.0), broken=(2,)), {"x": range(3)}, start={"x": 0},
               error_score="raise").fit(*data())


# ---- splits ----------------------------------------------------------------------------------------------------


def test_every_step_scores_on_the_same_folds():
    table = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
    X, y = np.arange(12.0).reshape(-1, 1) * 1000, np.zeros(12)
    kfold = KFold(3, shuffle=True)  # no seed: each call of split() deals other folds
    s = search(FoldSum(table=table), {"x": range(6)}, start={"x": 0}, cv=kfold).fit(X, y)
    assert s.n_evaluations_ == 6 and s.cv is kfold
    xs = [p["x"] for p in s.cv_results_["params"]]
    for k in range(3):
        fold_sums = s.cv_results_[f"split{k}_test_score"] - np.take(table, xs)
        assert np.all(fold_sums == fold_sums[0]), f"split {k} changed between steps: {fold_sums}"
    # a one-shot iterable of splits serves every step too
    splits = list(KFold(3).split(X))
    once = search(FoldSum(table=table), {"x": range(6)}, start={"x": 0}, cv=iter(splits)).fit(X, y)
    listed = search(FoldSum(table=table), {"x": range(6)}, start={"x": 0}, cv=splits).fit(X, y)
    np.testing.assert_array_equal(once.cv_results_["split2_test_score"], listed.cv_results_["split2_test_score"])
    assert once.n_evaluations_ == 6


# ---- what is printed -------------------------------------------------------------------------------------------


def test_verbose_levels(capsys):
    X, y = data()
    search(verbose=0).fit(X, y)
    assert capsys.readouterr() == ("", "")

    s = search(verbose=1).fit(X, y)
    out, err = capsys.readouterr()
    assert out == ""  # neither scikit-learn's "Fitting ..." lines nor step lines
    frames = [f for f in re.split(r"[\r\n]", err) if f.strip()]
    assert frames and all(f.startswith("BlockTimestepSearchCV:") for f in frames), frames[:3]
    assert err.count("\n") == 1  # one bar, closed once
    n, steps = s.n_evaluations_, int(s.cv_results_["search_step"].max())
    totals = [int(t) for t in re.findall(r"\| \d+/(\d+) \[", err)]
    assert totals == sorted(totals) and totals[-1] == n  # the total grows with the steps planned
    assert f"{n}/{n} [" in frames[-1] and f"step {steps}, best 1, grid {s.grid_size_}" in frames[-1]
    assert s.verbose == 1

    s = search(verbose=2).fit(X, y)
    out, err = capsys.readouterr()
    assert "BlockTimestepSearchCV:" not in err  # no bar
    assert out.count("Fitting 2 folds for each of") == steps + 1  # scikit-learn's line for each step
    assert out.count("[CV] END") == n * 2  # and for each fit
    # the start (12, 400, 12, 0.0) has 6 neighbours: text block 12 and text timestep 0.0 end their axes
    assert "[BlockTimestepSearchCV] step 1: 6 neighbour(s) of" in out
    assert f"stopped (local_optimum) after {n} of {s.grid_size_} candidates" in out
