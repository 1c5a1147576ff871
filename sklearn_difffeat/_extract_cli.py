"""``sklearn-difffeat extract``: sharded extraction into a feature store from the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

from ._cli import CommandError, dask_client

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="extract diffusion features of many images or texts into a feature store (resumable, Dask-ready)",
        description="Extract the features of many inputs into a feature store, shard by shard. Samples already "
                    "in the store are skipped, so an interrupted run resumes where it stopped. Unreadable files "
                    "are listed in a failures file and do not stop the run; a store that cannot be written (full "
                    "disk, file-size limit, read-only folder) does, with a non-zero exit.",
    )
    p.add_argument("--model", required=True,
                   help="hub id (facebook/DiT-XL-2-256, kuleshov-group/mdlm-owt), model folder, or embedded:NAME")
    p.add_argument("--input", required=True, type=Path,
                   help="a folder of images (searched recursively), a .txt list of image paths (one per line), a "
                        ".csv / .parquet table (see --image-column, --text-column), webdataset .tar shards (a file, "
                        "a folder of them, or a brace pattern such as 'shards/{00000..00099}.tar'; see --image-key, "
                        "--text-key), parquet files ('part-{000..015}.parquet', a folder), or hf:FOLDER, a "
                        "Hugging Face dataset saved with save_to_disk")
    p.add_argument("--store", required=True, type=Path, help="feature store folder (created if missing)")
    p.add_argument("--block", type=int, nargs="+", default=None,
                   help="block(s) to extract; 0 = embedding, k = output of block k, -1 = last "
                        "(default: 12 for images, -1 for text)")
    p.add_argument("--timestep", type=float, nargs="+", default=None,
                   help="timestep(s): the integer DDPM step for images (default 100), the mask probability in "
                        "[0, 1] for text (default 0)")
    p.add_argument("--text-column", help="extract text features from this column of a .csv / .parquet table")
    p.add_argument("--image-column", default="image",
                   help="image column of a table or dataset (default: image): paths (relative ones are read from "
                        "the table's folder), or in parquet / datasets encoded image files (binary, or the "
                        "Hugging Face {bytes, path} struct)")
    p.add_argument("--image-key", default=None,
                   help="webdataset: extension of the image member (default: the first of jpg, jpeg, png, webp)")
    p.add_argument("--text-key", default=None,
                   help="webdataset: extract text features from this member instead: an extension (txt), or "
                        "json:FIELD for a field of the .json member (json:caption)")
    p.add_argument("--batch-size", type=int, default=64, help="maximum batch on the device (default: 64)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="decoding processes per extraction (default: all cores but one, at most 16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute precision (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--pooling", default="mean", help="token pooling: mean, max, none (images), first (text)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (images; worth it on a GPU)")
    p.add_argument("--cache-depth", type=int, default=None,
                   help="also store every block up to this one from the same passes (for later searches)")
    p.add_argument("--shard-size", type=int, default=2048, help="samples per task (default: 2048)")
    cluster = p.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786)")
    cluster.add_argument("--local-gpus", type=int, metavar="N",
                         help="start a local Dask cluster with one worker per GPU (needs dask-cuda)")
    cluster.add_argument("--local-workers", type=int, metavar="N",
                         help="start a local Dask cluster of N CPU worker processes")
    p.add_argument("--failures", type=Path, default=None,
                   help="where to list unreadable inputs, as JSON lines {\"position\", \"input\", \"error\"} "
                        "(default: <store>/failures-<time>.jsonl, written only when something failed)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="where to write the manifest: each input's id (path or row), content key and status, and "
                        "the extractor's parameters, as parquet, for `sklearn-difffeat export` "
                        "(default: <store>/.manifests/<input name>-<UTC time>.parquet)")
    p.add_argument("--quiet", action="store_true", help="no progress bar; the summary is still printed")


def run(args) -> int:
    """Run the command; errors are reported by :func:`sklearn_difffeat._cli.run_command`."""
    inputs, is_text = read_inputs(args.input, args.text_column, args.image_column, args.image_key, args.text_key)
    extractor = _extractor(args, is_text)
    from .extraction import extract
    from .manifest import default_manifest_path

    manifest = args.manifest or default_manifest_path(args.store, args.input.stem or "extract")
    with contextlib.ExitStack() as stack:
        client = dask_client(args, stack)
        started = time.perf_counter()
        result = extract(extractor, inputs, args.store, client=client, shard_size=args.shard_size,
                         progress=not args.quiet, manifest=manifest)
        seconds = time.perf_counter() - started
    print(f"{result.summary()} in {seconds:.1f} s; store: {args.store}; manifest: {result.manifest}")
    if result.failed:
        path = args.failures or args.store / f"failures-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        write_failures(path, result.ids, result.failed)
        print(f"{len(result.failed)} unreadable inputs are listed in {path}")
    return 0


def write_failures(path: Path, ids, failed: dict) -> None:
    """One JSON object a line, ``{"position", "input", "error"}`` (the input by its id: a path, ``shard.tar/key``,
    ``table.parquet#row`` or a position), by position: names with a tab or a newline survive."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for position, error in sorted(failed.items()):
            handle.write(json.dumps({"position": position, "input": str(ids[position]), "error": error}) + "\n")


def read_inputs(path: Path, text_column: str | None, image_column: str, image_key: str | None = None,
                text_key: str | None = None) -> tuple:
    """The samples named by ``--input``: (a list of paths or texts, or a source; whether they are texts)."""
    from . import sources

    spec = str(path)
    kind = _input_kind(spec)
    if kind != "tar" and (image_key or text_key):
        raise CommandError("--image-key and --text-key apply to webdataset .tar shards")
    if kind == "tar":
        if text_column:
            raise CommandError("webdataset shards take --text-key (txt, json:caption), not --text-column")
        return sources.WebDatasetSource(spec, image_key=image_key, text_key=text_key), text_key is not None
    if kind == "parquet":
        column = text_column or image_column
        return sources.ParquetSource(spec, column, "texts" if text_column else "images"), bool(text_column)
    if kind == "hf":
        import datasets

        data = datasets.load_from_disk(spec[3:])
        if not isinstance(data, datasets.Dataset):
            raise CommandError(f"{spec[3:]} holds several splits ({', '.join(data)}): give the folder of one")
        column = text_column or image_column
        return sources.HuggingFaceSource(data, column, "texts" if text_column else "images"), bool(text_column)
    if path.is_dir():
        if text_column:
            raise CommandError("--text-column needs a table or dataset as --input, not a folder of images")
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise CommandError(f"--input {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}), .tar "
                               "shards or .parquet files")
        return files, False
    if path.suffix.lower() == ".csv":
        import pandas as pd

        table = pd.read_csv(path)
        column = text_column or image_column
        if column not in table.columns:
            raise CommandError(f"{path} has no column {column!r}; its columns are {list(table.columns)}")
        values = table[column].tolist()
        if text_column:
            return values, True
        return [str(v) if os.path.isabs(str(v)) else str(path.parent / str(v)) for v in values], False
    if text_column:
        raise CommandError("--text-column needs a .csv or .parquet table or an hf: dataset as --input")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise CommandError(f"--input {path} lists no files")
    return [line if os.path.isabs(line) else str(path.parent / line) for line in lines], False


def _input_kind(spec: str) -> str:
    """What ``--input`` names: "tar", "parquet", "hf" (a saved dataset), or "other" (images, lists, CSV)."""
    if spec.startswith("hf:"):
        if not Path(spec[3:]).is_dir():
            raise CommandError(f"--input {spec}: no dataset folder {spec[3:]}")
        return "hf"
    if "{" in spec:
        from braceexpand import braceexpand

        suffixes = {Path(name).suffix.lower() for name in braceexpand(spec)}
        if suffixes in ({".tar"}, {".parquet"}):
            return suffixes.pop()[1:]
        raise CommandError(f"--input {spec}: a brace pattern must name .tar shards or .parquet files")
    path = Path(spec)
    if not path.exists():
        raise CommandError(f"--input {path} does not exist")
    if path.is_dir():  # a folder of images (stop at the first), else of .tar shards, else of .parquet files
        suffixes = set()
        for name in path.rglob("*"):
            if name.suffix.lower() in IMAGE_SUFFIXES:
                return "other"
            suffixes.add(name.suffix.lower())
        return next((s[1:] for s in (".tar", ".parquet") if s in suffixes), "other")
    return {".tar": "tar", ".parquet": "parquet"}.get(path.suffix.lower(), "other")


def _extractor(args, is_text: bool):
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, dtype=args.dtype,
                  pooling=args.pooling, cache=str(args.store), cache_depth=args.cache_depth)
    if is_text:
        from .extractors.text import TextDiffusionFeatureExtractor

        timesteps = [0.0] if args.timestep is None else args.timestep
        return TextDiffusionFeatureExtractor(args.model, block=args.block or [-1], timestep=timesteps, **common)
    from .extractors.image import DiTFeatureExtractor

    timesteps = [100] if args.timestep is None else args.timestep
    steps = [int(t) for t in timesteps]
    if steps != timesteps:
        raise CommandError(f"image timesteps are integer DDPM steps; got {args.timestep}")
    return DiTFeatureExtractor(args.model, block=args.block or [12], timestep=steps, compile=args.compile, **common)


def main_parser() -> argparse.ArgumentParser:  # for `sklearn-difffeat extract --help` in the docs
    parser = argparse.ArgumentParser(prog="sklearn-difffeat")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser
