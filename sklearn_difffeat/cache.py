"""On-disk cache of per-sample arrays (latents, pooled features), shared by extractors, folds and processes.

Layout: ``<directory>/<namespace>/<key[:2]>/<key>.npz``. A namespace names everything that affects the stored
arrays except the sample (model fingerprint, timestep, pooling, ...); the key is the sample's content
fingerprint; one file holds named arrays (one per block for features). Writes go to a temporary file in the
same folder and are renamed into place, so a reader never sees a half-written file, a killed process leaves at
most a stray temporary file, and several processes may write the same entry at once (the last rename wins;
both wrote the same values, since features are a pure function of the key).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np


def stable_hash(*parts, size: int = 10) -> str:
    """Hex digest of JSON-serialisable parts; identical across processes and machines."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(payload, digest_size=size).hexdigest()


class FeatureCache:
    """A folder of cached per-sample arrays. Safe to share between processes.

    Parameters
    ----------
    directory : str or path-like
        Created on first write.
    """

    def __init__(self, directory):
        self.directory = Path(directory)

    def __repr__(self):
        return f"FeatureCache({str(self.directory)!r})"

    def _path(self, namespace: str, key: str) -> Path:
        return self.directory / namespace / key[:2] / f"{key}.npz"

    def load(self, namespace: str, key: str, names=None) -> dict[str, np.ndarray] | None:
        """The arrays stored for (namespace, key), or None when absent or unreadable.

        With ``names``, read only those arrays, and return None unless all of them are stored.
        """
        path = self._path(namespace, key)
        try:
            with np.load(path, allow_pickle=False) as data:
                wanted = data.files if names is None else list(names)
                if not set(wanted) <= set(data.files):
                    return None
                return {name: data[name] for name in wanted}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            # Only possible if the file was damaged outside this class (writes are atomic); recompute it.
            return None

    def store(self, namespace: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Add ``arrays`` to the entry (namespace, key), keeping the arrays it already has."""
        path = self._path(namespace, key)
        existing = self.load(namespace, key) or {}
        merged = {**existing, **arrays}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **merged)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def entries(self, namespace: str | None = None) -> int:
        """Number of stored entries (in one namespace, or in all)."""
        root = self.directory / namespace if namespace else self.directory
        return sum(1 for _ in root.rglob("*.npz")) if root.is_dir() else 0
