"""``cosmic-fx``: the parser built from :data:`COMMANDS`, and :func:`main`.

Exit codes: 0 success, 1 failure, 2 usage error. Errors go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from . import bench_claims, bench_compile, bench_perf, bench_presets, bench_zoo, demo, export, inspect
from .errors import CLIError

__all__ = ["COMMANDS", "build_parser", "main"]

EPILOG = textwrap.dedent(
    """
    examples:
      cosmic-fx demo                      train a CNN on digits with and without the cosmic backend
      cosmic-fx bench presets             default vs seed vs plain SGD on digits (README table)
      cosmic-fx bench presets --quick     the same, fewer arms and seeds
    """
)

# Every command, in `--help` order: (group, module). The module defines `add_parser(subparsers)`,
# which adds the command and returns its parser, and `run(args) -> int`; heavy imports stay inside
# `run`. A group (`bench`) is created where its first command appears.
COMMANDS = (
    (None, demo),
    ("bench", bench_presets),
    ("bench", bench_claims),
    ("bench", bench_perf),
    ("bench", bench_zoo),
    ("bench", bench_compile),
    (None, inspect),
    (None, export),
)

_GROUPS = {"bench": "benchmarks (each figure measured in the run that prints it)"}


def build_parser() -> argparse.ArgumentParser:
    """The ``cosmic-fx`` parser: every command of :data:`COMMANDS`, its ``run`` as ``args.func``."""
    parser = argparse.ArgumentParser(
        prog="cosmic-fx", description="cosmic_fx: passes, backend, inspection and benchmarks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for group, module in COMMANDS:
        if group is not None and group not in groups:
            groups[group] = top.add_parser(group, help=_GROUPS[group]).add_subparsers(dest=group, required=True)
        module.add_parser(top if group is None else groups[group]).set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cosmic-fx`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"cosmic-fx: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cosmic-fx: interrupted", file=sys.stderr)
        return 1
