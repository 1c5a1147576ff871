"""Samples of several texts for :class:`~sklearn_difffeat.TextDiffusionFeatureExtractor` (``text_pooling``).

A sample may be a string or a list of strings (an image's captions). Each text of a list is keyed and stored on
its own, exactly as a single-text sample is (same namespaces, same keys): a caption shared by two images is
computed once, a store filled by single-text runs serves lists, and switching ``text_pooling`` between "mean" and
"first" runs no model once the texts are stored. A sample's feature and key:

* ``"mean"``: the mean of its texts' features (a text listed twice counts twice). Its key is its text's key when
  the list holds one text, else a hash of "mean" and its texts' keys, sorted (the same texts in any order give
  the same key). With a cache, this pooled feature is also stored under that key, in the namespaces of the
  extractor's blocks and timesteps: the key says what the row is the feature of, as a text's key does. So
  ``read_stored``, ``ExtractionResult.features()`` and ``export`` read list samples by their keys, with no
  model and no texts, as they read single texts.
* ``"first"``: its first text's feature, keyed as that text.
* ``"join"``: the feature of its texts joined with a space, keyed as that joined text.

A plain string sample is a list of one text under every pooling. An empty list, or a list holding something that
is not a non-empty string, fails that sample: a ``ValueError`` naming it, or (``on_error="record"``, as
:func:`~sklearn_difffeat.extract` runs) a listed failure with a row of NaN.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import scipy.sparse as sp

from ..store import KEY_LENGTH, StoreWriteError
from ._engine import TransformReport, read_stored_into
from ._inputs import check_offset, input_position, single_column
from ._runtime import open_store
from ._texts import _utf8

TEXT_POOLINGS = ("mean", "first", "join")
_LIST_TYPES = (list, tuple, np.ndarray)


def text_lists(X) -> list | None:
    """The samples of ``X`` when any of them is a list of texts; None when there is none (the plain path takes X,
    and raises its own errors for containers it refuses)."""
    try:
        X = single_column(X, "texts")
    except ValueError:
        return None
    if hasattr(X, "iloc"):
        values = X.to_numpy()
    elif isinstance(X, np.ndarray):
        values = X[:, 0] if X.ndim == 2 and X.shape[1] == 1 else X
        if values.ndim != 1:
            return None
    elif isinstance(X, (list, tuple)):
        values = X
    else:
        return None
    return list(values) if any(isinstance(v, _LIST_TYPES) for v in values) else None


def _member_problem(text) -> str | None:
    """Why ``text`` cannot be one of a sample's texts (completing "Text <i>, item <j> ..."), or None: the reasons
    of a single text that fails."""
    try:
        _utf8(text)
    except ValueError as exc:
        return str(exc)
    return None


def _members(samples: list) -> tuple[list, dict]:
    """Each sample's texts (a string sample is a list of one), and {position: reason} for the unusable ones (a
    reason completes "Text <i>")."""
    members, problems = [], {}
    for i, sample in enumerate(samples):
        texts = [sample] if isinstance(sample, str) else list(sample) if isinstance(sample, _LIST_TYPES) else None
        if texts is None:
            problems[i] = f" {_member_problem(sample) or 'is not a text or a list of texts.'}"
        elif not texts:
            problems[i] = " is an empty list: a sample needs at least one text."
        else:
            bad = next(((j, p) for j, t in enumerate(texts) if (p := _member_problem(t))), None)
            if bad is not None:
                problems[i] = f", item {bad[0]} {bad[1]}"
        members.append([str(t) for t in texts] if i not in problems else [])
    return members, problems


def _text_key(text: str) -> bytes:
    """The key a single-text sample gets (see ``TextSamples.keys``)."""
    return hashlib.sha256(b"text:" + _utf8(text)).hexdigest()[:KEY_LENGTH].encode()


def sample_key(texts: list, pooling: str) -> bytes:
    """The content key of a sample of ``texts`` under ``pooling`` (see the module docstring)."""
    if pooling == "first":
        return _text_key(texts[0])
    if pooling == "join":
        return _text_key(" ".join(texts))
    if len(texts) == 1:
        return _text_key(texts[0])
    keys = b"".join(sorted(_text_key(t) for t in texts))
    return hashlib.sha256(b"texts-mean:" + keys).hexdigest()[:KEY_LENGTH].encode()


def _failed_key(position: int) -> bytes:
    return hashlib.sha256(f"unreadable-text-list:{position}".encode()).hexdigest()[:KEY_LENGTH].encode()


def transform_lists(extractor, samples: list, *, on_error: str = "raise", offset: int = 0, **options):
    """Features and report of samples that may be lists of texts: the per-text features come from the
    extractor's plain path (stored per text), then are pooled by ``extractor.text_pooling``."""
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(extractor, "n_features_out_")
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}.")
    offset = check_offset(offset)
    pooling = extractor.text_pooling
    members, problems = _members(samples)
    failed = {i: f"Text {input_position(offset, i)}{reason}" for i, reason in problems.items()}
    if failed and on_error == "raise":
        raise ValueError(next(iter(failed.values())))
    n = len(samples)
    keys = np.array([_failed_key(i) if i in failed else sample_key(members[i], pooling) for i in range(n)],
                    dtype=f"S{KEY_LENGTH}")
    out = np.full((n, extractor.n_features_out_), np.nan, dtype=np.float32)
    from_store = np.zeros(n, dtype=bool)
    todo = [i for i in range(n) if i not in failed]
    if pooling == "mean" and extractor.cache is not None and todo:
        found = _read_pooled(extractor, keys[todo], out, np.asarray(todo))
        from_store[np.asarray(todo)[found]] = True
        todo = [i for i, hit in zip(todo, found) if not hit]
    computed_rows = set()
    if todo:
        pooled, text_failed, needed_model = _pool(extractor, [members[i] for i in todo], pooling, options)
        rows = np.asarray(todo)
        out[rows] = pooled
        from_store[rows] = ~needed_model
        computed_rows = {int(r) for r in rows[needed_model]}
        for local, (j, message) in sorted(text_failed.items()):
            which = ", its texts joined," if j < 0 else f", item {j}"
            failed[int(rows[local])] = f"Text {input_position(offset, int(rows[local]))}{which} {message}"
        if failed and on_error == "raise":
            raise ValueError(failed[min(failed)])
        if pooling == "mean" and extractor.cache is not None:
            _store_pooled(extractor, keys, out, [i for i in todo if i not in failed and len(members[i]) > 1],
                          options.get("on_store_error", "warn"))
    out[list(failed)] = np.nan
    from_store[list(failed)] = False
    return out, _report(keys, failed, from_store, computed_rows)


