"""Reading images from a webdataset tar shard in place against the same images as files, in the same process.

The same n photo-like 640x480 JPEGs are written as files and as one tar shard (img2dataset's layout: a .jpg and
a .txt per key). Two figures, each for files and for the tar, and their ratio (tar / files):

1. keys: a rerun of ``extract`` over inputs whose features are all stored: it reads every sample, hashes it and
   finds it in the store (no decoding, no model), so it measures reading plus keying.
2. keys + decode: the same reading, then decoding and resizing to 256 px through the extractor's own decoding
   path (``to_uint8_images``, one process), shard by shard for the tar.

Both read from the page cache (the data was just written): the figures compare the reading paths, not disks.
Usage::

    python benchmarks/bench_sources.py              # 1000 images
    python benchmarks/bench_sources.py --n 4000 --shard-size 512
"""

from __future__ import annotations

import argparse
import io
import platform
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from sklearn_difffeat import DiTFeatureExtractor, extract
from sklearn_difffeat.extractors.image import to_uint8_images
from sklearn_difffeat.sources import WebDatasetSource

from bench_pipeline import best_of, photo_like  # the same photo-like JPEGs and timing as the decoding benchmark


def write_corpus(n: int, folder: Path) -> tuple[list, str]:
    rng = np.random.default_rng(0)
    paths = []
    tar_path = str(folder / "shard-00000.tar")
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n):
            buffer = io.BytesIO()
            Image.fromarray(photo_like(rng)).save(buffer, "JPEG", quality=90)
            paths.append(str(folder / f"{i:06d}.jpg"))
            Path(paths[-1]).write_bytes(buffer.getvalue())
            for extension, data in (("jpg", buffer.getvalue()), ("txt", f"photo {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return paths, tar_path


def report(what: str, n: int, files_s: float, tar_s: float) -> None:
    print(f"{what:<32} files {n / files_s:8.0f} img/s   tar {n / tar_s:8.0f} img/s   tar / files {files_s / tar_s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images (default: 1000)")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard (default: 256)")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}; n={args.n}, "
          f"shard_size={args.shard_size}, 640x480 JPEG (quality 90)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths, tar_path = write_corpus(args.n, folder)
        size = sum(Path(p).stat().st_size for p in paths)
        print(f"# {size / 2**20:.1f} MiB of JPEG; tar {Path(tar_path).stat().st_size / 2**20:.1f} MiB")
        ext = DiTFeatureExtractor("embedded:fashion-dit", block=3, timestep=0, num_workers=0)
        store = folder / "store"
        first = extract(ext, paths, store, shard_size=args.shard_size, progress=False)  # fill the store once

        def rerun(inputs):
            def run():
                result = extract(ext, inputs(), store, shard_size=args.shard_size, progress=False)
                assert result.computed == 0 and (result.keys == first.keys).all()  # the same samples
            return run

        report("keys (resume, all stored)", args.n, best_of(rerun(lambda: paths)),
               best_of(rerun(lambda: WebDatasetSource(tar_path))))

        def decode_files():
            for start in range(0, args.n, args.shard_size):
                to_uint8_images(paths[start:start + args.shard_size], 256)

        def decode_tar():
            for shard in WebDatasetSource(tar_path).shards(args.shard_size):
                to_uint8_images(shard.read().items, 256)

        report("read + decode to 256 px", args.n, best_of(decode_files), best_of(decode_tar))


if __name__ == "__main__":
    main()
