"""A registry of model identities in a feature store, so that stored features can be found without the weights.

A namespace depends on what loading a model resolves (e.g. the fingerprint of its weights), which costs the
whole load. A record maps an *identity* (what names a model without loading it: a hub id and revision, or a
folder's file names, sizes and times, plus options such as the dtype) to what loading it *resolved*. The store
does not interpret either dict; both must be JSON-serialisable and are compared after a JSON round trip.

Records are files ``.identities/<hash of identity>-<hash of resolved>.json``, each holding the identity, the
resolved dict and ``recorded_at``, written atomically and durably. Writers never touch each other's records, so
any number may record at once. When two records share an identity (two loads resolved different values), a
lookup returns the one with the largest ``recorded_at`` (ties: the larger file name). ``recorded_at`` is the
writer's clock in nanoseconds, raised past the newest record of that identity the writer could see, so that a
record made after another one was visible wins whatever the clocks say.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ._files import is_transient, make_folder, os_error_text, write_atomic
from ._format import FORMAT, StoreWriteError, caused_by, stable_hash

IDENTITY_FOLDER = ".identities"  # starts with '.': never taken for a namespace, by this version or an older one
_RECORD_VERSION = 1


def _canonical(value, argument: str):
    """``value`` after a JSON round trip (tuples become lists, ...); errors name ``argument``."""
    if not isinstance(value, dict):
        raise TypeError(f"{argument} must be a dict, got {type(value).__name__}.")
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{argument} must be JSON-serialisable (str keys; strings, finite numbers, booleans, None, "
                         f"lists and dicts): {exc}") from exc
    return json.loads(text)


def _read_record(path: Path, identity: dict) -> tuple[int, str, dict]:
    """``(recorded_at, file name, resolved)`` of a record; ``ValueError`` if it is damaged or holds another
    identity."""
    with open(path, "rb") as handle:
        record = json.loads(handle.read())
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError("not an identity record")
    recorded_at, resolved = record.get("recorded_at"), record.get("resolved")
    if type(recorded_at) is not int or not isinstance(resolved, dict):
        raise ValueError("its 'recorded_at' or 'resolved' field is missing or of the wrong type")
    if record.get("identity") != identity:
        raise ValueError("it holds another identity than its name says")
    return recorded_at, path.name, resolved


def _newest(folder: Path, identity: dict, warn) -> tuple[int, str, dict] | None:
    """The newest readable record of ``identity`` in ``folder``; ``warn(path, message)`` for each damaged one.

    Transient OS errors (too many open files, ...) propagate: they say nothing about the records.
    """
    prefix = f"{stable_hash(identity, size=16)}-"
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".json")]
    except FileNotFoundError:
        return None
    newest = None
    for name in names:
        try:
            record = _read_record(folder / name, identity)
        except FileNotFoundError:  # removed meanwhile (the store was cleared)
            continue
        except (OSError, ValueError) as exc:
            if is_transient(exc):
                raise
            warn(folder / name, f"Ignoring the damaged model-identity record {folder / name} ({exc}).")
            continue
        newest = record if newest is None else max(newest, record, key=lambda r: r[:2])
    return newest


def record(directory: Path, identity: dict, resolved: dict, warn, durable: bool = True) -> None:
    """Record that loading the model named by ``identity`` resolved ``resolved`` (see the module docstring).

    Nothing is written when the newest record of ``identity`` already holds ``resolved``. Raises
    :class:`StoreWriteError` naming the folder and the OS error when the record cannot be written.
    """
    identity, resolved = _canonical(identity, "identity"), _canonical(resolved, "resolved")
    folder = directory / IDENTITY_FOLDER
    try:
        newest = _newest(folder, identity, warn)
        if newest is not None and newest[2] == resolved:
            return
        recorded_at = max(time.time_ns(), newest[0] + 1 if newest else 0)
        record = {"format": FORMAT, "record": "model identity", "version": _RECORD_VERSION,
                  "recorded_at": recorded_at, "identity": identity, "resolved": resolved}
        name = f"{stable_hash(identity, size=16)}-{stable_hash(resolved, size=8)}.json"
        make_folder(folder, durable)
        write_atomic(folder / name, json.dumps(record, indent=1).encode(), durable=durable)
    except OSError as exc:
        raise caused_by(StoreWriteError, f"Could not record a model identity in the feature store {directory} "
                                         f"(folder {IDENTITY_FOLDER}): {os_error_text(exc)}", exc) from exc


def lookup(directory: Path, identity: dict, warn) -> dict | None:
    """What loading the model named by ``identity`` resolved, from its newest record; None if there is none."""
    newest = _newest(directory / IDENTITY_FOLDER, _canonical(identity, "identity"), warn)
    return None if newest is None else newest[2]
