"""Sharded extraction in this process against 1 and 2 local Dask worker processes, same inputs, same shards.

Each run extracts the embedded DiT's features of the same mosaics into a fresh store. Prints the wall time of
each, the speed-up of 2 workers over 1, and the overhead per shard of going through Dask (1 worker against
in-process: task submission, shipping the shard, loading the model once in the worker). Usage::

    python benchmarks/bench_scale.py                 # this machine
    python benchmarks/bench_scale.py --gpus 4        # also one worker per GPU (needs dask-cuda)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from sklearn_difffeat import DiTFeatureExtractor, extract
from sklearn_difffeat.datasets import load_fashion_mosaics


def timed_extract(images, client, shard_size, **params) -> float:
    with tempfile.TemporaryDirectory() as store:
        start = time.perf_counter()
        result = extract(DiTFeatureExtractor("embedded:fashion-dit", **params), images, store, client=client,
                         shard_size=shard_size, progress=False)
        seconds = time.perf_counter() - start
        # Every input has its features (repeated mosaics are computed once, so `computed` may be below n).
        assert not result.failed and np.isfinite(result.features()).all()
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1200)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--gpus", type=int, default=0, help="also time one Dask worker per GPU (dask-cuda)")
    args = parser.parse_args()
    from dask.distributed import Client, LocalCluster

    images = list(load_fashion_mosaics(args.n, split="train", random_state=0).data["image"])
    # One torch thread per worker process, and in-process too, so that the comparison is of processes.
    params = dict(block=[4, 8], timestep=[0, 100], batch_size=64, num_workers=0, device="cpu")
    shards = -(-args.n // args.shard_size)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.machine()}, {cores} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{args.n} mosaics in {shards} shards of {args.shard_size}, embedded DiT, 2 blocks x 2 timesteps")
    torch.set_num_threads(1)
    timed_extract(images[:64], None, args.shard_size, **params)  # load the model once here
    in_process = timed_extract(images, None, args.shard_size, **params)
    print(f"in-process (1 thread)         {in_process:7.1f} s  {args.n / in_process:7.0f} img/s")
    times = {}
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          env={"OMP_NUM_THREADS": "1"}) as cluster, Client(cluster) as client:
            timed_extract(images[:64], client, args.shard_size, **params)  # each worker loads the model
            times[workers] = timed_extract(images, client, args.shard_size, **params)
        print(f"Dask, {workers} worker process(es)  {times[workers]:7.1f} s  {args.n / times[workers]:7.0f} img/s")
    print(f"speed-up of 2 workers over 1: {times[1] / times[2]:.2f}x; overhead per shard (1 worker vs in-process): "
          f"{1000 * (times[1] - in_process) / shards:+.0f} ms")
    if args.gpus:
        from dask_cuda import LocalCUDACluster

        gpu_params = {**params, "device": None, "num_workers": None, "batch_size": 256}
        with LocalCUDACluster(n_workers=args.gpus, threads_per_worker=1) as cluster, Client(cluster) as client:
            timed_extract(images[:256], client, args.shard_size, **gpu_params)
            seconds = timed_extract(images, client, args.shard_size, **gpu_params)
        print(f"Dask, one worker per GPU ({args.gpus})  {seconds:7.1f} s  {args.n / seconds:7.0f} img/s")


if __name__ == "__main__":
    main()
