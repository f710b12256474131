"""``cosmic-fx bench perf``: the quick mode's table shape, every figure finite, the CLI's errors.

Never a timing assertion: whether a target passes is what the benchmark reports, not what the tests
require.
"""

import math

import pytest

from cosmic_fx.bench import perf
from cosmic_fx.cli import main


def table_rows(markdown: str) -> list[list[str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]  # header, rule


def test_quick_mode_prints_every_target_with_finite_ratios(capsys):
    assert main(["bench", "perf", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    header, *table = out.strip().splitlines()
    assert "1 thread(s), thread CPU time" in header and "quick: small sizes" in header
    assert [c.strip() for c in table[0].strip("|").split("|")] == perf.COLUMNS
    rows = table_rows("\n".join(table))
    sizes = perf.Sizes.quick()
    expected = {
        "1 CSC": 4 * len(sizes.csc_shapes),  # fwd, fwd+bwd: vs a clone, and eager vs compiled
        "2 QCI": 2,
        "2 QCI forms": (1 + sizes.qci_forms_compiled) * len(sizes.qci_forms) * len(sizes.qci_form_widths),
        "3 backend": 3,
        "3 pipeline": len(sizes.graph_nodes) + 1,
        "4 CDG": 4,
        "4 CDG prefix": 2 * (1 + sizes.prefix_compiled) * len(sizes.prefix_frozen),  # backward and memory per k
        "5 CCE fused": 1 + 2 * len(sizes.fused_kinds),  # memory eager; memory and step time compiled
    }
    assert {item: sum(r[0] == item for r in rows) for item in expected} == expected
    assert len(rows) == sum(expected.values())
    for _item, target, measured, goal, status, refs in rows:
        value = float(measured.split("x")[0].split(" ms")[0])
        assert math.isfinite(value) and value > 0, (target, measured)
        assert status in ("pass", "short", "info"), (target, status)
        assert (goal == "—") == (status == "info")
        assert refs  # every row names its reference arms
    # the reference arms the issue asks for are all in the table
    text = "\n".join(" ".join(r) for r in rows)
    compiled = sizes.compiled_name  # quick mode: aot_eager stands in for Inductor
    for arm in ("literal eager", f"literal {compiled}", "plain Linear", f"{compiled} alone", "clone",
                "public function called eagerly", "ATen ops"):
        assert arm in text, arm
    modes = (compiled, "eager") if sizes.qci_forms_compiled else ("eager",)
    for form in sizes.qci_forms:  # every QCI form against its site's own layer
        for mode in modes:
            assert sum(f"+ QCI {form}" in r[1] and f", {mode}," in r[1] for r in rows) == len(sizes.qci_form_widths)


def test_row_status_compares_with_the_goal():
    assert perf.Row("x", "t", 0.5, 1.0).status == "pass"
    assert perf.Row("x", "t", 1.5, 1.0).status == "short"
    assert perf.Row("x", "t", 1.5, None).status == "info"
    assert perf.Row("x", "t", float("nan"), 1.0).status == "error"
    assert perf.Row("x", "t", 2.0, 1.1).cells()[2:5] == ["2x", "≤ 1.1x", "short"]


def test_cli_errors_name_the_problem(capsys):
    assert main(["bench", "perf", "--threads", "0"]) == 1
    assert "--threads must be >= 1; got 0" in capsys.readouterr().err
    assert main(["bench", "perf", "--sections", "csc,warp"]) == 1
    assert "unknown perf section(s) ['warp']; valid: csc, qci, backend, cdg, prefix, memory" in capsys.readouterr().err


def test_unknown_section_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown perf section\(s\) \['x'\]"):
        perf.run(sections=("x",), show_progress=False)
