"""The ``cosmic-fx`` command line.

Exit codes: 0 success, 1 failure, 2 usage error. Errors go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

EPILOG = textwrap.dedent(
    """
    examples:
      cosmic-fx demo                      train a CNN on digits with and without the cosmic backend
      cosmic-fx bench presets             default vs seed vs plain SGD on digits (README table)
      cosmic-fx bench presets --quick     the same, fewer arms and seeds
    """
)


class CLIError(Exception):
    """A failure to report on stderr with exit code 1 (no traceback)."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(epochs=args.epochs, lower=args.lower, show_progress=not args.no_progress)
    return 0


def _cmd_bench_presets(args: argparse.Namespace) -> int:
    from .bench import presets

    seeds = 1 if args.quick and args.seeds is None else (args.seeds or 3)
    epochs = args.epochs or (10 if args.quick else 30)
    out = presets.run(seeds=seeds, epochs=epochs, engine=args.engine, quick=args.quick, out_dir=args.out,
                      show_progress=not args.no_progress, search=args.search)
    print(f"digits, {epochs} epochs, plain SGD lr 0.1, batch 32, {seeds} seed(s), engine={args.engine}; "
          "test error mean ± std over seeds")
    print(out["markdown"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmic-fx", description="cosmic_fx: passes, backend, inspection and benchmarks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small CNN on digits with the cosmic backend vs without it",
                          epilog="example:\n  cosmic-fx demo --epochs 10", formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--lower", choices=["inductor", "aot_eager", "eager"], default="inductor")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks (each figure measured in the run that prints it)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    presets = bench_sub.add_parser("presets", help="default vs seed vs plain SGD on digits, and each mechanism alone",
                                   epilog="example:\n  cosmic-fx bench presets --seeds 3 --out results",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    presets.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3, 1 with --quick)")
    presets.add_argument("--epochs", type=int, default=None, help="epochs (default 30, 10 with --quick)")
    presets.add_argument("--engine", choices=["eager", "compile"], default="eager",
                         help="eager: transform + eager hooks; compile: cosmic_fx.compile with aot_eager lowering")
    presets.add_argument("--quick", action="store_true")
    presets.add_argument("--search", action="store_true",
                         help="run the calibrated CDG/CCE forms that were tried for the default, each alone")
    presets.add_argument("--out", default=None, help="folder for presets.md / presets.json")
    presets.add_argument("--no-progress", action="store_true")
    presets.set_defaults(func=_cmd_bench_presets)
    for module, target in _PLUGINS:
        _register(module, sub if target == "top" else bench_sub)
    return parser


# Modules that add subcommands: each defines `register_cli(subparsers)` and keeps heavy imports
# inside its command functions, so `cosmic-fx --help` stays fast.
_PLUGINS = (
    ("cosmic_fx.inspect", "top"),
    ("cosmic_fx.export", "top"),
    ("cosmic_fx.bench.claims", "bench"),
    ("cosmic_fx.bench.perf", "bench"),
    ("cosmic_fx.bench.zoo", "bench"),
)


def _register(module: str, subparsers) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:  # not written (yet): no such subcommand
            return
        raise
    mod.register_cli(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":  # pragma: no cover
    # `python -m cosmic_fx.cli` runs this file as __main__: call the package's own module so that the
    # CLIError plugins raise is the class `main` catches
    from cosmic_fx.cli import main as _main

    sys.exit(_main())
