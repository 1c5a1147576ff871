"""The extraction engine with the feature store: what is computed once, what survives a kill, what is never
decoded, what bad files and folders do, and that none of it changes a feature."""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sklearn_difffeat import DiTFeatureExtractor, FeatureStore, TextDiffusionFeatureExtractor
from sklearn_difffeat.extractors import _images, _runtime

from conftest import PassCounter, build_tiny_dit_pipeline

BLOCKS, STEPS = [1, 4], [50, 600]


def ext_for(model, **params):
    params = {"block": BLOCKS, "timestep": STEPS, **params}
    return DiTFeatureExtractor(str(model), **params).fit(None)


def test_latents_once_and_features_reused(tiny_dit_dir, rgb_images, tmp_path):
    kwargs = dict(block=[2, 3], timestep=[100, 500, 900], cache=str(tmp_path), batch_size=3)
    ext = DiTFeatureExtractor(str(tiny_dit_dir), **kwargs).fit(rgb_images)
    counter = PassCounter(ext)
    first = ext.transform(rgb_images)
    assert counter.encoded == len(rgb_images)  # once per image, not once per timestep
    assert counter.passes == 3 * 3  # 3 timesteps x 3 batches
    counter.passes = counter.encoded = 0
    again = DiTFeatureExtractor(str(tiny_dit_dir), **kwargs).fit(rgb_images).transform(rgb_images)
    assert counter.passes == 0 and counter.encoded == 0
    np.testing.assert_array_equal(again, first)
    # a new timestep needs passes, but no VAE encoding: latents come from the store
    DiTFeatureExtractor(str(tiny_dit_dir), **{**kwargs, "timestep": 300}).fit(rgb_images).transform(rgb_images)
    assert counter.passes == 3 and counter.encoded == 0
    counter.close()
    uncached = DiTFeatureExtractor(str(tiny_dit_dir), **{**kwargs, "cache": None}).fit(rgb_images).transform(rgb_images)
    np.testing.assert_allclose(first, uncached, atol=1e-6)


def test_cache_depth_serves_other_blocks_without_a_pass(tiny_dit_dir, rgb_images, tmp_path):
    base = dict(timestep=200, cache=str(tmp_path), cache_depth=-1, batch_size=len(rgb_images))
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=1, **base).fit(rgb_images)
    counter = PassCounter(ext)
    ext.transform(rgb_images)
    assert counter.passes == 1 and counter.deepest == 5  # ran to the cache depth once
    for block in (0, 2, 4, 5, [3, 1]):
        got = DiTFeatureExtractor(str(tiny_dit_dir), block=block, **base).fit(rgb_images).transform(rgb_images)
        plain = DiTFeatureExtractor(str(tiny_dit_dir), block=block, timestep=200).fit(rgb_images).transform(rgb_images)
        np.testing.assert_allclose(got, plain, atol=1e-6)
    assert counter.passes == 1 + len((0, 2, 4, 5, [3, 1]))  # the "plain" runs only
    counter.close()


def test_parameters_that_change_features_do_not_share_entries(tiny_dit_dir, rgb_images, tmp_path):
    base = dict(block=2, timestep=300, cache=str(tmp_path))
    a = DiTFeatureExtractor(str(tiny_dit_dir), **base).fit(rgb_images).transform(rgb_images)
    changes = (dict(random_state=5), dict(pooling="max"), dict(class_label=3), dict(n_noise_draws=2),
               dict(dtype="bfloat16"))  # features computed in bfloat16 are never served to float32, or back
    for change in changes:
        cached = DiTFeatureExtractor(str(tiny_dit_dir), **base, **change).fit(rgb_images).transform(rgb_images)
        fresh = DiTFeatureExtractor(str(tiny_dit_dir), **{**base, "cache": None}, **change).fit(None)
        np.testing.assert_allclose(cached, fresh.transform(rgb_images), atol=1e-6)
        assert np.abs(cached - a).max() > 1e-5, change


