"""Multi-label metrics against hand-computed values and sklearn references."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_iris, make_multilabel_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from sklearn.multiclass import OneVsRestClassifier
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from sklearn_difffeat.metrics import (
    SCORERS,
    cf1_scorer,
    map_scorer,
    mean_average_precision,
    multilabel_report,
    of1_scorer,
)


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    # tiny problems: on a shared 2-core machine two BLAS threads mostly wait on each other
    with threadpool_limits(1):
        yield


# Example A: 4 samples x 3 classes, every class has a positive.
Y_A = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 0]])
S_A = np.array([[0.9, 0.6, 0.2], [0.8, 0.4, 0.7], [0.3, 0.7, 0.1], [0.4, 0.2, 0.6]])

# Example B: 2 samples x 5 classes; class 3 has no positive sample.
Y_B = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]])
S_B = np.array([[0.9, 0.8, 0.7, 0.6, 0.3], [0.2, 0.45, 0.4, 0.95, 0.9]])


def test_map_hand_example():
    # class 0 ranked: .9(+) .8(+) .4(+) .3(-)       -> AP = (1/1 + 2/2 + 3/3) / 3 = 1
    # class 1 ranked: .7(+) .6(-) .4(+) .2(-)       -> AP = (1/1 + 2/3) / 2 = 5/6
    # class 2 ranked: .7(-) .6(-) .2(+) .1(-)       -> AP = (1/3) / 1 = 1/3
    # mAP = (1 + 5/6 + 1/3) / 3 = 13/18
    assert mean_average_precision(Y_A, S_A) == pytest.approx(13 / 18)


def test_thresholded_hand_example_and_cf1_differs_from_macro_f1():
    # predictions at >= 0.5: [1,1,0], [1,0,1], [0,1,0], [0,0,1]
    # class 0: TP 2 FP 0 FN 1 -> P 1,   R 2/3, F1 0.8
    # class 1: TP 1 FP 1 FN 1 -> P 1/2, R 1/2, F1 0.5
    # class 2: TP 0 FP 2 FN 1 -> P 0,   R 0,   F1 0
    # CP = 1.5/3 = 1/2, CR = (2/3 + 1/2)/3 = 7/18, CF1 = 2 (1/2)(7/18) / (1/2 + 7/18) = 7/16
    # sklearn macro F1 = (0.8 + 0.5 + 0)/3 = 13/30 != 7/16
    # OP = 3 TP / 6 predicted = 1/2, OR = 3 TP / 6 positives = 1/2, OF1 = 1/2
    r = multilabel_report(Y_A, S_A)
    assert r["CP"] == pytest.approx(1 / 2)
    assert r["CR"] == pytest.approx(7 / 18)
    assert r["CF1"] == pytest.approx(7 / 16)
    assert r["OP"] == pytest.approx(1 / 2)
    assert r["OR"] == pytest.approx(1 / 2)
    assert r["OF1"] == pytest.approx(1 / 2)
    assert r["mAP"] == pytest.approx(13 / 18)
    pred = (S_A >= 0.5).astype(int)
    macro_f1 = f1_score(Y_A, pred, average="macro")
    assert macro_f1 == pytest.approx(13 / 30)
    assert abs(r["CF1"] - macro_f1) > 1e-3
    # OF1 is the micro F1, CP/CR the macro precision/recall with 0/0 = 0.
    assert r["OF1"] == pytest.approx(f1_score(Y_A, pred, average="micro"))
    assert r["CP"] == pytest.approx(precision_score(Y_A, pred, average="macro", zero_division=0))
    assert r["CR"] == pytest.approx(recall_score(Y_A, pred, average="macro", zero_division=0))
    assert set(r) == {
        "mAP", "CP", "CR", "CF1", "OP", "OR", "OF1",
        "CP_top3", "CR_top3", "CF1_top3", "OP_top3", "OR_top3", "OF1_top3",
    }  # fmt: skip


def test_top3_hand_example():
    # threshold predictions (>= 0.5): s0 [1,1,1,1,0], s1 [0,0,0,1,1]
    # top-3, ML-GCN (top 3 AND >= 0.5): s0 [1,1,1,0,0], s1 [0,0,0,1,1] (0.45 is in s1's top 3 but < 0.5)
    #   c0 P1 R1 | c1 TP1 FN1 P1 R1/2 | c2 P0 R0 | c3 (no positives) P0 R0 | c4 P0 R0
    #   CP = 2/5, CR = 1.5/5 = 3/10, CF1 = 2 (.4)(.3)/.7 = 12/35; OP = 2 TP / 5 predicted, OR = 2 / 5 positives
    with pytest.warns(UserWarning, match="1 of 5 classes"):
        r = multilabel_report(Y_B, S_B, threshold=0.5, top_k=3)
    assert r["CP_top3"] == pytest.approx(2 / 5)
    assert r["CR_top3"] == pytest.approx(3 / 10)
    assert r["CF1_top3"] == pytest.approx(12 / 35)
    assert r["OP_top3"] == pytest.approx(2 / 5)
    assert r["OR_top3"] == pytest.approx(2 / 5)
    assert r["OF1_top3"] == pytest.approx(2 / 5)
    # plain threshold: CP = 2/5, CR = 3/10; OP = 2 TP / 6 predicted = 1/3, OR = 2/5, OF1 = (4/15)/(11/15) = 4/11
    assert r["CF1"] == pytest.approx(12 / 35)
    assert r["OP"] == pytest.approx(1 / 3)
    assert r["OF1"] == pytest.approx(4 / 11)
    # mAP over classes 0,1,2,4 (class 3 left out): APs 1, 1, 1/2, 1/2 -> 3/4
    assert r["mAP"] == pytest.approx(3 / 4)

    # pure top-3 (no threshold): s1 [0,1,0,1,1]; c1 now TP 2 -> CP = CR = 2/5; OP = 3/6, OR = 3/5, OF1 = 6/11
    with pytest.warns(UserWarning):
        r = multilabel_report(Y_B, S_B, top_k=3, top_k_threshold=False)
    assert r["CP_top3"] == pytest.approx(2 / 5)
    assert r["CR_top3"] == pytest.approx(2 / 5)
    assert r["CF1_top3"] == pytest.approx(2 / 5)
    assert r["OP_top3"] == pytest.approx(1 / 2)
    assert r["OR_top3"] == pytest.approx(3 / 5)
    assert r["OF1_top3"] == pytest.approx(6 / 11)


def test_class_without_positives_left_out_with_one_warning():
    Y = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0]])
    S = np.array([[0.8, 0.1, 0.5], [0.9, 0.2, 0.4], [0.7, 0.3, 0.6]])
    # only class 0 counts: ranked .9(-) .8(+) .7(+) -> AP = (1/2 + 2/3)/2 = 7/12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = mean_average_precision(Y, S)
    relevant = [w for w in caught if "no positive" in str(w.message)]
    assert len(relevant) == 1 and "2 of 3 classes" in str(relevant[0].message)
    assert value == pytest.approx(7 / 12)


def test_map_equals_sklearn_macro_when_all_classes_have_positives():
    rng = np.random.default_rng(0)
    Y = rng.integers(0, 2, size=(60, 7))
    Y[0] = 1  # every class has a positive
    S = rng.random((60, 7))
    assert mean_average_precision(Y, S) == pytest.approx(average_precision_score(Y, S, average="macro"))


def test_zero_division_is_zero_without_crash():
    Y = np.array([[1, 0], [0, 1]])
    S = np.full((2, 2), 0.1)  # nothing predicted: every precision is 0/0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        r = multilabel_report(Y, S)
    for key in ("CP", "CR", "CF1", "OP", "OR", "OF1", "CP_top3", "OF1_top3"):
        assert r[key] == 0.0


def test_top_k_ties_prefer_lower_index():
    Y = np.array([[0, 1, 0]])
    S = np.array([[0.6, 0.6, 0.6]])
    # top-1 with ties picks label 0, which is wrong: OP_top1 = 0; predicting all three gives OP = 1/3
    with pytest.warns(UserWarning):
        r = multilabel_report(Y, S, top_k=1)
    assert r["OP_top1"] == 0.0
    assert r["OP"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "Y, S, match",
    [
        (np.ones((3, 2)), np.ones((3, 3)), "shape"),
        (np.array([[2, 0], [1, 0]]), np.ones((2, 2)), "0/1"),
        (np.ones((2, 2)), np.array([[np.nan, 0], [1, 0]]), "NaN"),
    ],
)
def test_bad_inputs(Y, S, match):
    with pytest.raises(ValueError, match=match):
        multilabel_report(Y, S)


@pytest.fixture(scope="module")
def multilabel_data():
    X, Y = make_multilabel_classification(n_samples=300, n_features=10, n_classes=5, random_state=0)
    return X, Y


def test_scorers_match_sklearn_multilabel(multilabel_data):
    X, Y = multilabel_data
    est = OneVsRestClassifier(LogisticRegression(max_iter=500)).fit(X[:200], Y[:200])
    Xt, Yt = X[200:], Y[200:]
    proba = est.predict_proba(Xt)
    assert map_scorer(est, Xt, Yt) == pytest.approx(average_precision_score(Yt, proba, average="macro"))
    pred = (proba >= 0.5).astype(int)
    assert of1_scorer(est, Xt, Yt) == pytest.approx(f1_score(Yt, pred, average="micro"))
    cp = precision_score(Yt, pred, average="macro", zero_division=0)
    cr = recall_score(Yt, pred, average="macro", zero_division=0)
    assert cf1_scorer(est, Xt, Yt) == pytest.approx(2 * cp * cr / (cp + cr))


def test_map_scorer_falls_back_to_decision_function(multilabel_data):
    X, Y = multilabel_data
    est = OneVsRestClassifier(LinearSVC()).fit(X[:200], Y[:200])
    assert not hasattr(est, "predict_proba")
    ref = average_precision_score(Y[200:], est.decision_function(X[200:]), average="macro")
    assert map_scorer(est, X[200:], Y[200:]) == pytest.approx(ref)


def test_scorers_in_cross_validate_and_grid_search(multilabel_data):
    X, Y = multilabel_data
    est = OneVsRestClassifier(LogisticRegression(max_iter=500))
    res = cross_validate(est, X, Y, cv=KFold(3), scoring=SCORERS)
    for name in ("map", "cf1", "of1"):
        assert np.all((res[f"test_{name}"] > 0) & (res[f"test_{name}"] <= 1))
    gs = GridSearchCV(est, {"estimator__C": [0.1, 1.0]}, scoring=map_scorer, cv=KFold(3)).fit(X, Y)
    assert 0 < gs.best_score_ <= 1


def test_scorers_binarize_1d_multiclass_against_classes_():
    X, y = load_iris(return_X_y=True)
    est = LogisticRegression(max_iter=500).fit(X, y)
    proba = est.predict_proba(X)
    onehot = (y[:, None] == est.classes_[None, :]).astype(int)
    assert map_scorer(est, X, y) == pytest.approx(average_precision_score(onehot, proba, average="macro"))
    # a test fold without class 2: class 2 is left out (warning), classes 0 and 1 keep their columns
    sub = y < 2
    ref = np.mean([average_precision_score(y[sub] == c, proba[sub, c]) for c in (0, 1)])
    with pytest.warns(UserWarning, match="1 of 3 classes"):
        assert map_scorer(est, X[sub], y[sub]) == pytest.approx(ref)
    # string labels: the scorer maps them through classes_
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    est_s = LogisticRegression(max_iter=500).fit(X, names)
    assert map_scorer(est_s, X, names) == pytest.approx(map_scorer(est, X, y))
