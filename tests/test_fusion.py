"""FusionClassifier: accuracy against sklearn baselines, sklearn contract, modalities, persistence, errors,
the fused representation and the training guards."""

import math
import warnings

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone, is_classifier
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, get_scorer
from sklearn.model_selection import GridSearchCV, KFold, cross_validate, train_test_split
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch.helper import SliceDict
from threadpoolctl import threadpool_limits

from sklearn_difffeat.fusion import FusionClassifier
from sklearn_difffeat.metrics import SCORERS, map_scorer

LABELS = [f"Class{i}" for i in range(1, 15)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The models here are tiny: with other processes on a 2-core machine, two torch / BLAS threads mostly
    # wait on each other. Results do not depend on the thread count; this only keeps the file fast.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def yeast():
    from river import datasets

    df = pd.read_csv(datasets.Yeast().path)  # ships inside the river wheel: no network
    X = df.drop(columns=LABELS).to_numpy(np.float32)
    Y = df[LABELS].to_numpy()
    assert X.shape == (2417, 103) and Y.shape == (2417, 14)
    return X, Y


def small(**kw):
    params = dict(projection_dim=32, lr=3e-3, max_epochs=15, batch_size=64)
    params.update(kw)
    return FusionClassifier(**params)


def test_yeast_two_modalities_matches_one_vs_rest_logistic_regression(yeast):
    X, Y = yeast
    folds = list(KFold(5, shuffle=True, random_state=0).split(X))
    ref, ours = [], []
    for tr, te in folds:
        lr = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=1000)))
        ref.append(average_precision_score(Y[te], lr.fit(X[tr], Y[tr]).predict_proba(X[te]), average="macro"))
        # a narrow projection and a short schedule keep the test fast; the benchmark runs the defaults
        clf = FusionClassifier(modalities=[50, 53], projection_dim=64, max_epochs=30)
        ours.append(average_precision_score(Y[te], clf.fit(X[tr], Y[tr]).predict_proba(X[te]), average="macro"))
    assert len(clf.modalities_) == 2
    assert np.mean(ours) >= np.mean(ref) - 0.01, (np.mean(ours), np.mean(ref))


def test_grid_search_over_pipeline(yeast):
    X, Y = yeast[0][:600], yeast[1][:600]
    pipe = Pipeline([("scale", StandardScaler()), ("clf", small(modalities=[50, 53], max_epochs=5))])
    grid = {"clf__projection_dim": [8, 16], "clf__lr": [1e-3, 3e-3]}
    # Label 14 has no positive in one of these folds: mAP leaves it out and says so.
    with pytest.warns(UserWarning, match="1 of 14 classes have no positive sample and are left out of mAP"):
        gs = GridSearchCV(pipe, grid, scoring=map_scorer, cv=KFold(3)).fit(X, Y)
    assert gs.cv_results_["mean_test_score"].shape == (4,)
    assert np.all((gs.cv_results_["mean_test_score"] > 0.2) & (gs.cv_results_["mean_test_score"] <= 1))
    assert gs.best_estimator_.predict_proba(X[:5]).shape == (5, 14)
    with pytest.warns(UserWarning, match="1 of 14 classes have no positive sample and are left out of mAP"):
        res = cross_validate(small(), X, Y, cv=KFold(3), scoring=SCORERS)
    assert np.all(res["test_map"] > 0.3)


def test_dataframe_prefixes_give_modalities(yeast):
    X, Y = yeast[0][:400], yeast[1][:400]
    frame = pd.DataFrame(X, columns=[f"a{i}" for i in range(103)])
    # the column naming of a real ColumnTransformer(...).set_output(transform="pandas")
    parts = [("image", StandardScaler(), [f"a{i}" for i in range(60)])]
    parts.append(("text", StandardScaler(), [f"a{i}" for i in range(60, 103)]))
    ct = ColumnTransformer(parts).set_output(transform="pandas")
    Z = ct.fit_transform(frame)
    assert Z.columns[0] == "image__a0" and Z.columns[-1] == "text__a102"
    clf = small().fit(Z, Y)
    assert list(clf.modalities_) == ["image", "text"]
    np.testing.assert_array_equal(clf.modalities_["image"], np.arange(60))
    np.testing.assert_array_equal(clf.modalities_["text"], np.arange(60, 103))
    in_widths = [p.in_features for p in clf.net_.module_.projections]
    assert in_widths == [60, 43]
    # unprefixed columns: one modality
    assert list(small().fit(frame, Y).modalities_) == ["X"]


