"""Modality resolution of the fusion head: specifications -> column groups, dict inputs, predict-time checks."""

import numpy as np
import pytest

from sklearn_difffeat.fusion._modalities import (
    check_frame_columns,
    is_modality_dict,
    resolve_modalities,
    stack_modality_dict,
)


def as_lists(groups):
    return {name: idx.tolist() for name, idx in groups.items()}


def test_auto_groups_by_prefix_in_order_of_first_appearance():
    names = ["image__a", "image__b", "text__a", "image__c", "text__b"]
    assert as_lists(resolve_modalities("auto", 5, names)) == {"image": [0, 1, 3], "text": [2, 4]}
    # only the first "__" separates the modality: feature names may contain it too
    assert as_lists(resolve_modalities("auto", 2, ["a__x__y", "b__z"])) == {"a": [0], "b": [1]}


def test_auto_without_prefixes_or_names_is_one_modality():
    assert as_lists(resolve_modalities("auto", 3, None)) == {"X": [0, 1, 2]}
    assert as_lists(resolve_modalities("auto", 3, ["f0", "f1", "f2"])) == {"X": [0, 1, 2]}
    with pytest.raises(ValueError, match="column 'f2' has none"):
        resolve_modalities("auto", 3, ["image__f0", "text__f1", "f2"])


def test_widths_are_consecutive_blocks():
    assert as_lists(resolve_modalities([2, 1, 3], 6)) == {"m0": [0, 1], "m1": [2], "m2": [3, 4, 5]}
    assert as_lists(resolve_modalities((np.int64(1), 1), 2)) == {"m0": [0], "m1": [1]}
    with pytest.raises(ValueError, match=r"widths \[3, 3\] add up to 6, but X has 7 features"):
        resolve_modalities([3, 3], 7)
    with pytest.raises(ValueError, match="must be positive"):
        resolve_modalities([0, 7], 7)


def test_dict_of_slices_positions_and_names():
    names = [f"c{i}" for i in range(6)]
    spec = {"a": slice(0, 2), "b": [-1, 2], "c": ["c3", "c4"]}
    assert as_lists(resolve_modalities(spec, 6, names)) == {"a": [0, 1], "b": [5, 2], "c": [3, 4]}


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"a": slice(0, 3), "b": slice(4, 7)}, "1 of the 7 columns of X belong to no modality \\(first: column 3\\)"),
        ({"a": slice(0, 4), "b": slice(3, 7)}, "Column 3 belongs to more than one modality"),
        ({"a": slice(0, 7), "b": slice(7, 9)}, "Modality 'b' selects no columns"),
        ({"a": [0, 7]}, "Modality 'a' indexes columns outside 0..6"),
        ({"a": ["x"]}, "Modality 'a' names columns, but X has no column names"),
        ({"a": [0.5]}, "Modality 'a': give a slice, int positions or column names"),
        ({}, "empty dict"),
        ("all", "modalities must be 'auto'"),
        ([], "non-empty list of widths"),
        (3, "non-empty list of widths"),
    ],
)
def test_bad_specifications_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_modalities(spec, 7)


def test_unknown_column_name():
    with pytest.raises(ValueError, match="Modality 'a': column 'z' is not in X"):
        resolve_modalities({"a": ["x", "z"], "b": ["y"]}, 2, ["x", "y"])


def test_stack_dict_at_fit_lays_out_in_dict_order():
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 2)), rng.random((4, 3))
    X, groups = stack_modality_dict({"text": b, "image": a})
    np.testing.assert_array_equal(X, np.hstack([b, a]).astype(np.float32))
    assert X.dtype == np.float32 and as_lists(groups) == {"text": [0, 1, 2], "image": [3, 4]}


def test_stack_dict_at_predict_follows_fitted_layout_whatever_the_key_order():
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 2)), rng.random((4, 3))
    _, fitted = stack_modality_dict({"image": a, "text": b})
    X, groups = stack_modality_dict({"text": b, "image": a}, fitted=fitted)
    np.testing.assert_array_equal(X, np.hstack([a, b]).astype(np.float32))
    assert groups is fitted
    with pytest.raises(ValueError, match="Modality 'text' is missing at predict time"):
        stack_modality_dict({"image": a}, fitted=fitted)
    with pytest.raises(ValueError, match=r"modalities \['audio'\] that were not seen at fit time"):
        stack_modality_dict({"image": a, "text": b, "audio": a}, fitted=fitted)
    with pytest.raises(ValueError, match="'image' has 3 features, but 2 at fit time"):
        stack_modality_dict({"image": b, "text": b}, fitted=fitted)


def test_stack_dict_rejects_bad_arrays_naming_the_modality():
    good = np.zeros((3, 2))
    with pytest.raises(ValueError, match="empty dict"):
        stack_modality_dict({})
    with pytest.raises(ValueError, match="different numbers of rows"):
        stack_modality_dict({"a": good, "b": np.zeros((4, 2))})
    with pytest.raises(ValueError, match=r"Modality 'b'.*NaN"):
        stack_modality_dict({"a": good, "b": np.full((3, 2), np.nan)})
    with pytest.raises(ValueError, match=r"Modality 'b'.*2D array"):
        stack_modality_dict({"a": good, "b": np.zeros(3)})


def test_is_modality_dict():
    import scipy.sparse as sp
    from skorch.helper import SliceDict

    assert is_modality_dict({"a": np.zeros((2, 1))}) and is_modality_dict(SliceDict(a=np.zeros((2, 1))))
    assert not is_modality_dict(sp.dok_matrix((2, 2)))  # a dict subclass, but a matrix
    assert not is_modality_dict(np.zeros((2, 2)))


@pytest.mark.parametrize(
    "columns, match",
    [
        (["image__a", "image__b"], "Modality 'text' is missing at predict time: none of its 1 columns"),
        (["image__a", "text__c"], "Modality 'image' lacks 1 columns seen at fit, e.g. 'image__b'"),
        (["image__a", "image__b", "text__c", "extra"], "1 columns not seen at fit time, e.g. 'extra'"),
        (["image__b", "image__a", "text__c"], "column 0 is 'image__b', expected 'image__a'"),
        (["image__a", "image__b", "text__c", "text__c"], "some are repeated"),
    ],
)
def test_frame_column_checks_name_what_differs(columns, match):
    fitted = ["image__a", "image__b", "text__c"]
    groups = resolve_modalities("auto", 3, fitted)
    check_frame_columns(fitted, fitted, groups)  # the fitted columns themselves pass
    with pytest.raises(ValueError, match=match):
        check_frame_columns(columns, fitted, groups)
