"""``sklearn-difffeat reproduce``: the paper's protocol on MS-COCO 2014 or VG500, from the command line."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "reproduce",
        help="run the paper's protocol on COCO 2014 or VG500: extract, search, fit, score (resumable)",
        description="Load the benchmark's train and test splits, extract image and text features into the store "
                    "at every grid timestep, search the (block, timestep) grid on a held-out part of the training "
                    "split, fit image-only, text-only and fused heads on the whole training split and score the "
                    "test split. Writes results.md, results.json and state.json to --output; a rerun resumes "
                    "after the last finished step, and reads every stored feature from the store.",
    )
    p.add_argument("dataset", choices=["coco", "vg500"])
    p.add_argument("--root", required=True, type=Path, help="the dataset folder (layout: docs/benchmarks.md)")
    p.add_argument("--store", required=True, type=Path, help="feature store folder (created if missing)")
    p.add_argument("--output", type=Path, default=None,
                   help="folder for the results and the state file (default: <store>/reproduce-<dataset>)")
    p.add_argument("--limit", type=int, default=None, help="keep the first N images of each split (a quick run)")
    p.add_argument("--image-model", default="facebook/DiT-XL-2-256", help="DiT: hub id, folder or embedded:NAME")
    p.add_argument("--text-model", default="kuleshov-group/mdlm-owt",
                   help="masked-diffusion text model: hub id, folder or embedded:NAME")
    p.add_argument("--grid", choices=["paper", "small"], default="paper",
                   help="paper: every block of each model, image t in 0..800 (8), text t in 0..0.5 (5); "
                        "small: a few values per axis (default: paper)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="backbone precision (default: bfloat16 when extracting on GPUs, else float32; a resumed "
                        "run keeps the one its extraction used)")
    p.add_argument("--batch-size", type=int, default=64, help="maximum batch on the device (default: 64)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image decoding processes (default: all cores but one, at most 16)")
    p.add_argument("--seed", type=int, default=0, help="seeds the held-out part and the heads (default: 0)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the training split held out to score the search (default: 0.2)")
    cluster = p.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", help="extract on a running Dask scheduler's workers (GPU workers assumed)")
    cluster.add_argument("--local-gpus", type=int, metavar="N",
                         help="extract on a local Dask cluster with one worker per GPU (needs dask-cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress; the table and the files written only")


def run(args) -> int:
    """Run the command; errors are reported by :func:`sklearn_difffeat._cli.run_command`."""
    import contextlib

    from ._cli import dask_client
    from .reproduce import ReproduceSettings, run_reproduce

    settings = ReproduceSettings(
        dataset=args.dataset, root=args.root, store=args.store, output=args.output, limit=args.limit,
        image_model=args.image_model, text_model=args.text_model, grid=args.grid, device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
        val_fraction=args.val_fraction, verbose=0 if args.quiet else 1,
    )
    args.local_workers = None  # `extract`'s cluster options, less the CPU-only one
    with contextlib.ExitStack() as stack:  # closes the client and a local cluster
        client = dask_client(args, stack)
        summary = run_reproduce(settings, client=client, gpu_workers=client is not None)
    counts = {m: c["computed"] for m, c in summary["extraction"].items()}
    print(f"samples computed this run: {json.dumps(counts)}; {summary['seconds']:.1f} s")
    return 0
