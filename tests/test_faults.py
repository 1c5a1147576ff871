"""Fault-injection tests: each test injects one kind of fault (a full disk, a damaged file, too many open files,
a hostile name, ...) and names it in its docstring, then checks what the user sees and what survives.

Faults are injected at the lowest call the code uses (``os.write``, ``os.open``, ``os.fsync``, ``open``), or for
real where the OS allows it (a file-size limit in a subprocess). Sections group them by the part of the library
that must withstand them.
"""

import contextlib
import copy
import errno
import hashlib
import json
import multiprocessing
import os
import re
import resource
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zlib

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV
from sklearn.multiclass import OneVsRestClassifier

import sklearn_difffeat.store as store_package
from sklearn_difffeat import DiTFeatureExtractor, FusionClassifier, TextDiffusionFeatureExtractor, extract
from sklearn_difffeat.backbones import module_fingerprint
from sklearn_difffeat.datasets import load_fashion_mosaics
from sklearn_difffeat.metrics import SCORERS, mean_average_precision, multilabel_report
from sklearn_difffeat.search import BlockTimestepSearchCV
from sklearn_difffeat.store import FeatureStore, StoreWriteError, _format

from search_estimators import Breaks, Table


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


# ---- metrics, search and fingerprints --------------------------------------------------------------------------
def _picky_data(n=8):
    return np.arange(n, dtype=float).reshape(-1, 1), np.zeros(n)


class FoldBreaks(Table):
    """Score = table[x]; fitting an x listed in `broken` raises on the training folds that hold row 0 only."""

    def __init__(self, x=0, table=(0.0,), broken=()):
        super().__init__(x=x, table=table)
        self.broken = broken

    def fit(self, X, y=None):
        if self.x in self.broken and 0.0 in np.asarray(X)[:, 0]:
            raise ValueError(f"x={self.x} cannot fit row 0")
        return self


def _nan_scorer(estimator, X, y):
    return float("nan")


@pytest.mark.filterwarnings("ignore:.*evaluated candidates have non-finite scores")
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
@pytest.mark.parametrize("to_sparse", [sp.csr_matrix, sp.csc_matrix, sp.csr_array, sp.csc_array, sp.coo_array])
def test_sparse_targets_score_and_a_search_without_any_score_raises(to_sparse):
    """Fault: a scipy sparse indicator Y (which FusionClassifier and OneVsRestClassifier accept). Every metric and
    scorer gives what it gives on the dense Y, so a search over it finds the same best candidate; a sparse Y with a
    value other than 0/1 is refused; and a search whose candidates all fail or score NaN raises, naming how many
    candidates and the first error (or that all scores were NaN), instead of returning best_score_ = nan."""
    rng = np.random.RandomState(0)
    X = rng.randn(60, 5)
    Y = (X[:, :3] + 0.5 * rng.randn(60, 3) > 0).astype(int)
    S = rng.rand(60, 3)
    model = OneVsRestClassifier(LogisticRegression()).fit(X, Y)
    for metric in (mean_average_precision, lambda a, b: multilabel_report(a, b, top_k=2)):
        assert metric(to_sparse(Y), S) == metric(Y, S)
    for scorer in SCORERS.values():
        assert scorer(model, X, to_sparse(Y)) == scorer(model, X, Y)
    with pytest.raises(ValueError, match=r"Y_true is a sparse matrix, .* stores the values \[2\]"):
        mean_average_precision(to_sparse(np.where(Y == 1, 2, 0)), S)
    grid = {"estimator__C": [0.01, 0.1, 1.0]}
    kw = dict(cv=3, priors=None, random_state=0)
    dense = BlockTimestepSearchCV(OneVsRestClassifier(LogisticRegression()), grid, **kw).fit(X, Y)
    found = BlockTimestepSearchCV(OneVsRestClassifier(LogisticRegression()), grid, **kw).fit(X, to_sparse(Y))
    assert np.isfinite(found.best_score_) and found.best_score_ == dense.best_score_
    assert found.best_params_ == dense.best_params_
    # Nothing to pick: every candidate scores NaN, or every candidate fails on one fold of two.
    with pytest.raises(ValueError, match=r"None of the 3 evaluated candidates .*all scores were NaN\. Check"):
        BlockTimestepSearchCV(Table(table=(1.0, 2.0, 3.0)), {"x": range(3)}, scoring=_nan_scorer, cv=2,
                              priors=None).fit(*_picky_data())
    with pytest.raises(ValueError, match=r"None of the 3 evaluated .*first error: ValueError: x=\d cannot fit row 0"):
        BlockTimestepSearchCV(FoldBreaks(table=(1.0, 2.0, 3.0), broken=(0, 1, 2)), {"x": range(3)}, cv=2,
                              priors=None).fit(*_picky_data())


