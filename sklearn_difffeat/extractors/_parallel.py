"""Where decoding runs in parallel: DataLoader worker processes when they can run, else a pool of threads.

Worker processes cannot always run. A daemon process may not have children, and Dask runs its workers as daemon
processes; and DataLoader workers hand each batch over in a shared-memory file, so under a file-size limit
(``RLIMIT_FSIZE``, ``ulimit -f``) below a batch the hand-over fails in the worker's feeder thread, and the loader
waits forever for a batch that never comes. There, a thread pool decodes instead: Pillow releases the GIL while
it decodes and resizes, so threads decode in parallel too, with no file at all.

A DataLoader starts its workers anew for each call, so how they start matters: a spawned worker imports torch
again (seconds; a Dask worker's processes spawn by default), a forked one starts at once. On Linux the workers
are forked, whatever the process's default start method; they touch neither CUDA nor the parent's threads.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from .._cores import usable_cores


def processes_usable(batch_bytes: int) -> bool:
    """Whether DataLoader worker processes can decode here, handing over batches of ``batch_bytes``."""
    if multiprocessing.current_process().daemon:
        return False
    try:
        import resource
    except ImportError:  # no resource limits on this platform
        return True
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return limit == resource.RLIM_INFINITY or limit >= batch_bytes + (1 << 20)


def loader_context() -> str | None:
    """The start method of DataLoader workers: "fork" on Linux, else the process's default (None)."""
    return "fork" if sys.platform.startswith("linux") else None


def ordered_batches(load, n: int, batch_size: int, workers: int):
    """Yield ``[load(i) for i in batch]`` for consecutive batches of ``range(n)``, in order, loaded ahead by
    ``workers`` threads.

    At most the batch being collected and ``max(batch_size, 2 * workers)`` items beyond it are in flight, so
    memory stays bounded; when the consumer stops early, the items not yet started are cancelled. An exception
    raised by ``load`` is raised here, at its item.
    """
    ahead = batch_size + max(batch_size, 2 * workers)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    pending: deque = deque()
    submitted = 0
    try:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            while submitted < min(n, start + ahead):
                pending.append(pool.submit(load, submitted))
                submitted += 1
            yield [pending.popleft().result() for _ in range(stop - start)]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def torch_threads_beside(decoders: int):
    """While ``decoders`` threads or processes decode on this machine's cores, the calling thread's torch computes
    on the cores they leave (at least one); its thread count is restored after.

    torch's threads meet after every operation, so on oversubscribed cores each operation waits for whichever of
    its threads was descheduled; decoding threads and processes meet no one. torch's thread count is kept per
    thread once a thread has computed, so this changes the calling thread alone (and threads started meanwhile).
    """
    before = torch.get_num_threads()
    wanted = max(1, min(before, usable_cores() - decoders)) if decoders > 0 else before
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted != before:
            torch.set_num_threads(before)
