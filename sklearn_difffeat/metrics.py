"""Multi-label metrics in the conventions of the multi-label image classification literature.

mAP is the mean over classes of average precision (ranking all samples by score). CP/CR/OP/OR and their F1s
follow ML-GCN / ASL / C-Tran:

* CP = mean_c TP_c / (TP_c + FP_c), CR = mean_c TP_c / (TP_c + FN_c), CF1 = 2 CP CR / (CP + CR).
  CF1 is the harmonic mean of the *averaged* precision and recall, not sklearn's macro F1 (the average of
  per-class F1s); the two differ whenever classes differ.
* OP = sum TP / sum (TP + FP), OR = sum TP / sum (TP + FN), OF1 = 2 OP OR / (OP + OR).
* A label is predicted when its score is >= ``threshold`` (ML-GCN predicts logit >= 0, i.e. sigmoid >= 0.5).
* Top-k variants: a label is predicted only when it is among the sample's k highest scores *and* its score is
  >= threshold. This is what ML-GCN's ``overall_topk`` does; pass ``top_k_threshold=False`` to predict the k
  highest scores whatever their value. Ties are broken towards the lower label index.
* Every 0/0 counts as 0 (a class never predicted has precision 0), so the C* averages run over all classes.

The scorers work for multi-label (2-D indicator y, dense or scipy sparse) and single-label (1-D y) estimators;
1-D y is one-hot encoded against ``estimator.classes_``. Every metric and scorer reads a scipy sparse ``Y_true``
(converted to dense once; its stored values must be 0 or 1) and refuses missing values (NaN, None, ``pd.NA``).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score

from ._target_arrays import target_array

__all__ = [
    "SCORERS",
    "cf1_scorer",
    "map_scorer",
    "mean_average_precision",
    "multilabel_report",
    "of1_scorer",
]


def _check_pair(Y_true, Y_score):
    """Return (Y_true, Y_score) as 2-D arrays of equal shape (int64 and float64); 1-D inputs become one column.

    Either may be a scipy sparse matrix or array; pandas objects with nullable dtypes are read too.
    """
    Y_true = target_array(Y_true, "Y_true")
    Y_score = np.asarray(Y_score.toarray() if sp.issparse(Y_score) else Y_score, dtype=np.float64)
    if Y_true.ndim == 1:
        Y_true = Y_true[:, None]
    if Y_score.ndim == 1:
        Y_score = Y_score[:, None]
    if Y_true.ndim != 2 or Y_score.ndim != 2:
        raise ValueError(f"Y_true and Y_score must be 1-D or 2-D; got {Y_true.ndim}-D and {Y_score.ndim}-D.")
    if Y_true.shape != Y_score.shape:
        raise ValueError(f"Y_true has shape {Y_true.shape} but Y_score has shape {Y_score.shape}.")
    if Y_true.shape[0] == 0:
        raise ValueError("Y_true is empty.")
    if not np.all(np.isfinite(Y_score)):
        raise ValueError("Y_score contains NaN or infinity.")
    # Elementwise == rather than np.unique: an object array mixing types cannot be sorted.
    bad = ~((Y_true == 0) | (Y_true == 1))
    if bad.any():
        found = list(dict.fromkeys(Y_true[bad].tolist()))[:10]
        raise ValueError(f"Y_true must be a 0/1 indicator matrix; found values {found}.")
    return Y_true.astype(np.int64), Y_score


def _check_threshold(threshold):
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real) or np.isnan(threshold):
        raise ValueError(f"threshold must be a real number (not NaN or a boolean); got {threshold!r}.")


def _check_top_k(top_k):
    """top_k as an int, or None; booleans are not counts."""
    if top_k is None:
        return None
    counts = isinstance(top_k, numbers.Real) and not isinstance(top_k, (bool, np.bool_))
    if not counts or not float(top_k).is_integer() or top_k < 1:
        raise ValueError(f"top_k must be a positive integer (a count; booleans are not counts) or None; got {top_k!r}.")
    return int(top_k)


def mean_average_precision(Y_true: ArrayLike, Y_score: ArrayLike) -> float:
    """Mean over classes of average precision; classes without a positive sample are left out.

    Parameters
    ----------
    Y_true : array or scipy sparse matrix of shape (n_samples, n_classes), 0/1 indicators (1-D: a single
        class). Missing values (NaN, None, pd.NA) raise a ``ValueError``.
    Y_score : array of the same shape, higher = more likely (probabilities or logits).

    Returns
    -------
    float in [0, 1]; NaN (with a warning) when no class has a positive sample.

    Examples
    --------
    Class 0 ranks its samples positive, negative, positive: its AP averages the precision at each positive,
    (1/1 + 2/3) / 2 = 5/6. Class 1 ranks both positives first: AP = 1. mAP = (5/6 + 1) / 2 = 11/12.

    >>> from sklearn_difffeat.metrics import mean_average_precision
    >>> Y_true = [[1, 0], [0, 1], [1, 1]]
    >>> Y_score = [[0.9, 0.2], [0.8, 0.4], [0.3, 0.6]]
    >>> round(mean_average_precision(Y_true, Y_score), 4)
    0.9167
    """
    Y_true, Y_score = _check_pair(Y_true, Y_score)
    has_pos = Y_true.sum(axis=0) > 0
    n_left_out = int((~has_pos).sum())
    if n_left_out:
        # AP is undefined without positives; averaging a 0 in would bias mAP by fold composition.
        warnings.warn(
            f"{n_left_out} of {Y_true.shape[1]} classes have no positive sample and are left out of mAP.",
            UserWarning,
            stacklevel=2,
        )
    if not has_pos.any():
        return float("nan")
    aps = [average_precision_score(Y_true[:, c], Y_score[:, c]) for c in np.flatnonzero(has_pos)]
    return float(np.mean(aps))


def _div(num, den):
    """Elementwise num / den with 0/0 (and x/0) taken as 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _prf_from_predictions(Y_true, Y_pred):
    tp = (Y_true & Y_pred).sum(axis=0)
    fp = ((1 - Y_true) & Y_pred).sum(axis=0)
    fn = (Y_true & (1 - Y_pred)).sum(axis=0)
    cp = float(_div(tp, tp + fp).mean())
    cr = float(_div(tp, tp + fn).mean())
    op = float(_div(tp.sum(), tp.sum() + fp.sum()))
    orr = float(_div(tp.sum(), tp.sum() + fn.sum()))
    return {
        "CP": cp,
        "CR": cr,
        "CF1": float(_div(2 * cp * cr, cp + cr)),
        "OP": op,
        "OR": orr,
        "OF1": float(_div(2 * op * orr, op + orr)),
    }


