"""Sharded extraction in this process against local Dask worker processes, same inputs, same shards.

Two cases, each into fresh stores, with features checked identical between the runs:

1. compute-bound: the embedded DiT on in-memory mosaics, in-process (torch's default threads) against 1 and 2
   Dask worker processes. A Dask nanny starts workers with OMP_NUM_THREADS=1; the shard task gives torch the
   cores the worker owns, so one worker should match in-process.
2. decoding-bound: 640x480 JPEG paths for a random pixel-space DiT at 128x128 whose compute is small beside
   decoding (patch 16: 64 tokens; 2 blocks of width 64; block 1), in-process with ``num_workers=0`` (one
   decoding thread) against one Dask worker process, which decodes in a thread pool (a daemon process cannot
   start DataLoader workers), and one non-daemon worker, which decodes in DataLoader processes. Pillow decodes a
   640x480 JPEG at half scale for a 128 px input, as for DiT-XL/2's 256 px. (The embedded DiT's 32 px input
   lets Pillow decode at 1/8 scale, so cheaply that decoding would not be what is measured; at 256 px, a
   pixel-space model's noise, four times as many values, would weigh more beside decoding.) One more row runs
   the in-process case into stores that close a segment every 64 rows (a batch), so that segments are written
   during the stream (by the store's writer thread), as a long GPU run's are, not all at a shard's end.

Dask workers are started as the command starts them (``dask_worker_config``): torch's OpenMP threads there
wait passively (``OMP_WAIT_POLICY=PASSIVE``), so that they leave the cores to the decoders between operations.
The in-process rows run with this process's own setting, printed in the first line (the command sets PASSIVE
for itself; a Python session has OpenMP's default unless its environment says otherwise).

Each time is the best of ``--repeat`` runs (the machine may be shared). Prints the wall times and ratios and
writes them to ``benchmarks/results/scale_cpu.txt``. Usage::

    python benchmarks/bench_scale.py                 # this machine
    python benchmarks/bench_scale.py --gpus 4        # also one worker per GPU (needs dask-cuda)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import torch
from PIL import Image

from sklearn_difffeat import DiTFeatureExtractor, FeatureStore, extract
from sklearn_difffeat.datasets import load_fashion_mosaics
from sklearn_difffeat.extraction import dask_worker_config
from sklearn_difffeat.extractors.image import to_uint8_images

LINES: list = []


def say(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


def extraction(inputs, client, shard_size, model="embedded:fashion-dit", segment_rows=None, **params):
    """A function timing one extraction of ``inputs`` into a fresh store (closing a segment every
    ``segment_rows`` rows, if given): ``() -> (seconds, features)``."""
    def run():
        with tempfile.TemporaryDirectory() as store:
            if segment_rows is not None:
                FeatureStore.create(store, segment_rows=segment_rows)
            start = time.perf_counter()
            result = extract(DiTFeatureExtractor(model, **params), inputs, store, client=client,
                             shard_size=shard_size, progress=False)
            seconds = time.perf_counter() - start
            features = result.features()
        assert not result.failed and np.isfinite(features).all()
        assert result.computed + result.already_stored == len(inputs)  # repeated inputs are computed once
        return seconds, features

    return run


def best_of(runs: dict, repeat: int) -> dict:
    """``{name: (best seconds, features)}`` over ``repeat`` rounds, each round running every configuration once,
    so that a change in the machine's load (it may be shared) reaches every configuration alike."""
    best: dict = {}
    for _ in range(repeat):
        for name, run in runs.items():
            seconds, features = run()
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, features)
    return best


def cluster(stack: contextlib.ExitStack, workers: int, daemon: bool = True):
    """A client of a local cluster of ``workers`` worker processes (one thread each), closed with ``stack``, started
    as the command starts its local clusters (``dask_worker_config``: torch's threads there wait passively)."""
    from dask.distributed import Client, LocalCluster

    with dask.config.set(dask_worker_config(daemon=daemon)):
        local = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                 dashboard_address=":0"))
    return stack.enter_context(Client(local))


def report(n: int, best: dict, baseline: str) -> None:
    base_seconds, reference = best[baseline]
    for name, (seconds, features) in best.items():
        gap = np.abs(features - reference).max()
        same = "identical" if gap == 0 else f"differ by up to {gap:.1e}"
        say(f"   {name:<48}{seconds:7.1f} s {n / seconds:6.0f} img/s  {base_seconds / seconds:5.2f}x"
            f"  (features {same})")


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


