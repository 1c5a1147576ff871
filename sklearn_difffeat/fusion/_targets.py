"""Target encoding for the fusion head: a 0/1 indicator matrix (multi-label) or 1-D class labels."""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import ArrayLike
from sklearn.exceptions import DataConversionWarning
from sklearn.utils.multiclass import check_classification_targets

from .._target_arrays import target_array

__all__ = ["encode_targets"]


def encode_targets(y: ArrayLike, n_samples: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Check ``y`` and encode it for the torch loss.

    Parameters
    ----------
    y : array-like or sparse matrix of shape (n_samples, n_labels) or (n_samples,)
        A 2-D 0/1 indicator matrix (multi-label; a DataFrame's column names are used in warnings), or 1-D class
        labels (single-label). A column vector ``(n, 1)`` is read as 1-D labels, with a
        ``DataConversionWarning``, as scikit-learn does.
    n_samples : int
        Number of rows of X, which y must match.

    Returns
    -------
    y_encoded : ndarray
        Multi-label: float32 ``(n_samples, n_labels)``, the target of ``BCEWithLogitsLoss``. Single-label:
        int64 ``(n_samples,)`` indices into ``classes``, the target of ``CrossEntropyLoss``.
    classes : ndarray
        Multi-label: ``np.arange(n_labels)``. Single-label: the sorted unique labels.
    multilabel : bool

    Warns
    -----
    UserWarning
        Once, naming them, when label columns of a multi-label y are constant (all 0 or all 1): the head can
        only learn that label's base rate.
    """
    if y is None:
        raise ValueError(
            "FusionClassifier requires y to be passed, but the target y is None "
            "(pass a 0/1 indicator matrix or 1-D class labels)."
        )
    names = [str(c) for c in y.columns] if hasattr(y, "columns") else None
    y = target_array(y, "y")  # sparse to dense, missing values (NaN, None, pd.NA) refused
    if y.ndim == 2 and y.shape[1] == 1:
        # scikit-learn's convention: a column vector is 1-D labels (one binary label is binary classification).
        warnings.warn(
            "A column-vector y was passed when a 1d array was expected; it is treated as 1-D class labels.",
            DataConversionWarning,
            stacklevel=3,
        )
        y = y.ravel()
    if y.ndim not in (1, 2):
        raise ValueError(f"y must be 1-D class labels or a 2-D 0/1 indicator matrix; got {y.ndim}-D.")
    if y.shape[0] != n_samples:
        raise ValueError(f"X has {n_samples} rows but y has {y.shape[0]}; they must match.")
    if y.dtype.kind in "fc" and not np.all(np.isfinite(y)):
        raise ValueError("y contains infinity.")
    if y.ndim == 2:
        return _encode_indicator(y, names), np.arange(y.shape[1]), True
    check_classification_targets(y)
    classes, encoded = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"y has a single class ({classes[0]!r}); at least two are needed.")
    return encoded.astype(np.int64), classes, False


def _encode_indicator(y, names):
    if y.shape[1] == 0:
        raise ValueError("y has no label columns.")
    values = np.unique(y)
    if not np.all(np.isin(values, [0, 1])):
        raise ValueError(f"A 2-D y must be a 0/1 indicator matrix (multi-label); found values {values[:10].tolist()}.")
    positives = y.sum(axis=0)
    constant = np.flatnonzero((positives == 0) | (positives == y.shape[0]))
    if constant.size:
        shown = [names[i] for i in constant] if names is not None else constant.tolist()
        kinds = ["all 0" if positives[i] == 0 else "all 1" for i in constant]
        listed = ", ".join(f"{c!r} ({k})" if names else f"{c} ({k})" for c, k in zip(shown[:10], kinds[:10]))
        more = f" and {constant.size - 10} more" if constant.size > 10 else ""
        warnings.warn(
            f"{constant.size} label column(s) of y are constant in the training data: {listed}{more}. "
            "The model can only learn their base rate; their predictions rank nothing.",
            UserWarning,
            stacklevel=4,  # the caller of FusionClassifier.fit
        )
    return y.astype(np.float32)