def _twice(estimator, X, y):
    return 2 * estimator.score(X, y)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.FitFailedWarning")
@pytest.mark.filterwarnings("ignore:.*evaluated candidates have non-finite scores")
@pytest.mark.filterwarnings("ignore:One or more of the (test|train) scores are non-finite")  # GridSearchCV's
@pytest.mark.parametrize("scoring", [None, {"land": _twice, "half": lambda e, X, y: e.score(X, y) / 2}])
@pytest.mark.parametrize("breaks", [Breaks, FoldBreaks], ids=["fails_on_every_fold", "fails_on_one_fold"])
def test_a_failed_candidate_never_wins_whatever_error_score(breaks, scoring):
    """Fault: a numeric error_score above every real score (1.0 here, real scores 0 to 0.5), on a candidate that
    fails on every fold or on one fold. It ranks last in every rank_test_* column, so best_index_, best_params_,
    best_score_ and the refit are the best candidate that fitted; the rows keep GridSearchCV's columns and
    scores, and the ranks are GridSearchCV's with error_score=nan (which ranks failures last)."""
    est = breaks(table=(0.0, 0.5, 0.2), broken=(2,))
    refit = True if scoring is None else "land"
    s = BlockTimestepSearchCV(est, {"x": range(3)}, cv=2, priors=None, error_score=1.0, scoring=scoring,
                              refit=refit).fit(*_picky_data())
    assert s.best_params_ == {"x": 1} and s.best_estimator_.x == 1
    assert s.best_score_ == pytest.approx(0.5 * (1 if scoring is None else 2))
    ref = GridSearchCV(est, {"x": range(3)}, cv=2, error_score=1.0, scoring=scoring, refit=False).fit(*_picky_data())
    ranked = GridSearchCV(est, {"x": range(3)}, cv=2, error_score=np.nan, scoring=scoring, refit=False)
    ranked.fit(*_picky_data())
    assert set(s.cv_results_) - {"search_step"} == set(ref.cv_results_)
    order = [p["x"] for p in s.cv_results_["params"]]
    for metric in ["score"] if scoring is None else list(scoring):
        for key in (f"mean_test_{metric}", f"split0_test_{metric}", f"split1_test_{metric}"):
            np.testing.assert_array_equal(s.cv_results_[key], ref.cv_results_[key][order], err_msg=key)
        key = f"rank_test_{metric}"
        np.testing.assert_array_equal(s.cv_results_[key], ranked.cv_results_[key][order], err_msg=key)
        assert s.cv_results_[key][order.index(2)] == 3
        assert s.cv_results_[key].dtype == ref.cv_results_[key].dtype


def _tiny_dit(seed):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=8, patch_size=2, sample_size=8, num_embeds_ada_norm=10)


def _tiny_ddit(seed):
    from sklearn_difffeat.backbones.mdlm import DDiTConfig, DDiTModel

    torch.manual_seed(seed)
    return DDiTModel(DDiTConfig(vocab_size=50, model_length=16, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=4))


@pytest.mark.parametrize("build", [_tiny_dit, _tiny_ddit], ids=["dit", "ddit"])
def test_the_model_fingerprint_covers_every_weight(build):
    """Fault: two checkpoints of one architecture that differ in a single weight element, one the former
    fingerprint's stride (about 256 values per tensor) skipped. Their fingerprints differ; rebuilding the same
    weights gives the same fingerprint, and so does a copy; the same values in another dtype do not."""
    model = build(seed=0)
    assert module_fingerprint(model) == module_fingerprint(build(seed=0)) == module_fingerprint(copy.deepcopy(model))
    before = module_fingerprint(model)
    name, weight = max(model.state_dict().items(), key=lambda item: item[1].numel())
    step = weight.numel() // 256  # the former sample read flat[::step]
    assert step >= 2, f"{name} is too small to have elements off the former sample"
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.state_dict()[name].view(-1)[step + 1] += 1.0
    assert (step + 1) % step != 0  # not a sampled element
    assert module_fingerprint(changed) != before
    assert module_fingerprint(copy.deepcopy(model).to(torch.float64)) != before


