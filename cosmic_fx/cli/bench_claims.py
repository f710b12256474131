"""``cosmic-fx bench claims``: the source text's four claims and issue 10's targets, measured on six
real-data tasks (:mod:`cosmic_fx.bench.claims`)."""

from __future__ import annotations

import argparse

from .errors import CLIError

__all__ = ["HELP", "NAME", "add_parser", "parse_arm_list", "run"]

NAME = "claims"
HELP = "measure the source text's four claims and issue 10's targets on six real-data tasks"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``claims`` to the ``bench`` group."""
    from ..bench.arms import arm_names
    from ..bench.tasks import LONG_TASK_NAMES, TASK_NAMES

    p = subparsers.add_parser(
        NAME, help=HELP,
        epilog="examples:\n  cosmic-fx bench claims --out results/claims\n  cosmic-fx bench claims --quick\n"
               "  cosmic-fx bench claims --tasks docs-finetune,mnist-transfer --arm 'cosmic default' "
               "--arm 'cosmic fast, freeze more'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny budgets, eager lowering, no ablations, 2 seeds (about a minute)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; 2 with --quick)")
    p.add_argument("--tasks", default=None,
                   help=f"comma list of {','.join(TASK_NAMES)} (default: all but {','.join(LONG_TASK_NAMES)}, "
                        "about 20 min per arm: name it to run it)")
    # some arm names contain a comma ('cosmic fast, freeze more'): one name per --arm is unambiguous
    p.add_argument("--arm", dest="arm", action="append", default=None, metavar="NAME",
                   help="an arm to keep, once per arm (the torch.compile and same-optimizer eager baselines "
                        f"always run); one of: {' '.join(repr(a) for a in arm_names())}")
    p.add_argument("--arms", default=None, metavar="LIST",
                   help="the same as a comma-separated list (names that contain a comma are recognised whole); "
                        "--arm is clearer")
    p.add_argument("--lower", choices=["inductor", "aot_eager", "eager"], default=None,
                   help="lowering of every compiled arm (default: inductor; eager with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--out", default=None, help="folder for claims.md, claims.json, PNG plots and pretrained/")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return p


def parse_arm_list(text: str, valid: list[str]) -> list[str]:
    """Split the ``--arms`` comma list into arm names, keeping a name that contains a comma whole
    (the longest valid name wins at each position).

    Args:
        text: the ``--arms`` value, e.g. ``"cosmic default,cosmic fast, freeze more"``.
        valid: every arm name.

    Raises:
        CLIError: a part is no arm name; the message lists the valid names.

    Example:
        >>> parse_arm_list("cosmic seed,cosmic fast, freeze more", ["cosmic seed", "cosmic fast, freeze more"])
        ['cosmic seed', 'cosmic fast, freeze more']
    """
    pieces = text.split(",")
    names, i = [], 0
    while i < len(pieces):
        for j in range(len(pieces), i, -1):
            name = ",".join(pieces[i:j]).strip()
            if name in valid:
                names.append(name)
                i = j
                break
        else:
            bad = pieces[i].strip()
            raise CLIError(f"--arms: {bad!r} is not an arm name; valid: {' '.join(repr(a) for a in valid)} "
                           "(pass one name per --arm, e.g. --arm 'cosmic fast, freeze more')")
    return names


def run(args: argparse.Namespace) -> int:
    from ..bench import claims
    from ..bench.arms import arm_names

    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    arms = None
    if args.arm or args.arms:
        arms = [a.strip() for a in args.arm or []] + (parse_arm_list(args.arms, arm_names()) if args.arms else [])
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
