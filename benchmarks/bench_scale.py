"""Sharded extraction in this process against local Dask worker processes, same inputs, same shards.

Two cases, each into fresh stores, with features checked identical between the runs:

1. compute-bound: the embedded DiT on in-memory mosaics, in-process (torch's default threads) against 1 and 2
   Dask worker processes. A Dask nanny starts workers with OMP_NUM_THREADS=1; the shard task gives torch the
   cores the worker owns, so one worker should match in-process.
2. decoding-bound: 640x480 JPEG paths through the embedded pixel-space DiT at block 1 (32x32 input: its compute
   is small beside decoding), in-process with ``num_workers=0`` (one decoding thread) against one Dask worker
   process, which decodes in a thread pool (a daemon process cannot start DataLoader workers), and against one
   non-daemon worker, which decodes in DataLoader processes.

Prints the wall times and ratios and writes them to ``benchmarks/results/scale_cpu.txt``. Usage::

    python benchmarks/bench_scale.py                 # this machine
    python benchmarks/bench_scale.py --gpus 4        # also one worker per GPU (needs dask-cuda)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import torch
from PIL import Image

from sklearn_difffeat import DiTFeatureExtractor, extract
from sklearn_difffeat.datasets import load_fashion_mosaics

LINES: list = []


def say(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


def timed_extract(inputs, client, shard_size, **params) -> tuple[float, np.ndarray]:
    with tempfile.TemporaryDirectory() as store:
        start = time.perf_counter()
        result = extract(DiTFeatureExtractor("embedded:fashion-dit", **params), inputs, store, client=client,
                         shard_size=shard_size, progress=False)
        seconds = time.perf_counter() - start
        features = result.features()
        assert not result.failed and np.isfinite(features).all()
        assert result.computed + result.already_stored == len(inputs)  # repeated inputs are computed once
    return seconds, features


def on_cluster(workers, inputs, shard_size, daemon=True, **params) -> tuple[float, np.ndarray]:
    from dask.distributed import Client, LocalCluster

    with dask.config.set({"distributed.worker.daemon": daemon}), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        timed_extract(inputs[:32], client, shard_size, **params)  # each worker loads the model
        return timed_extract(inputs, client, shard_size, **params)


def photo_like_jpegs(folder: Path, n: int) -> list[str]:
    """640x480 JPEGs (quality 90, ~120 kB) of smooth colour waves plus sensor-like noise: decoding costs about
    what it costs for a photo of that size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0, 2 * np.pi, 3)
        waves = np.stack([127 + 100 * np.sin(x / 97 * (1 + a) + a), 127 + 100 * np.cos(y / 61 * (1 + b) + b),
                          127 + 90 * np.sin((x + y) / 143 * (1 + c))], axis=-1)
        pixels = np.clip(waves + rng.normal(0, 12, waves.shape), 0, 255).astype(np.uint8)
        paths.append(str(folder / f"{i:04d}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def compute_bound(n: int, shard_size: int) -> None:
    images = list(load_fashion_mosaics(n, split="train", random_state=0).data["image"])
    params = dict(block=[4, 8], timestep=[0, 100], batch_size=64, num_workers=0, device="cpu")
    say(f"1. compute-bound: {n} mosaics in {-(-n // shard_size)} shards of {shard_size}, embedded DiT, "
        "2 blocks x 2 timesteps")
    timed_extract(images[:32], None, shard_size, **params)  # load the model once here
    here, reference = timed_extract(images, None, shard_size, **params)
    say(f"   in-process ({torch.get_num_threads()} torch threads)  {here:7.1f} s  {n / here:7.0f} img/s")
    times = {}
    for workers in (1, 2):
        times[workers], features = on_cluster(workers, images, shard_size, **params)
        same = np.array_equal(features, reference)
        say(f"   Dask, {workers} worker process(es)     {times[workers]:7.1f} s  {n / times[workers]:7.0f} img/s"
            f"  (features {'identical' if same else 'differ: max %.1e' % np.abs(features - reference).max()})")
    say(f"   1 worker / in-process: {times[1] / here:.2f}x the time; 2 workers over 1: {times[1] / times[2]:.2f}x")


def decoding_bound(n: int, shard_size: int, workers: int) -> None:
    params = dict(block=1, timestep=100, batch_size=64, device="cpu")
    say(f"2. decoding-bound: {n} 640x480 JPEG paths in {-(-n // shard_size)} shards of {shard_size}, embedded "
        "pixel-space DiT (32x32 input) at block 1")
    with tempfile.TemporaryDirectory() as folder:
        paths = photo_like_jpegs(Path(folder), n)
        timed_extract(paths[:32], None, shard_size, num_workers=0, **params)
        here, reference = timed_extract(paths, None, shard_size, num_workers=0, **params)
        say(f"   in-process, num_workers=0 (one decoding thread)   {here:7.1f} s  {n / here:7.0f} img/s")
        runs = [("in-process, DataLoader processes", None, dict(num_workers=workers)),
                ("Dask, 1 worker, decoding threads", True, dict(num_workers=workers)),
                ("Dask, 1 non-daemon worker, DataLoader", False, dict(num_workers=workers))]
        for name, daemon, extra in runs:
            if daemon is None:
                seconds, features = timed_extract(paths, None, shard_size, **extra, **params)
            else:
                seconds, features = on_cluster(1, paths, shard_size, daemon=daemon, **extra, **params)
            same = np.array_equal(features, reference)
            say(f"   {name + f' ({workers})':<50}{seconds:7.1f} s  {n / seconds:7.0f} img/s  {here / seconds:.2f}x"
                f"  (features {'identical' if same else 'DIFFER'})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1200, help="mosaics of the compute-bound case")
    parser.add_argument("--jpegs", type=int, default=600, help="JPEG files of the decoding-bound case")
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--gpus", type=int, default=0, help="also time one Dask worker per GPU (dask-cuda)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "scale_cpu.txt")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    say(f"machine: {platform.machine()}, {cores} cores, load average {os.getloadavg()[0]:.1f}")
    compute_bound(args.n, args.shard_size)
    decoding_bound(args.jpegs, args.shard_size, workers=max(2, cores))
    if args.gpus:
        from dask.distributed import Client
        from dask_cuda import LocalCUDACluster

        images = list(load_fashion_mosaics(args.n, split="train", random_state=0).data["image"])
        gpu = dict(block=[4, 8], timestep=[0, 100], batch_size=256)
        with LocalCUDACluster(n_workers=args.gpus, threads_per_worker=1) as cluster, Client(cluster) as client:
            timed_extract(images[:256], client, args.shard_size, **gpu)
            seconds, _ = timed_extract(images, client, args.shard_size, **gpu)
        say(f"Dask, one worker per GPU ({args.gpus})  {seconds:7.1f} s  {args.n / seconds:7.0f} img/s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