def _reference_fingerprint(*modules):
    """The fingerprint computed by hand from its definition: BLAKE2b-80 over each module's class name, then per
    weight (sorted by name) its name, shape and dtype and the BLAKE2b-256 of its raw bytes."""
    digest = hashlib.blake2b(digest_size=10)
    for module in modules:
        if module is None:
            digest.update(b"<none>")
            continue
        digest.update(type(module).__name__.encode())
        for name, t in sorted(module.state_dict().items()):
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            digest.update(hashlib.blake2b(raw, digest_size=32).digest())
    return digest.hexdigest()


def test_fingerprints_of_groups_sharing_a_module_hash_it_once(monkeypatch):
    from sklearn_difffeat.backbones import _hub

    transformer, encoder = _tiny_dit(seed=0), _tiny_ddit(seed=1)
    hashed = []
    real = _hub._bytes_digest
    monkeypatch.setattr(_hub, "_bytes_digest", lambda t: hashed.append(t.numel()) or real(t))
    both, alone = _hub.module_fingerprints((transformer, None, encoder), (encoder,))
    assert both == _reference_fingerprint(transformer, None, encoder) and alone == _reference_fingerprint(encoder)
    assert len(hashed) == len(transformer.state_dict()) + len(encoder.state_dict())  # the shared one once


def _axis_error(axis):
    return lambda: BlockTimestepSearchCV(Table(table=(0.0, 1.0, 2.0)), {"x": axis}, cv=2).fit(*_picky_data())


def _nullable_targets():
    return pd.DataFrame({"a": pd.array([1, None, 0, 1], dtype="Int64"), "b": pd.array([0, 1, 1, 0], dtype="Int64")})


