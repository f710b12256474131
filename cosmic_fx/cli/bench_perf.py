"""``cosmic-fx bench perf``: what each mechanism costs and what CDG/CCE save, as side-by-side ratios
(:mod:`cosmic_fx.bench.perf`)."""

from __future__ import annotations

import argparse

from .errors import CLIError

__all__ = ["HELP", "NAME", "add_parser", "run"]

NAME = "perf"
HELP = "cost of each mechanism and savings of CDG/CCE, as side-by-side ratios (issue 5 targets)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``perf`` to the ``bench`` group."""
    from ..bench import perf

    p = subparsers.add_parser(
        NAME, help=HELP,
        epilog="examples:\n  cosmic-fx bench perf\n  cosmic-fx bench perf --quick\n"
               "  cosmic-fx bench perf --sections csc,qci --threads 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (under a minute)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: timed with the thread's CPU clock, robust on a shared machine)")
    p.add_argument("--sections", default=None, help=f"comma list of {','.join(perf.SECTIONS)} (default: all)")
    p.add_argument("--out", default=None, help="folder for perf.md and perf.json")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from ..bench import perf

    if args.threads < 1:
        raise CLIError(f"--threads must be >= 1; got {args.threads}")
    sections = tuple(s.strip() for s in args.sections.split(",")) if args.sections else perf.SECTIONS
    try:
        out = perf.run(quick=args.quick, threads=args.threads, sections=sections, out_dir=args.out,
                       show_progress=not args.no_progress)
    except (ValueError, RuntimeError) as err:
        raise CLIError(str(err)) from err
    print(out["header"])
    print(out["markdown"])
    return 0
