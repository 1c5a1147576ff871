"""The segment feature store on its own: writes, reads, damage, concurrency, maintenance."""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sklearn_difffeat import FeatureStore
from sklearn_difffeat.store import StoreWriteError, _format
from sklearn_difffeat.store._index import NamespaceIndex


def keys(*ids):
    return np.array([hashlib.sha256(str(i).encode()).hexdigest()[:32].encode() for i in ids])


def rows(*ids, width=4):
    return np.array([[i + j / 10 for j in range(width)] for i in ids], dtype=np.float32)


def test_write_read_count_in_any_order(tmp_path):
    store = FeatureStore(tmp_path)
    assert store.count("ns") == 0 and store.namespaces() == {}
    store.write("ns", keys(0, 1, 2), rows(0, 1, 2), description={"block": 3})
    store.write("ns", keys(3, 4), rows(3, 4))
    values, found = store.read("ns", keys(4, 9, 0, 2), width=4)
    assert found.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(values[found], rows(4, 0, 2))
    assert not values[1].any()  # absent rows are zeros, flagged by `found`
    assert store.count("ns") == 5 and store.namespaces() == {"ns": {"block": 3}}
    assert sorted(store.keys("ns").tolist()) == sorted(keys(0, 1, 2, 3, 4).tolist())
    # another process (a new store object) sees the same
    values2, found2 = FeatureStore(tmp_path).read("ns", keys(4, 9, 0, 2))
    np.testing.assert_array_equal(values2, values)
    assert found2.tolist() == found.tolist()


def test_files_grow_with_segments_not_samples(tmp_path):
    store = FeatureStore.create(tmp_path, segment_rows=100)
    with store.writer("ns", 4) as writer:
        for start in range(0, 1000, 10):  # 1,000 rows in batches of 10
            writer.add(keys(*range(start, start + 10)), rows(*range(start, start + 10)))
    files = [p for p in (tmp_path / "ns").iterdir()]
    assert len(files) == 2 * 10  # 10 segments of 100 rows: a data file and an index each
    assert FeatureStore(tmp_path).settings["segment_rows"] == 100  # saved for every later writer
    assert FeatureStore(tmp_path).count("ns") == 1000


def test_writer_keeps_what_it_finished_when_interrupted(tmp_path):
    store = FeatureStore.create(tmp_path, segment_rows=3)
    with pytest.raises(RuntimeError), store.writer("ns", 4) as writer:
        writer.add(keys(0, 1, 2, 3), rows(0, 1, 2, 3))  # one full segment is written here ...
        writer.add(keys(4), rows(4))
        raise RuntimeError("interrupted")  # ... and leaving the block writes the rest
    assert FeatureStore(tmp_path).count("ns") == 5


def test_readers_ignore_unfinished_segments(tmp_path):
    store = FeatureStore(tmp_path)
    store.write("ns", keys(0), rows(0))
    # A writer killed between its data file and its index leaves data without an index, or a temporary file.
    (tmp_path / "ns" / "dead-writer.npy").write_bytes(b"\x93NUMPY partial")
    (tmp_path / "ns" / ".dead-writer.json.1234.part").write_text('{"keys": [')
    assert FeatureStore(tmp_path).count("ns") == 1


@pytest.mark.parametrize("damage", ["index", "data", "checksum", "shape"])
def test_damaged_segments_are_ignored_never_read_as_wrong_values(tmp_path, damage):
    store = FeatureStore(tmp_path)
    store.write("ns", keys(0, 1), rows(0, 1))
    store.write("ns", keys(2, 3), rows(2, 3))
    index = next(p for p in sorted((tmp_path / "ns").glob("*.json")) if p.name != "namespace.json")
    data = index.with_suffix(".npy")
    damaged_keys = json.loads(index.read_text())["keys"]
    if damage == "index":
        index.write_text(index.read_text()[:-20])  # truncated JSON
    elif damage == "data":
        data.write_bytes(data.read_bytes()[:-8])  # truncated array
    elif damage == "checksum":
        array = np.load(data)
        array[0, 0] += 1  # a flipped value, same shape: only the checksum can tell
        np.save(data, array)
    else:
        np.save(data, np.zeros((2, 5), np.float32))
    with pytest.warns(RuntimeWarning, match="damaged|Ignoring"):
        values, found = FeatureStore(tmp_path).read("ns", keys(0, 1, 2, 3), width=4)
    good = [k.decode() not in damaged_keys for k in keys(0, 1, 2, 3)]
    assert found.tolist() == good and sum(good) == 2
    np.testing.assert_array_equal(values[found], rows(0, 1, 2, 3)[found])