_SCORES = np.array([[0.9, 0.2], [0.8, 0.4], [0.3, 0.6], [0.1, 0.7]])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: FusionClassifier(max_epochs=1).fit(np.zeros((4, 3)), _nullable_targets()),
         r"^y has 1 missing value\(s\) \(NaN, None or pd.NA\), the first at row 1, column 0"),
        (lambda: mean_average_precision(_nullable_targets(), _SCORES), r"^Y_true has 1 missing value\(s\)"),
        (lambda: multilabel_report(_nullable_targets(), _SCORES), r"^Y_true has 1 missing value\(s\)"),
        (lambda: mean_average_precision(np.array([[1, 0], [None, 1], [0, 1], [1, 1]], dtype=object), _SCORES),
         r"^Y_true has 1 missing value\(s\) .* row 1, column 0"),
        (lambda: multilabel_report([[1, 0], [0, 1]], [[0.9, 0.1], [0.2, 0.8]], threshold=float("nan")),
         r"^threshold must be a real number \(not NaN"),
        (lambda: multilabel_report([[1, 0], [0, 1]], [[0.9, 0.1], [0.2, 0.8]], top_k=True),
         r"^top_k must be a positive integer .*booleans are not counts.*got True"),
        (_axis_error(np.array([[0, 1, 2]])), r"param_grid\['x'\] is a 2-D array of shape \(1, 3\)"),
        (_axis_error({0, 1, 2}), r"param_grid\['x'\] is a set, which has no order"),
        (_axis_error(frozenset({0, 1, 2})), r"param_grid\['x'\] is a frozenset, which has no order"),
        (_axis_error({0: "a", 1: "b", 2: "c"}.keys()), r"param_grid\['x'\] is a dict_keys, which has no order"),
        (_axis_error({"a": 0, "b": 1, "c": 2}.values()), r"param_grid\['x'\] is a dict_values, which has no order"),
    ],
    ids=["fusion_pd_na", "map_pd_na", "report_pd_na", "map_none", "threshold_nan", "top_k_true", "axis_2d",
         "axis_set", "axis_frozenset", "axis_dict_keys", "axis_dict_values"],
)
def test_bad_arguments_raise_a_value_error_naming_them(call, match):
    """Fault: arguments that used to raise a TypeError from deep inside (pd.NA and None in targets), or to be
    read as something else (a NaN threshold predicting nothing, top_k=True as top-1, a 2-D array as one
    candidate, a set's arbitrary order as the climb's order). Each raises a ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        call()


def test_a_failed_start_names_the_error_not_the_data_it_quotes():
    """Fault: scikit-learn's error for complex data ends with the data itself ("Complex data not supported"
    followed by the array), so the last line of each fold's traceback is a row of numbers. The search's error
    for a start that fails on every fold names the exception line instead, and quotes no data."""
    rng = np.random.RandomState(0)
    X = (rng.uniform(size=10) + 1j * rng.uniform(size=10)).reshape(-1, 2)
    y = rng.uniform(size=5) + 0j
    search = BlockTimestepSearchCV(Ridge(), {"alpha": [0.1, 1.0, 10.0]}, cv=3, priors=None)
    with pytest.raises(ValueError) as caught:
        search.fit(X, y)
    message = str(caught.value)
    assert re.search(r"failed on every CV fold, so there is nothing to climb from: ValueError: Complex data not "
                     r"supported\. Fix the estimator", message), message
    assert "j" not in message.partition("Complex data")[2].partition(". Fix")[0], message


# ---- engine -------------------------------------------------------------------------------------------------------

BLOCKS, STEPS = [1, 4], [10]


def dit(model, **params):
    return DiTFeatureExtractor(str(model), **{"block": BLOCKS, "timestep": STEPS, **params}).fit(None)


def fail_store_writes(monkeypatch, error, allowed=0):
    """Every file the store writes after the first ``allowed`` ones fails with ``error``.

    The one place that knows the store's lowest write call: adjust it here if the store writes elsewhere.
    """
    real, calls = _format.write_atomic, []

    def write_atomic(path, *chunks, **options):
        calls.append(path)
        if len(calls) > allowed:
            raise error
        return real(path, *chunks, **options)

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
    monkeypatch.setattr(_format, "write_atomic", lambda path, *chunks, **options: probe.append(path)
                        or real(path, *chunks, **options))
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


def _writer_threads():
    return [t for t in threading.enumerate() if t.name == "feature-store-writer"]


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_segment_write_mid_run_fails_it_and_keeps_the_segments_before(tiny_dit_dir, rgb_images, tmp_path,
                                                                              monkeypatch, background):
    """Fault 2, mid-run: with a segment per batch, the disk fills after a few segments. Written by the background
    thread or in the run's own, the run raises the store's StoreWriteError, leaves no thread behind, and every
    segment completed before the error holds exactly the features a run without a store computes."""
    from sklearn_difffeat.extractors import _writes

    monkeypatch.setattr(_writes, "WRITE_IN_BACKGROUND", background)
    reference = dit(tiny_dit_dir, batch_size=2, num_workers=0).transform(rgb_images)
    store = tmp_path / "store"
    FeatureStore.create(store, segment_rows=2)  # a segment for every batch of 2
    calls = fail_store_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), allowed=8)
    ext = dit(tiny_dit_dir, cache=str(store), batch_size=2, num_workers=0)
    with pytest.raises(StoreWriteError, match=f"{store}.*No space left on device"):
        ext.transform_with_report(rgb_images, on_store_error="raise")
    assert len(calls) == 9  # nothing is tried after the write that failed
    assert not _writer_threads()
    kept = FeatureStore(store)
    layout = ext.feature_layout()
    stored = {}
    keys = dit(tiny_dit_dir).transform_with_report(rgb_images)[1].keys
    for (block, step), name in layout.namespaces.items():
        values, found = kept.read(name, keys, layout.width)
        stored[name] = int(found.sum())
        column = (BLOCKS.index(block) * len(STEPS) + STEPS.index(step)) * layout.width
        np.testing.assert_array_equal(values[found], reference[found, column:column + layout.width])
    assert sum(stored.values()) > 0 and all(count % 2 == 0 for count in stored.values())


def test_the_writer_thread_never_blocks_a_run_after_an_error():
    """Fault 2, hand-over: a slow disk fills the hand-over queue, so the run waits; then the write fails. The run
    gets the error once, and neither the hand-overs waiting nor later ones nor the close wait forever on the
    thread that stopped writing."""
    from sklearn_difffeat.extractors._writes import StoreWrites

    disk_answers = threading.Event()

    class SlowFullDisk:
        def writer(self, namespace, width, description):
            return self

        def add(self, keys, values):
            disk_answers.wait(timeout=30)
            raise StoreWriteError("Could not write a segment: [ENOSPC] No space left on device")

    writes = StoreWrites(SlowFullDisk(), background=True, depth=1)
    batch = [("ns", None, keys(0), rows(0))]
    outcome = []

    def run():
        raised = 0
        for _ in range(6):  # the first is being written, the second waits in the queue, the third waits to enter
            try:
                writes.put(batch)
            except StoreWriteError:
                raised += 1
        try:
            writes.close()
        except StoreWriteError:
            raised += 1
        outcome.append(raised)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive() and not outcome  # the run waits for the disk: memory stays bounded
    disk_answers.set()
    thread.join(timeout=30)
    assert not thread.is_alive() and outcome == [1]
    assert not _writer_threads()


def test_features_and_store_are_the_same_with_and_without_the_writer_thread(tiny_dit_dir, rgb_images, tmp_path,
                                                                           monkeypatch):
    """The background writer changes when segments are written, not what: the same features, the same stored
    rows, for a run that writes a segment per batch."""
    from sklearn_difffeat.extractors import _writes

    runs = {}
    for background in (True, False):
        monkeypatch.setattr(_writes, "WRITE_IN_BACKGROUND", background)
        store = tmp_path / f"store-{background}"
        FeatureStore.create(store, segment_rows=2)
        ext = dit(tiny_dit_dir, cache=str(store), batch_size=2)
        features, report = ext.transform_with_report(rgb_images)
        kept = FeatureStore(store)
        rows = {name: kept.read(name, report.keys, None) for name in kept.namespaces()}
        runs[background] = features, rows
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    assert runs[True][1].keys() == runs[False][1].keys() and len(runs[True][1]) == len(BLOCKS) * len(STEPS) + 1
    for name, (values, found) in runs[True][1].items():
        assert found.all()
        np.testing.assert_array_equal(values, runs[False][1][name][0])


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


def test_command_local_clusters_start_workers_that_may_decode_in_processes(monkeypatch):
    """Parallel decoding: the command's local cluster starts non-daemon workers, so that extractors there can
    start DataLoader decoding processes, with torch's OpenMP threads waiting passively (set before torch loads)."""
    import argparse

    import dask
    import distributed  # noqa: F401  (its defaults in Dask's config)

    from sklearn_difffeat import _cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    trim = dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"]
    args = argparse.Namespace(scheduler=None, local_gpus=None, local_workers=1)
    with contextlib.ExitStack() as stack:
        client = _cli.dask_client(args, stack)
        seen = client.run(lambda: (multiprocessing.current_process().daemon, os.environ.get("OMP_WAIT_POLICY"),
                                   os.environ.get("MALLOC_TRIM_THRESHOLD_")))
    # The nanny's own worker settings are kept beside the added one (the shard task undoes them for torch).
    assert list(seen.values()) == [(False, "PASSIVE", str(trim))]
    assert "OMP_WAIT_POLICY" not in os.environ


