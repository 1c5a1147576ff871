"""DiTFeatureExtractor against diffusers' own forward and scheduler, on tiny random models loaded by path."""

import pickle
import subprocess
import sys

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from PIL import Image
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline

from sklearn_difffeat import DiTFeatureExtractor, FeatureStore
from sklearn_difffeat.extractors import clear_backbone_cache
from sklearn_difffeat.extractors.image import to_uint8_images

from conftest import SKLEARN_CHECKS_WITHOUT_DATA, TINY_DIT_LAYERS

RES = 16  # tiny VAE: 2x downsampling to an 8x8 latent


def _capture_noisy_inputs(extractor):
    """Record every x_t the extractor feeds the transformer (inputs of its patch embedding)."""
    transformer = extractor.get_backbone().transformer
    seen = []
    handle = transformer.pos_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen, handle


def _reference_block_means(folder, x_t, t, label):
    """Mean-pooled block outputs from the full diffusers forward, captured by forward hooks."""
    transformer = DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    outputs = {}
    hooks = [transformer.pos_embed.register_forward_hook(lambda m, a, o: outputs.__setitem__(0, o))]
    for k, block in enumerate(transformer.transformer_blocks, start=1):
        hooks.append(block.register_forward_hook(lambda m, a, o, k=k: outputs.__setitem__(k, o)))
    with torch.no_grad():
        n = x_t.shape[0]
        transformer(x_t, timestep=torch.full((n,), t), class_labels=torch.full((n,), label))
    for h in hooks:
        h.remove()
    return {k: v.mean(dim=1).numpy() for k, v in outputs.items()}


def test_every_block_matches_hooked_full_forward(tiny_dit_dir, rgb_images):
    t = 300
    for k in range(TINY_DIT_LAYERS + 1):
        ext = DiTFeatureExtractor(str(tiny_dit_dir), block=k, timestep=t, batch_size=16).fit(rgb_images)
        seen, handle = _capture_noisy_inputs(ext)
        features = ext.transform(rgb_images)
        handle.remove()
        x_t = torch.cat(seen)
        reference = _reference_block_means(tiny_dit_dir, x_t, t, label=10)  # 10 = null class of the tiny model
        assert np.abs(features - reference[k]).max() <= 1e-5, k


def test_class_label_is_fed(tiny_dit_dir, rgb_images):
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=3, timestep=50, class_label=4).fit(rgb_images)
    seen, handle = _capture_noisy_inputs(ext)
    features = ext.transform(rgb_images)
    handle.remove()
    reference = _reference_block_means(tiny_dit_dir, torch.cat(seen), 50, label=4)
    np.testing.assert_allclose(features, reference[3], atol=1e-5)
    null = DiTFeatureExtractor(str(tiny_dit_dir), block=3, timestep=50).fit(rgb_images).transform(rgb_images)
    assert np.abs(null - features).max() > 1e-4


def test_noisy_latent_is_scheduler_add_noise(tiny_dit_dir):
    images = np.random.default_rng(1).integers(0, 256, size=(4, RES, RES, 3), dtype=np.uint8)  # no resize
    vae = AutoencoderKL.from_pretrained(tiny_dit_dir, subfolder="vae").eval()
    scheduler = DDPMScheduler.from_pretrained(tiny_dit_dir, subfolder="scheduler")
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        x0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=1, timestep=[200, 700, 0]).fit(images)
    seen, handle = _capture_noisy_inputs(ext)
    ext.transform(images)
    handle.remove()
    x200, x700, x0_noised = seen
    # The noise, recovered from t = 200, must be the one used at t = 700 and t = 0 (common random numbers).
    abar = scheduler.alphas_cumprod
    eps = (x200 - abar[200].sqrt() * x0) / (1 - abar[200]).sqrt()
    for t, x_t in ((700, x700), (0, x0_noised)):
        expected = scheduler.add_noise(x0, eps, torch.full((4,), t))
        assert torch.allclose(x_t, expected, atol=1e-4), t
    # and it is standard normal noise, different per image
    assert abs(eps.mean()) < 0.15 and abs(eps.std() - 1) < 0.15
    assert not torch.allclose(eps[0], eps[1])


