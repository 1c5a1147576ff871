"""TextDiffusionFeatureExtractor on tiny random models saved in the real layouts."""

import pickle
import warnings

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from test_text_backbones import WORDS, make_tiny_mdlm

from sklearn_difffeat.backbones.mdlm import loglinear_sigma
from sklearn_difffeat.backbones.text import load_text_backbone
from sklearn_difffeat.extractors import TextDiffusionFeatureExtractor, clear_backbone_cache
from sklearn_difffeat.extractors import text as text_module

from conftest import SKLEARN_CHECKS_WITHOUT_DATA

RNG = np.random.default_rng(0)
TEXTS = [" ".join(RNG.choice(WORDS, size=n)) for n in (3, 9, 5, 12, 1, 7, 4, 10)]


@pytest.fixture(scope="module")
def mdlm_dir(tmp_path_factory):
    return make_tiny_mdlm(tmp_path_factory.mktemp("mdlm") / "plain", time_conditioning=False)


@pytest.fixture(scope="module")
def mdlm_tc_dir(tmp_path_factory):
    return make_tiny_mdlm(tmp_path_factory.mktemp("mdlm") / "tc", time_conditioning=True, seed=1, model_length=16)


def make(folder, **params):
    params.setdefault("batch_size", 4)
    return TextDiffusionFeatureExtractor(str(folder), **params).fit(TEXTS)


def manual_features(folder, texts, masks, t, block, pooling="mean"):
    """Features computed by hand: mask the given tokens, run each text alone, pool its tokens."""
    backbone = load_text_backbone(str(folder))
    feats = []
    for text, mask in zip(texts, masks):
        ids = torch.tensor(backbone.tokenizer(text)["input_ids"])[None]
        ids[0, torch.from_numpy(mask)] = backbone.mask_token_id
        sigma = loglinear_sigma(torch.tensor([t])) if backbone.time_conditioned else None
        hidden = backbone.hidden_states(ids, torch.ones_like(ids), sigma, [block])[block][0]
        feats.append({"mean": hidden.mean(0), "max": hidden.amax(0), "first": hidden[0]}[pooling].numpy())
    return np.stack(feats)


def test_t0_masks_nothing_and_equals_clean_forward(mdlm_dir):
    ext = make(mdlm_dir, timestep=0.0, block=2)
    masks = ext.token_masks(TEXTS, 0.0)
    assert not any(m.any() for m in masks)
    X = ext.transform(TEXTS)
    assert X.dtype == np.float32 and X.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(X, manual_features(mdlm_dir, TEXTS, masks, 0.0, 2), atol=1e-5)


def test_t1_masks_everything(mdlm_dir):
    ext = make(mdlm_dir, timestep=1.0)
    assert all(m.all() for m in ext.token_masks(TEXTS, 1.0))
    X = ext.transform(["the cat sat", "blue sea moon", "one two"])
    np.testing.assert_allclose(X[0], X[1], rtol=1e-5, atol=1e-6)  # same token count, all masked: identical inputs
    clean = make(mdlm_dir, timestep=0.0).transform(["the cat sat", "blue sea moon"])
    assert not np.allclose(clean[0], clean[1])


@pytest.mark.parametrize("t", [0.3, 0.5])
def test_masked_fraction_matches_t_and_transform_uses_those_masks(mdlm_dir, t):
    ext = make(mdlm_dir, timestep=t, block=-1)
    many = [" ".join(RNG.choice(WORDS, size=20)) + f" {w}" for w in WORDS for _ in range(2)]
    masks = ext.token_masks(many, t)
    n = sum(m.size for m in masks)
    frac = sum(m.sum() for m in masks) / n
    assert abs(frac - t) < 4 * np.sqrt(t * (1 - t) / n), (frac, n)
    some = TEXTS[:4]
    np.testing.assert_allclose(ext.transform(some), manual_features(mdlm_dir, some, ext.token_masks(some, t), t, 3),
                               atol=1e-5)


