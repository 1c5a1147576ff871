"""Naming a model without loading it, so that reading stored features needs no weights.

Store namespaces are named from what *loading* a model resolves: the fingerprint of its weights, its depth and
width, its timestep range, resolution or token budget. Loading DiT-XL/2 reads 2.7 GB only to compute that. So an
extractor with a cache that loads a model named by a string records in the store
(:meth:`~sklearn_difffeat.FeatureStore.record_identity`) the model's *identity*, computed without loading it,
together with the values the feature layout reads from the loaded backbone (a :class:`ResolvedModel`). Later
reads compute the identity, find the record and build the layout from it.

The identity of a model is the extractor class, the ``model`` string as given, the compute dtype (the one loading
option that enters the namespaces; device and ``torch.compile`` do not change features), the library version, the
version of the weights-fingerprint scheme, and a *state* that changes whenever the files would load differently:

* a local folder or an embedded model: a digest of the relative name, size and modification time of every file
  under it (hidden files and folders aside);
* a Hugging Face Hub id: the commit the local Hugging Face cache resolves it to (its snapshot folder is what an
  offline load reads; the files there are content-addressed). A hub id not in the local cache has no identity:
  reading its features needs a load, which downloads it.

Models given as modules in memory never use the registry. Beside each identity record, a second record keeps the
newest state seen for the same (extractor, model, dtype): when the current state has no record but that one
exists, the files changed (or differ on this machine), which is said once per process before loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..backbones import FINGERPRINT_VERSION, resolve_model_dir

_SCHEMA = 1  # version of the ResolvedModel fields in a record; a record of another version is not used
_EMBEDDED = "embedded:"
_HUB_FILES = ("model_index.json", "config.json")  # one of them is at the top of every loadable hub repo
_FOUND: dict = {}  # (store folder, identity digest) -> ResolvedModel found in the store, per process
_WARNED: set = set()  # (store folder, model state key) already warned about


@dataclass(frozen=True)
class ResolvedModel:
    """What the feature layout and the namespaces read from a loaded backbone, and nothing else.

    It stands in for the backbone wherever parameters are validated and the layout is built, so it carries the
    backbone's attribute names; fields a modality does not have are None.
    """

    fingerprint: str
    dtype: str
    num_blocks: int
    width: int
    num_train_timesteps: int | None = None  # images
    null_class: int | None = None
    resolution: int | None = None
    image_channels: int | None = None
    num_tokens: int | None = None
    max_length: int | None = None  # text
    mask_token_id: int | None = None

    @classmethod
    def of(cls, backbone) -> ResolvedModel:
        """The values of a loaded backbone."""
        values = {f.name: getattr(backbone, f.name, None) for f in fields(cls)}
        values = {k: int(v) if isinstance(v, int) else v for k, v in values.items()}
        return cls(**{**values, "fingerprint": str(backbone.fingerprint),
                      "dtype": str(backbone.dtype).replace("torch.", "")})

    def as_record(self) -> dict:
        return {"schema": _SCHEMA, **asdict(self)}

    @classmethod
    def from_record(cls, record: dict) -> ResolvedModel | None:
        """The values of a record, or None when it was written with other fields."""
        names = {f.name for f in fields(cls)}
        if record.get("schema") != _SCHEMA or set(record) - {"schema"} != names:
            return None
        return cls(**{k: v for k, v in record.items() if k != "schema"})


class ModelIdentity:
    """The identity of one named model for one extractor class and dtype, and its records in one store."""

    def __init__(self, store, extractor: str, model, dtype: str):
        from .. import __version__

        self.store = store
        self.model = os.fspath(model)
        self.base = {"extractor": extractor, "model": self.model, "dtype": dtype, "library": __version__,
                     "fingerprint_version": FINGERPRINT_VERSION}
        self.state = model_state(self.model)

    def lookup(self) -> ResolvedModel | None:
        """The recorded values of this identity; None (after a warning, once, if the files changed) when there
        are none, and the model must be loaded."""
        if self.state is None:
            return None
        identity = self._identity(self.state)
        memo = (str(self.store.directory), _digest(identity))
        if memo in _FOUND:
            return _FOUND[memo]
        record = self.store.lookup_identity(identity)
        resolved = ResolvedModel.from_record(record) if record is not None else None
        if resolved is not None:
            _FOUND[memo] = resolved
            return resolved
        self._warn_if_changed()
        return None

    def record(self, resolved: ResolvedModel) -> None:
        """Record what loading resolved. Skipped when the files changed while the model loaded, or when the store
        cannot be written (a read-only store is still read, only without this shortcut)."""
        if self.state is None or model_state(self.model) != self.state:
            return
        try:
            self.store.record_identity(self._identity(self.state), resolved.as_record())
            self.store.record_identity({**self.base, "record": "newest state"}, self.state)
        except OSError:
            return
        _FOUND[(str(self.store.directory), _digest(self._identity(self.state)))] = resolved

    def _identity(self, state: dict) -> dict:
        # A folder's file list can be long: the identity holds its digest; the newest-state record holds the list.
        compact = {"files": _digest(state["files"])} if "files" in state else state
        return {**self.base, **compact}

    def _warn_if_changed(self) -> None:
        newest = self.store.lookup_identity({**self.base, "record": "newest state"})
        key = (str(self.store.directory), _digest(self.base), _digest(self.state))
        if newest is None or newest == self.state or key in _WARNED:
            return
        _WARNED.add(key)
        warnings.warn(f"The model {self.model!r} differs from the one whose features were recorded in the store "
                      f"{self.store.directory} ({_difference(newest, self.state)}); loading it to name the "
                      "store's namespaces.", UserWarning, stacklevel=5)


def model_state(model: str) -> dict | None:
    """What changes when the files of ``model`` would load differently, computed without loading; None when it
    cannot be known (a hub id absent from the local cache, a missing folder)."""
    try:
        if model.startswith(_EMBEDDED) or Path(model).expanduser().is_dir():
            return {"files": _file_state(resolve_model_dir(model))}
        revision = _cached_revision(model)
    except (OSError, ValueError):
        return None
    return None if revision is None else {"revision": revision}


def _file_state(folder: Path) -> list:
    """``[relative name, size, mtime in ns]`` of every file under ``folder`` (following links), sorted."""
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back to a folder already walked
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            info = os.stat(path)
            files.append([os.path.relpath(path, folder).replace(os.sep, "/"), info.st_size, info.st_mtime_ns])
    return sorted(files)


def _cached_revision(model: str) -> str | None:
    """The commit of the snapshot the local Hugging Face cache holds for hub id ``model`` (no network)."""
    if model.count("/") != 1 or model.startswith((".", "/", "~")) or " " in model:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in _HUB_FILES:
        path = try_to_load_from_cache(model, filename)
        if isinstance(path, str):  # snapshots/<commit>/<filename>
            return Path(path).parent.name
    return None


def _difference(old: dict, new: dict) -> str:
    if "revision" in old or "revision" in new:
        return f"the Hugging Face cache now holds revision {new.get('revision')}, not {old.get('revision')}"
    before, after = {f[0]: f[1:] for f in old["files"]}, {f[0]: f[1:] for f in new["files"]}
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    return f"{len(changed)} file(s) added, removed or modified, e.g. {changed[0]}" if changed else "its files"


def _digest(value) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=12).hexdigest()