def decoding_model(folder: Path) -> str:
    """A random pixel-space DiT pipeline folder at 128x128 input, cheap to run (see the module docstring)."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=3, out_channels=6,
                                  num_layers=2, sample_size=128, patch_size=16, num_embeds_ada_norm=10)
    model.save_pretrained(folder / "transformer")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def compute_bound(n: int, shard_size: int, repeat: int) -> None:
    images = list(load_fashion_mosaics(n, split="train", random_state=0).data["image"])
    params = dict(block=[4, 8], timestep=[0, 100], batch_size=64, num_workers=0, device="cpu")
    say(f"1. compute-bound: {n} mosaics in {-(-n // shard_size)} shards of {shard_size}, embedded DiT, "
        f"2 blocks x 2 timesteps; speed-up over in-process")
    with contextlib.ExitStack() as stack:
        clients = {f"in-process ({torch.get_num_threads()} torch threads)": None,
                   "Dask, 1 worker process": cluster(stack, 1), "Dask, 2 worker processes": cluster(stack, 2)}
        for client in clients.values():  # load the model here and in each worker
            extraction(images[:32], client, shard_size, **params)()
        best = best_of({name: extraction(images, client, shard_size, **params) for name, client in clients.items()},
                       repeat)
    report(n, best, next(iter(best)))


def decoding_bound(n: int, shard_size: int, workers: int, repeat: int) -> None:
    say(f"2. decoding-bound: {n} 640x480 JPEG paths in {-(-n // shard_size)} shards of {shard_size}, decoded to "
        f"128x128 for a random pixel-space DiT (64 tokens, 2 blocks of width 64) at block 1; {workers} decoding "
        "workers; speed-up over in-process with one decoding thread")
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        params = dict(model=decoding_model(Path(folder) / "model"), block=1, timestep=100, batch_size=64, device="cpu")
        paths = photo_like_jpegs(Path(folder) / "jpg", n)
        runs = {
            "in-process, num_workers=0": extraction(paths, None, shard_size, num_workers=0, **params),
            "in-process, DataLoader processes": extraction(paths, None, shard_size, num_workers=workers, **params),
            "Dask, 1 worker: decoding threads": extraction(paths, cluster(stack, 1), shard_size, num_workers=workers,
                                                           **params),
            "Dask, 1 non-daemon worker: DataLoader": extraction(paths, cluster(stack, 1, daemon=False), shard_size,
                                                                num_workers=workers, **params),
            # A segment per batch: the writes with their fsyncs come during the stream, not only at a shard's end.
            "in-process, num_workers=0, segments of 64 rows": extraction(paths, None, shard_size, segment_rows=64,
                                                                         num_workers=0, **params),
        }
        for run in runs.values():  # load the model here and in each worker, and read the files once
            run()
        best = best_of(runs, repeat)
        start = time.perf_counter()
        to_uint8_images(paths, 128, num_workers=0)
        decoding = time.perf_counter() - start
    report(n, best, "in-process, num_workers=0")
    share = decoding / best["in-process, num_workers=0"][0]
    say(f"   decoding alone, one thread: {decoding:.1f} s, {100 * share:.0f}% of the in-process extraction (the rest: "
        "hashing, noise, model and store, on the same cores)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1200, help="mosaics of the compute-bound case")
    parser.add_argument("--jpegs", type=int, default=600, help="JPEG files of the decoding-bound case")
    parser.add_argument("--shard-size", type=int, default=100, help="shard size of the compute-bound case")
    parser.add_argument("--jpeg-shard-size", type=int, default=300)
    parser.add_argument("--gpus", type=int, default=0, help="also time one Dask worker per GPU (dask-cuda)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of runs; each configuration's best counts")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "scale_cpu.txt")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    say(f"machine: {platform.machine()}, {cores} cores, load average {os.getloadavg()[0]:.1f}; best of "
        f"{args.repeat} interleaved rounds; OMP_WAIT_POLICY in this process: "
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, in Dask workers: "
        f"{dask_worker_config()['distributed.nanny.pre-spawn-environ'].get('OMP_WAIT_POLICY', 'unset')}")
    compute_bound(args.n, args.shard_size, args.repeat)
    decoding_bound(args.jpegs, args.jpeg_shard_size, max(2, cores), args.repeat)
    if args.gpus:
        from dask.distributed import Client
        from dask_cuda import LocalCUDACluster

        images = list(load_fashion_mosaics(args.n, split="train", random_state=0).data["image"])
        gpu = dict(block=[4, 8], timestep=[0, 100], batch_size=256)
        with dask.config.set(dask_worker_config()), LocalCUDACluster(n_workers=args.gpus, threads_per_worker=1) \
                as local, Client(local) as client:
            extraction(images[:256], client, args.shard_size, **gpu)()
            seconds, _ = extraction(images, client, args.shard_size, **gpu)()
        say(f"Dask, one worker per GPU ({args.gpus})  {seconds:7.1f} s  {args.n / seconds:7.0f} img/s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