def test_identical_samples_are_computed_once(tiny_dit_dir, rgb_images):
    ext = ext_for(tiny_dit_dir)
    counter = PassCounter(ext)
    repeated = np.concatenate([rgb_images, rgb_images[::-1], rgb_images[:2]])
    features = ext.transform(repeated)
    assert counter.rows == len(rgb_images) * len(STEPS) and counter.encoded == len(rgb_images)
    counter.close()
    n = len(rgb_images)
    np.testing.assert_array_equal(features[n:2 * n], features[:n][::-1])
    np.testing.assert_array_equal(features[2 * n:], features[:2])


def test_features_identical_for_any_workers_batch_size_and_order(tiny_dit_dir, rgb_images, tmp_path):
    files = []
    for i, image in enumerate(rgb_images):  # file inputs go through the DataLoader workers
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(files[-1])
    reference = ext_for(tiny_dit_dir, num_workers=0, batch_size=64).transform(files)
    for workers, batch in ((2, 64), (0, 1), (2, 7), (2, 1)):
        got = ext_for(tiny_dit_dir, num_workers=workers, batch_size=batch).transform(files)
        np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-6)
    order = np.random.default_rng(0).permutation(len(files))
    shuffled = ext_for(tiny_dit_dir, num_workers=2, batch_size=3).transform([files[i] for i in order])
    np.testing.assert_allclose(shuffled, reference[order], rtol=1e-6, atol=1e-6)


