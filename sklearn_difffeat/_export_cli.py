"""``sklearn-difffeat export``: a manifest's features, in its order, with the input ids, as .npy or .parquet."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write the stored features of an extraction's inputs, in order, with their ids (.npy or .parquet)",
        description="Write the features of every input listed in an extraction manifest, in its order, read "
                    "from the feature store in chunks. .npy: a float32 array plus <stem>.ids.parquet (id, "
                    "position, key, status); .parquet: one table with those columns and the features as a "
                    "fixed-size list. Failed inputs get rows of NaN. The model is not loaded when the store "
                    "holds its identity record.",
    )
    p.add_argument("--manifest", required=True, type=Path, help="the manifest written by `sklearn-difffeat extract`")
    p.add_argument("--output", required=True, type=Path, help="feats.npy or feats.parquet")
    p.add_argument("--store", type=Path, default=None,
                   help="feature store folder (default: the one the manifest names)")
    p.add_argument("--block", type=int, nargs="+", default=None,
                   help="blocks to export, in this column order, among those extracted (default: all requested)")
    p.add_argument("--timestep", type=float, nargs="+", default=None,
                   help="timesteps to export, in this column order, among those extracted (default: all)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows read and written at a time (default: what fits in 256 MiB, at most 8192)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    """Run the command; errors are reported by :func:`sklearn_difffeat._cli.run_command`."""
    from ._cli import CommandError
    from .export import export_features

    if args.chunk_rows is not None and args.chunk_rows < 1:
        raise CommandError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    written = export_features(args.manifest, args.output, args.store, blocks=args.block, timesteps=args.timestep,
                              chunk_rows=args.chunk_rows, progress=not args.quiet)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
