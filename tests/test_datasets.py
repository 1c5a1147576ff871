"""The embedded Fashion-MNIST mosaic data set and the tiny diffusion models trained on it."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sklearn_difffeat.datasets import (
    CLASS_NAMES,
    _fashion,
    load_fashion_mosaics,
    load_fashion_sources,
    load_fashion_vocabulary,
    mentioned_classes,
)
from sklearn_difffeat.extractors import image as image_extractor

EMBEDDED = Path(_fashion.__file__).resolve().parents[1] / "embedded"


@pytest.fixture(scope="module")
def bunch():
    return load_fashion_mosaics(300, split="train", random_state=0)


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a.frame["image"], b.frame["image"])) and a.frame.drop(
        columns="image"
    ).equals(b.frame.drop(columns="image"))


def test_api_shapes_and_types(bunch):
    X, Y = bunch.data, bunch.Y
    assert list(X.columns) == ["image", "text"]
    assert Y.shape == (300, 10) and set(np.unique(Y)) <= {0, 1} and bunch.target is Y
    assert bunch.label_names == CLASS_NAMES == bunch.target_names
    assert all(im.shape == (56, 56, 3) and im.dtype == np.uint8 for im in X["image"])
    assert all(isinstance(t, str) and t for t in X["text"])
    assert "Fashion-MNIST" in bunch.DESCR
    X2, Y2 = load_fashion_mosaics(300, random_state=0, return_X_y=True)
    assert X2["text"].equals(X["text"]) and np.array_equal(Y2, Y)


def test_deterministic_and_prefix_stable(bunch):
    assert _same(bunch, load_fashion_mosaics(300, split="train", random_state=0))
    other = load_fashion_mosaics(300, split="train", random_state=1)
    assert not other.data["text"].equals(bunch.data["text"])
    # Sample i depends on (random_state, split, i) only: a smaller set is a prefix of a larger one.
    small = load_fashion_mosaics(50, split="train", random_state=0)
    assert small.data["text"].equals(bunch.data["text"].iloc[:50])


def test_labels_match_the_pasted_items(bunch):
    images, labels = load_fashion_sources("train")
    for image, items, sources, y in zip(bunch.frame["image"], bunch.frame["items"], bunch.frame["sources"], bunch.Y):
        assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
        gray = image[..., 0]
        for cell, (c, s) in enumerate(zip(items, sources)):
            r, col = divmod(cell, 2)
            patch = gray[28 * r : 28 * r + 28, 28 * col : 28 * col + 28]
            if c < 0:
                assert s == -1 and not patch.any()
            else:
                assert labels[s] == c and np.array_equal(patch, images[s])
        assert 1 <= sum(c >= 0 for c in items) <= 4
        assert set(np.flatnonzero(y)) == {c for c in items if c >= 0}
    label_cols = bunch.frame[CLASS_NAMES].to_numpy()
    assert np.array_equal(label_cols, bunch.Y)


def test_captions_never_mention_absent_classes():
    b = load_fashion_mosaics(2000, split="test", random_state=3)
    mentions = [mentioned_classes(t) for t in b.data["text"]]
    for text, found, y in zip(b.data["text"], mentions, b.Y):
        assert found <= set(np.flatnonzero(y)), (text, found, np.flatnonzero(y))
    # Captions are partial: about half the labels are mentioned, some captions mention nothing, so the text
    # alone cannot give every label.
    share = sum(len(m) for m in mentions) / b.Y.sum()
    assert 0.35 < share < 0.65
    assert 0.1 < np.mean([len(m) == 0 for m in mentions]) < 0.5
    # Varied wording: many distinct captions, and glosses are used, not only class names.
    assert b.data["text"].nunique() > 1500
    glosses = {g["text"] for entry in load_fashion_vocabulary() for g in entry["glosses"]}
    assert sum(any(g in t for g in glosses) for t in b.data["text"]) > 200
    # Even a mosaic with 3 or more items may get a caption that names none of them.
    assert any(not m for m, y in zip(mentions, b.Y) if y.sum() >= 3)


def test_caption_vocabulary_is_clean():
    # The project's templates, positions and fillers mention no class; each class's glosses and names mention
    # only that class.
    fixed = (
        _fashion.NAME_TEMPLATES
        + _fashion.LIST_TEMPLATES
        + _fashion.GLOSS_TEMPLATES
        + _fashion.FILLERS
        + [_fashion.POS_GLOSS_TEMPLATE]
        + [p.format(cell=c) for p in _fashion.POSITIONS for c in _fashion.CELL_NAMES]
        + [t for ts in _fashion.COUNT_TEMPLATES.values() for t in ts]
    )
    for text in fixed:
        assert mentioned_classes(text.replace("{", "").replace("}", "")) == set(), text
    for c, entry in enumerate(load_fashion_vocabulary()):
        assert entry["name"] == CLASS_NAMES[c]
        for phrase in [n["phrase"] for n in entry["names"]] + [g["text"] for g in entry["glosses"]]:
            assert mentioned_classes(phrase) == {c}, phrase
    assert mentioned_classes("A T-shirt.") == {0}  # hyphenated words stay whole: no Shirt
    assert mentioned_classes("A tee shirt.") == {0, 6}


def test_vocabulary_is_the_shipped_file_and_a_copy():
    import json

    shipped = json.loads((Path(_fashion.__file__).parent / "data" / "fashion_text.json").read_text())["classes"]
    vocab = load_fashion_vocabulary()
    assert vocab == shipped and [entry["name"] for entry in vocab] == CLASS_NAMES
    # Every name's marker is one of its class's markers, so mentioned_classes finds every name.
    assert all(n["marker"] in entry["markers"] for entry in vocab for n in entry["names"])
    # Editing the returned lists leaves the captions' own vocabulary alone.
    vocab[0]["glosses"].clear()
    vocab[0]["markers"].append("sandal")
    assert load_fashion_vocabulary() == shipped
    assert mentioned_classes("a sandal") == {5}


def test_train_and_test_use_disjoint_sources():
    tr_images, tr_labels = load_fashion_sources("train")
    te_images, te_labels = load_fashion_sources("test")
    assert tr_images.shape == (4000, 28, 28) and te_images.shape == (1000, 28, 28)
    assert np.array_equal(np.bincount(tr_labels), [400] * 10) and np.array_equal(np.bincount(te_labels), [100] * 10)
    train_pixels = {im.tobytes() for im in tr_images}
    assert not any(im.tobytes() in train_pixels for im in te_images)
    test = load_fashion_mosaics(100, split="test", random_state=0)
    for image, sources in zip(test.frame["image"], test.frame["sources"]):
        for cell, s in enumerate(sources):
            if s >= 0:
                r, col = divmod(cell, 2)
                assert np.array_equal(image[28 * r : 28 * r + 28, 28 * col : 28 * col + 28, 0], te_images[s])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_samples=0),
        dict(n_samples=2.5),
        dict(split="valid"),
        dict(random_state=-1),
        dict(random_state="a"),
        dict(mention_prob=1.5),
    ],
)
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        load_fashion_mosaics(**{"n_samples": 5, **kwargs})


def test_mention_prob_bounds():
    none = load_fashion_mosaics(100, random_state=0, mention_prob=0.0)
    assert not any(mentioned_classes(t) for t in none.data["text"])
    every = load_fashion_mosaics(100, random_state=0, mention_prob=1.0)
    assert all(mentioned_classes(t) == set(np.flatnonzero(y)) for t, y in zip(every.data["text"], every.Y))


def test_shipped_files_and_licences():
    data = Path(_fashion.__file__).parent / "data"
    assert "Zalando" in (data / "LICENSE_fashion_mnist.txt").read_text()
    assert "Princeton" in (data / "LICENSE_wordnet.txt").read_text()
    assert (data / "fashion_mnist_subset.npz").stat().st_size < 3e6


# ---- the embedded models ----------------------------------------------------------------------------------
def _dit_test_loss(model, scheduler, x0, t):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    steps = torch.full((len(x0),), t, dtype=torch.long)
    labels = torch.full((len(x0),), model.config.num_embeds_ada_norm, dtype=torch.long)
    with torch.no_grad():
        eps = model(scheduler.add_noise(x0, noise, steps), timestep=steps, class_labels=labels).sample
    return torch.mean((eps - noise) ** 2).item()


def test_embedded_dit_loads_and_has_learned():
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from PIL import Image

    folder = EMBEDDED / "fashion-dit"
    model = DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer").float().eval()
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1000
    assert (model.config.sample_size, model.config.patch_size, model.config.in_channels) == (32, 4, 3)
    assert len(model.transformer_blocks) >= 8
    images = load_fashion_mosaics(64, split="test", random_state=5).data["image"]
    x0 = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)) for im in images])
    x0 = torch.from_numpy(x0).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.manual_seed(0)
    fresh = DiTTransformer2DModel.from_config(model.config).eval()
    trained_loss, fresh_loss = _dit_test_loss(model, scheduler, x0, 500), _dit_test_loss(fresh, scheduler, x0, 500)
    assert trained_loss < 0.2 * fresh_loss and trained_loss < 0.2, (trained_loss, fresh_loss)


def test_embedded_mdlm_loads_and_has_learned():
    from sklearn_difffeat.backbones.mdlm import DDiTModel, MDLMBackbone

    backbone = MDLMBackbone.from_pretrained(EMBEDDED / "fashion-mdlm")
    model, tok = backbone.module, backbone.tokenizer
    assert backbone.mask_token_id == tok.mask_token_id and tok.pad_token_id is not None
    assert len(tok) == model.config.vocab_size and (backbone.num_blocks, backbone.width) == (6, 128)
    assert tok.unk_token_id is not None and tok("a sandal")["input_ids"] != [tok.unk_token_id] * 2
    texts = list(load_fashion_mosaics(64, split="test", random_state=5).data["text"])
    enc = tok(texts, padding=True, truncation=True, max_length=model.config.model_length, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]
    masked = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5) & attn.bool()
    noisy = torch.where(masked, torch.full_like(ids, tok.mask_token_id), ids)

    def masked_ce(m):
        with torch.no_grad():
            logits = m(noisy, None, attention_mask=attn)
        return torch.nn.functional.cross_entropy(logits[masked], ids[masked]).item()

    torch.manual_seed(0)
    fresh = DDiTModel(model.config).eval()
    trained, untrained = masked_ce(model), masked_ce(fresh)
    assert trained < 0.5 * untrained, (trained, untrained)


def _training_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "train_embedded.py"
    spec = importlib.util.spec_from_file_location("train_embedded", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train


def test_dit_training_preprocessing_matches_the_extractor():
    # The embedded DiT must see at training time exactly what DiTFeatureExtractor feeds it, also through the
    # on-device resize of the mosaic stream used for training.
    train = _training_script()
    images = np.stack(load_fashion_mosaics(8, split="test", random_state=0).data["image"])
    ours = train.dit_preprocess(images)
    theirs = np.stack(image_extractor.to_uint8_images(images, 32))
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(ours, theirs)
    stream = train.MosaicStream(torch.device("cpu"), torch.Generator().manual_seed(0))
    resized = stream.resize_like_pil(torch.from_numpy(images[..., 0])) / 127.5 - 1
    assert torch.equal(resized, ours[:, 0])
    drawn = stream.sample(16)
    assert drawn.shape == (16, 3, 32, 32) and drawn.min() >= -1 and drawn.max() <= 1


def test_training_script_smoke(tmp_path):
    # A few steps of each model on the CPU through the same code path as a GPU run (--device, --out, --steps).
    from diffusers import DiTTransformer2DModel

    from sklearn_difffeat.backbones.mdlm import MDLMBackbone

    train = _training_script()
    small = ["--device", "cpu", "--steps", "2", "--batch-size", "4", "--n-test", "4"]
    train.main(["dit", *small, "--out", str(tmp_path / "dit")])
    model = DiTTransformer2DModel.from_pretrained(tmp_path / "dit", subfolder="transformer")
    assert model.config.sample_size == 32 and (tmp_path / "dit" / "train_log.txt").is_file()
    train.main(["mdlm", *small, "--texts", "200", "--budget-s", "60", "--out", str(tmp_path / "mdlm")])
    backbone = MDLMBackbone.from_pretrained(tmp_path / "mdlm")
    assert backbone.num_blocks == 6 and "saved to" in (tmp_path / "mdlm" / "train_log.txt").read_text()