def test_fully_stored_run_over_paths_decodes_nothing(tiny_dit_dir, rgb_images, tmp_path, monkeypatch):
    files = []
    for i, image in enumerate(rgb_images):
        files.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(image).save(files[-1], quality=95)
    ext = ext_for(tiny_dit_dir, cache=str(tmp_path / "store"), num_workers=0)
    first = ext.transform(files)
    decoded = []
    real = _images.decode_image  # every decoding path (in-process, threads, DataLoader workers) goes through it
    monkeypatch.setattr(_images, "decode_image", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    counter = PassCounter(ext)
    np.testing.assert_array_equal(ext.transform(files), first)
    assert decoded == [] and counter.passes == 0
    # a new timestep decodes nothing either: the clean latents are stored too
    ext_for(tiny_dit_dir, timestep=[50, 600, 999], cache=str(tmp_path / "store"), num_workers=0).transform(files)
    assert decoded == [] and counter.rows == len(files) and counter.encoded == 0
    counter.close()


def test_damaged_segment_is_recomputed_not_read(tiny_dit_dir, rgb_images, tmp_path):
    store_dir = tmp_path / "store"
    reference = ext_for(tiny_dit_dir, cache=str(store_dir)).transform(rgb_images)
    for data in store_dir.glob("dit-b4-t600-*/*.npy"):
        array = np.load(data)
        np.save(data, array + 1.0)  # same shape, wrong values: only the checksum can tell
    fresh = ext_for(tiny_dit_dir, cache=str(store_dir))  # a new process would open the store anew
    _runtime.clear_store_cache()
    counter = PassCounter(fresh)
    with pytest.warns(RuntimeWarning, match="checksum"):
        got = fresh.transform(rgb_images)
    np.testing.assert_allclose(got, reference, atol=1e-6)
    assert counter.rows == len(rgb_images)  # only timestep 600 was recomputed
    counter.close()


def test_damaged_latents_are_encoded_again(tiny_dit_dir, rgb_images, tmp_path):
    store_dir = tmp_path / "store"
    ext_for(tiny_dit_dir, cache=str(store_dir), batch_size=3).transform(rgb_images)
    for data in store_dir.glob("dit-x0-*/*.npy"):
        np.save(data, np.load(data) * 2)  # wrong values, right shape
    _runtime.clear_store_cache()  # as a new process would
    later = ext_for(tiny_dit_dir, timestep=[300], cache=str(store_dir), batch_size=3)
    counter = PassCounter(later)
    with pytest.warns(RuntimeWarning, match="checksum"):
        got = later.transform(rgb_images)
    assert counter.encoded == len(rgb_images)  # every image went through the VAE again
    counter.close()
    np.testing.assert_allclose(got, ext_for(tiny_dit_dir, timestep=[300]).transform(rgb_images), atol=1e-6)


_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from sklearn_difffeat import DiTFeatureExtractor
    from sklearn_difffeat.extractors import _writes
    model, store, data, out, kill_after, background = sys.argv[1:7]
    _writes.WRITE_IN_BACKGROUND = background == "True"
    X = np.load(data)
    ext = DiTFeatureExtractor(model, block=[1, 4], timestep=[50, 600], batch_size=2, cache=store).fit(X)
    passes = []
    def maybe_die(*args):
        passes.append(1)
        if len(passes) > int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as with an OOM kill or a pulled plug
    ext.get_backbone().transformer.pos_embed.register_forward_hook(maybe_die)
    np.save(out, ext.transform(X))
    """
)


def _worker(model, store, data, out, kill_after=10**6, background=True):
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(model), str(store), str(data), str(out),
                             str(kill_after), str(background)])


@pytest.mark.parametrize("background", [False, True])
def test_killed_extraction_resumes_and_equals_an_uninterrupted_run(tiny_dit_dir, tmp_path, background):
    """A run killed mid-way keeps its completed segments; the rerun computes exactly what is missing. Segments
    written by the writer thread: the kill may also lose the batches handed over and not yet written."""
    images = np.random.default_rng(5).integers(0, 256, size=(9, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    store_dir = tmp_path / "store"
    FeatureStore.create(store_dir, segment_rows=2)  # every batch of 2 closes a segment
    proc = _worker(tiny_dit_dir, store_dir, tmp_path / "x.npy", tmp_path / "never.npy", kill_after=5,
                   background=background)
    assert proc.wait() == -9
    store = FeatureStore(store_dir)
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=[1, 4], timestep=[50, 600], batch_size=2,
                              cache=str(store_dir)).fit(images)
    features = {name: store.count(name) for name in ext.feature_layout().namespaces.values()}
    assert sum(features.values()) < 4 * 9  # not all was kept ...
    assert background or min(features.values()) > 0  # ... and, written by the run's thread, some of each
    counter = PassCounter(ext)
    resumed = ext.transform(images)
    counter.close()
    kept = {t: min(n for name, n in features.items() if f"-t{t}-" in name) for t in (50, 600)}
    assert counter.rows == sum(9 - kept[t] for t in (50, 600))  # exactly the missing (sample, timestep) pairs
    fresh = DiTFeatureExtractor(str(tiny_dit_dir), block=[1, 4], timestep=[50, 600]).fit(images).transform(images)
    np.testing.assert_allclose(resumed, fresh, atol=1e-5)


def test_two_processes_writing_one_store(tiny_dit_dir, tmp_path):
    images = np.random.default_rng(6).integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    FeatureStore.create(tmp_path / "store", segment_rows=2)
    procs = [_worker(tiny_dit_dir, tmp_path / "store", tmp_path / "x.npy", tmp_path / f"f{i}.npy") for i in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    f0, f1 = np.load(tmp_path / "f0.npy"), np.load(tmp_path / "f1.npy")
    np.testing.assert_allclose(f0, f1, atol=1e-6)
    store = FeatureStore(tmp_path / "store")
    assert {store.count(name) for name in store.namespaces()} == {8}  # every entry of every namespace
    assert not list((tmp_path / "store").rglob(".*.part"))
    again = DiTFeatureExtractor(str(tiny_dit_dir), block=[1, 4], timestep=[50, 600], cache=str(tmp_path / "store"))
    counter = PassCounter(again.fit(images))
    np.testing.assert_allclose(again.transform(images), f0, atol=1e-6)
    assert counter.passes == 0
    counter.close()


def test_read_only_store_computes_and_warns_once(tiny_dit_dir, rgb_images, tmp_path, monkeypatch):
    from test_store import read_only

    reference = ext_for(tiny_dit_dir).transform(rgb_images)
    read_only(tmp_path / "ro", monkeypatch)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = ext_for(tiny_dit_dir, cache=str(tmp_path / "ro"), batch_size=2).transform(rgb_images)
    finally:
        (tmp_path / "ro").chmod(0o700)
    np.testing.assert_allclose(got, reference, atol=1e-6)
    messages = [str(w.message) for w in caught if "nothing is stored" in str(w.message)]
    assert len(messages) == 1 and "Permission" in messages[0]


@pytest.mark.slow
def test_bounded_host_memory_over_many_paths(tmp_path):
    """Peak RSS of transforming 4,000 256-px JPEG paths exceeds that of 400 by < 300 MB (all decoded images
    would take 786 MB): inputs stream through, decoded a batch at a time."""
    # 256 px pixel-space input, as large as DiT-XL/2's, behind a model that costs little per image.
    model = build_tiny_dit_pipeline(tmp_path / "m256", with_vae=False, sample_size=256, patch_size=32)
    rng = np.random.default_rng(0)
    folder = tmp_path / "jpg"
    folder.mkdir()
    for i in range(4000):  # distinct smooth pictures: small files, quick to decode
        small = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
        small.resize((256, 256), Image.BILINEAR).save(folder / f"{i:04d}.jpg", quality=90)
    script = textwrap.dedent(
        """
        import resource, sys
        from pathlib import Path
        from sklearn_difffeat import DiTFeatureExtractor
        model, folder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
        paths = sorted(str(p) for p in Path(folder).glob("*.jpg"))[:n]
        ext = DiTFeatureExtractor(model, block=1, timestep=10, batch_size=32, num_workers=0).fit(None)
        X = ext.transform(paths)
        assert X.shape[0] == n
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )

    def peak_mb(n):  # in-process decoding: every decoded image passes through this process's memory
        done = subprocess.run([sys.executable, "-c", script, str(model), str(folder), str(n)], check=True,
                              capture_output=True, text=True)
        return int(done.stdout.split()[-1])

    small, large = peak_mb(400), peak_mb(4000)
    assert large - small < 300, (small, large)


