"""``cosmic-fx demo``: train a small CNN on digits with the cosmic backend and without it."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``demo`` to ``subparsers``."""
    p = subparsers.add_parser("demo", help="train a small CNN on digits with the cosmic backend vs without it",
                              epilog="example:\n  cosmic-fx demo --epochs 10",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lower", choices=["inductor", "aot_eager", "eager"], default="inductor")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(epochs=args.epochs, lower=args.lower, show_progress=not args.no_progress)
    return 0
