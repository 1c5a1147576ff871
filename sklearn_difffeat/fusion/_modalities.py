"""Modality resolution: which columns of X feed which projection of the fusion head.

Plain functions, no estimator state: the classifier calls :func:`resolve_modalities` and
:func:`stack_modality_dict` in ``fit`` to learn the column groups, and :func:`check_frame_columns` and
:func:`stack_modality_dict` (with the fitted groups) at predict time to check that X still has them.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike
from sklearn.utils.validation import check_array

__all__ = ["check_frame_columns", "is_modality_dict", "resolve_modalities", "stack_modality_dict"]


def is_modality_dict(X: object) -> bool:
    """True for a dict of per-modality arrays (plain dict or ``skorch.helper.SliceDict``)."""
    return isinstance(X, dict) and not sp.issparse(X)  # scipy's dok_matrix is a dict subclass


def resolve_modalities(
    spec: str | list[int] | dict, n_features: int, feature_names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Turn a ``modalities`` specification into ``{name: column positions}`` for a 2-D X.

    Parameters
    ----------
    spec : "auto", list of int or dict
        ``"auto"``: group the columns by their ``<modality>__`` prefix (the naming of
        ``ColumnTransformer(...).set_output(transform="pandas")``); with no prefix anywhere, or no column names,
        all columns form the one modality ``"X"``. A list of int: consecutive widths, named ``m0, m1, ...``. A
        dict: name -> slice, list of column positions (negative ones count from the end) or, when
        ``feature_names`` is given, list of column names.
    n_features : int
        Number of columns of X.
    feature_names : list of str or None, default=None
        Column names of X, if it has any.

    Returns
    -------
    dict of str -> ndarray of int64
        Column positions of each modality, in the order of the specification. Every column belongs to exactly
        one modality.

    Raises
    ------
    ValueError
        If the specification is malformed, names an unknown column, leaves a column out or puts one in two
        modalities; the message names the modality or column.
    """
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"modalities must be 'auto', a list of widths or a dict; got {spec!r}.")
        return _groups_from_prefixes(n_features, feature_names)
    if isinstance(spec, dict):
        groups = {name: _columns_of(name, cols, n_features, feature_names) for name, cols in spec.items()}
        if not groups:
            raise ValueError("modalities is an empty dict; give at least one modality.")
        _check_partition(groups, n_features)
        return groups
    if isinstance(spec, (list, tuple)) and spec and all(_is_int(w) for w in spec):
        widths = [int(w) for w in spec]
        if min(widths) < 1:
            raise ValueError(f"Modality widths must be positive; got {widths}.")
        if sum(widths) != n_features:
            raise ValueError(f"modalities widths {widths} add up to {sum(widths)}, but X has {n_features} features.")
        bounds = np.cumsum([0, *widths])
        return {f"m{i}": np.arange(bounds[i], bounds[i + 1]) for i in range(len(widths))}
    raise ValueError(f"modalities must be 'auto', a non-empty list of widths or a dict name -> columns; got {spec!r}.")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _groups_from_prefixes(n_features, feature_names):
    if feature_names is None or not any("__" in n for n in feature_names):
        return {"X": np.arange(n_features)}
    prefixes = [n.split("__", 1)[0] if "__" in n else None for n in feature_names]
    if None in prefixes:
        bad = feature_names[prefixes.index(None)]
        raise ValueError(
            f"modalities='auto' groups columns by their '<modality>__' prefix, but column {bad!r} has none; "
            "pass modalities explicitly."
        )
    groups = {}
    for i, prefix in enumerate(prefixes):
        groups.setdefault(prefix, []).append(i)
    return {name: np.asarray(idx, dtype=np.int64) for name, idx in groups.items()}


def _columns_of(name, cols, n_features, feature_names):
    """Column positions of one dict entry of ``modalities``."""
    if isinstance(cols, slice):
        idx = np.arange(n_features)[cols]
    else:
        cols = np.atleast_1d(cols).tolist()  # plain Python values, for readable messages
        if cols and all(isinstance(c, str) for c in cols):
            if feature_names is None:
                raise ValueError(f"Modality {name!r} names columns, but X has no column names.")
            lookup = {n: i for i, n in enumerate(feature_names)}
            unknown = [c for c in cols if c not in lookup]
            if unknown:
                raise ValueError(f"Modality {name!r}: column {unknown[0]!r} is not in X.")
            cols = [lookup[c] for c in cols]
        elif not all(_is_int(c) for c in cols):
            raise ValueError(f"Modality {name!r}: give a slice, int positions or column names; got {cols!r}.")
        idx = np.asarray(cols, dtype=np.int64)
        if idx.size and (idx.min() < -n_features or idx.max() >= n_features):
            raise ValueError(f"Modality {name!r} indexes columns outside 0..{n_features - 1}.")
        idx = idx % n_features
    if idx.size == 0:
        raise ValueError(f"Modality {name!r} selects no columns.")
    return idx


