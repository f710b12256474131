"""``cosmic-fx bench claims``: the source text's four claims and issue 10's targets, measured on six
real-data tasks (:mod:`cosmic_fx.bench.claims`)."""

from __future__ import annotations

import argparse

from ..bench import claims
from ..bench.arms import arm_names
from ..bench.tasks import TASK_NAMES
from .errors import CLIError

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``claims`` to the ``bench`` group."""
    p = subparsers.add_parser(
        "claims", help="measure the source text's four claims and issue 10's targets on six real-data tasks",
        epilog="examples:\n  cosmic-fx bench claims --out results/claims\n  cosmic-fx bench claims --quick\n"
               "  cosmic-fx bench claims --tasks docs-finetune,mnist-transfer --arms 'cosmic default'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny budgets, eager lowering, no ablations, 2 seeds (about a minute)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; 2 with --quick)")
    p.add_argument("--tasks", default=None, help=f"comma list of {','.join(TASK_NAMES)} (default: all)")
    p.add_argument("--arms", default=None,
                   help="comma list of arms to keep (the torch.compile and same-optimizer eager baselines "
                        f"always run); valid: {', '.join(arm_names())}")
    p.add_argument("--lower", choices=["inductor", "aot_eager", "eager"], default=None,
                   help="lowering of every compiled arm (default: inductor; eager with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--out", default=None, help="folder for claims.md, claims.json, PNG plots and pretrained/")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
    try:
        out = claims.run(tasks=tasks, seeds=seeds, quick=args.quick, out_dir=args.out,
                         show_progress=not args.no_progress, arms=arms, lower=args.lower, threads=args.threads)
    except ValueError as err:
        raise CLIError(str(err)) from None
    lower = out["payload"]["lower"]
    note = " (speed figures are not the claims' figures)" if lower != "inductor" else ""
    print(f"## Do the claims hold? ({'quick' if args.quick else 'full'} budget, {seeds} seed(s), "
          f"{out['payload']['threads']} thread(s), mean ± std; "
          f"compiled arms lowered with {lower}{note}; reductions relative to the torch.compile baseline for "
          "speed and memory, to torch.compile and eager with the same optimizer pooled for iterations and "
          "generalization)\n")
    print(out["markdown"])
    return 0
