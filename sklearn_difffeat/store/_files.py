"""Durable atomic file writes and the classification of OS errors, for the feature store.

A durable write syncs the file before renaming it into place and syncs the folder after the rename, so that
after a power loss a name either holds its complete content or does not exist. Writes go through ``os.write`` on
a raw descriptor, so every failure (full disk, file too large, read-only folder) surfaces as an ``OSError`` at
the call that hit it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path

_MAX_WRITE = 1 << 30  # bytes per os.write call (Linux writes at most about 2 GiB at once)
# OS errors that say nothing about a file's content: the process ran out of descriptors or memory, a call was
# interrupted, or a network filesystem timed out. A file that cannot be opened for these reasons is not damaged.
TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.EINTR, errno.EAGAIN, errno.ENOMEM, errno.ENOBUFS, errno.ETIMEDOUT})
# What fsync of a folder answers on filesystems that do not support it (some FUSE and network filesystems).
_NO_FOLDER_SYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def is_transient(exc: BaseException) -> bool:
    """Whether an error comes from the process's state (descriptors, memory, signals), not from a file."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS)


def os_error_text(exc: BaseException) -> str:
    """``[ENOSPC] No space left on device (file)``: the error's errno name, text and file, for messages."""
    code = getattr(exc, "errno", None)
    if not code:
        return f"{type(exc).__name__}: {exc}"
    text = f"[{errno.errorcode.get(code, code)}] {exc.strerror or os.strerror(code)}"
    return f"{text} ({exc.filename})" if getattr(exc, "filename", None) else text


def write_all(fd: int, chunk) -> None:
    """Write a whole bytes-like object (e.g. a C-contiguous array) to a file descriptor."""
    view = memoryview(chunk).cast("B")
    while len(view):
        written = os.write(fd, view[:_MAX_WRITE])
        if written <= 0:  # a regular file never does this, but never loop forever
            raise OSError(errno.EIO, "the write made no progress")
        view = view[written:]


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk, so that the renames into it survive a power loss."""
    if os.name == "nt":  # a folder cannot be opened as a file there; NTFS journals its renames itself
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_FOLDER_SYNC:
            raise
    finally:
        os.close(fd)


def make_folder(folder: Path, durable: bool = True) -> None:
    """Create a folder and its missing parents; ``durable`` syncs each new folder's parent."""
    if folder.is_dir():
        return
    make_folder(folder.parent, durable)
    with contextlib.suppress(FileExistsError):  # another writer made it meanwhile
        folder.mkdir()
    if durable:
        sync_folder(folder.parent)


def write_atomic(path: Path, *chunks, durable: bool = True) -> None:
    """Write ``chunks`` (bytes-like) to a hidden temporary file beside ``path``, then rename it into place.

    ``durable`` syncs the file before the rename and the folder after it. On failure the temporary file is
    removed (when the OS lets us) and ``path`` is left as it was.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            for chunk in chunks:
                write_all(fd, chunk)
            if durable:
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):  # the first error is the one to report
                os.close(fd)
            raise
        os.close(fd)  # may report a delayed write error (network filesystems)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        sync_folder(path.parent)


