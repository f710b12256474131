"""``cosmic-fx bench presets``: default vs seed vs plain SGD on digits, and each mechanism alone."""

from __future__ import annotations

import argparse

__all__ = ["HELP", "NAME", "add_parser", "run"]

NAME = "presets"
HELP = "default vs seed vs plain SGD on digits, and each mechanism alone"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``presets`` to the ``bench`` group."""
    p = subparsers.add_parser(NAME, help=HELP,
                              epilog="example:\n  cosmic-fx bench presets --seeds 3 --out results",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3, 1 with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 30, 10 with --quick)")
    p.add_argument("--engine", choices=["eager", "compile"], default="eager",
                   help="eager: transform + eager hooks; compile: cosmic_fx.compile with aot_eager lowering")
    p.add_argument("--quick", action="store_true",
                   help="fewer arms and seeds (1 seed, 10 epochs unless --seeds / --epochs say otherwise)")
    p.add_argument("--search", action="store_true",
                   help="run the calibrated CDG/CCE forms that were tried for the default, each alone")
    p.add_argument("--out", default=None, help="folder for presets.md / presets.json")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from ..bench import presets

    seeds = 1 if args.quick and args.seeds is None else (args.seeds or 3)
    epochs = args.epochs or (10 if args.quick else 30)
    out = presets.run(seeds=seeds, epochs=epochs, engine=args.engine, quick=args.quick, out_dir=args.out,
                      show_progress=not args.no_progress, search=args.search)
    print(f"digits, {epochs} epochs, plain SGD lr 0.1, batch 32, {seeds} seed(s), engine={args.engine}; "
          "test error mean ± std over seeds")
    print(out["markdown"])
    return 0
