"""What the commands share: their one-line error reports and exit codes, and the Dask client they may start."""

from __future__ import annotations

import contextlib
import os
import sys


class CommandError(Exception):
    """A problem with the command's arguments or inputs, reported as one line."""


def run_command(name: str, run, args) -> int:
    """``run(args)``, with an error reported as one line on stderr: exit code 2 for a problem with the arguments
    or inputs (:class:`CommandError`), 1 for an error of the run (a missing model, a store that cannot be
    written, ...)."""
    try:
        return run(args)
    except CommandError as exc:
        print(f"sklearn-difffeat {name}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, TypeError, ImportError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sklearn-difffeat {name}: error: {message}", file=sys.stderr)
        return 1


def dask_client(args, stack: contextlib.ExitStack):
    """The Dask client the arguments ask for (None: run in this process), closed with ``stack``.

    Local clusters start their workers with :func:`~sklearn_difffeat.extraction.dask_worker_config` (non-daemon,
    so that they may start DataLoader decoding processes; torch's threads waiting passively); the settings stay on
    while the cluster lives, so that a worker the nanny restarts is started the same way. Starting one leaves the
    nanny's worker settings (``OMP_NUM_THREADS=1``, ``MALLOC_TRIM_THRESHOLD_``) in this process's environment,
    where they would slow every process started later (joblib's workers, for one): the environment is put back.
    """
    if not (args.scheduler or args.local_gpus or args.local_workers):
        return None
    try:
        import dask
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise CommandError("Dask is not installed: pip install 'sklearn-difffeat[dask]'") from exc
    if args.scheduler:
        return stack.enter_context(Client(args.scheduler))
    from .extraction import dask_worker_config

    stack.enter_context(dask.config.set(dask_worker_config()))
    if args.local_gpus:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise CommandError("--local-gpus needs dask-cuda (pip install dask-cuda), or start one `dask worker` "
                               "per GPU with CUDA_VISIBLE_DEVICES and pass --scheduler") from exc
    environment = dict(os.environ)
    try:
        if args.local_gpus:
            cluster = LocalCUDACluster(n_workers=args.local_gpus, threads_per_worker=1)
        else:
            cluster = LocalCluster(n_workers=args.local_workers, threads_per_worker=1, processes=True)
    finally:
        os.environ.clear()
        os.environ.update(environment)
    stack.enter_context(cluster)
    return stack.enter_context(Client(cluster))
