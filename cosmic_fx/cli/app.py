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

# Every command, in `--help` order: (group, module). The module defines `NAME`, `HELP`,
# `add_parser(subparsers)`, which adds the command and returns its parser, and `run(args) -> int`.
# Importing a command module is cheap (no torch, no library): heavy imports stay inside `add_parser`
# and `run`, so that `cosmic-fx --help` answers at once. A group (`bench`) is created where its first
# command appears.
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


def build_parser(only: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``cosmic-fx`` parser: every command of :data:`COMMANDS`, its ``run`` as ``args.func``.

    Args:
        only: the command to build in full, as its words (``["bench", "claims"]``); the others get
            only their name and help line (enough for ``--help`` and for an unknown-command error),
            which spares importing what their options need. ``None``: every command in full.

    Example:
        >>> build_parser().parse_args(["demo", "--quick"]).quick
        True
    """
    parser = argparse.ArgumentParser(
        prog="cosmic-fx", description="cosmic_fx: passes, backend, inspection and benchmarks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for group, module in COMMANDS:
        if group is not None and group not in groups:
            groups[group] = top.add_parser(group, help=_GROUPS[group]).add_subparsers(dest=group, required=True)
        subparsers = top if group is None else groups[group]
        words = [module.NAME] if group is None else [group, module.NAME]
        if only is None or list(only) == words:
            module.add_parser(subparsers).set_defaults(func=module.run)
        else:
            subparsers.add_parser(module.NAME, help=module.HELP)
    return parser


def _command_words(argv: Sequence[str]) -> list[str]:
    """The words that name the command in ``argv`` (``["bench", "claims"]``); ``[]`` when none.
    The top level and the groups take no option with a value, so the first words that are not
    options name it."""
    words = [a for a in argv if not a.startswith("-")][:2]
    if words and words[0] not in _GROUPS:
        words = words[:1]
    return words


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cosmic-fx`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Args:
        argv: the arguments after the program name.

    Example:
        >>> main(["demo", "--quick", "--no-progress"])   # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_command_words(argv))
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
