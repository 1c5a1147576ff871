"""What durable segment writes cost: FeatureStore.write with and without fsync, in one process.

Run: python benchmarks/bench_store.py [--dir FOLDER] [--rounds 3] [--large 8] [--small 64]

Two segment shapes, each written as one FeatureStore.write call: 4,096 x 1,152 float32 (18.9 MB, a full
segment of DiT-XL/2 features) and 64 x 1,152 (295 kB, a small batch flushed on its own). For each shape the
durable (fsync of each file before its rename and of the folder after) and the non-durable store write the same
segments in alternating rounds, each round into a fresh namespace after an os.sync(), so that neither inherits
the other's dirty pages. Prints the median rate of each and the ratio. The folder should be on the disk under
test (default: a temporary folder in the current directory).
"""

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid

import numpy as np

from sklearn_difffeat import FeatureStore

WIDTH = 1152


def segments(rows: int, count: int, seed: int):
    """``count`` (keys, values) pairs of ``rows`` random float32 rows and fresh random keys."""
    rng = np.random.default_rng(seed)
    return [([uuid.UUID(int=int(rng.integers(2**63)) << 64 | i).hex for i in range(rows)],
             rng.standard_normal((rows, WIDTH), dtype=np.float32)) for _ in range(count)]


def timed_round(folder: str, durable: bool, batch) -> float:
    """Seconds to write every segment of ``batch`` into a fresh namespace of a store in ``folder``."""
    store = FeatureStore(folder, durable=durable)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    os.sync()
    start = time.perf_counter()
    for keys, values in batch:
        store.write(namespace, keys, values)
    seconds = time.perf_counter() - start
    store.clear(namespace)
    return seconds


def compare(folder: str, rows: int, count: int, rounds: int):
    batch = segments(rows, count, seed=rows)
    megabytes = count * rows * WIDTH * 4 / 1e6
    times = {True: [], False: []}
    for r in range(rounds):
        for durable in ((False, True) if r % 2 == 0 else (True, False)):
            times[durable].append(timed_round(folder, durable, batch))
    print(f"{rows:>5} x {WIDTH} float32 ({rows * WIDTH * 4 / 1e6:.2f} MB), {count} segments per round, "
          f"{rounds} rounds (median):")
    for durable in (False, True):
        seconds, label = statistics.median(times[durable]), "fsync" if durable else "no fsync"
        print(f"  {label:<9} {count / seconds:>9.1f} segments/s {megabytes / seconds:>8.1f} MB/s   "
              f"({seconds * 1e3 / count:.2f} ms per segment)")
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(f"  fsync / no fsync: {ratio:.2f}x the time per segment")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="parent folder of the temporary store (default: .)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", type=int, default=8, help="4,096-row segments per round")
    parser.add_argument("--small", type=int, default=64, help="64-row segments per round")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-store-", dir=args.dir or ".")
    print(f"{platform.platform()}, Python {platform.python_version()}, numpy {np.__version__}; store in "
          f"{os.path.abspath(folder)}")
    try:
        compare(folder, 4096, args.large, args.rounds)
        compare(folder, 64, args.small, args.rounds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
