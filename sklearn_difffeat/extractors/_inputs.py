"""Small helpers for the containers the extractors accept as input and as parameters."""

from __future__ import annotations

import numbers

import numpy as np


def as_list(value) -> list:
    """A parameter that may be one value or several (``block``, ``timestep``) as a list."""
    return list(value) if isinstance(value, (list, tuple, np.ndarray, range)) else [value]


def check_offset(offset):
    """``transform_with_report``'s ``offset``: a non-negative int (the position of ``X[0]`` in the whole input), or
    a 1-D array of non-negative ints (the position of each sample of ``X``)."""
    if isinstance(offset, (list, tuple, np.ndarray)):
        positions = np.asarray(offset)
        if positions.ndim != 1 or positions.dtype.kind not in "iu" or (positions < 0).any():
            raise ValueError("offset must be a non-negative integer or a 1-D array of non-negative integers (the "
                             "position of each sample in the whole input).")
        return positions.astype(np.int64)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"offset must be a non-negative integer, got {offset!r}.")
    return int(offset)


def input_position(offset, i: int) -> int:
    """The position in the whole input of sample ``i`` of a part whose ``offset`` :func:`check_offset` checked."""
    if isinstance(offset, np.ndarray):
        if len(offset) <= i:
            raise ValueError(f"offset lists {len(offset)} positions, fewer than the samples given.")
        return int(offset[i])
    return offset + int(i)


def single_column(X, what: str):
    """Unwrap the one-column DataFrame a ColumnTransformer passes for a column given as a list (``["image"]``)."""
    if hasattr(X, "iloc") and getattr(X, "ndim", 1) == 2:
        if X.shape[1] != 1:
            raise ValueError(f"Expected one column of {what}, got a DataFrame with {X.shape[1]} columns.")
        return X.iloc[:, 0]
    return X
