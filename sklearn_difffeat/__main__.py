"""Command line: ``sklearn-difffeat demo``, ``extract``, ``export``, ``reproduce`` (``python -m sklearn_difffeat``)."""

import argparse
import os
import sys


def main(argv=None):
    # Decoding workers share the cores with torch's threads: OpenMP threads waiting for work should sleep, not
    # spin (see extraction.dask_worker_config). OpenMP reads this once, when torch loads, which happens below.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog="sklearn-difffeat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run Diff-Feat end to end on the embedded data and models (offline, CPU)")
    demo.add_argument("--n-train", type=int, default=1000)
    demo.add_argument("--n-test", type=int, default=500)
    demo.add_argument("--cv", type=int, default=3)
    demo.add_argument("--output", default="demo_output", help="folder for the model, figures, summary and cache")
    demo.add_argument(
        "--threads", type=int, default=1, help="CPU threads while the demo runs (default 1; 0: the libraries' own)"
    )
    talk = demo.add_mutually_exclusive_group()
    talk.add_argument("--quiet", action="store_true", help="print only the results: no progress, no notices")
    talk.add_argument(
        "--verbose", action="store_true", help="also the extractors' progress bars and the search's per-step lines"
    )
    from . import _export_cli, _extract_cli, _reproduce_cli
    from ._cli import run_command

    commands = {"extract": _extract_cli, "export": _export_cli, "reproduce": _reproduce_cli}
    for command in commands.values():
        command.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command in commands:
        return run_command(args.command, commands[args.command].run, args)
    if args.command == "demo":
        from .demo import DemoSettings, run_demo

        verbose = 0 if args.quiet else 2 if args.verbose else 1
        settings = DemoSettings(
            n_train=args.n_train, n_test=args.n_test, output=args.output, cv=args.cv, verbose=verbose,
            n_threads=args.threads or None,
        )
        run_demo(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
