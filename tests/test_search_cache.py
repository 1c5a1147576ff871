"""Searches over real extractors on a shared cache: each (image, timestep) goes through the DiT once at most,
each image through the VAE once, whatever the number of candidates and folds."""

import joblib
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_difffeat import BlockTimestepSearchCV, DiTFeatureExtractor
from sklearn_difffeat.metrics import map_scorer

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
        str(model_dir), block=1, timestep=50, cache=str(cache), batch_size=64, **extractor_params
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
    # the scores are those of the grid at the same candidates (same folds, same features)
    grid_scores = {
        tuple(sorted(p.items())): s for p, s in zip(grid.cv_results_["params"], grid.cv_results_["mean_test_score"])
    }
    for params, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"]):
        np.testing.assert_allclose(score, grid_scores[tuple(sorted(params.items()))], atol=1e-6)

    # a second search over the same cache computes nothing at all
    counter.passes = counter.encoded = 0
    BlockTimestepSearchCV(_pipeline(tiny_dit_dir, tmp_path / "search-cache"), GRID, cv=KFold(3)).fit(frame, Y)
    assert counter.passes == 0 and counter.encoded == 0
    counter.close()

    path = tmp_path / "best.joblib"
    joblib.dump(search.best_estimator_, path)
    restored = joblib.load(path)
    np.testing.assert_array_equal(restored.predict_proba(frame), search.best_estimator_.predict_proba(frame))
