"""Samples of several texts (``text_pooling``) on a tiny random MDLM saved in the hub layout: pooled features
against per-text features computed separately, store reuse with single-text runs, keys, failures and counts."""

import numpy as np
import pandas as pd
import pytest
from test_text_backbones import WORDS, make_tiny_mdlm

from sklearn_difffeat import extract
from sklearn_difffeat.export import export_features
from sklearn_difffeat.extractors import TextDiffusionFeatureExtractor, clear_backbone_cache
from sklearn_difffeat.extractors import text as text_module

RNG = np.random.default_rng(3)
CAPTIONS = [" ".join(RNG.choice(WORDS, size=n)) for n in (4, 7, 3, 9, 5, 6, 2, 8)]
# Each sample a list of captions; caption 2 is shared by samples 0 and 2; sample 3 repeats a caption; sample 4 is a
# plain string.
SAMPLES = [[CAPTIONS[0], CAPTIONS[1], CAPTIONS[2]], [CAPTIONS[3]], [CAPTIONS[2], CAPTIONS[4]],
           [CAPTIONS[5], CAPTIONS[6], CAPTIONS[5]], CAPTIONS[7]]


@pytest.fixture(scope="module")
def mdlm_dir(tmp_path_factory):
    return make_tiny_mdlm(tmp_path_factory.mktemp("mdlm") / "plain", time_conditioning=False)


def make(folder, **params):
    params = {"batch_size": 3, "block": [1, 3], "timestep": [0.0, 0.5], "num_workers": 0, **params}
    return TextDiffusionFeatureExtractor(str(folder), **params).fit()


