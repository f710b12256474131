"""The ``cosmic-fx`` command line: a thin layer on the library, one file per command.

The library (every module outside this package) never imports it. Every command is a module here
that defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``, listed
once in :data:`cosmic_fx.cli.app.COMMANDS`.
"""

from __future__ import annotations

from .app import COMMANDS, build_parser, main
from .errors import CLIError

__all__ = ["COMMANDS", "CLIError", "build_parser", "main"]
