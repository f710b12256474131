"""``cosmic-fx demo``: train a small CNN on digits with the cosmic backend and without it."""

from __future__ import annotations

import argparse

from .errors import CLIError

__all__ = ["HELP", "NAME", "QUICK_EPOCHS", "QUICK_LOWER", "add_parser", "run"]

NAME = "demo"
HELP = "train a small CNN on digits with the cosmic backend vs without it"

# --quick: a smoke run of the whole demo (both arms, both tables) in well under a minute on 2 cores;
# aot_eager skips Inductor's code generation, which dominates a short run.
QUICK_EPOCHS = 3
QUICK_LOWER = "aot_eager"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``demo`` to ``subparsers``."""
    p = subparsers.add_parser(NAME, help=HELP,
                              description="Train DigitsCNN on scikit-learn's digits twice, with the same data "
                              "and seed: plain PyTorch (eager), then cosmic_fx.compile (default preset). Prints "
                              "the rewritten sites, then one results row per arm.",
                              epilog="examples:\n  cosmic-fx demo                 30 epochs, Inductor (a few "
                              "minutes)\n  cosmic-fx demo --quick         "
                              f"{QUICK_EPOCHS} epochs, {QUICK_LOWER} (under a minute)",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs of each arm (default 30; {QUICK_EPOCHS} with --quick)")
    p.add_argument("--lower", choices=["inductor", "aot_eager", "eager"], default=None,
                   help="what the cosmic backend lowers the rewritten graph to "
                   f"(default inductor; {QUICK_LOWER} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run that checks the demo end to end: {QUICK_EPOCHS} epochs, {QUICK_LOWER} "
                   "lowering (unless --epochs / --lower say otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models' initialisation and the batch order")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else 30)
    lower = args.lower or (QUICK_LOWER if args.quick else "inductor")
    if epochs < 1:
        raise CLIError(f"--epochs must be at least 1; got {epochs}")
    run_demo(epochs=epochs, lower=lower, show_progress=not args.no_progress, seed=args.seed)
    return 0