def _check_partition(groups, n_features):
    counts = np.bincount(np.concatenate(list(groups.values())), minlength=n_features)
    if (counts == 0).any():
        raise ValueError(
            f"{int((counts == 0).sum())} of the {n_features} columns of X belong to no modality "
            f"(first: column {int(np.argmax(counts == 0))})."
        )
    if (counts > 1).any():
        raise ValueError(f"Column {int(np.argmax(counts > 1))} belongs to more than one modality.")


def stack_modality_dict(
    X: Mapping[str, ArrayLike], fitted: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Concatenate a dict of per-modality 2-D arrays into one float32 array.

    Parameters
    ----------
    X : dict of str -> array-like of shape (n_samples, d_m)
        One finite 2-D array per modality, all with the same number of rows.
    fitted : dict of str -> ndarray of int or None, default=None
        The column positions learned at fit time. None (fit): the modalities are laid out in the dict's order.
        Given (predict): X must have exactly these modalities, each with its fitted width, in any order.

    Returns
    -------
    X_stacked : ndarray of shape (n_samples, sum of d_m), float32
    groups : dict of str -> ndarray of int
        Column positions of each modality in ``X_stacked`` (``fitted`` itself when it was given).
    """
    if len(X) == 0:
        raise ValueError("X is an empty dict; expected one 2-D array per modality.")
    blocks = {}
    for name, value in X.items():
        try:
            blocks[name] = check_array(value, dtype=np.float32, input_name=f"X[{name!r}]")
        except ValueError as exc:
            raise ValueError(f"Modality {name!r}: {exc}") from None
    rows = {name: b.shape[0] for name, b in blocks.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"The modalities of X have different numbers of rows: {rows}.")
    if fitted is None:
        bounds = np.cumsum([0, *(b.shape[1] for b in blocks.values())])
        groups = {name: np.arange(bounds[i], bounds[i + 1]) for i, name in enumerate(blocks)}
        return np.hstack(list(blocks.values())), groups
    missing = [m for m in fitted if m not in blocks]
    if missing:
        raise ValueError(
            f"Modality {missing[0]!r} is missing at predict time; X has {list(blocks)}, "
            f"the model was fitted on {list(fitted)}."
        )
    extra = [m for m in blocks if m not in fitted]
    if extra:
        raise ValueError(f"X has modalities {extra} that were not seen at fit time ({list(fitted)}).")
    out = np.empty((next(iter(rows.values())), sum(len(idx) for idx in fitted.values())), dtype=np.float32)
    for name, idx in fitted.items():
        if blocks[name].shape[1] != len(idx):
            raise ValueError(f"Modality {name!r} has {blocks[name].shape[1]} features, but {len(idx)} at fit time.")
        out[:, idx] = blocks[name]
    return out, fitted


def check_frame_columns(
    columns: Sequence, feature_names_in: Sequence[str], groups: dict[str, np.ndarray]
) -> None:
    """Check a predict-time DataFrame's columns against the fitted ones; name what differs.

    Parameters
    ----------
    columns : sequence
        Columns of the DataFrame passed at predict time.
    feature_names_in : sequence of str
        Columns seen at fit time, in order.
    groups : dict of str -> ndarray of int
        Fitted column positions of each modality.

    Raises
    ------
    ValueError
        If a whole modality is missing, some of its columns are, X has columns not seen at fit time, or the
        column order differs.
    """
    fitted = [str(c) for c in feature_names_in]
    cols = [str(c) for c in columns]
    present = set(cols)
    for name, idx in groups.items():
        absent = [fitted[i] for i in idx if fitted[i] not in present]
        if len(absent) == len(idx):
            raise ValueError(
                f"Modality {name!r} is missing at predict time: none of its {len(idx)} columns "
                f"(e.g. {absent[0]!r}) is in X."
            )
        if absent:
            raise ValueError(f"Modality {name!r} lacks {len(absent)} columns seen at fit, e.g. {absent[0]!r}.")
    known = set(fitted)
    extra = [c for c in cols if c not in known]
    if extra:
        raise ValueError(f"X has {len(extra)} columns not seen at fit time, e.g. {extra[0]!r}.")
    if len(cols) != len(fitted):
        raise ValueError(f"X has {len(cols)} columns for the {len(fitted)} seen at fit time; some are repeated.")
    if cols != fitted:
        pos = next(i for i, (a, b) in enumerate(zip(cols, fitted)) if a != b)
        raise ValueError(
            f"The column order of X differs from fit: column {pos} is {cols[pos]!r}, expected {fitted[pos]!r}. "
            "Select the columns in the fitted order (X[model.feature_names_in_])."
        )