def test_non_finite_rows_and_wrong_widths_count_as_absent(tmp_path):
    store = FeatureStore(tmp_path)
    bad = rows(0, 1)
    bad[1, 2] = np.nan
    store.write("ns", keys(0, 1), bad)
    with pytest.warns(RuntimeWarning, match="not finite"):
        _, found = store.read("ns", keys(0, 1), width=4)
    assert found.tolist() == [True, False]
    store.write("other", keys(0), rows(0, width=3))
    with pytest.warns(RuntimeWarning, match="width 3, expected 4"):
        _, found = store.read("other", keys(0), width=4)
    assert not found.any()


def read_only(folder, monkeypatch):
    """Make ``folder`` unwritable: by permissions, or (as root, who may write anyway) by failing every write."""
    folder.mkdir(exist_ok=True)
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):
        def denied(path, *chunks, durable=True):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(_format, "write_atomic", denied)


def test_unwritable_folder_raises_a_store_error(tmp_path, monkeypatch):
    read_only(tmp_path / "ro", monkeypatch)
    try:
        with pytest.raises(StoreWriteError, match=r"Could not write a segment.*Permission"):
            FeatureStore(tmp_path / "ro").write("ns", keys(0), rows(0))
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_bad_keys_and_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="empty path"):
        FeatureStore("")
    with pytest.raises(ValueError, match=r"keys\[1\]"):
        FeatureStore(tmp_path).write("ns", ["a" * 32, "not-hex"], rows(0, 1))
    with pytest.raises(ValueError, match="not a valid namespace name"):
        FeatureStore(tmp_path).count("../escape")


def test_compact_merges_segments_and_drops_duplicates(tmp_path):
    store = FeatureStore.create(tmp_path, segment_rows=1000)
    for start in range(0, 30, 3):
        store.write("ns", keys(*range(start, start + 3)), rows(*range(start, start + 3)))
    store.write("ns", keys(0, 1), rows(0, 1))  # a racing writer stored these twice
    store.compact()
    indexes = [p for p in (tmp_path / "ns").glob("*.json") if p.name != "namespace.json"]
    assert len(indexes) == 1
    assert sum(json.loads(p.read_text())["rows"] for p in indexes) == 30
    values, found = FeatureStore(tmp_path).read("ns", keys(*range(30)))
    assert found.all()
    np.testing.assert_array_equal(values, rows(*range(30)))


def test_clear_and_pickle(tmp_path):
    store = FeatureStore.create(tmp_path / "s", segment_rows=7)
    store.write("a", keys(0), rows(0))
    store.write("b", keys(0), rows(0))
    clone = pickle.loads(pickle.dumps(store))
    assert clone.directory == store.directory and clone.settings["segment_rows"] == 7 and clone.durable
    assert not pickle.loads(pickle.dumps(FeatureStore(tmp_path / "s", durable=False))).durable
    store.clear("a")
    assert set(store.namespaces()) == {"b"}
    store.clear()
    assert store.namespaces() == {} and store.count("b") == 0


