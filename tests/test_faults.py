"""Fault-injection tests: each test injects one kind of fault (a full disk, a damaged file, too many open files,
a hostile name, ...) and names it in its docstring, then checks what the user sees and what survives.

Faults are injected at the lowest call the code uses (``os.write``, ``os.open``, ``os.fsync``, ``open``), or for
real where the OS allows it (a file-size limit in a subprocess). Sections group them by the part of the library
that must withstand them.
"""

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import sklearn_difffeat.store as store_package
from sklearn_difffeat.store import FeatureStore, StoreWriteError, _format


def keys(*ids):
    return np.array([hashlib.sha256(str(i).encode()).hexdigest()[:32].encode() for i in ids])


def rows(*ids, width=4):
    return np.array([[i + j / 10 for j in range(width)] for i in ids], dtype=np.float32)


def tree(folder):
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- store ---------------------------------------------------------------------------------------------------
class FileCalls:
    """Wraps ``os.open``, ``os.write``, ``os.fsync`` and ``os.replace``: records them, with the path behind each
    descriptor, and fails the calls that ``fail(call, path)`` picks with the OS error it returns."""

    def __init__(self, monkeypatch, fail=lambda call, path: None):
        self.fail, self.events, self.paths = fail, [], {}
        self.real = {name: getattr(os, name) for name in ("open", "write", "fsync", "replace")}
        for name in self.real:
            monkeypatch.setattr(os, name, getattr(self, name))

    def check(self, call, path):
        code = self.fail(call, str(path))
        if code is not None:
            raise OSError(code, os.strerror(code), str(path))

    def open(self, path, flags, mode=0o777, **kwargs):
        if flags & os.O_CREAT:
            self.check("open", path)
        fd = self.real["open"](path, flags, mode, **kwargs)
        self.paths[fd] = str(path)
        return fd

    def write(self, fd, data):
        path = self.paths.get(fd, "")
        if self.fail("write", path) is not None and len(data) > 16:
            return self.real["write"](fd, data[:16])  # a partial write first, as a filling disk does
        self.check("write", path)
        return self.real["write"](fd, data)

    def fsync(self, fd):
        self.events.append(("fsync", self.paths.get(fd, fd)))
        self.check("fsync", self.paths.get(fd, ""))
        return self.real["fsync"](fd)

    def replace(self, src, dst):
        self.events.append(("replace", str(src), str(dst)))
        return self.real["replace"](src, dst)


@pytest.mark.parametrize("call, code, target", [
    ("write", errno.ENOSPC, ".npy."),  # full disk while writing the data ...
    ("write", errno.ENOSPC, ".json."),  # ... or the index, once the data is in place
    ("write", errno.EFBIG, ".npy."),  # file too large
    ("open", errno.EROFS, ".npy."),  # read-only filesystem
    ("open", errno.EACCES, ".json."),  # read-only folder
    ("fsync", errno.EIO, ".json."),  # the disk failed to store the index
    ("fsync", errno.EIO, "/ns"),  # the disk failed to store the folder after a rename
])
def test_failed_write_raises_a_named_error_and_leaves_nothing(tmp_path, monkeypatch, call, code, target):
    """Faults: ENOSPC, EFBIG, EROFS, EACCES, EIO at each step of a segment write. The error names the store
    folder, the namespace and the OS error; readers see nothing of the failed segment and all of the earlier
    ones; no temporary file is left."""
    store = FeatureStore(tmp_path)
    store.write("ns", keys(0, 1), rows(0, 1))
    before = tree(tmp_path)

    def pick(this_call, path):  # a temporary file by its suffix, or a folder by its end
        hit = target in os.path.basename(path) if target.startswith(".") else path.endswith(target)
        return code if this_call == call and hit else None

    with monkeypatch.context() as patch:
        FileCalls(patch, pick)
        with pytest.raises(StoreWriteError) as caught:
            store.write("ns", keys(2, 3), rows(2, 3))
    message = str(caught.value)
    for part in (str(tmp_path), "'ns'", errno.errorcode[code], os.strerror(code)):
        assert part in message
    assert caught.value.errno == code and isinstance(caught.value.__cause__, OSError)
    assert tree(tmp_path) == before
    for reader in (store, FeatureStore(tmp_path)):
        values, found = reader.read("ns", keys(0, 1, 2, 3), width=4)
        assert found.tolist() == [True, True, False, False]
        np.testing.assert_array_equal(values[:2], rows(0, 1))