def test_dict_and_slicedict_inputs_equal_widths_on_array(yeast):
    X, Y = yeast[0][:400], yeast[1][:400]
    a = small(modalities=[50, 53]).fit(X, Y)
    d = small().fit({"image": X[:, :50], "text": X[:, 50:]}, Y)
    # same layout, seed and data: the dict is just another way to say the widths
    np.testing.assert_array_equal(a.predict_proba(X), d.predict_proba({"image": X[:, :50], "text": X[:, 50:]}))
    sd = SliceDict(image=X[:, :50], text=X[:, 50:])
    # Label 14 has no positive in one half: the head warns at fit, scikit-learn's average precision at scoring.
    with pytest.warns(UserWarning, match=r"1 label column\(s\) of y are constant in the training data: 13 \(all 0\)"), \
            pytest.warns(UserWarning, match="No positive class found in y_true"):
        res = cross_validate(small(), sd, Y, cv=KFold(2), scoring="average_precision")
    assert np.all(res["test_score"] > 0.3)
    sliced = {"image": slice(0, 50), "text": list(range(50, 103))}
    s = small(modalities=sliced).fit(X, Y)
    np.testing.assert_array_equal(a.predict_proba(X), s.predict_proba(X))


def test_joblib_round_trip_and_refit_reproducible(yeast, tmp_path):
    X, Y = yeast[0][:400], yeast[1][:400]
    clf = small(modalities=[50, 53], early_stopping=3, max_epochs=20).fit(X, Y)
    path = tmp_path / "clf.joblib"
    joblib.dump(clf, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(clf.predict_proba(X), loaded.predict_proba(X))
    np.testing.assert_array_equal(clf.predict(X), loaded.predict(X))
    again = small(modalities=[50, 53], early_stopping=3, max_epochs=20).fit(X, Y)
    np.testing.assert_array_equal(clf.predict_proba(X), again.predict_proba(X))
    other = small(modalities=[50, 53], early_stopping=3, max_epochs=20, random_state=1).fit(X, Y)
    assert not np.array_equal(clf.predict_proba(X), other.predict_proba(X))


def test_multilabel_outputs_and_sklearn_view(yeast):
    X, Y = yeast[0][:400], yeast[1][:400]
    clf = small(threshold=0.3).fit(X, Y)
    proba = clf.predict_proba(X)
    assert proba.shape == (400, 14) and np.all((proba > 0) & (proba < 1))
    np.testing.assert_array_equal(clf.predict(X), (proba >= 0.3).astype(int))
    np.testing.assert_allclose(1 / (1 + np.exp(-clf.decision_function(X))), proba, rtol=1e-6)
    np.testing.assert_array_equal(clf.classes_, np.arange(14))
    assert is_classifier(clf) and clf.__sklearn_tags__().classifier_tags.multi_label
    assert 0 < get_scorer("average_precision")(clf, X, Y) <= 1


def test_single_label_digits_two_modalities():
    X, y = load_digits(return_X_y=True)
    names = np.array([f"digit{d}" for d in range(10)])[y]  # predict must return the original labels
    Xtr, Xte, ytr, yte = train_test_split(X, names, test_size=0.3, random_state=0, stratify=names)
    clf = FusionClassifier(modalities={"top": slice(0, 32), "bottom": slice(32, 64)}, projection_dim=64, lr=3e-3)
    clf.fit(Xtr, ytr)
    np.testing.assert_array_equal(clf.classes_, np.sort(np.unique(names)))
    pred = clf.predict(Xte)
    assert pred.dtype == names.dtype and accuracy_score(yte, pred) >= 0.93
    proba = clf.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(axis=1)], pred)
    assert get_scorer("roc_auc_ovr")(clf, Xte, yte) > 0.98
    assert map_scorer(clf, Xte, yte) > 0.9