def test_pixel_space_model_noises_the_image(tiny_pixel_dit_dir):
    images = np.random.default_rng(2).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    scheduler = DDPMScheduler.from_pretrained(tiny_pixel_dit_dir, subfolder="scheduler")
    ext = DiTFeatureExtractor(str(tiny_pixel_dit_dir), block=2, timestep=[100, 400]).fit(images)
    seen, handle = _capture_noisy_inputs(ext)
    ext.transform(images)
    handle.remove()
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    abar = scheduler.alphas_cumprod
    eps = (seen[0] - abar[100].sqrt() * x0) / (1 - abar[100]).sqrt()
    assert torch.allclose(seen[1], scheduler.add_noise(x0, eps, torch.full((3,), 400)), atol=1e-4)


def test_features_do_not_depend_on_batch_or_order(tiny_dit_dir, rgb_images):
    kwargs = dict(block=[2, 5], timestep=[100, 600])
    reference = (
        DiTFeatureExtractor(str(tiny_dit_dir), batch_size=len(rgb_images), **kwargs)
        .fit(rgb_images)
        .transform(rgb_images)
    )
    for batch_size in (1, 3):
        got = (
            DiTFeatureExtractor(str(tiny_dit_dir), batch_size=batch_size, **kwargs)
            .fit(rgb_images)
            .transform(rgb_images)
        )
        np.testing.assert_allclose(got, reference, atol=1e-5)
    order = np.random.default_rng(0).permutation(len(rgb_images))
    shuffled = (
        DiTFeatureExtractor(str(tiny_dit_dir), batch_size=3, **kwargs).fit(rgb_images).transform(rgb_images[order])
    )
    np.testing.assert_allclose(shuffled, reference[order], atol=1e-5)
    # a sample's features do not depend on the other samples
    alone = DiTFeatureExtractor(str(tiny_dit_dir), **kwargs).fit(rgb_images).transform(rgb_images[4:5])
    np.testing.assert_allclose(alone, reference[4:5], atol=1e-5)


def test_batch_size_changes_noise_never_and_features_only_by_float32_rounding(tiny_pixel_dit_dir):
    """The noisy model input is bit-identical for any batch size (pixel space: nothing batched comes before it);
    features agree within the bound docs/guide.md states: 1e-6 times the largest feature value."""
    images = np.random.default_rng(2).integers(0, 256, size=(64, 8, 8, 3), dtype=np.uint8)
    inputs, features = {}, {}
    for batch in (1, 7, 64):
        ext = DiTFeatureExtractor(str(tiny_pixel_dit_dir), block=[1, 3, 5], timestep=[0, 100, 500],
                                  batch_size=batch).fit(None)
        seen, handle = _capture_noisy_inputs(ext)
        features[batch] = ext.transform(images)
        handle.remove()
        per_step = [torch.cat(seen[i::3]) for i in range(3)]  # the batches of each timestep, in input order
        inputs[batch] = torch.stack(per_step)
    for batch in (1, 7):
        assert torch.equal(inputs[batch], inputs[64])
        assert np.abs(features[batch] - features[64]).max() <= 1e-6 * np.abs(features[64]).max()


def test_features_identical_across_processes(tiny_dit_dir, rgb_images, tmp_path):
    np.save(tmp_path / "x.npy", rgb_images)
    script = (
        "import numpy as np, sys; from sklearn_difffeat import DiTFeatureExtractor;"
        f"X = np.load({str(tmp_path / 'x.npy')!r});"
        f"F = DiTFeatureExtractor({str(tiny_dit_dir)!r}, block=3, timestep=250, batch_size=2).fit(X).transform(X);"
        f"np.save({str(tmp_path / 'f.npy')!r}, F)"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    here = (
        DiTFeatureExtractor(str(tiny_dit_dir), block=3, timestep=250, batch_size=2)
        .fit(rgb_images)
        .transform(rgb_images)
    )
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), here)


