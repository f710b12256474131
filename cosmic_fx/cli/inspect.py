"""``cosmic-fx inspect``: what cosmic does to a model (:func:`cosmic_fx.explain`) as a table, code, diff,
DOT, SVG or JSON."""

from __future__ import annotations

import argparse

from .errors import CLIError
from .model_args import add_model_command, model_and_inputs

__all__ = ["HELP", "NAME", "add_parser", "run"]

NAME = "inspect"
HELP = "show what cosmic does to a model: sites, parameters, graph diff, diagram"

_EPILOG = """\
examples:
  cosmic-fx inspect cosmic_fx.models:DigitsCNN --input-shape 8,1,8,8
  cosmic-fx inspect my_model.py:build --input-shape 4,64 --format diff
  cosmic-fx inspect my_model.py:build --input-shape 4,64 --format dot | dot -Tsvg > graph.svg
  cosmic-fx inspect lm.py:build --input-shape 2,16 --input-dtype int64 --int-high 100 --preset seed
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``inspect`` to ``subparsers``."""
    p = add_model_command(
        subparsers, NAME, help=HELP,
        description="Transform a model with cosmic_fx and report every change (cosmic_fx.explain).",
        epilog=_EPILOG,
    )
    p.add_argument("--format", choices=["table", "code", "diff", "dot", "svg", "json"], default="table",
                   help="table: sites and parameters; code: the rewritten graph; diff: before vs after; "
                        "dot: Graphviz text; svg: rendered by Graphviz (needs `dot`); json: everything")
    p.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    return p


def run(args: argparse.Namespace) -> int:
    from ..inspect import explain

    model, inputs, config = model_and_inputs(args)
    try:
        report = explain(model, inputs, config)
    except (ValueError, TypeError, RuntimeError) as err:
        raise CLIError(str(err)) from None
    if args.format == "svg":
        try:
            text = report.svg()
        except RuntimeError as err:
            raise CLIError(str(err)) from None
    else:
        text = {"table": str, "code": lambda r: r.graph_after, "diff": lambda r: r.diff,
                "dot": lambda r: r.dot, "json": lambda r: r.to_json() + "\n"}[args.format](report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        print(text, end="")
    return 0
