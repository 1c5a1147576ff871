"""The embedded models through the public API, and the end-to-end demo on a small sample."""

import json

import numpy as np
import pytest

from sklearn_difffeat import DiTFeatureExtractor, TextDiffusionFeatureExtractor
from sklearn_difffeat.backbones._hub import EMBEDDED_DIR, embedded_models
from sklearn_difffeat.datasets import load_fashion_mosaics
from sklearn_difffeat.extractors import _base


@pytest.fixture(scope="module")
def mosaics():
    return load_fashion_mosaics(12, split="test", random_state=3).data


def test_embedded_models_are_listed():
    assert {"fashion-dit", "fashion-mdlm"} <= set(embedded_models())


@pytest.mark.parametrize("cls, name, column, params", [
    (DiTFeatureExtractor, "fashion-dit", "image", dict(block=[3, -1], timestep=[0, 200])),
    (TextDiffusionFeatureExtractor, "fashion-mdlm", "text", dict(block=[2, -1], timestep=[0.0, 0.4])),
])
def test_embedded_models_load_by_name_like_a_folder_and_are_deterministic(mosaics, cls, name, column, params):
    by_name = cls(f"embedded:{name}", **params).fit(None).transform(mosaics[column])
    _base.clear_backbone_cache()  # a fresh load, as in another process
    again = cls(f"embedded:{name}", **params).fit(None).transform(mosaics[column])
    by_path = cls(str(EMBEDDED_DIR / name), **params).fit(None).transform(mosaics[column])
    np.testing.assert_array_equal(by_name, again)
    np.testing.assert_array_equal(by_name, by_path)
    assert np.isfinite(by_name).all() and by_name.std(axis=0).mean() > 1e-3  # not a constant feature


def test_unknown_embedded_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="fashion-dit"):
        DiTFeatureExtractor("embedded:nope").fit(None)


def test_demo_end_to_end_on_a_small_sample(tmp_path):
    from sklearn_difffeat.demo import run_demo

    summary = run_demo(n_train=90, n_test=40, output=tmp_path, cv=2, verbose=0)
    assert summary["reload_identical"]
    assert 1 <= summary["evaluations"] < summary["grid_size"]
    assert set(summary["held_out"]) == {"image only", "text only", "fused"}
    for report in summary["held_out"].values():
        assert 0 <= report["mAP"] <= 1 and 0 <= report["CF1"] <= 1 and 0 <= report["OF1"] <= 1
    assert (tmp_path / "image_block_timestep_map.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "summary.json").read_text())["evaluations"] == summary["evaluations"]