class Passes:
    """Counts the texts that go through the model (rows entering the token embedding)."""

    def __init__(self, extractor):
        self.rows = 0
        self._hook = extractor.get_backbone().module.vocab_embed.register_forward_hook(self._count)

    def _count(self, module, args, out):
        self.rows += args[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()


def _as_lists(samples):
    return [[s] if isinstance(s, str) else s for s in samples]


def test_mean_first_and_join_equal_the_per_text_features_computed_separately(mdlm_dir):
    # One text per batch: each text's feature is then the same computation in every call (batches of other
    # lengths pad differently, which moves float32 results by ~1e-5), and only the pooling is compared.
    single = make(mdlm_dir, batch_size=1).transform(CAPTIONS).astype(np.float64)
    index = {c: i for i, c in enumerate(CAPTIONS)}
    mean = make(mdlm_dir, text_pooling="mean", batch_size=1).transform(SAMPLES)
    expected = np.stack([single[[index[t] for t in texts]].mean(axis=0) for texts in _as_lists(SAMPLES)])
    assert mean.dtype == np.float32 and mean.shape == expected.shape
    np.testing.assert_allclose(mean, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    first = make(mdlm_dir, text_pooling="first", batch_size=1).transform(SAMPLES)
    np.testing.assert_array_equal(first, single[[index[t[0]] for t in _as_lists(SAMPLES)]].astype(np.float32))
    join = make(mdlm_dir, text_pooling="join", batch_size=1).transform(SAMPLES)
    joined = make(mdlm_dir, batch_size=1).transform([" ".join(t) for t in _as_lists(SAMPLES)])
    np.testing.assert_array_equal(join, joined)


def test_a_series_of_lists_through_a_dataframe_column(mdlm_dir):
    ext = make(mdlm_dir)
    frame = pd.DataFrame({"text": pd.Series(SAMPLES, dtype=object)})
    np.testing.assert_array_equal(ext.transform(frame[["text"]]), ext.transform(SAMPLES))
    np.testing.assert_array_equal(ext.transform(np.array(SAMPLES, dtype=object)), ext.transform(SAMPLES))


def test_keys_a_one_text_list_as_its_text_and_ignore_the_order_of_a_mean(mdlm_dir):
    ext = make(mdlm_dir)
    _, plain = ext.transform_with_report(CAPTIONS[:2])
    _, lists = ext.transform_with_report([[CAPTIONS[0]], (CAPTIONS[1],), [CAPTIONS[0], CAPTIONS[1]],
                                          [CAPTIONS[1], CAPTIONS[0]]])
    assert list(lists.keys[:2]) == list(plain.keys)
    assert lists.keys[2] == lists.keys[3] and lists.keys[2] not in plain.keys
    _, first = make(mdlm_dir, text_pooling="first").transform_with_report([[CAPTIONS[1], CAPTIONS[0]]])
    assert first.keys[0] == plain.keys[1]


def test_each_text_is_computed_once_and_a_store_of_single_texts_is_reused(mdlm_dir, tmp_path):
    cache = str(tmp_path / "store")
    ext = make(mdlm_dir, cache=cache)
    distinct = sorted({t for texts in _as_lists(SAMPLES) for t in texts})
    with Passes(ext) as passes:
        _, report = ext.transform_with_report(SAMPLES)
    # Two timesteps, each distinct text once per timestep (the shared and the repeated captions too).
    assert passes.rows == 2 * len(distinct) and report.computed == len(SAMPLES) and report.stored == 0

    reused = str(tmp_path / "reused")
    single = make(mdlm_dir, cache=reused).transform(CAPTIONS).astype(np.float64)  # a single-text run fills it
    index = {c: i for i, c in enumerate(CAPTIONS)}
    expected = {"mean": [single[[index[t] for t in texts]].mean(axis=0) for texts in _as_lists(SAMPLES)],
                "first": [single[index[texts[0]]] for texts in _as_lists(SAMPLES)]}
    for pooling in ("mean", "first", "mean", "join"):
        lists = make(mdlm_dir, cache=reused, text_pooling=pooling)
        with Passes(lists) as passes:
            features, report = lists.transform_with_report(SAMPLES)
        if pooling == "join":  # joined texts are new texts: computed once, then stored
            assert passes.rows == 2 * sum(isinstance(s, list) and len(s) > 1 for s in SAMPLES)
            continue
        assert passes.rows == 0 and report.computed == 0 and report.stored == len(SAMPLES)
        assert report.from_store.all()
        np.testing.assert_allclose(features, np.stack(expected[pooling]), rtol=1e-6, atol=1e-6)


def test_an_empty_list_or_a_bad_item_names_the_sample(mdlm_dir):
    ext = make(mdlm_dir)
    with pytest.raises(ValueError, match=r"Text 1 is an empty list"):
        ext.transform([[CAPTIONS[0]], []])
    with pytest.raises(ValueError, match=r"Text 2, item 1 is missing"):
        ext.transform([CAPTIONS[0], [CAPTIONS[1]], [CAPTIONS[2], None]])
    with pytest.raises(ValueError, match=r"Text 0, item 0 is empty"):
        ext.transform([["  "], [CAPTIONS[1]]])


def test_extract_lists_failures_and_counts_per_sample_and_reads_back_without_the_model(mdlm_dir, tmp_path,
                                                                                     monkeypatch):
    store = tmp_path / "store"
    samples = [*SAMPLES[:3], [], SAMPLES[3], [CAPTIONS[0], 7], SAMPLES[0]]  # 3 and 5 fail; 6 repeats 0
    result = extract(make(mdlm_dir), samples, store, shard_size=3, progress=False)
    assert sorted(result.failed) == [3, 5]
    assert "empty list" in result.failed[3] and "item 1 is a int, not a string" in result.failed[5]
    # Per shard of 3, distinct good samples: 3 computed, then 1 (and 2 failed), then sample 6 is sample 0, stored.
    assert result.computed == 4 and result.already_stored == 1
    features = result.features()
    assert np.isnan(features[[3, 5]]).all() and not np.isnan(np.delete(features, [3, 5], axis=0)).any()
    direct = make(mdlm_dir).transform([s for i, s in enumerate(samples) if i not in (3, 5)])
    # (shards batch other texts together: float32 sums move by ~1e-6)
    np.testing.assert_allclose(np.delete(features, [3, 5], axis=0), direct, rtol=1e-4, atol=1e-5)

    again = extract(make(mdlm_dir), samples, store, shard_size=3, progress=False)
    assert again.computed == 0 and again.already_stored == 5 and sorted(again.failed) == [3, 5]

    # Read back by key and exported from the manifest, with the weights out of reach.
    clear_backbone_cache()
    monkeypatch.setattr(text_module, "load_text_backbone", _no_load)
    np.testing.assert_array_equal(make(mdlm_dir, cache=str(store)).read_stored(result.keys), features)
    written = result.export(tmp_path / "features.npy")
    np.testing.assert_array_equal(np.load(written[0]), features)
    export_features(result.manifest, tmp_path / "rebuilt.npy")  # the extractor rebuilt from the manifest
    np.testing.assert_array_equal(np.load(tmp_path / "rebuilt.npy"), features)


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded")


def test_pooling_weights_summed_a_block_of_rows_at_a_time():
    import scipy.sparse as sp

    from sklearn_difffeat.extractors._multitext import _weighted_means

    rng = np.random.default_rng(0)
    features = rng.normal(size=(7, 5)).astype(np.float32)
    owner, member = np.array([0, 0, 1, 2, 2, 2, 3, 4]), np.array([0, 6, 1, 2, 3, 2, 5, 4])
    counts = np.bincount(owner)
    weights = sp.csr_matrix((1.0 / counts[owner], (owner, member)), shape=(5, 7))
    expected = np.stack([features[member[owner == g]].astype(np.float64).mean(axis=0) for g in range(5)])
    for rows in (1, 2, 4096):
        np.testing.assert_allclose(_weighted_means(weights, features, rows_at_once=rows), expected, rtol=1e-6)


def test_a_text_that_fails_in_the_model_path_fails_its_sample(mdlm_dir, monkeypatch):
    """A text the tokenizer turns into special tokens alone (here: any text equal to BAD) fails its sample only."""
    bad = CAPTIONS[6]
    original = text_module.tokenize

    def special_only(tokenizer, texts, *args):
        ids, special, lengths, cut = original(tokenizer, texts, *args)
        special[[i for i, t in enumerate(texts) if t == bad]] = True
        return ids, special, lengths, cut

    monkeypatch.setattr(text_module, "tokenize", special_only)
    samples = [[CAPTIONS[0], bad], [CAPTIONS[1]], [CAPTIONS[2], CAPTIONS[3]]]
    features, report = make(mdlm_dir).transform_with_report(samples, on_error="record", offset=10)
    assert list(report.failed) == [0] and report.failed[0].startswith("Text 10, item 1 (")
    assert "gives no tokens besides special tokens" in report.failed[0]
    assert np.isnan(features[0]).all() and np.isfinite(features[1:]).all()
    assert report.computed == 2 and report.stored == 0
    with pytest.raises(ValueError, match=r"Text 0, item 1 \("):
        make(mdlm_dir).transform(samples)
    _, joined = make(mdlm_dir, text_pooling="join").transform_with_report([[bad], [CAPTIONS[1], bad]],
                                                                          on_error="record")
    assert list(joined.failed) == [0] and joined.failed[0].startswith("Text 0, its texts joined, (")