_WRITER = textwrap.dedent(
    """
    import hashlib, sys
    import numpy as np
    from sklearn_difffeat import FeatureStore
    folder, offset = sys.argv[1], int(sys.argv[2])
    store = FeatureStore(folder)
    with store.writer("ns", 4) as writer:
        for i in range(offset, offset + 400):
            key = hashlib.sha256(str(i).encode()).hexdigest()[:32]
            writer.add([key], np.array([[i + j / 10 for j in range(4)]], np.float32))
    """
)


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    FeatureStore.create(tmp_path, segment_rows=25)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(offset)])
             for offset in (0, 200, 400)]  # overlapping ranges: keys 200..599 are written twice
    assert [p.wait() for p in procs] == [0, 0, 0]
    store = FeatureStore(tmp_path)
    assert store.count("ns") == 800
    values, found = store.read("ns", keys(*range(800)))
    assert found.all()
    np.testing.assert_array_equal(values, rows(*range(800)))


# ---- one store object shared by threads ----------------------------------------------------------------------
@pytest.fixture
def tight_thread_switching():
    """Let threads switch far more often than the default 5 ms, so that their store calls interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def check_read(store, ids, must_find):
    """Read ``ids`` through ``store``: every row found is exactly the one written, and ``must_find`` are found."""
    values, found = store.read("ns", keys(*ids), width=4)
    np.testing.assert_array_equal(values[found], rows(*ids)[found])
    assert found[:must_find].all()


@pytest.mark.filterwarnings("error")  # a damaged or half-seen segment would warn: here that fails the test
def test_threads_sharing_one_store_write_and_read_consistently(tmp_path, tight_thread_switching):
    store = FeatureStore.create(tmp_path, segment_rows=4)  # each add of 4 rows completes a segment
    n_threads, per_thread = 4, 160
    written = []  # ids whose segment is complete; list.append is atomic

    def work(thread):
        rng = np.random.default_rng(thread)
        own = range(thread * per_thread, (thread + 1) * per_thread)
        with store.writer("ns", 4) as writer:
            for start in range(0, per_thread, 4):
                batch = list(own[start:start + 4])
                writer.add(keys(*batch), rows(*batch))
                written.extend(batch)
                recent = written[-12:]  # complete segments, of this and other threads
                anything = rng.integers(0, n_threads * per_thread, 8).tolist()  # written or not (yet)
                check_read(store, recent + anything, must_find=len(recent))
                assert store.contains("ns", keys(*batch)).all()

    with ThreadPoolExecutor(n_threads) as pool:
        for future in [pool.submit(work, t) for t in range(n_threads)]:
            future.result()  # re-raises a thread's failure

    everything = list(range(n_threads * per_thread))
    assert sorted(written) == everything
    assert store.count("ns") == len(everything)
    assert sorted(store.keys("ns").tolist()) == sorted(keys(*everything).tolist())
    check_read(store, everything, must_find=len(everything))
    check_read(FeatureStore(tmp_path), everything, must_find=len(everything))  # as another process sees it
    indexes = [p for p in (tmp_path / "ns").glob("*.json") if p.name != "namespace.json"]
    assert sum(json.loads(p.read_text())["rows"] for p in indexes) == len(everything)  # each row stored once
    assert not [p for p in (tmp_path / "ns").iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.filterwarnings("error")
def test_compact_while_threads_read_and_write(tmp_path, tight_thread_switching):
    store = FeatureStore.create(tmp_path, segment_rows=50)
    for start in range(0, 200, 5):  # 40 small segments
        store.write("ns", keys(*range(start, start + 5)), rows(*range(start, start + 5)))
    done = threading.Event()
    written = list(range(200))

    def compactor():
        try:
            for round_ in range(3):
                store.compact()
                again = range(10 * round_, 10 * round_ + 10)  # a racing writer's duplicates, for the next round
                store.write("ns", keys(*again), rows(*again))
        finally:
            done.set()

    def writer():
        with store.writer("ns", 4) as w:
            for start in range(200, 300, 2):
                w.add(keys(start, start + 1), rows(start, start + 1))
                w.flush()
                written.extend([start, start + 1])

    def reader(seed):
        rng = np.random.default_rng(seed)
        reads = 0
        while not done.is_set() or reads < 3:
            known = list(written)
            ids = rng.choice(known, 24, replace=False).tolist()
            check_read(store, ids + rng.integers(200, 300, 4).tolist(), must_find=len(ids))
            reads += 1

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(compactor), pool.submit(writer)] + [pool.submit(reader, s) for s in range(3)]
        for future in futures:
            future.result()

    everything = list(range(300))
    assert sorted(written) == everything and store.count("ns") == 300
    check_read(store, everything, must_find=300)
    store.compact()  # alone now: every key in exactly one segment
    indexes = [p for p in (tmp_path / "ns").glob("*.json") if p.name != "namespace.json"]
    assert len(indexes) == 6 and sum(json.loads(p.read_text())["rows"] for p in indexes) == 300
    check_read(FeatureStore(tmp_path), everything, must_find=300)


# ---- the format and the index on their own -------------------------------------------------------------------
def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_segment_file_round_trip_and_checksum(tmp_path):
    values = rows(0, 1, 2, width=5)
    name = _format.write_segment(tmp_path, keys(0, 1, 2), values)
    assert sorted(os.listdir(tmp_path)) == [f"{name}.json", f"{name}.npy"]  # no temporary file left behind
    segment = _format.load_index(tmp_path / f"{name}.json")
    assert (segment.name, segment.width, segment.data) == (name, 5, tmp_path / f"{name}.npy")
    assert segment.keys.tolist() == keys(0, 1, 2).tolist()
    assert segment.sha256 == hashlib.sha256(keys(0, 1, 2).tobytes() + values.tobytes()).hexdigest()
    assert (tmp_path / f"{name}.npy").read_bytes() == npy_bytes(values)  # the file np.save writes
    np.testing.assert_array_equal(_format.open_data(segment, verify=True), values)

    with open(segment.data, "r+b") as handle:  # flip one bit of the last value: same shape, other data
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)[0]
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last ^ 0x01]))
    with pytest.raises(ValueError, match="checksum mismatch"):
        _format.open_data(segment, verify=True)
    unchecked = np.array(_format.open_data(segment, verify=False))  # only the checksum can tell
    assert unchecked.shape == values.shape and (unchecked != values).sum() == 1


def test_index_without_data_or_field_is_refused(tmp_path):
    name = _format.write_segment(tmp_path, keys(0), rows(0))
    index = json.loads((tmp_path / f"{name}.json").read_text())
    (tmp_path / "partial.json").write_text(json.dumps({k: v for k, v in index.items() if k != "sha256_keys_data"}))
    (tmp_path / "partial.npy").write_bytes((tmp_path / f"{name}.npy").read_bytes())
    with pytest.raises(ValueError, match="'sha256_keys_data' is missing"):
        _format.load_index(tmp_path / "partial.json")
    (tmp_path / f"{name}.npy").unlink()
    with pytest.raises(ValueError, match="data file is missing"):
        _format.load_index(tmp_path / f"{name}.json")


def test_index_locates_keys_like_a_dict(tmp_path):
    rng = np.random.default_rng(0)
    pool = keys(*range(300))  # keys 200..299 are never stored
    truth: dict[bytes, set] = {}  # key -> every (segment name, row) that holds it
    segments = []
    for s in range(8):
        chosen = pool[rng.choice(200, size=int(rng.integers(1, 60)), replace=False)]  # segments overlap
        segments.append(_format.Segment(f"s{s}", tmp_path / f"s{s}.npy", chosen, 4, ""))
        for row, key in enumerate(chosen.tolist()):
            truth.setdefault(key, set()).add((f"s{s}", row))
    index = NamespaceIndex(tmp_path)
    index.add(segments[:5])
    index.add(segments[5:])

    def agrees(index, truth):
        query = pool[rng.permutation(len(pool))]
        found, where, row = index.locate(query)
        for key, hit, s, r in zip(query.tolist(), found, where, row):
            assert hit == (key in truth)
            assert not hit or (index.segments[s].name, r) in truth[key]
        assert index.sorted_keys.tolist() == sorted(truth)

    agrees(index, truth)
    index.drop([2, 6])  # keys held only by the dropped segments become absent
    truth = {k: {loc for loc in v if loc[0] not in ("s2", "s6")} for k, v in truth.items()}
    agrees(index, {k: v for k, v in truth.items() if v})
