"""The CLI is a layer on the library: the library never imports `cosmic_fx.cli`, commands are
registered in one place, and the `cosmic-fx` script points at the package."""

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

import cosmic_fx
from cosmic_fx.cli import COMMANDS, build_parser

PACKAGE = Path(cosmic_fx.__file__).parent
ROOT = PACKAGE.parent
# cosmic_fx.passes is installed from passes/ (pyproject's package-dir)
LIBRARY_DIRS = {"cosmic_fx": PACKAGE, "cosmic_fx.passes": ROOT / "passes"}


def _library_modules() -> dict[str, Path]:
    """Every module of the library (the package and cosmic_fx.passes), the CLI excluded."""
    modules = {}
    for base, folder in LIBRARY_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[0] == "cli":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((base, *parts))] = path
    return modules


def _imported(name: str, path: Path, *, top_level_only: bool) -> set[str]:
    """Absolute names of the modules `name` imports (anywhere in the file, or only at module level)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import mod`
    return found


def test_no_library_module_imports_the_cli():
    # every import statement, also those inside functions (an import run lazily is still a dependency)
    modules = _library_modules()
    assert "cosmic_fx.inspect" in modules and "cosmic_fx.bench.zoo" in modules and "cosmic_fx.passes" in modules
    offenders = {name: sorted(m for m in _imported(name, path, top_level_only=False)
                              if m == "cosmic_fx.cli" or m.startswith("cosmic_fx.cli."))
                 for name, path in modules.items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_library_module_loads_no_cli_module():
    names = sorted(_library_modules())
    # a module that needs an optional package that is not installed is skipped (its imports are still
    # checked statically above); any other import error fails the test
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ModuleNotFoundError as err:\n"
            "        if (err.name or '').split('.')[0] == 'cosmic_fx':\n"
            "            raise\n"
            "print(sorted(m for m in sys.modules if m == 'cosmic_fx.cli' or m.startswith('cosmic_fx.cli.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_modules_import_without_a_cycle():
    # module-level imports only (what runs at import time): the CLI package may use the library, and
    # its modules may not form a cycle among themselves or back through the library
    cli_dir = PACKAGE / "cli"
    modules = {f"cosmic_fx.cli.{p.stem}" if p.stem != "__init__" else "cosmic_fx.cli": p for p in cli_dir.glob("*.py")}
    graph = {name: {m for m in _imported(name, path, top_level_only=True) if m in modules}
             for name, path in modules.items() if name != "cosmic_fx.cli"}  # __init__ only re-exports

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join([*stack, node])}"
        for nxt in graph.get(node, ()):
            visit(nxt, [*stack, node])

    for name in graph:
        visit(name, [])
    assert "cosmic_fx.cli.app" in graph and graph["cosmic_fx.cli.inspect"] >= {"cosmic_fx.cli.model_args"}


def test_every_command_is_registered_once_from_its_own_module():
    modules = [module for _, module in COMMANDS]
    assert len(set(modules)) == len(modules) == 8
    for module in modules:
        assert module.__name__.startswith("cosmic_fx.cli.") and callable(module.add_parser) and callable(module.run)
    parser = build_parser()
    for argv, module in [(["demo"], "demo"), (["inspect", "m.py:f", "--input-shape", "2,3"], "inspect"),
                         (["export", "m.py:f", "--input-shape", "2,3", "--format", "pt2", "-o", "x"], "export"),
                         (["bench", "presets"], "bench_presets"), (["bench", "claims"], "bench_claims"),
                         (["bench", "perf"], "bench_perf"), (["bench", "zoo"], "bench_zoo"),
                         (["bench", "compile"], "bench_compile")]:
        assert parser.parse_args(argv).func.__module__ == f"cosmic_fx.cli.{module}"


def test_console_script_points_at_the_cli_main():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["project"]["scripts"]["cosmic-fx"] == "cosmic_fx.cli.app:main"
    packages = config["tool"]["setuptools"]["packages"]
    # every folder of the package is listed, so a non-editable install has the CLI (and the rest)
    folders = {"cosmic_fx." + ".".join(p.parent.relative_to(PACKAGE).parts)
               for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    assert folders - set(packages) == set()


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "cosmic_fx.cli", "bench", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: cosmic-fx bench") and "zoo" in out.stdout