def _pool(extractor, groups: list, pooling: str, options: dict):
    """Pooled features of ``groups`` (each a list of texts), the failed texts as {group: (item, message)} (item
    -1: the joined text), and which groups needed the model. The texts go once each through the extractor's plain
    path."""
    if pooling == "mean":
        owner = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
        items = np.concatenate([np.arange(len(g)) for g in groups])
        texts = [t for g in groups for t in g]
    else:
        owner, items = np.arange(len(groups)), np.full(len(groups), 0 if pooling == "first" else -1)
        texts = [g[0] if pooling == "first" else " ".join(g) for g in groups]
    distinct, member = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    # Plain strings only: the extractor's plain path, which keys, reads and stores each text on its own.
    features, report = extractor.transform_with_report(list(distinct), on_error="record", **options)
    failed = {}
    for position, message in report.failed.items():  # name the failed text by its sample and item
        for occurrence in np.flatnonzero(member == position):
            group = int(owner[occurrence])
            failed.setdefault(group, (int(items[occurrence]), _without_position(message, position)))
    counts = np.bincount(owner, minlength=len(groups))
    pooled = _weighted_means(sp.csr_matrix((1.0 / counts[owner], (owner, member)),
                                           shape=(len(groups), len(distinct))), features)
    needed_model = np.zeros(len(groups), dtype=bool)
    np.logical_or.at(needed_model, owner, ~report.from_store[member])
    return pooled, failed, needed_model


def _weighted_means(weights, features, rows_at_once: int = 4096) -> np.ndarray:
    """``weights @ features`` summed in float64 (the result rounded once to float32), a block of rows at a time so
    that only the texts of those rows are ever held in float64. NaN rows (failed texts) count as 0: their samples
    fail anyway."""
    pooled = np.empty((weights.shape[0], features.shape[1]), dtype=np.float32)
    for start in range(0, weights.shape[0], rows_at_once):
        part = weights[start:start + rows_at_once]
        used = np.unique(part.indices)
        pooled[start:start + part.shape[0]] = part[:, used] @ np.nan_to_num(features[used].astype(np.float64))
    return pooled


def _without_position(message: str, position: int) -> str:
    """A plain-path failure message without its "Text <position> " start (the position among the distinct texts
    means nothing to the caller, who is told the sample and item instead)."""
    prefix = f"Text {position} "
    return message[len(prefix):] if message.startswith(prefix) else message


def _read_pooled(extractor, keys, out, rows) -> np.ndarray:
    """Copy the stored features of ``keys`` into ``out[rows]``; return which were complete."""
    layout = extractor.feature_layout()
    buffer = np.empty((len(keys), len(layout.blocks), len(layout.timesteps), layout.width), dtype=np.float32)
    complete = read_stored_into(layout, open_store(extractor.cache), keys, buffer, np.arange(len(keys)))
    found = complete.all(axis=1)
    out[rows[found]] = buffer[found].reshape(int(found.sum()), out.shape[1])
    return found


def _store_pooled(extractor, keys, out, rows: list, on_store_error: str) -> None:
    """Store the pooled features of ``rows`` under their sample keys, in the namespaces of the extractor's blocks
    and timesteps (each distinct key once)."""
    if not rows:
        return
    _, first = np.unique(keys[rows], return_index=True)
    rows = np.asarray(rows)[np.sort(first)]
    layout = extractor.feature_layout()
    values = out[rows].reshape(len(rows), len(layout.blocks), len(layout.timesteps), layout.width)
    store = open_store(extractor.cache)
    try:
        for bi, b in enumerate(layout.blocks):
            for ti, t in enumerate(layout.timesteps):
                namespace = layout.namespaces[b, t]
                store.write(namespace, keys[rows], values[:, bi, ti], layout.descriptions[namespace])
    except StoreWriteError as exc:
        if on_store_error == "raise":
            raise
        warnings.warn(f"{exc}. The pooled features are returned but not stored.", RuntimeWarning, stacklevel=4)


def _report(keys, failed: dict, from_store, computed_rows: set) -> TransformReport:
    """Counts by input position, as the plain path counts: failed, else computed (any of its texts needed the
    model), else stored."""
    computed = len(computed_rows - set(failed))
    return TransformReport(keys=keys, computed=computed, stored=len(keys) - len(failed) - computed,
                           failed=dict(sorted(failed.items())), from_store=from_store)
