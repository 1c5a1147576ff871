"""Host-side speed of the extraction engine, each figure against a baseline run in the same process.

1. Decoding: 640x480 JPEG paths -> model-ready 256 px uint8 batches, through the extractor's decoding path
   (``to_uint8_images``, which ``transform`` shares) with 2 DataLoader worker processes against the same decoding
   in the calling process (num_workers=0).
2. Stored features served by ``transform`` (arrays in, every feature already in the store): samples/s for the
   embedded model's 56 px mosaics and for 256 px images, against the one-file-per-sample cache a first version
   would write (an ``.npz`` per sample, read back one by one, keyed by a blake2b hash of each image).

The store is filled by a first ``transform`` of the same inputs. Usage::

    python benchmarks/bench_pipeline.py                # this machine's CPUs
    python benchmarks/bench_pipeline.py --n-jpeg 2000 --n-56 50000 --n-256 8000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sklearn_difffeat import DiTFeatureExtractor
from sklearn_difffeat.extractors.image import to_uint8_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def best_of(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def photo_like(rng) -> np.ndarray:
    y, x = np.mgrid[0:480, 0:640] / 640.0
    channels = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    return (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 8, (480, 640, 3))).clip(0, 255).astype(np.uint8)


def decoding(n: int, folder: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(str(folder / f"{i:05d}.jpg"))
        Image.fromarray(photo_like(rng)).save(paths[-1], quality=90)

    def decode(workers):
        return lambda: to_uint8_images(paths, 256, num_workers=workers, batch_size=32)

    base = n / best_of(decode(0))
    two = n / best_of(decode(2))
    size = np.mean([os.path.getsize(p) for p in paths]) / 1024
    print(f"decode 640x480 JPEG ({size:.0f} KB) -> 256 px: num_workers=0 {base:8.0f} img/s | num_workers=2 "
          f"{two:8.0f} img/s | {two / base:.2f}x")


def naive_cache_reads(images, folder: Path, width: int) -> float:
    """The first version's cache: one .npz per sample, keyed by a blake2b hash of the image, read one by one."""
    rng = np.random.default_rng(1)
    keys = [hashlib.blake2b(image.tobytes(), digest_size=12).hexdigest() for image in images]
    for key in keys:
        (folder / key[:2]).mkdir(exist_ok=True)
        np.savez(folder / key[:2] / f"{key}.npz", b1=rng.standard_normal(width).astype(np.float32))

    def read():
        out = np.empty((len(images), width), np.float32)
        for i, image in enumerate(images):
            key = hashlib.blake2b(image.tobytes(), digest_size=12).hexdigest()
            with np.load(folder / key[:2] / f"{key}.npz") as data:
                out[i] = data["b1"]
        return out

    return len(images) / best_of(read)


def stored_reads(label, model, images, folder: Path) -> None:
    ext = DiTFeatureExtractor(model, block=[1, 2], timestep=[0, 100], cache=str(folder / "store")).fit(None)
    first = ext.transform(images)  # computes every feature and stores it
    ours = len(images) / best_of(lambda: ext.transform(images))
    np.testing.assert_array_equal(ext.transform(images), first)
    (folder / "naive").mkdir()
    n_naive = min(len(images), 5000)
    naive = naive_cache_reads(images[:n_naive], folder / "naive", ext.feature_width_)
    print(f"stored features through transform, {label}: one file per sample {naive:9.0f} samples/s | segment "
          f"store {ours:9.0f} samples/s | {ours / naive:.1f}x  ({len(images)} samples, 2 blocks x 2 timesteps)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-jpeg", type=int, default=600)
    parser.add_argument("--n-56", type=int, default=50000)
    parser.add_argument("--n-256", type=int, default=8000)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.machine()}, {cores} cores, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "jpg").mkdir()
        decoding(args.n_jpeg, scratch / "jpg")

        from sklearn_difffeat.datasets import load_fashion_mosaics

        mosaics = np.stack(load_fashion_mosaics(min(args.n_56, 2000), split="train", random_state=0).data["image"])
        reps = -(-args.n_56 // len(mosaics))  # distinct samples: each copy gets one pixel changed
        images = np.concatenate([mosaics] * reps)[:args.n_56]
        images[:, 0, 0, 0] = np.repeat(np.arange(reps, dtype=np.uint8), len(mosaics))[:args.n_56]
        (scratch / "a").mkdir()
        stored_reads(f"embedded DiT, {images.shape[1]} px mosaics", "embedded:fashion-dit", images, scratch / "a")

        from conftest import build_tiny_dit_pipeline

        model = build_tiny_dit_pipeline(scratch / "m256", sample_size=32, vae_channels=(1, 1, 1, 1))
        big = np.random.default_rng(2).integers(0, 256, size=(args.n_256, 256, 256, 3), dtype=np.uint8)
        (scratch / "b").mkdir()
        stored_reads("256 px images", str(model), big, scratch / "b")


if __name__ == "__main__":
    main()
