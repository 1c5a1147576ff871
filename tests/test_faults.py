"""fault-injection tests; each test names the fault it covers"""

import contextlib
import errno
import json
import multiprocessing
import os
import resource
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sklearn_difffeat import DiTFeatureExtractor, FeatureStore, TextDiffusionFeatureExtractor, extract
from sklearn_difffeat.datasets import load_fashion_mosaics
from sklearn_difffeat.store import StoreWriteError, _format

# ---- engine ----

BLOCKS, STEPS = [1, 4], [10]


def dit(model, **params):
    return DiTFeatureExtractor(str(model), **{"block": BLOCKS, "timestep": STEPS, **params}).fit(None)


def fail_store_writes(monkeypatch, error, allowed=0):
    """Every file the store writes after the first ``allowed`` ones fails with ``error``.

    The one place that knows the store's lowest write call: adjust it here if the store writes elsewhere.
    """
    real, calls = _format.write_atomic, []

    def write_atomic(path, payload):
        calls.append(path)
        if len(calls) > allowed:
            raise error
        return real(path, payload)

    monkeypatch.setattr(_format, "write_atomic", write_atomic)
    return calls


def png_bomb() -> bytes:
    """A PNG whose header claims 20000 x 20000 pixels: Pillow refuses it as a decompression bomb on opening."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def write_broken_files(folder) -> list[str]:
    """A truncated JPEG, an empty file, a text file named .png and a decompression bomb."""
    folder.mkdir(exist_ok=True)
    noise = np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    contents = {"truncated.jpg": data[:len(data) // 2], "empty.png": b"", "text.png": b"hello, not an image\n",
                "bomb.png": png_bomb()}
    for name, content in contents.items():
        (folder / name).write_bytes(content)
    return [str(folder / name) for name in contents]


def write_images(folder, images, suffix=".png") -> list[str]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"{i:03d}{suffix}"))
        Image.fromarray(image).save(paths[-1])
    return paths


def assert_nothing_stored(store_dir, keys):
    """No namespace (features or clean latents) holds any of ``keys``."""
    store = FeatureStore(store_dir)
    for name in store.namespaces():
        assert not store.contains(name, keys).any(), name


@pytest.fixture
def mixed_inputs(rgb_images, tmp_path):
    """Good and broken image files interleaved: (inputs, positions of the broken ones)."""
    good = write_images(tmp_path / "good", rgb_images[:4])
    broken = write_broken_files(tmp_path / "bad")
    inputs = [good[0], broken[0], good[1], broken[1], broken[2], good[2], broken[3], good[3]]
    return inputs, [1, 3, 4, 6]


@pytest.fixture
def daemon_process(monkeypatch):
    """Run as a daemon process does (a Dask worker): no child processes may be started."""
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)


@pytest.mark.parametrize("path", ["in-process", "dataloader", "threads"])
def test_broken_image_never_gets_features_on_any_decoding_path(tiny_dit_dir, mixed_inputs, tmp_path, path, request):
    """Fault 1: a broken file (truncated, empty, not an image, decompression bomb) stays failed run after run,
    with a NaN row and nothing stored, whatever decodes it; and the stored-latent path never serves it."""
    if path == "threads":
        request.getfixturevalue("daemon_process")
    inputs, bad = mixed_inputs
    good = [i for i in range(len(inputs)) if i not in bad]
    workers = 0 if path == "in-process" else 2
    store = tmp_path / "store"
    for steps in ([10], [10], [20, 10]):  # the third run reads the good ones' latents from the store
        ext = dit(tiny_dit_dir, timestep=steps, cache=str(store), num_workers=workers, batch_size=3)
        features, report = ext.transform_with_report(inputs, on_error="record")
        assert sorted(report.failed) == bad
        assert np.isnan(features[bad]).all() and np.isfinite(features[good]).all()
        reference = dit(tiny_dit_dir, timestep=steps, num_workers=0).transform([inputs[i] for i in good])
        np.testing.assert_allclose(features[good], reference, atol=1e-6)
        assert_nothing_stored(store, report.keys[bad])
    assert "decompression bomb" in report.failed[6]


def test_object_array_with_bad_items_stores_nothing_for_them(tiny_dit_dir, rgb_images, tmp_path):
    """Fault 1 (arrays): an object array holding bad items (NaN pixels, a wrong shape) records them and stores
    nothing of theirs, twice in a row."""
    items = np.empty(5, dtype=object)
    items[:] = [rgb_images[0], np.full((16, 16, 3), np.nan), rgb_images[1], np.zeros((16, 16, 5)), rgb_images[2]]
    for _ in range(2):
        features, report = dit(tiny_dit_dir, cache=str(tmp_path)).transform_with_report(items, on_error="record")
        assert sorted(report.failed) == [1, 3] and "Image 1: contains NaN" in report.failed[1]
        assert np.isnan(features[[1, 3]]).all() and np.isfinite(features[[0, 2, 4]]).all()
        assert_nothing_stored(tmp_path, report.keys[[1, 3]])
        assert report.computed + report.stored + len(report.failed) == 5


def test_decoding_paths_give_identical_features_and_failures(tiny_dit_dir, mixed_inputs, monkeypatch):
    """Parallel decoding: in-process, DataLoader processes and the thread pool of a daemon process agree exactly."""
    inputs, _ = mixed_inputs
    runs = {}
    for path, workers in (("in-process", 0), ("dataloader", 2), ("threads", 2)):
        if path == "threads":
            monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)
        ext = dit(tiny_dit_dir, num_workers=workers, batch_size=3)
        runs[path] = ext.transform_with_report(inputs, on_error="record")
    for path in ("dataloader", "threads"):
        np.testing.assert_array_equal(runs[path][0], runs["in-process"][0])
        assert runs[path][1].failed == runs["in-process"][1].failed


def test_thread_pool_decodes_in_order_with_bounded_prefetch(rgb_images, tmp_path, daemon_process, monkeypatch):
    """Parallel decoding: the thread pool yields batches in input order and never runs far ahead of the consumer."""
    from sklearn_difffeat.extractors import _images

    paths = write_images(tmp_path, np.concatenate([rgb_images] * 6))  # 42 files
    started = []
    real = _images.ImageSamples.decode
    monkeypatch.setattr(_images.ImageSamples, "decode", lambda self, p, key=None: started.append(p) or real(self, p))
    samples = _images.ImageSamples(paths, 16, 3)
    batches = _images.decode_batches(samples, np.arange(len(paths)), 4, workers=2)
    first = next(batches)
    time.sleep(0.3)
    assert len(started) <= 4 + max(4, 2 * 2)  # this batch and one window ahead, not all 42
    rest = list(batches)
    got = np.concatenate([first[1].numpy()] + [b[1].numpy() for b in rest])
    np.testing.assert_array_equal(got, _images.to_uint8_images(paths, 16))


@pytest.mark.slow
def test_broken_images_on_a_dask_worker(tiny_dit_dir, mixed_inputs, tmp_path):
    """Faults 1, 3, 5 on Dask: broken files fail on the worker as in-process, with global positions and their own
    names in the messages, nothing stored, and counts that add up; a rerun changes nothing."""
    distributed = pytest.importorskip("distributed")
    inputs, bad = mixed_inputs
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=BLOCKS, timestep=STEPS, batch_size=2)
    reference = extract(ext, inputs, tmp_path / "local", shard_size=3, progress=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        for _ in range(2):
            result = extract(ext, inputs, tmp_path / "store", client=client, shard_size=3, progress=False)
            assert sorted(result.failed) == bad
            for position in bad:
                assert result.failed[position].startswith(f"Image {position} ({inputs[position]!r})")
            assert result.failed == reference.failed
            assert result.computed + result.already_stored + len(result.failed) == len(inputs)
            features = result.features()
            assert np.isnan(features[bad]).all()
            np.testing.assert_allclose(features, reference.features(), atol=1e-6)
            assert_nothing_stored(tmp_path / "store", result.keys[bad])
        assert (result.computed, result.already_stored) == (0, 4)
        threads = client.run(lambda: __import__("torch").get_num_threads())
        # Fault 2 on Dask: a worker that cannot write the store fails the run with the store's error.
        client.run(_limit_file_size, 100)  # bytes: the store's settings file exceeds it
        with pytest.raises(StoreWriteError, match=str(tmp_path / "full")):
            extract(ext, inputs, tmp_path / "full", client=client, shard_size=3, progress=False)
    cores = len(os.sched_getaffinity(0))
    assert list(threads.values()) == [cores]  # the worker's torch uses the cores it owns, not the nanny's 1


def test_write_error_fails_extract_and_keeps_what_was_stored(tiny_dit_dir, rgb_images, tmp_path, monkeypatch):
    """Fault 2: a full disk fails extract() with the store's StoreWriteError, after the earlier shards were stored;
    transform with a cache computes, returns the right features and warns once."""
    reference = dit(tiny_dit_dir).transform(rgb_images)
    probe = []
    real = _format.write_atomic
    monkeypatch.setattr(_format, "write_atomic", lambda path, payload: probe.append(path) or real(path, payload))
    extract(DiTFeatureExtractor(str(tiny_dit_dir), block=BLOCKS, timestep=STEPS), rgb_images[:3], tmp_path / "probe",
            shard_size=3, progress=False)
    per_shard = len(probe)  # files written by one shard into a new store
    store = tmp_path / "store"
    fail_store_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), allowed=per_shard)
    ext = DiTFeatureExtractor(str(tiny_dit_dir), block=BLOCKS, timestep=STEPS)
    with pytest.raises(StoreWriteError, match=f"{store}.*No space left on device"):
        extract(ext, rgb_images, store, shard_size=3, progress=False)
    kept = FeatureStore(store)
    assert {kept.count(name) for name in kept.namespaces()} == {3}  # the first shard, complete
    with pytest.warns(RuntimeWarning, match="nothing is stored") as caught:
        got = dit(tiny_dit_dir, cache=str(store), batch_size=2).transform(rgb_images)
    assert len([w for w in caught if "nothing is stored" in str(w.message)]) == 1
    np.testing.assert_allclose(got, reference, atol=1e-6)


def test_read_only_store_fails_extract(tiny_dit_dir, rgb_images, tmp_path, monkeypatch):
    """Fault 2: a store that cannot be written fails extract() with StoreWriteError naming it."""
    from test_store import read_only

    read_only(tmp_path / "ro", monkeypatch)
    try:
        with pytest.raises(StoreWriteError, match=str(tmp_path / "ro")):
            extract(DiTFeatureExtractor(str(tiny_dit_dir), block=1, timestep=10), rgb_images, tmp_path / "ro",
                    progress=False)
    finally:
        (tmp_path / "ro").chmod(0o700)


def _limit_file_size(size=16 << 10):
    """RLIMIT_FSIZE for this process (default 16 KiB, which the store's segments exceed)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_file_size_limit_fails_the_command_without_hanging(tmp_path):
    """Fault 2: under RLIMIT_FSIZE (EFBIG on writes; CPython ignores SIGXFSZ) the command exits non-zero with one
    line naming the store and the error, instead of hanging on a DataLoader worker that cannot share a batch."""
    images = load_fashion_mosaics(24, split="test", random_state=1).data["image"]
    write_images(tmp_path / "in", list(images))
    store = tmp_path / "store"
    command = [sys.executable, "-m", "sklearn_difffeat", "extract", "--model", "embedded:fashion-dit", "--block", "2",
               "--input", str(tmp_path / "in"), "--store", str(store), "--num-workers", "2", "--shard-size", "8",
               "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    # One line naming the store, from the store's StoreWriteError (whose wording the store owns).
    assert len(lines) == 1 and lines[0].startswith("sklearn-difffeat extract: error: "), done.stderr
    assert str(store) in lines[0]


def test_counts_add_up_per_input_position(tiny_dit_dir, rgb_images, tmp_path):
    """Fault 3: computed + stored + failed == n, by input position: missing and unreadable files, duplicates,
    fully stored, partially stored (another timestep) and new samples."""
    a, b, c, d = write_images(tmp_path / "img", rgb_images[:4])
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    store = str(tmp_path / "store")
    dit(tiny_dit_dir, timestep=[10, 20], cache=store).transform([a])  # a: both timesteps stored
    dit(tiny_dit_dir, timestep=[10], cache=store).transform([b])  # b: one of the two
    inputs = [a, str(tmp_path / "absent.png"), b, a, str(tmp_path / "broken.png"), c, c, d, b]
    ext = dit(tiny_dit_dir, timestep=[10, 20], cache=store)
    _, report = ext.transform_with_report(inputs, on_error="record")
    assert sorted(report.failed) == [1, 4]
    assert (report.computed, report.stored) == (5, 2)  # b, c, c, d, b computed; a, a stored
    result = extract(ext, inputs, store, shard_size=4, progress=False)
    assert (result.computed, result.already_stored, len(result.failed)) == (0, 7, 2)
    assert "7 already stored, 2 failed" in result.summary()


def _in_thread(function, seconds=60):
    """Run ``function`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "still running: it hangs"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_only_regular_files_are_read(tiny_dit_dir, rgb_images, tmp_path):
    """Fault 4: a device, a FIFO or a folder given as an image is a clear failure, never a hang."""
    good = write_images(tmp_path / "img", rgb_images[:1])[0]
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "folder.png").mkdir()
    inputs = [good, "/dev/zero", str(fifo), str(tmp_path / "folder.png")]
    ext = dit(tiny_dit_dir, num_workers=0)
    try:
        _, report = _in_thread(lambda: ext.transform_with_report(inputs, on_error="record"))
    finally:  # unblock a reader stuck on the FIFO
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert sorted(report.failed) == [1, 2, 3]
    assert all("not a regular file" in message for message in report.failed.values())
    assert "a character device" in report.failed[1] and "a FIFO" in report.failed[2] and "a folder" in report.failed[3]
    with pytest.raises(ValueError, match=r"Image 1 \('/dev/zero'\): cannot read file: not a regular file"):
        _in_thread(lambda: ext.transform(inputs[:2]))


def test_a_file_that_grows_while_hashed_is_refused(tmp_path, monkeypatch):
    """Fault 4: hashing reads at most the size stat gave before reading; a file that changed meanwhile is
    refused (its key would describe bytes that are not the file)."""
    from sklearn_difffeat.extractors import _files

    path = tmp_path / "growing.png"
    path.write_bytes(b"x" * 100)
    real = _files._read_chunk

    def read_and_grow(fd, size):
        with open(path, "ab") as handle:
            handle.write(b"more")
        return real(fd, size)

    monkeypatch.setattr(_files, "_read_chunk", read_and_grow)
    with pytest.raises(ValueError, match="changed while being read"):
        _files.file_key(path)


def test_a_file_rewritten_after_hashing_is_refused(tiny_dit_dir, rgb_images, tmp_path, monkeypatch):
    """Fault 4: what is stored under a key is computed from the bytes that key hashes; a file rewritten between
    hashing and decoding fails instead of storing another picture's features under the old key."""
    from sklearn_difffeat.extractors import _images

    paths = write_images(tmp_path / "img", rgb_images[:3])
    real = _images.ImageSamples.keys

    def keys_then_rewrite(self, workers, errors=None):
        keys = real(self, workers, errors)
        Image.fromarray(rgb_images[5]).save(paths[1])
        return keys

    monkeypatch.setattr(_images.ImageSamples, "keys", keys_then_rewrite)
    for workers in (0, 2):
        ext = dit(tiny_dit_dir, cache=str(tmp_path / "s"), num_workers=workers)
        _, report = ext.transform_with_report(paths, on_error="record")
        assert list(report.failed) == [1] and "changed after it was hashed" in report.failed[1]
        assert_nothing_stored(tmp_path / "s", report.keys[[1]])
        Image.fromarray(rgb_images[1]).save(paths[1])


TEXT = dict(block=[1, -1], timestep=[0.0])


def test_bad_texts_are_listed_failures_in_extract(tmp_path):
    """Faults 5 and 7: an empty, missing, non-string or invalid-Unicode caption in a table is a listed failure of
    extract (NaN row, nothing stored), named by its position in the whole input; transform still raises."""
    texts = ["a red shirt", "a dog", "sandals", "", "a bag", None, "a\ud800b", 3, "a hat"]
    ext = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", **TEXT)
    table = pd.DataFrame({"caption": texts})
    result = extract(ext, table["caption"], tmp_path, shard_size=2, progress=False)
    bad = [3, 5, 6, 7]
    assert sorted(result.failed) == bad
    for position in bad:
        assert result.failed[position].startswith(f"Text {position} "), result.failed[position]
    assert "surrogate" in result.failed[6]
    assert result.computed + result.already_stored + len(result.failed) == len(texts)
    features = result.features()
    assert np.isnan(features[bad]).all() and np.isfinite(np.delete(features, bad, axis=0)).all()
    assert_nothing_stored(tmp_path, result.keys[bad])
    with pytest.raises(ValueError, match="Text 3 is empty"):
        ext.fit(None).transform(texts)


def test_lone_surrogate_is_a_clear_error(tmp_path):
    """Fault 7: a lone surrogate raises a ValueError naming the text, not a raw UnicodeEncodeError."""
    ext = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", **TEXT).fit(None)
    with pytest.raises(ValueError, match=r"Text 1 is not valid Unicode.*surrogate") as info:
        ext.transform(["a red shirt", "a \ud800 shirt"])
    assert not isinstance(info.value, UnicodeError)


def test_failure_messages_name_positions_in_the_whole_input(tiny_dit_dir, rgb_images, tmp_path):
    """Fault 5: with shards, a message names the input's position in the whole input, not in its shard."""
    paths = write_images(tmp_path / "img", rgb_images[:6])
    paths[4] = str(tmp_path / "absent.png")
    result = extract(dit(tiny_dit_dir), paths, tmp_path / "store", shard_size=3, progress=False)
    assert list(result.failed) == [4] and result.failed[4].startswith(f"Image 4 ({paths[4]!r})")


def test_failures_file_is_json_lines_with_each_inputs_own_name(tmp_path):
    """Fault 8: names with a newline or a tab survive in the failures file, and two failing files with the same
    bytes (one key) each carry their own name and position."""
    folder = tmp_path / "in"
    images = load_fashion_mosaics(3, split="test", random_state=1).data["image"]
    write_images(folder, list(images))
    for name in ("a\nb.png", "c\td.png", "e.png"):
        (folder / name).write_bytes(b"the same bytes, not a picture")
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "sklearn_difffeat", "extract", "--model", "embedded:fashion-dit",
                           "--block", "2", "--input", str(folder), "--store", str(store), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (listing,) = store.glob("failures-*.jsonl")
    records = [json.loads(line) for line in listing.read_text().splitlines()]
    inputs = sorted(str(p) for p in folder.iterdir())
    assert [r["input"] for r in records] == [str(folder / n) for n in ("a\nb.png", "c\td.png", "e.png")]
    for record in records:
        assert inputs[record["position"]] == record["input"]
        assert record["error"].startswith(f"Image {record['position']} ({record['input']!r})")


def test_truncation_is_per_call_under_threads():
    """Fault 6: two extractors sharing one tokenizer with different max_length, hammered from threads, truncate
    each text at their own length (as single-threaded runs do)."""
    texts = load_fashion_mosaics(12, split="test", random_state=1).data["text"].tolist()
    extractors = [TextDiffusionFeatureExtractor("embedded:fashion-mdlm", max_length=m, num_workers=0, batch_size=1,
                                                **TEXT).fit(None) for m in (6, 20)]
    assert extractors[0].get_backbone() is extractors[1].get_backbone()
    with pytest.warns(UserWarning, match="truncated"):
        reference = [ext.transform(texts) for ext in extractors]
    errors = []

    def hammer(i):
        for _ in range(6):
            try:
                with np.errstate(all="ignore"):
                    got = extractors[i].transform(texts)
                if not np.array_equal(got, reference[i]):
                    errors.append(f"extractor {i}: rows differ")
            except Exception as exc:  # a tokenizer mutated by the other thread may also raise
                errors.append(f"extractor {i}: {type(exc).__name__}: {exc}")

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=hammer, args=(i % 2,)) for i in range(4)]
        with pytest.warns(UserWarning):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(switch)
    assert errors == []


def test_command_local_clusters_start_workers_that_may_decode_in_processes():
    """Parallel decoding: the command's local cluster starts non-daemon workers, so that extractors there can
    start DataLoader decoding processes."""
    import argparse

    from sklearn_difffeat import _extract_cli

    args = argparse.Namespace(scheduler=None, local_gpus=None, local_workers=1)
    with contextlib.ExitStack() as stack:
        client = _extract_cli._client(args, stack)
        daemon = client.run(lambda: multiprocessing.current_process().daemon)
    assert list(daemon.values()) == [False]
