"""``cosmic-fx bench compile``: the first training step's compile time (cold, warm, recompiles) against
``torch.compile``, each measurement in a fresh process (:mod:`cosmic_fx.bench.compile_time`)."""

from __future__ import annotations

import argparse
import sys

from .errors import CLIError

__all__ = ["HELP", "NAME", "add_parser", "run"]

NAME = "compile"
HELP = "first-step compile time, cold / warm / recompiles, cosmic vs torch.compile (issue 18)"

_QUICK_MODELS = ("mlp",)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``compile`` to the ``bench`` group."""
    p = subparsers.add_parser(
        NAME, help=HELP,
        epilog="examples:\n  cosmic-fx bench compile\n  cosmic-fx bench compile --quick\n"
               "  cosmic-fx bench compile --models mlp,gpt2 --breakdown",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="the MLP only, the default preset only, no warm run (about a minute with aot_eager)")
    p.add_argument("--models", default=None, help="comma list of mlp,gpt2,bert,convnext (default: all)")
    p.add_argument("--arms", default=None,
                   help="comma list of torch,cosmic,cosmic-fast (default: all three; torch is the baseline)")
    p.add_argument("--lower", default="inductor", choices=("inductor", "aot_eager"),
                   help="the lowering of both arms (default inductor)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the first step (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process (default 1)")
    p.add_argument("--breakdown", action="store_true",
                   help="also: where the cold step's time went (dynamo's timers) and one run without each mechanism")
    p.add_argument("--repeats", type=int, default=2,
                   help="measure every arm this many times, in alternating order, and report the fastest "
                        "(default 2; --quick: 1)")
    p.add_argument("--no-events", action="store_true",
                   help="skip the recompile events (second step, eval, new batch, freeze): cold and warm only")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    return p


def run(args: argparse.Namespace) -> int:
    import json

    from ..bench import compile_time

    if args.threads < 1:
        raise CLIError(f"--threads must be >= 1; got {args.threads}")
    if args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1; got {args.repeats}")
    if args.batch < 1:
        raise CLIError(f"--batch must be >= 1; got {args.batch}")
    models = tuple(m.strip() for m in args.models.split(",")) if args.models else (
        _QUICK_MODELS if args.quick else compile_time.Settings.models)
    arms = tuple(a.strip() for a in args.arms.split(",")) if args.arms else (
        ("torch", "cosmic") if args.quick else compile_time.Settings.arms)
    if "torch" not in arms:
        arms = ("torch", *arms)  # every ratio is against it
    settings = compile_time.Settings(models=models, arms=arms, lower=args.lower, batch=args.batch,
                                     threads=args.threads, warm=not args.quick, breakdown=args.breakdown,
                                     repeats=1 if args.quick else args.repeats, events=not args.no_events)
    try:
        out = compile_time.run(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError) as err:
        raise CLIError(str(err)) from err
    print(f"# bench compile: lower={args.lower}, batch {args.batch}, {args.threads} thread(s), a fresh process "
          f"per measurement, a new cache directory per arm, one Inductor compile thread, the fastest of "
          f"{settings.repeats} repeat(s) after a discarded priming process; times are seconds of the "
          "first forward + backward, compile included: CPU time of the process and its compiler children "
          "(robust on a shared machine), and wall time")
    print(compile_time.render(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
