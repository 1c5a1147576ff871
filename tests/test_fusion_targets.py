"""Target encoding of the fusion head, against scikit-learn's own encoders."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.exceptions import DataConversionWarning
from sklearn.preprocessing import LabelEncoder, MultiLabelBinarizer

from sklearn_difffeat.fusion._targets import encode_targets


def test_indicator_matrix_is_multilabel_float32():
    sets = [{0, 2}, {1}, {0, 1, 2}, set()]
    Y = MultiLabelBinarizer(classes=[0, 1, 2]).fit_transform(sets)
    for y in (Y, sp.csr_matrix(Y), pd.DataFrame(Y, columns=["a", "b", "c"])):
        encoded, classes, multilabel = encode_targets(y, 4)
        assert multilabel and encoded.dtype == np.float32
        np.testing.assert_array_equal(encoded, Y)
        np.testing.assert_array_equal(classes, [0, 1, 2])


@pytest.mark.parametrize("y", [["cat", "dog", "cat", "bird"], [3, 1, 3, 2], [1.0, -1.0, 1.0, 2.0]])
def test_labels_match_label_encoder(y):
    encoded, classes, multilabel = encode_targets(np.asarray(y), 4)
    reference = LabelEncoder().fit(y)
    assert not multilabel and encoded.dtype == np.int64
    np.testing.assert_array_equal(classes, reference.classes_)
    np.testing.assert_array_equal(encoded, reference.transform(y))


def test_column_vector_is_labels_with_sklearns_warning():
    with pytest.warns(DataConversionWarning, match="column-vector y"):
        encoded, classes, multilabel = encode_targets(np.array([[1], [0], [1]]), 3)
    assert not multilabel
    np.testing.assert_array_equal(classes, [0, 1])
    np.testing.assert_array_equal(encoded, [1, 0, 1])


def test_constant_label_columns_get_one_warning_naming_them():
    Y = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]])
    with pytest.warns(UserWarning, match=r"2 label column\(s\) of y are constant") as record:
        encode_targets(Y, 3)
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "0 (all 1), 3 (all 0)" in messages[0]
    frame = pd.DataFrame(Y, columns=["shirt", "bag", "shoe", "coat"])
    with pytest.warns(UserWarning, match=r"'shirt' \(all 1\), 'coat' \(all 0\)"):
        encode_targets(frame, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_targets(Y[:, 1:3], 3)  # no constant column: no warning


@pytest.mark.parametrize(
    "y, match",
    [
        (None, "requires y to be passed"),
        (np.array([[0, 2], [1, 0]]), "0/1 indicator matrix"),
        (np.zeros((2, 0)), "no label columns"),
        (np.zeros((2, 2, 2)), "got 3-D"),
        (np.array([0.0, np.nan]), r"y has 1 missing value\(s\) .*, the first at row 1;"),
        (np.array([0.0, np.inf]), "y contains infinity"),
        (np.array([1, 1]), "single class"),
        (np.array([0.5, 1.5]), "Unknown label type: continuous"),
        (np.array([[0.1, 1.0], [0.0, 1.0]]), "0/1 indicator matrix"),
        (np.array([0, 1, 0]), "X has 2 rows but y has 3"),
    ],
)
def test_bad_targets_say_what_is_wrong(y, match):
    with pytest.raises(ValueError, match=match):
        encode_targets(y, 2)