def test_different_blocks_differ_and_one_pass_serves_all_blocks(tiny_dit_dir, rgb_images):
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=[1, 3], timestep=400).fit(rgb_images)
    transformer = ext.get_backbone().transformer
    calls = {"embed": 0, "blocks": [0] * TINY_DIT_LAYERS}
    hooks = [transformer.pos_embed.register_forward_hook(lambda *a: calls.__setitem__("embed", calls["embed"] + 1))]
    for k, block in enumerate(transformer.transformer_blocks):
        hooks.append(
            block.register_forward_hook(lambda *a, k=k: calls["blocks"].__setitem__(k, calls["blocks"][k] + 1))
        )
    features = ext.transform(rgb_images)
    for h in hooks:
        h.remove()
    assert calls["embed"] == 1  # one batch, one pass for both blocks
    assert calls["blocks"] == [1, 1, 1, 0, 0]  # truncated after block 3
    width = transformer.inner_dim
    b1, b3 = features[:, :width], features[:, width:]
    assert np.abs(b1 - b3).max() > 1e-3
    single = DiTFeatureExtractor(str(tiny_dit_dir), block=3, timestep=400).fit(rgb_images).transform(rgb_images)
    np.testing.assert_array_equal(b3, single)


def test_feature_layout_names_and_pooling(tiny_dit_dir, rgb_images):
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=[4, -1], timestep=[10, 20]).fit(rgb_images)
    names = ext.get_feature_names_out()
    assert names[0] == "dit_b4_t10_0" and names[16] == "dit_b4_t20_0" and names[-1] == "dit_b5_t20_15"
    assert ext.transform(rgb_images).shape == (7, 4 * 16) == (7, ext.n_features_out_)
    flat = DiTFeatureExtractor(str(tiny_dit_dir), block=2, pooling="none").fit(rgb_images).transform(rgb_images)
    mean = DiTFeatureExtractor(str(tiny_dit_dir), block=2, pooling="mean").fit(rgb_images).transform(rgb_images)
    biggest = DiTFeatureExtractor(str(tiny_dit_dir), block=2, pooling="max").fit(rgb_images).transform(rgb_images)
    tokens = flat.reshape(7, 16, 16)  # 16 tokens (8x8 latent, patch 2) of width 16
    np.testing.assert_allclose(tokens.mean(axis=1), mean, atol=1e-5)
    np.testing.assert_allclose(tokens.max(axis=1), biggest, atol=1e-6)


def test_noise_draws_average(tiny_dit_dir, rgb_images):
    one = DiTFeatureExtractor(str(tiny_dit_dir), block=2, timestep=900).fit(rgb_images).transform(rgb_images)
    two = (
        DiTFeatureExtractor(str(tiny_dit_dir), block=2, timestep=900, n_noise_draws=2)
        .fit(rgb_images)
        .transform(rgb_images)
    )
    other_seed = (
        DiTFeatureExtractor(str(tiny_dit_dir), block=2, timestep=900, random_state=1)
        .fit(rgb_images)
        .transform(rgb_images)
    )
    assert np.abs(one - two).max() > 1e-4 and np.abs(one - other_seed).max() > 1e-4


def test_sklearn_contract(tiny_dit_dir, rgb_images):
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=2, timestep=100).fit(rgb_images)
    loaded = ext.get_backbone()
    twin = clone(ext).set_params(block=4).fit(rgb_images)
    assert twin.get_backbone() is loaded  # set_params / clone reuse the loaded weights
    frame = twin.set_output(transform="pandas").transform(rgb_images)
    assert isinstance(frame, pd.DataFrame) and list(frame.columns[:2]) == ["dit_b4_t100_0", "dit_b4_t100_1"]
    with pytest.raises(Exception, match="not fitted"):
        DiTFeatureExtractor(str(tiny_dit_dir)).transform(rgb_images)