def test_masks_nested_across_timesteps(mdlm_dir):
    ext = make(mdlm_dir)
    for low, high in zip(ext.token_masks(TEXTS, 0.2), ext.token_masks(TEXTS, 0.5)):
        assert not (low & ~high).any()


def test_sigma_conditioned_model_gets_matching_sigma(mdlm_tc_dir):
    ext = make(mdlm_tc_dir, timestep=0.4, block=-1, pooling="max")
    some = TEXTS[:3]
    expected = manual_features(mdlm_tc_dir, some, ext.token_masks(some, 0.4), 0.4, 3, pooling="max")
    np.testing.assert_allclose(ext.transform(some), expected, atol=1e-5)


def test_first_pooling(mdlm_dir):
    ext = make(mdlm_dir, timestep=0.0, block=1, pooling="first")
    masks = ext.token_masks(TEXTS, 0.0)
    np.testing.assert_allclose(ext.transform(TEXTS), manual_features(mdlm_dir, TEXTS, masks, 0, 1, "first"),
                               atol=1e-5)


def test_invariant_to_batch_size_padding_and_order(mdlm_dir):
    params = dict(timestep=[0.0, 0.5], block=[1, -1], n_noise_draws=2)
    one = make(mdlm_dir, batch_size=1, **params).transform(TEXTS)
    many = make(mdlm_dir, batch_size=len(TEXTS), **params).transform(TEXTS)
    np.testing.assert_allclose(one, many, atol=1e-5, rtol=1e-5)
    order = np.random.default_rng(1).permutation(len(TEXTS))
    shuffled = make(mdlm_dir, batch_size=3, **params).transform([TEXTS[i] for i in order])
    np.testing.assert_allclose(shuffled, many[order], atol=1e-5, rtol=1e-5)
    # same text, different neighbours: a padded batch of one long and one short text
    alone = make(mdlm_dir, **params).transform([TEXTS[4]])
    padded = make(mdlm_dir, **params).transform([TEXTS[3], TEXTS[4]])[1:]
    np.testing.assert_allclose(alone, padded, atol=1e-5, rtol=1e-5)


def test_noise_draws_and_random_state_change_noisy_features_only(mdlm_dir):
    a = make(mdlm_dir, timestep=[0.0, 0.5], random_state=0).transform(TEXTS)
    b = make(mdlm_dir, timestep=[0.0, 0.5], random_state=1).transform(TEXTS)
    np.testing.assert_array_equal(a[:, :32], b[:, :32])
    assert not np.allclose(a[:, 32:], b[:, 32:])


def test_persistence_round_trip_without_weights(mdlm_dir, tmp_path):
    ext = make(mdlm_dir, timestep=[0.0, 0.3], block=[2, 3])
    before = ext.transform(TEXTS)
    payload = pickle.dumps(ext)
    assert len(payload) < 5000 and b"vocab_embed" not in payload
    joblib.dump(ext, tmp_path / "ext.joblib")
    clear_backbone_cache()  # force the reload from the folder
    after = joblib.load(tmp_path / "ext.joblib").transform(TEXTS)
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(
    "bad, match",
    [
        (["the cat", "", "a dog"], "Text 1 is empty"),
        (["the cat", "  ", "a dog"], "Text 1 is empty"),
        (["the cat", None], "Text 1 is missing"),
        (pd.Series(["the cat", "a dog", np.nan]), "Text 2 is missing"),
        (["the cat", 3], "Text 1 is a int"),
        ("the cat", "single string"),
        ([], "No texts"),
        (np.array([["a", "b"], ["c", "d"]]), "1-D"),
    ],
)
def test_bad_inputs_name_the_index(mdlm_dir, bad, match):
    ext = make(mdlm_dir)
    with pytest.raises(ValueError, match=match):
        ext.transform(bad)


