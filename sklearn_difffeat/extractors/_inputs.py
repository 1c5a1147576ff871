"""Small helpers for the containers the extractors accept as input and as parameters."""

from __future__ import annotations

import numpy as np


def as_list(value) -> list:
    """A parameter that may be one value or several (``block``, ``timestep``) as a list."""
    return list(value) if isinstance(value, (list, tuple, np.ndarray, range)) else [value]


def single_column(X, what: str):
    """Unwrap the one-column DataFrame a ColumnTransformer passes for a column given as a list (``["image"]``)."""
    if hasattr(X, "iloc") and getattr(X, "ndim", 1) == 2:
        if X.shape[1] != 1:
            raise ValueError(f"Expected one column of {what}, got a DataFrame with {X.shape[1]} columns.")
        return X.iloc[:, 0]
    return X