def test_column_transformer_on_dataframe(tiny_dit_dir, rgb_images):
    frame = pd.DataFrame({"image": list(rgb_images), "other": np.arange(7)})
    ct = ColumnTransformer([("image", DiTFeatureExtractor(str(tiny_dit_dir), block=2, timestep=100), "image")])
    out = Pipeline([("features", ct.set_output(transform="pandas"))]).fit_transform(frame)
    direct = DiTFeatureExtractor(str(tiny_dit_dir), block=2, timestep=100).fit(rgb_images).transform(rgb_images)
    assert out.columns[0] == "image__dit_b2_t100_0"
    np.testing.assert_allclose(out.to_numpy(), direct, atol=1e-6)


def _model_inputs(ext, X):
    """The pixels (in [-1, 1]) the extractor hands the VAE for X, in input order."""
    seen = []
    handle = ext.get_backbone().vae.encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    features = ext.transform(X)
    handle.remove()
    return torch.cat(seen), features


def test_input_kinds_reach_the_model_as_the_same_pixels(tiny_dit_dir, rgb_images, tmp_path):
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=2, timestep=100, num_workers=0).fit(rgb_images)
    reference, features = _model_inputs(ext, rgb_images)
    pil = [Image.fromarray(a) for a in rgb_images]
    paths = []
    for i, image in enumerate(pil):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    floats = rgb_images.astype(np.float64) / 255
    for variant in (pil, paths, pd.Series(list(rgb_images)), floats, list(rgb_images)):
        torch.testing.assert_close(_model_inputs(ext, variant)[0], reference, rtol=0, atol=0)
    gray = rgb_images[..., 0]
    torch.testing.assert_close(_model_inputs(ext, gray)[0], _model_inputs(ext, np.repeat(gray[..., None], 3, -1))[0])
    # A stacked array, a list of its rows and a Series of them are one sample each: the same keys, the same noise.
    for variant in (list(rgb_images), pd.Series(list(rgb_images))):
        np.testing.assert_allclose(ext.transform(variant), features, rtol=1e-6, atol=1e-7)


