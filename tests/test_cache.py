"""The on-disk cache: latents once, features reused, deeper taps stored, resumable, safe with two writers."""

import subprocess
import sys
import textwrap

import numpy as np

from sklearn_difffeat import DiTFeatureExtractor, FeatureCache

from conftest import PassCounter


def test_store_merges_and_load_misses(tmp_path):
    cache = FeatureCache(tmp_path)
    assert cache.load("ns", "abcd") is None
    cache.store("ns", "abcd", {"b1": np.arange(3.0)})
    cache.store("ns", "abcd", {"b2": np.ones(2)})
    got = cache.load("ns", "abcd")
    assert sorted(got) == ["b1", "b2"] and np.array_equal(got["b1"], np.arange(3.0))
    assert list(cache.load("ns", "abcd", ["b2"])) == ["b2"]
    assert cache.load("ns", "abcd", ["b2", "b3"]) is None  # partial entries are misses
    (tmp_path / "ns" / "ab" / "abcd.npz").write_bytes(b"garbage")  # damaged outside the cache: a miss
    assert cache.load("ns", "abcd") is None


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
    # a new timestep needs passes, but no VAE encoding: latents come from the cache
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
    for change in (dict(random_state=5), dict(pooling="max"), dict(class_label=3), dict(n_noise_draws=2)):
        cached = DiTFeatureExtractor(str(tiny_dit_dir), **base, **change).fit(rgb_images).transform(rgb_images)
        fresh = (
            DiTFeatureExtractor(str(tiny_dit_dir), **{**base, "cache": None}, **change)
            .fit(rgb_images)
            .transform(rgb_images)
        )
        np.testing.assert_allclose(cached, fresh, atol=1e-6)
        assert np.abs(cached - a).max() > 1e-5, change


_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from sklearn_difffeat import DiTFeatureExtractor
    model, cache, data, out, kill_after = sys.argv[1:6]
    X = np.load(data)
    ext = DiTFeatureExtractor(model, block=[1, 4], timestep=[50, 600], batch_size=2, cache=cache).fit(X)
    passes = []
    def maybe_die(*args):
        passes.append(1)
        if len(passes) > int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as with an OOM kill or a pulled plug
    ext._backbone().transformer.pos_embed.register_forward_hook(maybe_die)
    np.save(out, ext.transform(X))
    """
)


def _worker(model, cache, data, out, kill_after=10**6):
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(model), str(cache), str(data), str(out), str(kill_after)]
    )


def test_killed_extraction_keeps_finished_batches(tiny_dit_dir, tmp_path):
    images = np.random.default_rng(5).integers(0, 256, size=(9, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    cache_dir = tmp_path / "cache"
    proc = _worker(tiny_dit_dir, cache_dir, tmp_path / "x.npy", tmp_path / "never.npy", kill_after=3)
    assert proc.wait() == -9
    cache = FeatureCache(cache_dir)
    kept = cache.entries()
    # 3 finished batches of 2 at the first timestep: 6 feature entries, plus the latents encoded so far
    assert kept >= 6
    for path in cache_dir.rglob("*.npz"):  # nothing half-written
        assert cache.load(path.parent.parent.name, path.stem) is not None
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=[1, 4], timestep=[50, 600], batch_size=2, cache=str(cache_dir))
    ext.fit(images)
    counter = PassCounter(ext)
    resumed = ext.transform(images)
    counter.close()
    assert counter.passes == 2 + 5  # the 3 remaining samples at t=50 (2 batches), all 9 at t=600 (5 batches)
    fresh = DiTFeatureExtractor(str(tiny_dit_dir), block=[1, 4], timestep=[50, 600]).fit(images).transform(images)
    np.testing.assert_allclose(resumed, fresh, atol=1e-5)


def test_two_processes_writing_the_same_entries(tiny_dit_dir, tmp_path):
    images = np.random.default_rng(6).integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    procs = [_worker(tiny_dit_dir, tmp_path / "cache", tmp_path / "x.npy", tmp_path / f"f{i}.npy") for i in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    f0, f1 = np.load(tmp_path / "f0.npy"), np.load(tmp_path / "f1.npy")
    np.testing.assert_array_equal(f0, f1)
    cache = FeatureCache(tmp_path / "cache")
    assert cache.entries() == 8 * 2 + 8  # 8 images x 2 timesteps of features, 8 latents; no duplicates
    assert not list((tmp_path / "cache").rglob(".tmp-*"))
    again = DiTFeatureExtractor(str(tiny_dit_dir), block=[1, 4], timestep=[50, 600], cache=str(tmp_path / "cache"))
    np.testing.assert_array_equal(again.fit(images).transform(images), f0)
