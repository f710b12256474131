"""``cosmic-fx bench zoo``: the pass-rate table over torch built-ins, HF transformers, torchvision and
timm models (:mod:`cosmic_fx.bench.zoo`)."""

from __future__ import annotations

import argparse
import os

from .errors import CLIError

__all__ = ["HELP", "NAME", "add_parser", "run"]

NAME = "zoo"
HELP = "pass-rate table over torch built-ins, HF transformers, torchvision and timm models"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``zoo`` to the ``bench`` group."""
    from ..bench import zoo

    p = subparsers.add_parser(
        NAME, help=HELP,
        epilog="examples:\n  cosmic-fx bench zoo --out results\n  cosmic-fx bench zoo --quick\n"
               "  cosmic-fx bench zoo --models 'hf-|tv-vit' --lower inductor\n\n"
               "torchvision and timm are read from an isolated folder: `make zoo-vendor` (see "
               "cosmic_fx/bench/zoo_vision.py).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a small subset: torch built-ins and a few HF models")
    p.add_argument("--models", default=None, metavar="REGEX", help="only models whose name matches (re.search)")
    p.add_argument("--lower", choices=["aot_eager", "inductor", "eager"], default="aot_eager",
                   help="lowering of every compiled run, plain torch.compile included (default aot_eager)")
    p.add_argument("--steps", type=int, default=5, help="training steps on the fixed batch (default 5)")
    p.add_argument("--columns", default=None, metavar="KEYS",
                   help=f"comma list of columns to run (default all: {','.join(k for k, _ in zoo.COLUMNS)})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--vendor", default=None, metavar="DIR",
                   help="folder with the isolated torchvision/timm (default: $COSMIC_FX_ZOO_VENDOR or .zoo-vendor)")
    p.add_argument("--list", action="store_true", help="list the selected models and exit")
    p.add_argument("--out", default=None, help="folder for zoo.md and zoo.json")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import zoo
    from ..bench.common import write_results
    from ..bench.zoo_models import all_models
    from ..bench.zoo_vision import VENDOR_ENV

    if args.vendor:
        os.environ[VENDOR_ENV] = args.vendor
    if args.list:
        for m in zoo.select(all_models(), args.models, args.quick):
            print(f"{m.name:24s} {m.library}{'  (quick)' if m.quick else ''}")
        return 0
    if args.threads < 1 or args.steps < 2:
        raise CLIError(f"--threads must be >= 1 and --steps >= 2; got {args.threads} and {args.steps}")
    torch.set_num_threads(args.threads)
    columns = tuple(c.strip() for c in args.columns.split(",")) if args.columns else zoo.Settings.columns
    try:
        settings = zoo.Settings(lower=args.lower, steps=args.steps, columns=columns)
    except ValueError as err:
        raise CLIError(str(err)) from None

    def save(rows: list[zoo.Row]) -> None:  # after every model: a long run that is stopped keeps what it measured
        write_results(args.out, "zoo", zoo.render(rows, settings), zoo.to_json(rows, settings))

    rows = zoo.run(settings=settings, quick=args.quick, pattern=args.models, show_progress=not args.no_progress,
                   on_row=save if args.out else None)
    print(zoo.render(rows, settings))
    return 0