def test_truncation_warns_once_with_count(mdlm_dir):
    ext = make(mdlm_dir, max_length=4, timestep=0.0)
    texts = ["the cat sat on the mat", "a dog", "one two three four five six seven"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X = ext.transform(texts)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "2 of 3 texts" in messages[0]
    np.testing.assert_allclose(X[0], make(mdlm_dir, timestep=0.0).transform(["the cat sat on"])[0], atol=1e-6)


def test_parameter_errors(mdlm_dir):
    with pytest.raises(ValueError, match="out of range"):
        make(mdlm_dir, block=4)
    with pytest.raises(ValueError):
        make(mdlm_dir, timestep=1.5)
    with pytest.raises(ValueError):
        make(mdlm_dir, pooling="none")


def test_feature_names_set_output_clone_set_params(mdlm_dir, monkeypatch):
    clear_backbone_cache()
    loads = []
    real = text_module.load_text_backbone
    monkeypatch.setattr(text_module, "load_text_backbone", lambda *a, **k: loads.append(1) or real(*a, **k))
    ext = make(mdlm_dir, block=[1, -1], timestep=[0, 0.5])
    names = ext.get_feature_names_out()
    assert len(names) == ext.n_features_out_ == 2 * 2 * 32
    assert names[0] == "text_b1_t0_0" and names[-1] == "text_b3_t0.5_31"
    df = clone(ext).set_output(transform="pandas").fit(TEXTS).transform(TEXTS)
    assert isinstance(df, pd.DataFrame) and list(df.columns) == list(names)
    ext.set_params(block=2, timestep=0.0)
    assert ext.fit(TEXTS).transform(TEXTS).shape == (len(TEXTS), 32)
    assert len(loads) == 1  # clones and new parameters reuse the loaded weights


def test_column_transformer_on_dataframe(mdlm_dir):
    df = pd.DataFrame({"text": TEXTS, "x": np.arange(len(TEXTS))})
    ct = ColumnTransformer([("text", TextDiffusionFeatureExtractor(str(mdlm_dir), block=1), "text")],
                           remainder="passthrough").set_output(transform="pandas")
    out = ct.fit_transform(df)
    assert out.shape == (len(TEXTS), 33)
    assert out.columns[0] == "text__text_b1_t0_0" and out.columns[-1] == "remainder__x"
    direct = TextDiffusionFeatureExtractor(str(mdlm_dir), block=1).fit(TEXTS).transform(TEXTS)
    np.testing.assert_allclose(out.iloc[:, :32].to_numpy(), direct, atol=1e-6)
    # a one-column DataFrame works too
    ct2 = ColumnTransformer([("text", TextDiffusionFeatureExtractor(str(mdlm_dir), block=1), ["text"])])
    np.testing.assert_allclose(ct2.fit_transform(df), direct, atol=1e-6)


def test_generic_bert_never_masks_special_tokens(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tok = BertTokenizerFast(str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=32)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ext = TextDiffusionFeatureExtractor(str(tmp_path), timestep=1.0, pooling="first").fit(TEXTS)
    for mask in ext.token_masks(TEXTS, 1.0):
        assert not mask[0] and not mask[-1] and mask[1:-1].all()  # [CLS] ... [SEP]
    X = ext.transform(TEXTS)
    assert X.shape == (len(TEXTS), 32) and np.isfinite(X).all()


@pytest.mark.parametrize("check", SKLEARN_CHECKS_WITHOUT_DATA)
def test_sklearn_checks_that_apply_to_text_input(check):
    # The other checks feed numeric arrays, which a text extractor rightly rejects.
    from sklearn.utils import estimator_checks

    getattr(estimator_checks, check)("TextDiffusionFeatureExtractor", TextDiffusionFeatureExtractor("unused"))


def test_bfloat16_autocast_path_runs_and_stays_close(mdlm_dir):
    # The CUDA default (bf16 autocast), exercised on CPU: padded batch, noise, float32 output.
    fp32 = make(mdlm_dir, timestep=0.3, block=[1, -1]).transform(TEXTS)
    bf16 = make(mdlm_dir, timestep=0.3, block=[1, -1], dtype="bfloat16").transform(TEXTS)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, fp32, atol=0.1, rtol=0.05)
