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

Errors are ``ValueError`` s whose text is the reason alone; the caller names the input.
"""

from __future__ import annotations

import hashlib
import os
import stat

from ..store import KEY_LENGTH

# An encoded image file's content given in memory (from a parquet column, a tar member, a dataset): keyed and
# decoded exactly as the file with the same bytes.
ENCODED = (bytes, bytearray, memoryview)
_CHUNK = 1 << 20
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_key(path) -> bytes:
    """The content key of a file (hex ASCII bytes): a hash of its bytes, read as the module docstring says."""
    digest = hashlib.sha256(b"file:")
    _read(path, digest.update)
    return digest.hexdigest()[:KEY_LENGTH].encode("ascii")


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
