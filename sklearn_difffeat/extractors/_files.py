"""Reading image files for keys and decoding: regular files only, read to the size they had when opened.

A file's content key is a hash of its bytes, and the store keeps what the model computed under that key, so
both the key and the decoded pixels must come from one and the same content:

* only regular files are read. A device (``/dev/zero`` never ends), a FIFO (opening it waits for a writer) or a
  folder is refused at once: the file is opened without blocking and checked with ``fstat`` before any read;
* a file is read to the size ``fstat`` gave before reading, never further, and refused if its size or
  modification time changed meanwhile (a file still being written). Hashing a prefix of a growing file would
  key bytes that are not the file, and decoding would then see other bytes than those hashed;
* decoding reads the bytes again and checks them against the key (:func:`content_key`): a file rewritten
  between hashing and decoding fails instead of storing another picture's features under the old key.

A search transforms the same files once per candidate and fold, so a process remembers the keys it hashed, by
what identifies a file's content without reading it: device, inode, size, and modification and change times in
nanoseconds (what make and rsync trust; the change time cannot be set back by a user). Writing a file gives it
new times, so a rewritten file is hashed anew. As git does for its index, a file modified in the last two seconds
is not remembered: a second write within the clock's resolution could otherwise keep its times.

Errors are ``ValueError`` s whose text is the reason alone; the caller names the input.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections import OrderedDict

from ..store import KEY_LENGTH

# An encoded image file's content given in memory (from a parquet column, a tar member, a dataset): keyed and
# decoded exactly as the file with the same bytes.
ENCODED = (bytes, bytearray, memoryview)
_CHUNK = 1 << 20
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


_KNOWN: OrderedDict = OrderedDict()  # file identity -> key, least recently used first
_KNOWN_LIMIT = 1 << 20  # about 200 MB at most
_KNOWN_LOCK = threading.Lock()
_SETTLED_SECONDS = 2.0


def file_key(path) -> bytes:
    """The content key of a file (hex ASCII bytes): a hash of its bytes, read as the module docstring says (or
    remembered from an earlier read in this process of the same, unchanged file)."""
    identity = _identity(path)
    if identity is not None:
        with _KNOWN_LOCK:
            key = _KNOWN.get(identity)
            if key is not None:
                _KNOWN.move_to_end(identity)
                return key
    digest = hashlib.sha256(b"file:")
    _read(path, digest.update)
    key = digest.hexdigest()[:KEY_LENGTH].encode("ascii")
    if identity is not None and _identity(path) == identity:  # unchanged while it was read
        with _KNOWN_LOCK:
            _KNOWN[identity] = key
            while len(_KNOWN) > _KNOWN_LIMIT:
                _KNOWN.popitem(last=False)
    return key


def _identity(path):
    """What identifies a regular file's content without reading it, or None (not a settled regular file)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None  # reading it says why
    changed = max(info.st_mtime_ns, info.st_ctime_ns)  # a copy may carry an old mtime, never an old ctime
    if not stat.S_ISREG(info.st_mode) or time.time_ns() - changed < _SETTLED_SECONDS * 1e9:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def read_file(path) -> bytes:
    """The whole content of a regular file, read as the module docstring says."""
    parts: list = []
    _read(path, parts.append)
    return b"".join(parts)


def content_key(data: bytes) -> bytes:
    """The key :func:`file_key` gives a file holding ``data``."""
    return hashlib.sha256(b"file:" + data).hexdigest()[:KEY_LENGTH].encode("ascii")


def unwrap_image_dict(item):
    """A Hugging Face image dict ``{"bytes": b or None, "path": p or None}`` as its bytes, else its path; any other
    item as it is."""
    if not isinstance(item, dict):
        return item
    if item.get("bytes") is not None:
        return item["bytes"]
    if item.get("path") is not None:
        return item["path"]
    raise ValueError(f"an image dict needs 'bytes' or 'path', got keys {sorted(item)} with no value")


def _read(path, sink) -> None:
    """Feed the bytes of the regular file ``path`` to ``sink`` in chunks; raise ``ValueError`` with the reason."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ValueError(f"cannot read file ({exc.strerror or exc})") from exc
    try:
        before = os.fstat(fd)
        for is_kind, kind in _KINDS:
            if is_kind(before.st_mode):
                raise ValueError(f"cannot read file: not a regular file ({kind})")
        remaining = before.st_size
        while remaining > 0:
            chunk = _read_chunk(fd, min(_CHUNK, remaining))
            if not chunk:
                break
            sink(chunk)
            remaining -= len(chunk)
        after = os.fstat(fd)
        if remaining or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise ValueError("cannot read file: it changed while being read (is it still being written?)")
    except OSError as exc:
        raise ValueError(f"cannot read file ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)


def _read_chunk(fd: int, size: int) -> bytes:
    return os.read(fd, size)
