"""A griffe extension for the API reference (``mkdocs.yml`` loads it; ``make docs`` builds the site).

1. ``cosmic_fx.passes`` lives outside ``cosmic_fx/``: the rewrite passes are the top-level ``passes/``
   folder, installed as ``cosmic_fx.passes`` through a setuptools ``package-dir`` mapping. Griffe reads
   ``cosmic_fx`` from its folder and so never sees that subpackage; this extension asks the import
   system where the installed ``cosmic_fx.passes`` is (the mapping, as pip installed it) and loads it
   from there as a member of ``cosmic_fx``.
2. The docstrings here title their doctests ``Example:`` (CONVENTIONS.md); griffe's Google parser knows
   only ``Examples:`` as a code section and renders ``Example:`` as a note, whose ``>>>`` lines and
   printed lists would then be read as Markdown (a list such as ``[('0', 32, True)]`` as a link). The
   rendered copy of each docstring says ``Examples:``; the source is left as it is.
3. Sphinx roles (``:func:`cosmic_fx.transform```) mean nothing to Markdown, which would print the role
   name; the rendered copy shows the target as code.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import Any

import griffe

_EXAMPLE_TITLE = re.compile(r"^Example:[ \t]*$", re.MULTILINE)
_SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


class CosmicDocs(griffe.Extension):
    """Load ``cosmic_fx.passes`` from where it is installed; render ``Example:`` and Sphinx roles."""

    def on_instance(self, *, node: ast.AST | griffe.ObjectNode, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE_TITLE.sub("Examples:", obj.docstring.value)
            obj.docstring.value = _SPHINX_ROLE.sub(r"`\1`", text)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "cosmic_fx" or "passes" in pkg.members:
            return
        spec = importlib.util.find_spec("cosmic_fx.passes")
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError("cosmic_fx.passes is not installed: run `make docs` (pip install -e '.[docs]')")
        # a private loader method, but the one that builds a subpackage with its parent set
        module = loader._load_module("passes", Path(spec.origin), parent=pkg)
        pkg.set_member("passes", module)
