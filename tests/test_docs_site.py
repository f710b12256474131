"""The README is a front door that stays true, and the docs site documents every public name.

`make docs` (mkdocs build --strict) checks links, anchors and that every API reference resolves; these
tests check what the build cannot: that no public name is missing from the reference, that the README
stays short with its commands first, that its example runs, and that the experiment scripts and the
docs that cite them agree.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cosmic_fx

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
API = DOCS / "api"
EXPERIMENTS = ROOT / "benchmarks" / "experiments"
NOT_RUN = "<!-- not run -->"

_DIRECTIVE = re.compile(r"^::: *(?P<path>[\w.]+)[ \t]*\n(?P<options>(?:[ \t]+.*\n)*)", re.MULTILINE)
_HEADING = re.compile(r"^\s+heading:\s*[\"']?(?P<heading>[\w.]+)", re.MULTILINE)


def api_directives() -> dict[str, str]:
    """``{name the reference shows: python path it renders}`` from every ``::: path`` in docs/api/."""
    out = {}
    for page in sorted(API.glob("*.md")):
        for m in _DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            heading = _HEADING.search(m.group("options"))
            out[heading.group("heading") if heading else m.group("path")] = m.group("path")
    return out


def resolve(path: str) -> object:
    """What the reference renders for ``path``: a module wins over a package attribute of the same name,
    as it does for griffe (``cosmic_fx.export`` is the module, not the function the package re-exports)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


def test_api_reference_documents_every_public_name():
    documented = api_directives()
    missing = sorted(name for name in cosmic_fx.__all__ if f"cosmic_fx.{name}" not in documented)
    assert not missing, (
        f"public names without an entry in docs/api/*.md: {missing}; add a `::: cosmic_fx.NAME` line to the "
        "page of its topic (docs/api/index.md lists them)"
    )
    wrong = {}
    for name in cosmic_fx.__all__:
        path = documented[f"cosmic_fx.{name}"]
        if resolve(path) is not getattr(cosmic_fx, name):
            wrong[name] = path
    assert not wrong, (
        f"these entries render another object than the public name (a module of the same name?): {wrong}; "
        "point the directive at the object itself and set `heading:` to the public name"
    )


def test_api_reference_names_only_what_exists_and_the_public_modules():
    documented = api_directives()
    for module in ("cosmic_fx.integrations.hf", "cosmic_fx.passes"):
        assert documented.get(module) == module
    stale = {}
    for name, path in documented.items():
        try:
            resolve(path)
        except (AttributeError, ModuleNotFoundError) as exc:
            stale[name] = f"{type(exc).__name__}: {exc}"
    assert not stale, f"docs/api/*.md names objects that do not exist: {stale}"


def test_readme_is_short_and_starts_with_the_commands_and_the_backend():
    size = README.stat().st_size
    assert size <= 16 * 1024, f"README.md is {size} bytes, over 16 KB: move details to a page under docs/"
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:60])
    for needle in ("make demo", "make test", 'backend="cosmic"'):
        assert needle in head, f"README.md's first 60 lines must hold {needle!r}"
    # the presets' costs and gains: the three-row table, inside the first 60 lines too
    for preset in ("CosmicConfig()", "CosmicConfig.fast()", "CosmicConfig.seed()"):
        assert re.search(rf"^\| .*`{re.escape(preset)}`.*\|.*\|.*\|", head, re.MULTILINE), preset


def readme_python_blocks() -> tuple[list[str], int]:
    """The README's fenced ```python blocks meant to run, and how many are marked ``<!-- not run -->``."""
    text = README.read_text(encoding="utf-8")
    run, skipped = [], 0
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        before = text[: m.start()].rstrip().splitlines()
        if before and before[-1].strip() == NOT_RUN:
            skipped += 1
        else:
            run.append(m.group(1))
    return run, skipped


def test_readme_python_examples_run():
    blocks, skipped = readme_python_blocks()
    assert blocks, "README.md has no runnable ```python block (the 'your own model' example)"
    assert skipped <= 2, f"{skipped} README blocks are marked {NOT_RUN}: keep illustrative-only blocks few"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for code in blocks:
        # a fresh process: the example compiles, and must not lean on state another test left behind
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"README example failed:\n{code}\n--- stderr:\n{proc.stderr[-3000:]}"
        if "cosmic_fx.explain(" in code:
            # the example's last line prints the report: the rewritten site and the parameter table
            assert "cosmic_fx.explain: Sequential" in proc.stdout, proc.stdout[-2000:]
            assert "| 0      | linear |" in proc.stdout, proc.stdout[-2000:]


def test_readme_links_point_to_files_that_exist():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(((?!https?:)[^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets, "README.md links to no docs page"
    missing = sorted({t for t in targets if not (ROOT / t).exists()})
    assert not missing, f"README.md links to missing files: {missing}"


def test_experiment_scripts_live_in_benchmarks_and_name_their_table():
    assert not list(DOCS.glob("*.py")), "experiment scripts belong in benchmarks/experiments/, not docs/"
    scripts = sorted(EXPERIMENTS.glob("*.py"))
    assert scripts
    for script in scripts:
        doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
        m = re.search(r"Produced: (docs/[\w/.-]+\.md)", doc)
        assert m, f"{script.name}: its docstring must say 'Produced: docs/PAGE.md, section ...' (the table it made)"
        assert (ROOT / m.group(1)).exists(), f"{script.name} names {m.group(1)}, which does not exist"


@pytest.mark.parametrize("folder", ["docs", "cosmic_fx", "tests", "README.md", "benchmarks", "examples"])
def test_no_reference_to_the_old_experiment_paths(folder):
    old = re.compile(r"(?<![\w/])docs/\w+_experiment\.py")
    base = ROOT / folder
    files = [base] if base.is_file() else [p for p in base.rglob("*") if p.suffix in (".py", ".md")]
    stale = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in old.finditer(p.read_text("utf-8"))]
    assert not stale, f"old experiment paths (now benchmarks/experiments/): {stale}"