def test_clone_and_params():
    clf = FusionClassifier(projection_dim=16, lr=0.01)
    c = clone(clf)
    assert c.get_params() == clf.get_params() and c is not clf
    c.set_params(projection_dim=8)
    assert c.projection_dim == 8 and clf.projection_dim == 16
    X, y = np.random.default_rng(0).random((40, 6)), np.tile([0, 1], 20)
    fitted = small().fit(X, y)
    assert not hasattr(clone(fitted), "net_")


@pytest.fixture(scope="module")
def frame_model():
    rng = np.random.default_rng(0)
    cols = [f"image__f{i}" for i in range(4)] + [f"text__g{i}" for i in range(3)]
    Z = pd.DataFrame(rng.random((50, 7)), columns=cols)
    Y = (rng.random((50, 3)) > 0.5).astype(int)
    return small(max_epochs=2).fit(Z, Y), Z, Y


def test_missing_modality_and_changed_order_raise(frame_model):
    clf, Z, _ = frame_model
    with pytest.raises(ValueError, match="Modality 'text' is missing at predict time"):
        clf.predict(Z.drop(columns=[c for c in Z.columns if c.startswith("text__")]))
    with pytest.raises(ValueError, match="column order of X differs from fit"):
        clf.predict(Z[Z.columns[::-1]])
    with pytest.raises(ValueError, match="lacks 1 columns"):
        clf.predict(Z.drop(columns=["image__f0"]))
    d = small(max_epochs=1).fit({"image": Z.iloc[:, :4].to_numpy(), "text": Z.iloc[:, 4:].to_numpy()}, frame_model[2])
    with pytest.raises(ValueError, match="Modality 'text' is missing at predict time"):
        d.predict({"image": Z.iloc[:, :4].to_numpy()})
    with pytest.raises(ValueError, match="'image' has 3 features, but 4 at fit time"):
        d.predict({"image": Z.iloc[:, :3].to_numpy(), "text": Z.iloc[:, 4:].to_numpy()})


@pytest.mark.parametrize(
    "modalities, match",
    [
        ([3, 3], "widths \\[3, 3\\] add up to 6, but X has 7 features"),
        ({"a": slice(0, 3), "b": slice(4, 7)}, "1 of the 7 columns of X belong to no modality"),
        ({"a": slice(0, 4), "b": slice(3, 7)}, "Column 3 belongs to more than one modality"),
        ("all", "modalities must be 'auto'"),
    ],
)
def test_bad_modalities(modalities, match):
    X, Y = np.random.default_rng(0).random((20, 7)), np.eye(2, dtype=int)[np.arange(20) % 2]
    with pytest.raises(ValueError, match=match):
        small(modalities=modalities).fit(X, Y)


