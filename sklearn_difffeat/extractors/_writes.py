"""A run's writes to the feature store, made in a background thread so that writing a segment (its checksum, its
data and the fsyncs that make it durable) never holds up the stream that feeds the device.

The run hands over each batch's rows as it stores them (:meth:`StoreWrites.put`); one thread appends them to a
:class:`~sklearn_difffeat.store.SegmentWriter` per namespace, which writes a segment whenever one fills (the
store's segment rows, bytes or seconds); :meth:`StoreWrites.close` writes what is left and waits for it. The
hand-over queue holds at most ``depth`` batches: when the disk falls behind, the run waits for it rather than
holding ever more rows in memory.

The first write that fails stops all writing, as it would in the run's own thread: the thread drops every row
after it, and the run gets the error (the store's ``StoreWriteError``, or whatever else the write raised) at its
next hand-over or at ``close``, which never waits on a thread that has stopped. Segments completed before the
error stay in the store.
"""

from __future__ import annotations

import queue
import threading

WRITE_IN_BACKGROUND = True  # False: every write happens in the run's own thread (for comparisons)


class StoreWrites:
    """Rows handed over batch by batch, appended to ``store`` as segments, in a thread of their own when
    ``background`` (default :data:`WRITE_IN_BACKGROUND`), else in the caller's."""

    def __init__(self, store, background: bool | None = None, depth: int = 2):
        self.store = store
        self.background = WRITE_IN_BACKGROUND if background is None else background
        self.writers: dict = {}
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread: threading.Thread | None = None
        self.failed = False
        self.error: BaseException | None = None  # what the writer thread's failed write raised
        self.reported = False  # whether the run has been given ``error``

    def put(self, rows: list) -> None:
        """Hand over one batch's rows, ``[(namespace, description, keys, values), ...]``. Raises the error of
        a write that failed since the last call (once; nothing more is written after it)."""
        self._raise_error()
        if not rows or self.failed:
            return
        if not self.background:
            self._guarded(self._write, rows)
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="feature-store-writer", daemon=True)
            self.thread.start()
        self.queue.put(rows)  # blocks while `depth` batches wait for the disk

    def close(self) -> None:
        """Write the rows still buffered as segments, and wait for every write; raise a write error not yet
        raised."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        elif not self.failed:
            self._guarded(self._flush)
        self._raise_error()

    def _work(self) -> None:
        """The writer thread: append each batch handed over; at the end, flush. After an error it goes on taking
        batches (and drops them), so that a run handing over more never blocks on a full queue."""
        while (rows := self.queue.get()) is not None:
            if not self.failed:
                self._caught(self._write, rows)
        if not self.failed:
            self._caught(self._flush)

    def _write(self, rows: list) -> None:
        for namespace, description, keys, values in rows:
            writer = self.writers.get(namespace)
            if writer is None:
                writer = self.writers[namespace] = self.store.writer(namespace, values.shape[1], description)
            writer.add(keys, values)

    def _flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def _guarded(self, action, *args) -> None:
        """``action(*args)`` in the caller's thread: an error stops all later writes, and is raised."""
        try:
            action(*args)
        except BaseException:
            self.failed = True
            raise

    def _caught(self, action, *args) -> None:
        """``action(*args)`` in the writer thread: an error stops all later writes, and waits for the run."""
        try:
            action(*args)
        except BaseException as exc:
            self.error, self.failed = exc, True

    def _raise_error(self) -> None:
        if self.error is not None and not self.reported:
            self.reported = True
            raise self.error
