"""`cosmic-fx demo` (the README's `make demo`) end to end in quick mode, through the CLI entry, and the
command line's face: every option has a help text, `--help` imports neither torch nor the library,
and arm names with commas are unambiguous in `bench claims`."""

import argparse
import re
import subprocess
import sys

import pytest
import torch

from cosmic_fx.cli import COMMANDS, CLIError, build_parser, main
from cosmic_fx.cli.bench_claims import parse_arm_list
from cosmic_fx.cli.demo import QUICK_EPOCHS, QUICK_LOWER

NUMBER = r"[-+]?\d+(?:\.\d+)?"


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the github-format table whose first header cell is `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\|\s*{re.escape(first_header)}\s*\|", line))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_quick_demo_runs_end_to_end_and_prints_both_tables(capsys):
    state = torch.random.get_rng_state()
    assert main(["demo", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"model: DigitsCNN, {QUICK_EPOCHS} epochs" in out
    assert "rewritten sites (path: symbolic_trace" in out
    sites = _table_rows(out, "site")
    assert [row[:3] for row in sites] == [["conv1", "conv2d", "16"], ["conv2", "conv2d", "32"],
                                          ["fc1", "linear", "64"], ["head", "linear", "10"]]
    assert [row[3] for row in sites] == ["yes", "yes", "yes", "no (width 10 <= 10)"]
    results = _table_rows(out, "arm")
    assert [row[0] for row in results] == ["plain PyTorch (eager)", f"cosmic_fx.compile ({QUICK_LOWER})"]
    for row in results:
        accuracy, loss, first_step, median_ms, frozen, scaled = row[1:]
        for cell in (accuracy, frozen, scaled):
            assert re.fullmatch(rf"{NUMBER}%", cell), row
            assert 0 <= float(cell[:-1]) <= 100, row
        for cell in (loss, first_step, median_ms):
            assert re.fullmatch(NUMBER, cell) and float(cell) >= 0, row
    plain = results[0]
    assert float(plain[1][:-1]) > 20  # well above chance (10%) after the quick epochs: it trained
    assert plain[5:] == ["0%", "0%"]  # plain PyTorch has no CDG / CCE
    assert torch.equal(torch.random.get_rng_state(), state)  # the demo seeds a forked RNG


def test_demo_rejects_zero_epochs(capsys):
    assert main(["demo", "--epochs", "0"]) == 1
    assert re.search(r"--epochs must be at least 1; got 0", capsys.readouterr().err)
    args = build_parser().parse_args(["demo", "--epochs", "-2"])
    with pytest.raises(CLIError, match="--epochs must be at least 1; got -2"):
        args.func(args)


def _commands(parser: argparse.ArgumentParser, prefix=()):
    """Every (words, parser) of a command: the leaves of the subparser tree."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _commands(sub, (*prefix, name))


def test_every_option_of_every_command_has_a_help_text():
    commands = dict(_commands(build_parser()))
    assert len(commands) == len(COMMANDS)
    missing = [(" ".join(words), action.dest) for words, parser in commands.items() for action in parser._actions
               if not (action.help or "").strip()]
    assert missing == []


def test_cli_help_imports_neither_torch_nor_the_library():
    code = ("import sys\n"
            "import cosmic_fx.cli.app\n"
            "assert 'torch' not in sys.modules, 'import cosmic_fx.cli.app imported torch'\n"
            "from cosmic_fx.cli.app import main\n"
            "for argv in (['--help'], ['bench', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "    assert 'torch' not in sys.modules, f'{argv} imported torch'\n"
            "library = sorted(m for m in sys.modules\n"
            "                 if m.startswith('cosmic_fx.') and not m.startswith('cosmic_fx.cli'))\n"
            "assert library == [], library\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "usage: cosmic-fx" in out.stdout and "demo" in out.stdout and out.stdout.endswith("ok\n")


def test_the_package_reexports_lazily_and_completely():
    import cosmic_fx
    from cosmic_fx import transform

    assert callable(transform) and cosmic_fx.transform is transform  # the function, not the submodule
    import cosmic_fx.export as export_module  # noqa: F401 - importing the submodule must not rebind the name

    assert callable(cosmic_fx.export) and cosmic_fx.export.__name__ == "export"
    assert all(getattr(cosmic_fx, name) is not None for name in cosmic_fx.__all__)
    assert set(cosmic_fx.__all__) <= set(dir(cosmic_fx))
    with pytest.raises(AttributeError, match="module 'cosmic_fx' has no attribute 'no_such_name'"):
        cosmic_fx.no_such_name  # noqa: B018


ARMS = ["cosmic default", "cosmic fast", "cosmic fast, freeze more", "QCI alone"]


@pytest.mark.parametrize("text, expected", [
    ("cosmic default", ["cosmic default"]),
    ("cosmic fast, freeze more", ["cosmic fast, freeze more"]),
    ("cosmic default,cosmic fast, freeze more,QCI alone", ["cosmic default", "cosmic fast, freeze more", "QCI alone"]),
    ("cosmic fast,cosmic default", ["cosmic fast", "cosmic default"]),
])
def test_arm_list_keeps_names_with_commas_whole(text, expected):
    assert parse_arm_list(text, ARMS) == expected


def test_arm_list_rejects_an_unknown_name_and_says_how_to_pass_one():
    with pytest.raises(CLIError, match=r"--arms: 'freeze less' is not an arm name; valid: 'cosmic default' .* "
                                       r"\(pass one name per --arm, e.g. --arm 'cosmic fast, freeze more'\)"):
        parse_arm_list("cosmic fast, freeze less", ARMS)


def test_bench_claims_takes_one_arm_per_option():
    args = build_parser().parse_args(["bench", "claims", "--arm", "cosmic fast, freeze more", "--arm", "cosmic seed"])
    assert args.arm == ["cosmic fast, freeze more", "cosmic seed"]
    claims = dict(_commands(build_parser(["bench", "claims"])))[("bench", "claims")]
    arm_help = next(a.help for a in claims._actions if a.dest == "arm")
    assert "'cosmic fast, freeze more'" in arm_help  # quoted whole, not one more item of a comma list


def test_submodules_load_on_first_attribute_use_in_a_fresh_process():
    # `import cosmic_fx` then `cosmic_fx.inspect.watch_backend` worked when the package imported every
    # module eagerly; the lazy package must keep it working.
    code = ("import cosmic_fx, sys\n"
            "assert 'cosmic_fx.inspect' not in sys.modules\n"
            "assert callable(cosmic_fx.inspect.watch_backend)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"