def test_sixteen_bit_and_float_images_are_scaled_or_refused(tiny_dit_dir, tmp_path):
    rng = np.random.default_rng(1)
    eight = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
    sixteen = eight.astype(np.uint16) * 257  # the same picture at 16 bits
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    Image.fromarray(eight.astype(np.float32) / 255).save(tmp_path / "unit.tiff")
    Image.fromarray(eight.astype(np.float32)).save(tmp_path / "raw.tiff")  # 0..255 as floats: ambiguous
    expected = np.repeat(eight[..., None], 3, axis=-1)
    for name in ("deep.png", "unit.tiff"):
        np.testing.assert_array_equal(_images.to_uint8_images([str(tmp_path / name)], 16)[0], expected)
    with pytest.raises(ValueError, match=r"Image 0 \('.*raw\.tiff'\): a floating-point image \(mode F\) must hold"):
        _images.to_uint8_images([str(tmp_path / "raw.tiff")], 16)
    Image.fromarray(np.full((16, 16), 70000, dtype=np.int32)).save(tmp_path / "wide.tiff")
    with pytest.raises(ValueError, match=r"Image 1 \('.*wide\.tiff'\): 32-bit integer images"):
        ext_for(tiny_dit_dir).transform([str(tmp_path / "deep.png"), str(tmp_path / "wide.tiff")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_says_so(tiny_dit_dir):
    with pytest.raises(ValueError, match="PyTorch sees no CUDA device"):
        DiTFeatureExtractor(str(tiny_dit_dir), device="cuda").fit(None)


def test_bad_cache_parameters_are_named(tiny_dit_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="cache='' is not a folder"):
        DiTFeatureExtractor(str(tiny_dit_dir), cache="").fit(None)
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory
    with pytest.raises(ValueError, match="cache_depth=99 is out of range for a model with 5 blocks"):
        DiTFeatureExtractor(str(tiny_dit_dir), block=1, cache=str(tmp_path / "s"), cache_depth=99).fit(None)


def test_text_store_and_duplicates(tmp_path):
    texts = ["a red shirt", "blue trousers and a bag", "a red shirt", "sandals"]
    params = dict(block=[1, -1], timestep=[0.0, 0.5], cache=str(tmp_path))
    first = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", **params).fit(None)
    calls = []
    first.get_backbone().module.vocab_embed.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    out = first.transform(texts)
    assert sum(calls) == 3 * 2  # three distinct texts, two timesteps
    np.testing.assert_array_equal(out[0], out[2])
    calls.clear()
    again = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", num_workers=0, **params).fit(None)
    np.testing.assert_array_equal(again.transform(texts[::-1]), out[::-1])
    assert calls == []
    plain = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", block=[1, -1], timestep=[0.0, 0.5]).fit(None)
    np.testing.assert_allclose(plain.transform(texts), out, atol=1e-5)
    assert os.path.isdir(tmp_path) and FeatureStore(tmp_path).namespaces()


def test_read_stored_equals_transform_and_is_nan_where_nothing_is_stored(tiny_dit_dir, rgb_images, tmp_path):
    ext = ext_for(tiny_dit_dir, cache=str(tmp_path / "store"))
    empty_keys = ext.transform_with_report(rgb_images[:2])[1].keys  # computed and stored now
    features, report = ext.transform_with_report(rgb_images)
    assert report.computed == len(rgb_images) - 2 and report.stored == 2 and report.failed == {}
    counter = PassCounter(ext)
    np.testing.assert_array_equal(ext.read_stored(report.keys), features)
    assert counter.passes == 0 and counter.encoded == 0
    counter.close()
    np.testing.assert_array_equal(report.keys[:2], empty_keys)
    # the same store given explicitly, to an extractor without a cache, and keys as str
    plain = ext_for(tiny_dit_dir)
    np.testing.assert_array_equal(plain.read_stored([k.decode() for k in report.keys], tmp_path / "store"), features)
    with pytest.raises(ValueError, match="read_stored needs a feature store"):
        plain.read_stored(report.keys)
    # nothing stored: an empty store, a sample never seen, or one (block, timestep) of the row missing
    assert np.isnan(plain.read_stored(report.keys, tmp_path / "empty")).all()
    unseen = ext.transform_with_report(rgb_images[:1] // 2)[1].keys  # computed by a run without that cache
    more = ext_for(tiny_dit_dir, timestep=[*STEPS, 999], cache=str(tmp_path / "store"))
    got = more.read_stored(np.concatenate([report.keys, unseen]))
    assert got.shape == (len(rgb_images) + 1, more.n_features_out_) and np.isnan(got).all()


def test_transform_with_report_records_unreadable_files_by_position(tiny_dit_dir, rgb_images, tmp_path):
    files = []
    for i, image in enumerate(rgb_images[:4]):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(files[-1])
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    inputs = [files[0], str(tmp_path / "broken.png"), files[1], files[2], str(tmp_path / "absent.png"), files[3],
              files[0]]
    ext = ext_for(tiny_dit_dir, num_workers=0)
    with pytest.raises(ValueError, match=r"Image 4 \('.*absent\.png'\): cannot read file \(No such file"):
        ext.transform(inputs)
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'record'"):
        ext.transform_with_report(inputs, on_error="skip")
    features, report = ext.transform_with_report(inputs, on_error="record")
    assert sorted(report.failed) == [1, 4]
    assert "broken.png" in report.failed[1] and "absent.png" in report.failed[4]
    assert np.isnan(features[[1, 4]]).all()
    good = [0, 2, 3, 5, 6]
    np.testing.assert_array_equal(features[good], ext.transform([inputs[i] for i in good]))
    assert report.computed == 5 and report.stored == 0  # five readable inputs (four distinct files), no store
    assert len(report.keys) == len(inputs) and report.keys[0] == report.keys[6]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_file_leaves_nothing_in_the_store(tiny_dit_dir, rgb_images, tmp_path, workers):
    files = []
    for i, image in enumerate(rgb_images[:3]):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(files[-1])
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    files.insert(1, str(tmp_path / "broken.png"))
    store = str(tmp_path / "store")
    first = ext_for(tiny_dit_dir, timestep=[10], cache=store, num_workers=workers)
    assert list(first.transform_with_report(files, on_error="record")[1].failed) == [1]
    # its clean input was not stored either: at another timestep it is still unreadable, not a black picture
    later = ext_for(tiny_dit_dir, timestep=[20], cache=store, num_workers=workers)
    features, report = later.transform_with_report(files, on_error="record")
    assert list(report.failed) == [1] and np.isnan(features[1]).all() and not np.isnan(features[[0, 2, 3]]).any()


def test_to_uint8_images_decodes_alike_in_workers_and_names_a_bad_file(rgb_images, tmp_path):
    files = []
    for i, image in enumerate(rgb_images):
        files.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(image).save(files[-1], quality=90)
    here = _images.to_uint8_images(files, 16, num_workers=0, batch_size=3)
    assert here.shape == (len(files), 16, 16, 3)
    np.testing.assert_array_equal(here[2], _images.load_image(files[2], 2, 16, 3))
    np.testing.assert_array_equal(_images.to_uint8_images(files, 16, num_workers=2, batch_size=3), here)
    (tmp_path / "broken.jpg").write_bytes(b"not a picture")
    for workers in (0, 2):
        with pytest.raises(ValueError, match=r"Image 4 \('.*broken\.jpg'\): cannot read file as an image"):
            _images.to_uint8_images([*files[:4], str(tmp_path / "broken.jpg"), *files[4:]], 16, num_workers=workers)


def test_a_settled_file_is_read_once_per_process_and_a_rewritten_one_again(tmp_path, monkeypatch):
    """Searches transform the same files at every candidate and fold: a file's key is remembered by its identity
    (inode, size, times), so it is read once; a file written again is read again and keyed by its new bytes."""
    from sklearn_difffeat.extractors import _files

    path = tmp_path / "a.bin"
    path.write_bytes(b"first content")
    reads = []
    real = _files._read
    monkeypatch.setattr(_files, "_read", lambda p, sink: reads.append(p) or real(p, sink))
    expected = _files.content_key(b"first content")
    assert _files.file_key(path) == _files.file_key(path) == expected
    assert len(reads) == 2  # written just now: not settled, so not remembered
    monkeypatch.setattr(_files, "_SETTLED_SECONDS", 0.0)
    reads.clear()
    assert [_files.file_key(path) for _ in range(3)] == [expected] * 3
    assert len(reads) == 1
    path.write_bytes(b"other content")  # same size, new bytes: new times, so a new identity
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # even on a coarse clock
    assert _files.file_key(path) == _files.content_key(b"other content") and len(reads) == 2


def test_noise_drawn_in_row_chunks_on_a_cpu_is_the_whole_batch_draw(tiny_pixel_dit_dir):
    """The CPU draws noise a few rows at a time (the chunks here: 5, 5, 2 rows); each element is a pure function
    of its sample, draw and index, so the numbers are those of one draw over the whole batch."""
    import contextlib
    import types

    from sklearn_difffeat.extractors._noise import key_words, normals, sample_seeds

    ext = DiTFeatureExtractor(str(tiny_pixel_dit_dir), n_noise_draws=2, random_state=7)
    keys = np.array([f"{i:032x}".encode() for i in range(12)])
    words = key_words(keys)
    run = types.SimpleNamespace(device=torch.device("cpu"), elementwise_threads=contextlib.nullcontext)
    shape = (3, 128, 128)  # 49,152 values a sample: 5 samples a chunk
    drawn = ext._noises(run, words, shape)
    assert len(drawn) == 2
    for draw, noise in enumerate(drawn):
        assert torch.equal(noise, normals(sample_seeds(words, 7, draw), shape))


def test_element_wise_work_leaves_the_cores_to_decoding_threads(tiny_dit_dir, rgb_images, tmp_path, monkeypatch):
    """While threads decode (a daemon process), the noise is drawn on the cores they leave and the model keeps
    torch's threads; afterwards torch has its threads back, and the features are those of decoding in-process."""
    import multiprocessing

    from sklearn_difffeat._cores import usable_cores
    from sklearn_difffeat.backbones.dit import DiTBackbone
    from sklearn_difffeat.extractors import image

    paths = []
    for i, pixels in enumerate(rgb_images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    seen = {"noise": set(), "model": set()}
    real_normals, real_hidden = image.normals, DiTBackbone.hidden_states
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the model's last bits may depend on torch's thread count: the same on both sides
    try:
        reference = ext_for(tiny_dit_dir, num_workers=0, batch_size=3).transform(paths)
        monkeypatch.setattr(image, "normals", lambda *a: seen["noise"].add(torch.get_num_threads())
                            or real_normals(*a))
        monkeypatch.setattr(DiTBackbone, "hidden_states", lambda self, *a, **k:
                            seen["model"].add(torch.get_num_threads()) or real_hidden(self, *a, **k))
        monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)
        features = ext_for(tiny_dit_dir, num_workers=2, batch_size=3).transform(paths)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == {"noise": {max(1, min(2, usable_cores() - 2))}, "model": {2}} and after == 2
    np.testing.assert_array_equal(features, reference)
