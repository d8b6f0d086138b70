"""Command-line interface: ``adamkit <command> ...``.

Commands
--------
``adamkit demo [--out DIR] [--force]``
    Race Adam, AdamW, AMSGrad and SGD on analytic test functions, print the
    results table and write the figures into ``DIR`` (default
    ``./adamkit-demo``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from adamkit._version import __version__

__all__ = ["main", "build_parser"]

#: Exit status for usage errors (as argparse uses).
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="adamkit",
        description="The Adam optimizer family for PyTorch and NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="compare Adam, AdamW, AMSGrad and SGD on test functions and plot them",
        description=(
            "Run Adam (and AdamW, AMSGrad) against SGD on f(x) = (x-2)^2, Rosenbrock and Beale, "
            "print a results table and write quadratic.png, rosenbrock.png and beale.png."
        ),
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("adamkit-demo"),
        metavar="DIR",
        help="directory for the figures, created if missing (default: ./adamkit-demo)",
    )
    demo.add_argument(
        "--force",
        action="store_true",
        help="write into DIR even if it is not empty (figures of the same name are overwritten)",
    )
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _error(message: str) -> int:
    print(f"adamkit: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _cmd_demo(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not out.is_dir():
        return _error(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        return _error(f"output directory {str(out)!r} is not empty; use --force to write into it anyway")

    from adamkit.experiments.demo import plot_paths, run_demo  # heavy imports (matplotlib) only here

    run_demo(out)
    print()
    print("Figures written:")
    for path in plot_paths(out):
        print(f"  {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