def test_segments_are_synced_around_their_renames(tmp_path, monkeypatch):
    """Fault: a power loss after a write returned. Each file is synced before its rename and the folder after
    it, data before index; ``durable=False`` syncs nothing; a folder that cannot be synced (EINVAL, as on some
    network filesystems) is tolerated."""
    FeatureStore(tmp_path).write("ns", keys(0), rows(0))  # the folders exist: only the segment's own steps follow
    calls = FileCalls(monkeypatch)
    FeatureStore(tmp_path).write("ns", keys(1), rows(1))
    folder = str(tmp_path / "ns")
    (name,) = {os.path.basename(e[2]).split(".")[0] for e in calls.events if e[0] == "replace"}
    data, index = os.path.join(folder, f"{name}.npy"), os.path.join(folder, f"{name}.json")
    temporary = [e[1] for e in calls.events if e[0] == "replace"]
    assert calls.events == [("fsync", temporary[0]), ("replace", temporary[0], data), ("fsync", folder),
                            ("fsync", temporary[1]), ("replace", temporary[1], index), ("fsync", folder)]
    calls.events.clear()
    FeatureStore(tmp_path, durable=False).write("ns", keys(2), rows(2))
    assert [e[0] for e in calls.events] == ["replace", "replace"]
    calls.fail = lambda call, path: errno.EINVAL if call == "fsync" and path == folder else None
    FeatureStore(tmp_path).write("ns", keys(3), rows(3))
    assert FeatureStore(tmp_path).read("ns", keys(0, 1, 2, 3))[1].all()


