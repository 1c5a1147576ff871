"""scikit-learn's common estimator checks over every public estimator of the library.

Each check that is expected to fail is listed with its reason, and expected failures are strict
(``xfail_strict`` in the pytest configuration): a listed check that starts passing fails the run, as does any
unlisted check that fails, so both changes show. The one exception is a check whose outcome depends on the
platform's floating-point rounding (``PLATFORM_DEPENDENT``): it may pass, or fail as an expected failure.

The extractors take images or texts, not numeric tables, and say so with the tag ``input_tags.two_d_array =
False``, on which scikit-learn skips every check but ``check_estimator_cloneable``. So that the list of what
applies stays visible, the checks run on stand-ins that differ from the extractors only in that tag: the checks
that need no data must pass, and each data check's failure is listed with its reason.
"""

import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.utils import get_tags
from sklearn.utils.estimator_checks import estimator_checks_generator, parametrize_with_checks

from sklearn_difffeat import (
    BlockTimestepSearchCV,
    DiTFeatureExtractor,
    FusionClassifier,
    TextDiffusionFeatureExtractor,
)

from conftest import SKLEARN_CHECKS_WITHOUT_DATA

# scikit-learn's checks feed the search NaN, infinite and object data on purpose. With error_score=nan it scores
# the failing fits as NaN and says so: scikit-learn's FitFailedWarning and "Scoring failed", the search's own count
# of non-finite candidates, and numpy's cast warning on NaN scores. Those are the behaviour under test, not noise.
pytestmark = [
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning"),
    pytest.mark.filterwarnings("ignore:Scoring failed:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*evaluated candidates have non-finite scores:UserWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning"),
]


class TabularDiTFeatureExtractor(DiTFeatureExtractor):
    """DiTFeatureExtractor whose tags claim 2-D array input, so that scikit-learn runs its data checks."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        return tags


class TabularTextDiffusionFeatureExtractor(TextDiffusionFeatureExtractor):
    """TextDiffusionFeatureExtractor whose tags claim 2-D array input, so that scikit-learn runs its data checks."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        return tags


# The embedded models load offline; block 4 exists in both (the default block=12 of the DiT extractor is out of
# range for the 8-block embedded DiT, and fit would fail on that before any check reached the data).
DIT = TabularDiTFeatureExtractor("embedded:fashion-dit", block=4)
TEXT = TabularTextDiffusionFeatureExtractor("embedded:fashion-mdlm", block=4)
FUSION = FusionClassifier(projection_dim=16, lr=1e-2, max_epochs=30, batch_size=64)
SEARCH_CLASSIFIER = BlockTimestepSearchCV(LogisticRegression(), {"C": [0.1, 1.0, 10.0]}, cv=3, priors=None)
SEARCH_REGRESSOR = BlockTimestepSearchCV(Ridge(), {"alpha": [0.1, 1.0, 10.0]}, cv=3, priors=None)



@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The models here are tiny: one thread runs them fastest, and spares the hundreds of small fits the cost of
    thread contention when the CPU is shared (tens of times slower then)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_NOT_READ = "fit learns nothing from X and does not read it, so it accepts any X and sets no n_features_in_"


def _extractor_failures(takes):
    """The data checks an extractor fails: those that need fit to read X, and those that transform a table."""
    not_a_table = f"transform takes {takes}, and rejects a numeric table with a ValueError naming its shape"
    return {
        **dict.fromkeys(
            ["check_complex_data", "check_estimators_empty_data_messages", "check_estimators_nan_inf",
             "check_estimator_sparse_tag", "check_fit1d", "check_n_features_in", "check_n_features_in_after_fitting"],
            _NOT_READ,
        ),
        **dict.fromkeys(
            ["check_dict_unchanged", "check_dtype_object", "check_estimators_dtypes", "check_estimators_pickle",
             "check_f_contiguous_array_estimator", "check_fit_idempotent", "check_fit_score_takes_y",
             "check_methods_sample_order_invariance", "check_methods_subset_invariance",
             "check_pipeline_consistency", "check_transformer_data_not_an_array", "check_transformer_general",
             "check_transformer_preserve_dtypes"],
            not_a_table,
        ),
        "check_fit2d_predict1d": f"transform takes {takes}; its error for a 1-D array says so, not 'Reshape your data'",
    }