def test_resize_and_center_crop(tiny_dit_dir):
    # A 16x32 image whose middle 16x16 square is the only content: the crop must keep exactly it.
    rng = np.random.default_rng(3)
    middle = rng.integers(0, 256, size=(RES, RES, 3), dtype=np.uint8)
    wide = np.zeros((RES, 2 * RES, 3), dtype=np.uint8)
    wide[:, RES // 2 : RES // 2 + RES] = middle
    np.testing.assert_array_equal(to_uint8_images([wide], RES)[0], middle)
    tall = np.swapaxes(wide, 0, 1).copy()
    np.testing.assert_array_equal(to_uint8_images([tall], RES)[0], np.swapaxes(middle, 0, 1))
    # a 2x larger image is resized (bicubic on the shorter side), not cropped
    big = np.asarray(Image.fromarray(middle).resize((2 * RES, 2 * RES), Image.BICUBIC))
    assert np.abs(to_uint8_images([big], RES)[0].astype(int) - middle).mean() < 40


def test_joblib_round_trip_reloads_weights(tiny_dit_dir, rgb_images, tmp_path):
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=[1, 3], timestep=[100, 800]).fit(rgb_images)
    before = ext.transform(rgb_images)
    joblib.dump(ext, tmp_path / "ext.joblib")
    assert (tmp_path / "ext.joblib").stat().st_size < 1_000_000
    assert b"transformer_blocks" not in pickle.dumps(ext)
    clear_backbone_cache()  # as in a fresh process
    restored = joblib.load(tmp_path / "ext.joblib")
    np.testing.assert_array_equal(restored.transform(rgb_images), before)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((0, 16, 16, 3), np.uint8), "0 samples|No images"),
        ([], "No images"),
        (np.zeros((16, 16), np.uint8), r"shape \(n, H, W\)"),
        (np.zeros((2, 16, 16, 5), np.uint8), r"C in 1, 3, 4; got shape \(2, 16, 16, 5\)"),
        (np.zeros((16, 16, 3), np.uint8), r"looks like one \(H, W, C\) image; pass a batch of one as X\[None\]"),
        ([np.zeros((16, 16, 3)), np.full((16, 16, 3), np.nan)], "Image 1: contains NaN"),
        ([np.zeros((16, 16, 3)), np.full((16, 16, 3), 2.0)], r"Image 1: float pixels must lie in \[0, 1\]"),
        ([np.zeros((16, 16, 3), np.uint8), "no/such/file.png"], r"Image 1 \('no/such/file\.png'\): cannot read file"),
        ([np.zeros((16, 16, 3), np.uint8), 42], "Image 1: expected a PIL image"),
        ([np.zeros((16, 16, 3), np.uint8), np.zeros((0, 16, 3), np.uint8)], "Image 1: empty"),
        ([np.zeros((16, 16, 3), np.complex64)], "Image 0: unsupported dtype"),
    ],
)
def test_bad_images_raise_naming_the_sample(tiny_dit_dir, bad, message):
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=1).fit(None)
    with pytest.raises(ValueError, match=message):
        ext.transform(bad)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(block=6), r"block=6 is out of range .* 0\.\.5"),
        (dict(block=-7), "out of range"),
        (dict(block=[1, 1]), "twice"),
        (dict(block=[]), "empty"),
        (dict(timestep=1000), r"\[0, 999\]"),
        (dict(timestep=[10, 2.5]), "2.5"),
        (dict(pooling="first"), "pooling"),
        (dict(batch_size=0), "batch_size"),
        (dict(class_label=11), "class_label=11 is out of range"),
    ],
)
def test_bad_parameters(tiny_dit_dir, rgb_images, params, message):
    with pytest.raises(ValueError, match=message):
        DiTFeatureExtractor(str(tiny_dit_dir), **{"block": 1, **params}).fit(rgb_images).transform(rgb_images)


def test_missing_model_folder_is_explained(tmp_path):
    with pytest.raises(ValueError, match="not a DiT pipeline folder"):
        DiTFeatureExtractor(str(tmp_path)).fit(None)
    with pytest.raises(ValueError, match="does not exist"):
        DiTFeatureExtractor(str(tmp_path / "nope")).fit(None)


@pytest.mark.parametrize("check", SKLEARN_CHECKS_WITHOUT_DATA)
def test_sklearn_checks_that_apply_to_image_input(check):
    # The other checks feed 2-D numeric tables, which an image extractor rightly rejects.
    from sklearn.utils import estimator_checks

    getattr(estimator_checks, check)("DiTFeatureExtractor", DiTFeatureExtractor("unused"))


def test_fit_does_not_change_parameters(tiny_dit_dir, rgb_images):
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=[1, -1], timestep=[5, 50])
    before = ext.get_params()
    ext.fit(rgb_images).transform(rgb_images)
    assert ext.get_params() == before


def test_bfloat16_autocast_path_stays_close(tiny_dit_dir, rgb_images):
    # The CUDA default (bf16 autocast), exercised on CPU; features still come back as float32.
    fp32 = DiTFeatureExtractor(str(tiny_dit_dir), block=[1, 4], timestep=300).fit(rgb_images).transform(rgb_images)
    bf16 = (
        DiTFeatureExtractor(str(tiny_dit_dir), block=[1, 4], timestep=300, dtype="bfloat16")
        .fit(rgb_images)
        .transform(rgb_images)
    )
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, fp32, atol=0.1, rtol=0.05)


