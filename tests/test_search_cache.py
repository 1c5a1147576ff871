"""Searches over real extractors on a shared cache: each (image, timestep) goes through the DiT once at most,
each image through the VAE once, whatever the number of candidates and folds."""

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_difffeat import BlockTimestepSearchCV, DiTFeatureExtractor
from sklearn_difffeat.metrics import map_scorer
from sklearn_difffeat.search_priors import DiffFeatPriors

from conftest import PassCounter

GRID = {"features__image__block": [1, 2, 3, 4, 5], "features__image__timestep": [50, 200, 500, 800]}


def _data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(15, 16, 16, 3), dtype=np.uint8)
    Y = np.column_stack([images[:, :8].mean(axis=(1, 2, 3)) > 127, images[..., 0].mean(axis=(1, 2)) > 127,
                         np.arange(15) % 2 == 0]).astype(int)
    return pd.DataFrame({"image": list(images)}), Y


def _pipeline(model_dir, cache, **extractor_params):
    extractor = DiTFeatureExtractor(
        str(model_dir), block=1, timestep=50, cache=None if cache is None else str(cache), batch_size=64,
        **extractor_params,
    )
    return Pipeline(
        [
            ("features", ColumnTransformer([("image", extractor, "image")])),
            ("scale", StandardScaler()),
            ("clf", OneVsRestClassifier(LogisticRegression(max_iter=200))),
        ]
    )


class ImagesThroughDiT(PassCounter):
    """Counts images (not batches) through the DiT's patch embedding."""

    def _on_pass(self, module, args, out):
        self.passes += args[0].shape[0]


def test_grid_and_local_search_share_one_pass_per_image_and_timestep(tiny_dit_dir, tmp_path):
    frame, Y = _data()
    n = len(frame)
    pipe = _pipeline(tiny_dit_dir, tmp_path / "grid-cache", cache_depth=-1)
    counter = ImagesThroughDiT(pipe.named_steps["features"].transformers[0][1].fit(None))
    grid = GridSearchCV(pipe, GRID, cv=KFold(3), scoring=map_scorer).fit(frame, Y)
    assert len(grid.cv_results_["params"]) == 20
    assert counter.encoded == n  # every image through the VAE once, for 20 candidates x 3 folds + refit
    assert counter.passes <= n * len(GRID["features__image__timestep"])

    # Local search on its own fresh cache: it announces the blocks it may visit (cache_depth left unset).
    counter.passes = counter.encoded = 0
    search = BlockTimestepSearchCV(_pipeline(tiny_dit_dir, tmp_path / "search-cache"), GRID, cv=KFold(3)).fit(frame, Y)
    visited_timesteps = {p["features__image__timestep"] for p in search.cv_results_["params"]}
    assert counter.encoded == n
    assert counter.passes <= n * len(visited_timesteps)
    assert search.n_evaluations_ == len(search.cv_results_["params"]) < 20
    # the scores are those of the grid at the same candidates (same folds, same features); the search's candidates
    # also carry the cache depth it announced (the model's 5 blocks)
    assert search.shared_params_ == {"features__image__cache_depth": 5}
    grid_scores = {
        tuple(sorted(p.items())): s for p, s in zip(grid.cv_results_["params"], grid.cv_results_["mean_test_score"])
    }
    for params, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"]):
        axes = {k: v for k, v in params.items() if k in GRID}
        np.testing.assert_allclose(score, grid_scores[tuple(sorted(axes.items()))], atol=1e-6)

    # a second search over the same cache computes nothing at all
    counter.passes = counter.encoded = 0
    BlockTimestepSearchCV(_pipeline(tiny_dit_dir, tmp_path / "search-cache"), GRID, cv=KFold(3)).fit(frame, Y)
    assert counter.passes == 0 and counter.encoded == 0
    counter.close()

    path = tmp_path / "best.joblib"
    joblib.dump(search.best_estimator_, path)
    restored = joblib.load(path)
    np.testing.assert_array_equal(restored.predict_proba(frame), search.best_estimator_.predict_proba(frame))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
@pytest.mark.filterwarnings("ignore:.*evaluated candidates have non-finite scores")
def test_a_grid_written_for_a_deeper_model(tiny_dit_dir, tmp_path):
    # The README's image blocks range(1, 29) are for DiT-XL/2 (28 blocks); the tiny DiT has 5.
    readme_axis = {"features__image__block": range(1, 29)}
    cached = _pipeline(tiny_dit_dir, tmp_path / "cache")
    assert DiffFeatPriors().shared_params(cached, readme_axis) == {"features__image__cache_depth": 5}
    assert DiffFeatPriors().shared_params(_pipeline(tiny_dit_dir, None), readme_axis) == {}  # no cache, no depth

    # Block 6 does not exist: it fails its own candidate, and blocks 4 and 5 are scored as usual.
    frame, Y = _data()
    grid = {"features__image__block": [4, 5, 6], "features__image__timestep": [200]}
    for cache in (tmp_path / "cache", None):
        search = BlockTimestepSearchCV(_pipeline(tiny_dit_dir, cache), grid, cv=KFold(3)).fit(frame, Y)
        assert search.start_params_["features__image__block"] == 5  # middle of the blocks the model has
        scores = {p["features__image__block"]: v
                  for p, v in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"])}
        assert set(scores) == {4, 5, 6}
        assert np.isfinite(scores[4]) and np.isfinite(scores[5]) and np.isnan(scores[6]), (cache, scores)
        assert search.best_params_["features__image__block"] in (4, 5)
        assert search.shared_params_ == ({} if cache is None else {"features__image__cache_depth": 5})