# check_dtype_object puts a dict in one cell of X: every candidate then fails on the folds that train or score on
# that row, so no candidate has a score and the search raises its ValueError naming the first error (the
# TypeError the check wants) rather than returning best_score_ = nan; GridSearchCV raises the TypeError from its
# refit on all rows.
_NO_CANDIDATE_SCORES = {
    "check_dtype_object": "no candidate has a score, so the search raises a ValueError that names the first fit's "
    "TypeError",
}

EXPECTED_FAILURES = {
    TabularDiTFeatureExtractor: _extractor_failures("images ((n, H, W[, C]) arrays, PIL images or file paths)"),
    TabularTextDiffusionFeatureExtractor: _extractor_failures("a 1-D sequence of texts"),
    FusionClassifier: {},
    LogisticRegression: dict(_NO_CANDIDATE_SCORES),
    Ridge: {
        **_NO_CANDIDATE_SCORES,
        # BaseSearchCV copies the wrapped estimator's classifier and regressor tags but not target_tags, so a
        # search does not say it takes 2-D y; GridSearchCV(Ridge()) fails this check the same way.
        "check_supervised_y_2d": "BaseSearchCV does not pass on the wrapped estimator's multi_output tag",
    },
}


def expected_failed_checks(estimator):
    key = type(estimator.estimator) if isinstance(estimator, BlockTimestepSearchCV) else type(estimator)
    return EXPECTED_FAILURES[key]


ESTIMATORS = [FUSION, SEARCH_CLASSIFIER, SEARCH_REGRESSOR, DIT, TEXT]


# Checks whose outcome depends on the BLAS library and CPU, so neither "passes" nor "fails" can be strict: float32
# matrix products differ in the last bits with the number of rows scored at once (~1e-7 here, right at the check's
# tolerance). Such a check passes or is reported as an expected failure, never an error.
PLATFORM_DEPENDENT = {(FusionClassifier, "check_methods_subset_invariance")}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    name = getattr(check, "func", check).__name__
    if (type(estimator), name) not in PLATFORM_DEPENDENT:
        check(estimator)
        return
    try:
        check(estimator)
    except AssertionError as exc:
        pytest.xfail(f"float32 rounding differs with the batch's row count on this platform: {exc}")


def _check_names(estimator):
    return {getattr(check, "func", check).__name__ for _, check in estimator_checks_generator(estimator)}


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_every_expected_failure_names_a_check_that_runs(estimator):
    stale = set(expected_failed_checks(estimator)) - _check_names(estimator)
    assert not stale, f"listed as expected to fail, but scikit-learn runs no such check: {sorted(stale)}"


@pytest.mark.parametrize("estimator", [DIT, TEXT], ids=lambda e: type(e).__name__)
def test_the_checks_that_need_no_data_run_and_must_pass(estimator):
    names = _check_names(estimator)
    assert set(SKLEARN_CHECKS_WITHOUT_DATA) <= names
    assert not set(SKLEARN_CHECKS_WITHOUT_DATA) & set(expected_failed_checks(estimator))


@pytest.mark.parametrize("stand_in, extractor", [(DIT, DiTFeatureExtractor), (TEXT, TextDiffusionFeatureExtractor)])
def test_the_stand_ins_differ_from_the_extractors_only_in_the_input_tag(stand_in, extractor):
    real = extractor(**stand_in.get_params())
    assert get_tags(real).input_tags.two_d_array is False  # why scikit-learn would skip the real ones
    tags = get_tags(stand_in)
    tags.input_tags.two_d_array = False
    assert tags == get_tags(real)
    cls = type(stand_in)
    assert cls.__bases__ == (extractor,)
    assert [name for name, value in vars(cls).items() if callable(value)] == ["__sklearn_tags__"]