def test_out_of_memory_halves_the_batch_and_goes_on(tiny_dit_dir, rgb_images, monkeypatch):
    reference = DiTFeatureExtractor(str(tiny_dit_dir), block=2, timestep=300).fit(rgb_images).transform(rgb_images)
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=2, timestep=300, batch_size=8).fit(rgb_images)
    backbone = ext.get_backbone()
    real = type(backbone).hidden_states
    sizes = []

    def fails_above_two(self, x_t, *args, **kwargs):
        sizes.append(len(x_t))
        if len(x_t) > 2:  # as CUDA would on a card that fits only two images
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x_t, *args, **kwargs)

    monkeypatch.setattr(type(backbone), "hidden_states", fails_above_two)
    np.testing.assert_allclose(ext.transform(rgb_images), reference, atol=1e-5)
    assert sizes[:3] == [7, 4, 2] and set(sizes[3:]) <= {1, 2}  # halved until it fits, then kept
    assert sum(s for s in sizes if s <= 2) == len(rgb_images)  # every image computed exactly once

    def always_fails(self, *args, **kwargs):
        raise torch.OutOfMemoryError("x")

    monkeypatch.setattr(type(backbone), "hidden_states", always_fails)
    one = DiTFeatureExtractor(str(tiny_dit_dir), block=2, timestep=300, batch_size=1).fit(rgb_images)
    with pytest.raises(torch.OutOfMemoryError):  # a batch of one that does not fit is reported, not looped on
        one.transform(rgb_images)


def test_compile_wraps_each_block_and_keeps_features(tiny_dit_dir, rgb_images, monkeypatch):
    # Inductor would spend minutes compiling C++ on a CPU test machine; dynamo's eager backend still traces
    # the blocks the way compile=True calls them.
    compiled = []
    real_compile = torch.compile

    def spy(module, **kwargs):
        compiled.append(module)
        return real_compile(module, backend="eager")


    monkeypatch.setattr(torch, "compile", spy)
    plain = DiTFeatureExtractor(str(tiny_dit_dir), block=[2, 4], timestep=300).fit(rgb_images).transform(rgb_images)
    got = (
        DiTFeatureExtractor(str(tiny_dit_dir), block=[2, 4], timestep=300, compile=True)
        .fit(rgb_images)
        .transform(rgb_images)
    )
    # every block, plus the VAE encoder path
    assert sum(isinstance(m, torch.nn.Module) for m in compiled) == TINY_DIT_LAYERS
    assert len(compiled) == TINY_DIT_LAYERS + 1
    np.testing.assert_allclose(got, plain, atol=1e-5)


def test_built_modules_work_and_are_never_confused(tiny_dit_dir, rgb_images):
    from diffusers import AutoencoderKL, DDIMScheduler

    def modules(scale):
        transformer = DiTTransformer2DModel.from_pretrained(tiny_dit_dir, subfolder="transformer")
        with torch.no_grad():
            for p in transformer.parameters():
                p.mul_(scale)
        return {
            "transformer": transformer,
            "vae": AutoencoderKL.from_pretrained(tiny_dit_dir, subfolder="vae"),
            "scheduler": DDIMScheduler.from_pretrained(tiny_dit_dir, subfolder="scheduler"),
        }

    by_path = DiTFeatureExtractor(str(tiny_dit_dir), block=3, timestep=100).fit(None).transform(rgb_images)
    # Each dict is dropped right after use, so Python could hand its id to the next one.
    same = DiTFeatureExtractor(modules(1.0), block=3, timestep=100).fit(None).transform(rgb_images)
    scaled = DiTFeatureExtractor(modules(0.5), block=3, timestep=100).fit(None).transform(rgb_images)
    np.testing.assert_allclose(same, by_path, atol=1e-6)
    assert np.abs(scaled - same).max() > 1e-3


