"""Targets as the metrics and the fusion head read them: one dense numpy array, complete, and every error naming
the argument it is about.

Both take the same inputs (lists, numpy arrays, pandas objects with nullable dtypes, scipy sparse matrices and
arrays), so they share this one conversion.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def target_array(y, name: str) -> np.ndarray:
    """``y`` as a numpy array, converted once.

    A scipy sparse ``y`` (any format, matrix or array) is an indicator matrix: its stored values must be 0 or 1,
    and it comes back dense. Missing values (NaN, None, ``pd.NA``, NaT) raise a ``ValueError`` that names ``name``
    and the first missing position: a target must be known for every sample.
    """
    if sp.issparse(y):
        return _dense_indicator(y, name)
    y = np.asarray(y)  # a pandas object with nullable dtypes becomes an object array holding pd.NA
    missing = _missing(y)
    if missing.any():
        first = tuple(int(i) for i in np.argwhere(missing)[0])
        where = "its only entry" if not first else f"row {first[0]}" + "".join(f", column {i}" for i in first[1:])
        raise ValueError(
            f"{name} has {int(missing.sum())} missing value(s) (NaN, None or pd.NA), the first at {where}; "
            "every sample needs a known target."
        )
    return y


def _dense_indicator(y, name):
    y = y.tocsr(copy=True)
    y.sum_duplicates()  # duplicate entries of a COO input add up: check the values the matrix stands for
    values = np.unique(y.data)
    if not np.all(np.isin(values, [0, 1])):
        raise ValueError(
            f"{name} is a sparse matrix, read as a 0/1 indicator matrix, but it stores the values "
            f"{values[~np.isin(values, [0, 1])][:10].tolist()}."
        )
    return y.toarray()


def _missing(y):
    """Where ``y`` holds a missing value."""
    if y.dtype.kind == "O":
        import pandas as pd  # lazy: only object arrays can hold None or pd.NA

        return np.asarray(pd.isna(y), dtype=bool)
    if y.dtype.kind in "fc":
        return np.isnan(y)
    if y.dtype.kind in "mM":
        return np.isnat(y)
    return np.zeros(y.shape, dtype=bool)