def test_dask_worker_config_keeps_the_nannys_settings_and_a_users_wait_policy(monkeypatch):
    import dask
    import distributed  # noqa: F401  (its defaults in Dask's config)

    from sklearn_difffeat.extraction import dask_worker_config

    defaults = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    config = dask_worker_config(daemon=True)
    assert config == {"distributed.worker.daemon": True,
                      "distributed.nanny.pre-spawn-environ": {**defaults, "OMP_WAIT_POLICY": "PASSIVE"}}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice reaches the workers through the nanny
    assert dask_worker_config()["distributed.nanny.pre-spawn-environ"] == defaults
    assert dask.config.get("distributed.nanny.pre-spawn-environ") == defaults  # nothing changed globally


def test_the_command_sets_a_passive_openmp_wait_before_torch_loads():
    """OpenMP reads OMP_WAIT_POLICY when torch loads: the command module must not load torch before main() sets
    it, and main() leaves a value the user set."""
    code = ("import sys, sklearn_difffeat.__main__ as m; loaded = 'torch' in sys.modules\n"
            "try:\n    m.main(['export', '--help'])\nexcept SystemExit:\n    pass\n"
            "import os; print(loaded, os.environ.get('OMP_WAIT_POLICY'), file=sys.stderr)")
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stderr.strip().splitlines()[-1] == f"False {expected}"