def test_loaded_backbone_keeps_its_source_alive(tiny_dit_dir, rgb_images):
    # The registry keys built modules by id(); holding the source object keeps that id from being reused by
    # another object (and so another model) while the entry lives.
    import gc
    import weakref

    from sklearn_difffeat.backbones.dit import load_dit_backbone

    class Pipeline:  # pipeline-like object: the extractor builds a new backbone from its parts
        pass

    source = Pipeline()
    loaded = load_dit_backbone(str(tiny_dit_dir))
    source.transformer, source.scheduler, source.vae = loaded.transformer, loaded.scheduler, loaded.vae
    del loaded
    ref = weakref.ref(source)
    DiTFeatureExtractor(source, block=1).fit(None).transform(rgb_images)
    del source
    gc.collect()
    assert ref() is not None
    clear_backbone_cache()
    gc.collect()
    assert ref() is None


def test_two_threads_asking_for_one_model_load_it_once(tiny_dit_dir, monkeypatch):
    import threading
    import time

    from sklearn_difffeat.extractors import image as image_module

    loads = []
    real = image_module.load_dit_backbone

    def slow_load(*args, **kwargs):
        loads.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the other thread to ask while this load runs
        return real(*args, **kwargs)

    monkeypatch.setattr(image_module, "load_dit_backbone", slow_load)
    clear_backbone_cache()
    start = threading.Barrier(2)
    got = [None, None]

    def ask(i):
        start.wait()
        got[i] = DiTFeatureExtractor(str(tiny_dit_dir), block=1).get_backbone()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1
    assert got[0] is got[1] is not None
    # another model (here: another dtype) still loads on its own
    DiTFeatureExtractor(str(tiny_dit_dir), block=1, dtype="bfloat16").get_backbone()
    assert len(loads) == 2


def test_feature_layout_against_a_hand_built_expectation(tiny_dit_dir, tiny_pixel_dit_dir, rgb_images, tmp_path):
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=[4, -1], timestep=[10, 20], cache=str(tmp_path)).fit(None)
    layout = ext.feature_layout()
    width = 2 * 8  # heads x head width of the tiny DiT
    assert layout.blocks == (4, TINY_DIT_LAYERS) and layout.timesteps == (10, 20) and layout.width == width
    names = [f"dit_b{b}_t{t}_{j}" for b in (4, 5) for t in (10, 20) for j in range(width)]
    assert list(layout.feature_names) == names == list(ext.get_feature_names_out())
    assert set(layout.namespaces) == {(4, 10), (4, 20), (5, 10), (5, 20)}
    assert len(set(layout.namespaces.values())) == 4 and set(layout.descriptions) == set(layout.namespaces.values())
    for (b, t), name in layout.namespaces.items():
        assert name.startswith(f"dit-b{b}-t{t}-")
        assert layout.descriptions[name]["block"] == b and layout.descriptions[name]["timestep"] == t
    # other blocks, indexed as the block parameter; a shared (block, timestep) keeps its namespace
    other = ext.feature_layout(blocks=[0, -2])
    assert other.blocks == (0, 4) and other.namespaces[4, 20] == layout.namespaces[4, 20]
    with pytest.raises(ValueError, match="blocks=9 is out of range"):
        ext.feature_layout(blocks=9)
    # the namespaces are where transform stores the features
    ext.transform(rgb_images)
    assert set(layout.namespaces.values()) <= set(FeatureStore(tmp_path).namespaces())

    def namespace(model=str(tiny_dit_dir), **change):
        params = {"block": 4, "timestep": 10, **change}
        return DiTFeatureExtractor(model, **params).fit(None).feature_layout().namespaces[4, 10]

    base = namespace()
    for change in [dict(pooling="max"), dict(n_noise_draws=2), dict(random_state=1), dict(class_label=3),
                   dict(dtype="bfloat16"), dict(model=str(tiny_pixel_dit_dir))]:
        assert namespace(**change) != base, change
    for change in [dict(batch_size=3), dict(num_workers=0), dict(verbose=1), dict(cache=str(tmp_path)),
                   dict(cache=str(tmp_path), cache_depth=-1), dict(block=[1, 4]), dict(timestep=[10, 99])]:
        assert namespace(**change) == base, change
    with pytest.raises(NotFittedError):
        DiTFeatureExtractor(str(tiny_dit_dir)).feature_layout()