def _top_k_mask(Y_score, k):
    # Stable sort of the negated scores: among equal scores the lower label index ranks first.
    order = np.argsort(-Y_score, axis=1, kind="stable")[:, :k]
    mask = np.zeros(Y_score.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def multilabel_report(
    Y_true: ArrayLike,
    Y_score: ArrayLike,
    threshold: float = 0.5,
    top_k: int | None = 3,
    *,
    top_k_threshold: bool = True,
) -> dict[str, float]:
    """mAP and the thresholded per-class (C*) and overall (O*) precision, recall and F1.

    Parameters
    ----------
    Y_true : array or scipy sparse matrix of shape (n_samples, n_classes), 0/1 indicators.
    Y_score : array of the same shape (probabilities when ``threshold=0.5``; use ``threshold=0`` for logits).
    threshold : float, a label is predicted when its score is >= threshold (NaN is refused).
    top_k : int or None. When an int, also report ``CP_top{k}`` ... ``OF1_top{k}``, where each sample
        predicts at most its k highest-scoring labels. None skips the top-k keys. A boolean is refused.
    top_k_threshold : bool, keyword only. True (ML-GCN convention): a top-k label must also score
        >= threshold. False: the k highest scores are predicted whatever their value.

    Returns
    -------
    dict with keys "mAP", "CP", "CR", "CF1", "OP", "OR", "OF1" and, for top_k=3, "CP_top3", "CR_top3",
    "CF1_top3", "OP_top3", "OR_top3", "OF1_top3". Values are fractions in [0, 1] (multiply by 100 to report).

    Examples
    --------
    At threshold 0.5, class 0 predicts samples 0 and 1 (TP 1, FP 1, FN 1), class 1 predicts sample 2 (TP 1,
    FP 0, FN 1). CP = (1/2 + 1/1) / 2 = 0.75, CR = (1/2 + 1/2) / 2 = 0.5, CF1 = 2 CP CR / (CP + CR) = 0.6
    (the mean of the per-class F1s would be (1/2 + 2/3) / 2 = 0.583). Pooled, OP = 2/3, OR = 2/4, OF1 = 4/7.

    >>> from sklearn_difffeat.metrics import multilabel_report
    >>> Y_true = [[1, 0], [0, 1], [1, 1]]
    >>> Y_score = [[0.9, 0.2], [0.8, 0.4], [0.3, 0.6]]
    >>> report = multilabel_report(Y_true, Y_score, top_k=None)
    >>> {name: round(value, 4) for name, value in report.items()}
    {'mAP': 0.9167, 'CP': 0.75, 'CR': 0.5, 'CF1': 0.6, 'OP': 0.6667, 'OR': 0.5, 'OF1': 0.5714}

    With ``top_k=1`` a sample predicts only its highest-scoring label, even when two pass the threshold:

    >>> one = multilabel_report([[1, 1]], [[0.9, 0.8]], top_k=1)
    >>> one["OR"], one["OR_top1"]
    (1.0, 0.5)
    """
    _check_threshold(threshold)
    top_k = _check_top_k(top_k)
    Y_true, Y_score = _check_pair(Y_true, Y_score)
    report = {"mAP": mean_average_precision(Y_true, Y_score)}
    above = Y_score >= threshold
    report.update(_prf_from_predictions(Y_true, above.astype(np.int64)))
    if top_k is not None:
        pred = _top_k_mask(Y_score, top_k)
        if top_k_threshold:
            pred &= above
        for key, value in _prf_from_predictions(Y_true, pred.astype(np.int64)).items():
            report[f"{key}_top{top_k}"] = value
    return report


# --------------------------------------------------------------------------------------------------------
# Scorers
#
# sklearn's make_scorer(..., response_method="predict_proba") passes the metric only (y_true, y_score). That
# is not enough here: a 1-D multiclass y must be one-hot encoded against estimator.classes_ (a test fold may
# lack some classes), and sklearn reduces predict_proba to one column whenever classes_ has two entries,
# which would break a multi-label estimator with two labels (classes_ = [0, 1]). So the scorers are small
# callables with sklearn's scorer signature, accepted anywhere `scoring=` takes a callable.


def _indicator_targets(estimator, y, n_columns):
    """y as a (n, n_columns) 0/1 matrix matching the columns of the estimator's scores."""
    y = target_array(y, "y_true")
    if y.ndim == 2 and y.shape[1] == 1 and n_columns != 1:
        y = y.ravel()
    if y.ndim == 2:
        return y
    classes = getattr(estimator, "classes_", None)
    if classes is None:
        raise ValueError("A 1-D y needs an estimator with classes_ to binarise against.")
    classes = np.asarray(classes)
    if n_columns == 1 and len(classes) == 2:
        # Binary decision_function: one column that scores classes_[1].
        return (y == classes[1]).astype(np.int64)[:, None]
    if n_columns != len(classes):
        raise ValueError(f"The estimator gives {n_columns} score columns but has {len(classes)} classes_.")
    return (y[:, None] == classes[None, :]).astype(np.int64)


class _MultiLabelScorer:
    """Scorer callable ``scorer(estimator, X, y) -> float`` (greater is better)."""

    def __init__(self, name: str, metric: Callable[[np.ndarray, np.ndarray], float], response_methods: tuple[str, ...]):
        self.name = name
        self._metric = metric
        self._response_methods = response_methods

    def _scores(self, estimator, X):
        for method in self._response_methods:
            if hasattr(estimator, method):
                scores = getattr(estimator, method)(X)
                if isinstance(scores, list):
                    # MultiOutputClassifier-style predict_proba: one (n, 2) array per label.
                    scores = np.column_stack([np.asarray(p)[:, -1] for p in scores])
                return np.asarray(scores, dtype=np.float64)
        raise AttributeError(f"{type(estimator).__name__} has none of {self._response_methods}.")

    def __call__(self, estimator, X, y_true: ArrayLike, sample_weight: None = None) -> float:
        if sample_weight is not None:
            raise ValueError(f"{self.name} does not support sample_weight.")
        scores = self._scores(estimator, X)
        if scores.ndim == 1:
            scores = scores[:, None]
        Y = _indicator_targets(estimator, y_true, scores.shape[1])
        return float(self._metric(Y, scores))

    def __repr__(self) -> str:
        return f"{self.name}(response_method={self._response_methods[0]!r})"


def _cf1(Y_true, Y_score):
    return multilabel_report(Y_true, Y_score, threshold=0.5, top_k=None)["CF1"]


def _of1(Y_true, Y_score):
    return multilabel_report(Y_true, Y_score, threshold=0.5, top_k=None)["OF1"]


#: mAP on predict_proba, or on decision_function for estimators without predict_proba.
map_scorer = _MultiLabelScorer("map_scorer", mean_average_precision, ("predict_proba", "decision_function"))
#: CF1 (harmonic mean of CP and CR) at threshold 0.5 on predict_proba.
cf1_scorer = _MultiLabelScorer("cf1_scorer", _cf1, ("predict_proba",))
#: OF1 (harmonic mean of OP and OR) at threshold 0.5 on predict_proba.
of1_scorer = _MultiLabelScorer("of1_scorer", _of1, ("predict_proba",))

SCORERS = {"map": map_scorer, "cf1": cf1_scorer, "of1": of1_scorer}