def test_bad_inputs(frame_model):
    rng = np.random.default_rng(0)
    X, Y = rng.random((20, 5)), (rng.random((20, 3)) > 0.5).astype(int)
    Xnan = X.copy()
    Xnan[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        small().fit(Xnan, Y)
    with pytest.raises(ValueError, match="infinity"):
        small().fit(np.where(X > 0.9, np.inf, X), Y)
    with pytest.raises(ValueError, match="0/1 indicator"):
        small().fit(X, Y * 2)
    with pytest.raises(ValueError, match="X has 20 rows but y has 19"):
        small().fit(X, Y[:19])
    with pytest.raises(ValueError, match="dim 3"):
        small().fit(X[:, :, None], Y)
    fitted = small(max_epochs=1).fit(X, Y)
    with pytest.raises(ValueError, match="4 features, but FusionClassifier is expecting 5"):
        fitted.predict(X[:, :4])
    with pytest.raises(ValueError, match="NaN"):
        fitted.predict(Xnan)
    with pytest.raises(ValueError, match="single class"):
        small().fit(X, np.zeros(20))
    with pytest.raises(ValueError, match="projection_dim"):
        small(projection_dim=0).fit(X, Y)


def test_fit_leaves_torch_global_rng_alone():
    X, y = np.random.default_rng(0).random((30, 4)), np.tile([0, 1, 2], 10)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    small(max_epochs=2).fit(X, y)
    assert torch.equal(torch.rand(3), expected)


def test_fuse_is_the_sum_of_the_standardised_projections(frame_model):
    clf, Z, _ = frame_model
    X = Z.to_numpy(np.float64)
    Xs = (X - X.mean(axis=0)) / X.std(axis=0)  # numpy's population std, as the standardisation uses
    module = clf.net_.module_
    weights = [(p.weight.detach().double().numpy(), p.bias.detach().double().numpy()) for p in module.projections]
    image, text = Xs[:, :4], Xs[:, 4:]
    expected = image @ weights[0][0].T + weights[0][1] + text @ weights[1][0].T + weights[1][1]
    fused = clf.fuse(Z)
    assert fused.shape == (50, clf.projection_dim) and fused.dtype == np.float32
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-5)
    # the head is linear on the fused vector: its affine map gives the decision function
    head_w, head_b = module.head.weight.detach().double().numpy(), module.head.bias.detach().double().numpy()
    np.testing.assert_allclose(clf.decision_function(Z), fused @ head_w.T + head_b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="column order of X differs from fit"):
        clf.fuse(Z[Z.columns[::-1]])


def test_fuse_before_fit_raises():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        FusionClassifier().fuse(np.zeros((2, 3)))


def test_diverging_training_raises_naming_epoch_batch_and_cause(yeast):
    X, Y = yeast[0][::8], yeast[1][::8]  # every 8th row: every label occurs
    with pytest.raises(
        FloatingPointError, match=r"epoch \d+, batch \d+\. The learning rate \(lr=1e\+06\) is likely too high"
    ):
        small(lr=1e6).fit(X, Y)


def test_constant_label_column_warns_once_naming_it(yeast):
    X, Y = yeast[0][::8], yeast[1][::8].copy()
    Y[:, 3] = 0
    Y[:, 5] = 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        small(max_epochs=1).fit(X, Y)
    constant = [str(w.message) for w in record if "constant in the training data" in str(w.message)]
    assert len(constant) == 1 and "2 label column(s)" in constant[0] and "3 (all 0), 5 (all 1)." in constant[0]


def test_learning_rate_follows_a_cosine_to_zero(yeast):
    X, Y = yeast[0][::8], yeast[1][::8]
    clf = small(lr=0.01, max_epochs=8).fit(X, Y)
    lrs = clf.net_.history[:, "event_lr"]
    np.testing.assert_allclose(lrs, [0.005 * (1 + math.cos(math.pi * e / 8)) for e in range(8)], rtol=1e-6)


def test_early_stopping_holds_out_a_validation_split_and_stops():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(500, 6)), rng.integers(0, 2, size=(500, 3))  # pure noise: validation loss soon rises
    params = dict(projection_dim=16, lr=0.01, max_epochs=200, batch_size=50)
    stopped = FusionClassifier(**params, early_stopping=3).fit(X, Y)
    history = stopped.net_.history
    assert history[0, "train_batch_count"] == 9  # 450 training rows; 50 held out
    best = int(np.argmin(history[:, "valid_loss"]))
    assert stopped.n_epochs_ == best + 1 + 3 < 200  # three epochs without improvement after the best
    full = FusionClassifier(**{**params, "max_epochs": 5}).fit(X, Y)
    assert "valid_loss" not in full.net_.history[-1] and full.n_epochs_ == 5
    assert full.net_.history[0, "train_batch_count"] == 10  # all 500 rows train