_OVER_THE_FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import hashlib, resource, sys
    import numpy as np
    from sklearn_difffeat.store import FeatureStore, StoreWriteError
    folder, limit = sys.argv[1], int(sys.argv[2])
    store = FeatureStore(folder)
    keys = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(100, 612)]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        store.write("ns", keys, np.ones((len(keys), 1152), np.float32))  # 2.4 MB
    except StoreWriteError as exc:
        print(exc)
        sys.exit(3)
    """
)


def test_file_size_limit_fails_the_write_for_real(tmp_path):
    """Fault: EFBIG for real, from a file-size limit (RLIMIT_FSIZE) below the segment's size in a subprocess
    (Python ignores SIGXFSZ, so the write fails instead of killing the process)."""
    pytest.importorskip("resource")  # only POSIX has file-size limits
    FeatureStore(tmp_path).write("ns", keys(0, 1), rows(0, 1, width=1152))
    before = tree(tmp_path)
    done = subprocess.run([sys.executable, "-c", _OVER_THE_FILE_SIZE_LIMIT, str(tmp_path), str(1 << 20)],
                          capture_output=True, text=True, timeout=30)  # ends within seconds
    assert done.returncode == 3, done.stderr
    assert "Could not write a segment of namespace 'ns'" in done.stdout and str(tmp_path) in done.stdout
    assert "[EFBIG] File too large" in done.stdout
    assert tree(tmp_path) == before  # no partial data file, no temporary file
    values, found = FeatureStore(tmp_path).read("ns", keys(0, 1, 100, 611), width=1152)
    assert found.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(values[:2], rows(0, 1, width=1152))


def _damage(index, damage):
    """Damage the segment of ``index`` (its ``.json``) in one of the ways disks, copies and people do."""
    data = index.with_suffix(".npy")
    raw = data.read_bytes()
    if damage == "zero-byte data":
        data.write_bytes(b"")
    elif damage == "truncated data":
        data.write_bytes(raw[:-3])
    elif damage == "header bit flip":  # the header's "{" becomes "z": numpy's tokenizer fails on it
        data.write_bytes(raw[:10] + bytes([raw[10] ^ 0x01]) + raw[11:])
    elif damage == "keys swapped":  # the data and its own checksum are intact: only the keys are wrong
        content = json.loads(index.read_text())
        content["keys"] = content["keys"][::-1]
        index.write_text(json.dumps(content))
    elif damage == "zero-byte index":
        index.write_bytes(b"")
    else:
        index.write_text("[1, 2]")


@pytest.mark.parametrize("damage", ["zero-byte data", "truncated data", "header bit flip", "keys swapped",
                                    "zero-byte index", "index not an object"])
def test_damaged_segment_warns_once_reads_absent_and_is_rewritten(tmp_path, damage):
    """Faults: a zero-byte, truncated or header-damaged ``.npy``, an index whose keys were swapped, a
    zero-byte or malformed index. Reading warns once, naming the file and the reason, the rows are absent, and a
    later write of the same keys is read back."""
    FeatureStore(tmp_path).write("ns", keys(0, 1), rows(0, 1))
    FeatureStore(tmp_path).write("ns", keys(2), rows(2))
    index = next(p for p in (tmp_path / "ns").glob("*.json") if "keys" in p.read_text()
                 and keys(0)[0].decode() in p.read_text())
    _damage(index, damage)
    store = FeatureStore(tmp_path)
    with pytest.warns(RuntimeWarning) as caught:
        values, found = store.read("ns", keys(0, 1, 2), width=4)
    named = [str(w.message) for w in caught if index.stem in str(w.message)]
    assert len(caught) == 1 and len(named) == 1 and "(" in named[0], [str(w.message) for w in caught]
    assert found.tolist() == [False, False, True]
    np.testing.assert_array_equal(values[2], rows(2)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the damaged file was reported once: this reader is done with it
        store.write("ns", keys(0, 1), rows(0, 1))
        values, found = store.read("ns", keys(0, 1, 2), width=4)
    assert found.all()
    np.testing.assert_array_equal(values, rows(0, 1, 2))
    with warnings.catch_warnings(record=True) as caught:  # a new reader may meet the damaged file again
        warnings.simplefilter("always")
        values, found = FeatureStore(tmp_path).read("ns", keys(0, 1, 2), width=4)
    assert found.all() and all(index.stem in str(w.message) for w in caught)
    np.testing.assert_array_equal(values, rows(0, 1, 2))


def test_any_header_bit_flip_is_absent_or_right(tmp_path):
    """Fault: one flipped bit at each position of a segment's ``.npy`` header. No read raises; each row is
    either reported absent or exactly the one written."""
    FeatureStore(tmp_path).write("ns", keys(0, 1), rows(0, 1))
    data = next((tmp_path / "ns").glob("*.npy"))
    raw = data.read_bytes()
    header_length = len(raw) - rows(0, 1).nbytes
    for position in range(header_length):
        data.write_bytes(raw[:position] + bytes([raw[position] ^ 0x01]) + raw[position + 1:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values, found = FeatureStore(tmp_path).read("ns", keys(0, 1), width=4)
        np.testing.assert_array_equal(values[found], rows(0, 1)[found])


def test_indexes_of_the_previous_format_stay_readable(tmp_path):
    """Fault: a store written by the previous version (index checksum over the data alone). Its segments read,
    and damage to their data is still caught."""
    FeatureStore(tmp_path).write("ns", keys(0, 1), rows(0, 1))
    index = next(p for p in (tmp_path / "ns").glob("*.json"))
    content = json.loads(index.read_text())
    del content["sha256_keys_data"]
    content.update(version=1, sha256=hashlib.sha256(rows(0, 1).tobytes()).hexdigest())
    index.write_text(json.dumps(content))
    values, found = FeatureStore(tmp_path).read("ns", keys(0, 1))
    assert found.all()
    np.testing.assert_array_equal(values, rows(0, 1))
    np.save(index.with_suffix(".npy"), rows(0, 1) + 1)
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        assert not FeatureStore(tmp_path).read("ns", keys(0, 1))[1].any()


@pytest.mark.filterwarnings("error")  # a healthy segment taken for damaged would warn
@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM])
def test_too_many_open_files_is_not_damage(tmp_path, monkeypatch, code):
    """Faults: EMFILE, ENFILE, ENOMEM when opening a segment's index or data. Once: the store closes its
    memory maps and retries, and the read succeeds. Always: StoreReadError naming the error, and once the
    fault is gone the healthy segment is read as before: it was never dropped."""
    FeatureStore(tmp_path).write("ns", keys(0, 1), rows(0, 1))
    real_open, failures = open, []

    def failing_open(path, *args, **kwargs):
        if failures and failures[0] > 0:
            failures[0] -= 1
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(_format, "open", failing_open, raising=False)
    for call in ("count", "read"):  # opening an index, then a data file
        store = FeatureStore(tmp_path)
        if call == "read":
            store.count("ns")
        failures[:] = [1]
        assert store.read("ns", keys(0, 1))[1].all()
        store = FeatureStore(tmp_path)
        if call == "read":
            store.count("ns")
        failures[:] = [10**9]
        with pytest.raises(store_package.StoreReadError, match=f"{errno.errorcode[code]}.*{os.strerror(code)}"):
            store.read("ns", keys(0, 1)) if call == "read" else store.count("ns")
        failures[:] = [0]
        values, found = store.read("ns", keys(0, 1))
        assert found.all() and store.count("ns") == 2
        np.testing.assert_array_equal(values, rows(0, 1))


BAD_NAMES = ["../x", "a/b", "ABSOLUTE", ".", "..", "", ".hidden", "a\0b", "a\\b", "C:x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_namespace_names_are_refused_by_every_call(tmp_path, name):
    """Fault: a namespace name that leaves the store folder or hides in it (``..``, ``a/b``, an absolute path,
    ``.``, empty, a leading dot, NUL, backslash, a drive). Every entry point refuses it, naming the argument and
    the value, and no file inside or outside the store changes."""
    root = tmp_path / "root"  # a store inside a folder of victims
    for victim in ("x", "store/a/b", "store/.hidden", "store/a\\b", "victim"):
        (root / victim).mkdir(parents=True)
        (root / victim / "keep.json").write_text("{}")
    store = FeatureStore(root / "store")
    store.write("ns", keys(0), rows(0))
    name = str(root / "victim") if name == "ABSOLUTE" else name  # never "/": a missing check must not cost a disk
    before = tree(root)
    calls = {
        "clear": lambda: store.clear(name), "write": lambda: store.write(name, keys(1), rows(1)),
        "writer": lambda: store.writer(name, 4), "read": lambda: store.read(name, keys(0)),
        "count": lambda: store.count(name), "keys": lambda: store.keys(name),
        "contains": lambda: store.contains(name, keys(0)), "compact": lambda: store.compact(name),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match="is not a valid namespace name") as caught:
            call()
        assert f"namespace={name!r}" in str(caught.value)
    assert tree(root) == before


@pytest.mark.filterwarnings("error")
def test_identity_records_round_trip_conflict_and_damage(tmp_path):
    """Faults: records of one identity that disagree (the model changed between two loads), a damaged record,
    a record holding another identity, a record that is not JSON. The newest readable record wins; damaged ones
    are ignored with a warning."""
    store = FeatureStore(tmp_path)
    identity = {"source": "org/model", "revision": "abc123", "dtype": "float32",
                "files": [["transformer/weights.safetensors", 123456, 1700000000.5]]}
    first, second = {"fingerprint": "3f2a", "blocks": 28, "width": 1152}, {"fingerprint": "9c01", "blocks": 28}
    assert store.lookup_identity(identity) is None
    store.record_identity(identity, first)
    folder = tmp_path / ".identities"
    written = tree(folder)
    store.record_identity(identity, dict(reversed(first.items())))  # the same again: nothing is written
    assert tree(folder) == written and len(written) == 1
    assert FeatureStore(tmp_path).lookup_identity(dict(reversed(identity.items()))) == first
    assert store.lookup_identity({**identity, "revision": "def456"}) is None
    assert store.namespaces() == {}  # records are no namespace
    store.record_identity(identity, second)
    assert FeatureStore(tmp_path).lookup_identity(identity) == second
    store.record_identity(identity, first)  # the model went back: the newest record wins again
    assert FeatureStore(tmp_path).lookup_identity(identity) == first
    newest = max(folder.iterdir(), key=lambda p: json.loads(p.read_text())["recorded_at"])
    for damage in ("{not json", json.dumps({**json.loads(newest.read_text()), "identity": {"other": 1}})):
        newest.write_text(damage)
        with pytest.warns(RuntimeWarning, match=f"Ignoring the damaged model-identity record.*{newest.name}"):
            assert FeatureStore(tmp_path).lookup_identity(identity) == second  # the older readable one
    with pytest.raises(ValueError, match="identity must be JSON-serialisable"):
        store.record_identity({"path": object()}, first)
    with pytest.raises(TypeError, match="resolved must be a dict"):
        store.record_identity(identity, ["not", "a", "dict"])


_RECORDER = textwrap.dedent(
    """
    import sys
    from sklearn_difffeat.store import FeatureStore
    store = FeatureStore(sys.argv[1])
    for i in range(100):
        store.record_identity({"model": "m"}, {"fingerprint": sys.argv[2]})
        assert store.lookup_identity({"model": "m"})["fingerprint"] in ("a", "b", "c")
    """
)


@pytest.mark.filterwarnings("error")
def test_concurrent_identity_writers_never_expose_a_partial_record(tmp_path):
    """Fault: several processes recording one identity at once, with different results. Every lookup, during
    and after, returns one of the recorded dicts and never warns."""
    procs = [subprocess.Popen([sys.executable, "-c", _RECORDER, str(tmp_path), value]) for value in "abc"]
    store = FeatureStore(tmp_path)
    while any(p.poll() is None for p in procs):
        found = store.lookup_identity({"model": "m"})
        assert found is None or found["fingerprint"] in ("a", "b", "c")
    assert [p.wait() for p in procs] == [0, 0, 0]
    assert store.lookup_identity({"model": "m"})["fingerprint"] in ("a", "b", "c")
    assert sorted(p.name.startswith(".") for p in (tmp_path / ".identities").iterdir()) == [False] * 3
