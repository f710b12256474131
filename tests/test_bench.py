"""The benchmarks' quick modes: table shapes, and every figure finite (never a timing assertion)."""

import json
import math
import re

import pytest

from cosmic_fx.bench import claims, presets
from cosmic_fx.cli import main

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?%?")


def table_rows(markdown: str) -> list[list[str]]:
    """Data rows of every github-style table in ``markdown`` (header and rule rows dropped)."""
    rows, lines = [], [ln for ln in markdown.splitlines() if ln.startswith("|")]
    for i, line in enumerate(lines):
        if set(line) <= set("|-: "):
            continue
        if i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            continue  # a header row
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def numbers_in(cell: str) -> list[float]:
    return [float(m.rstrip("%")) for m in NUMBER.findall(cell)]


def test_presets_quick_table_shape_and_finite_figures():
    out = presets.run(seeds=1, epochs=2, quick=True, show_progress=False)
    rows = table_rows(out["markdown"])
    assert [r[0] for r in rows] == list(presets.QUICK_ARMS)
    assert all(len(r) == 9 for r in rows)
    for row in rows:
        for cell in row[1:]:
            values = numbers_in(cell)
            assert values and all(math.isfinite(v) for v in values), (row[0], cell)
    assert out["results"]["plain SGD"]["MLP"]["frozen_fraction"] == 0.0


@pytest.mark.slow
def test_claims_quick_end_to_end(tmp_path, capsys):
    assert main(["bench", "claims", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    claim_rows = [r for r in table_rows(text) if len(r) == 6]
    budget_rows = [r for r in table_rows(text) if len(r) == 7]
    arm_rows = [r for r in table_rows(text) if len(r) == 10]
    tasks = ["digits-mlp", "digits-cnn", "stdlib-lm"]
    assert [r[0] for r in claim_rows] == [t for t in tasks for _ in claims.CLAIMS]
    assert [r[0] for r in budget_rows] == tasks
    assert [(r[0], r[1]) for r in arm_rows] == [(t, a) for t in tasks for a in claims.QUICK_ARMS]
    for row in arm_rows:
        for cell in row[2:]:
            if cell.startswith("not reached"):
                continue  # a target not reached within the budget is reported, not averaged
            values = numbers_in(cell)
            assert values and all(math.isfinite(v) for v in values), (row[:2], cell)
    verdicts = {"holds", "smaller than claimed", "no effect beyond seed spread", "opposite (worse)",
                "not measurable (target never reached)"}
    assert all(r[3] in verdicts and r[5] in verdicts for r in claim_rows)
    payload = json.loads((tmp_path / "claims.json").read_text())
    assert set(payload["tasks"]) == set(tasks)
    assert (tmp_path / "claims_val_vs_time.png").stat().st_size > 0
    assert (tmp_path / "claims_memory.png").stat().st_size > 0


@pytest.mark.parametrize("reduction,beyond,expected", [
    (35.0, True, "holds"), (10.0, True, "smaller than claimed"), (40.0, False, "no effect beyond seed spread"),
    (-5.0, True, "opposite (worse)"), (float("nan"), False, "not measurable (target never reached)"),
])
def test_verdict_follows_from_numbers(reduction, beyond, expected):
    assert claims.verdict(reduction, beyond, 30.0) == expected


def test_effect_uses_seed_spread():
    red, beyond = claims._effect([10.0, 10.2, 9.8], [9.9, 10.1, 10.0])
    assert abs(red) < 1 and not beyond
    red, beyond = claims._effect([10.0, 10.1, 9.9], [5.0, 5.1, 4.9])
    assert red == pytest.approx(50.0) and beyond


def test_cli_usage_errors_exit_2(capsys):
    assert main(["bench", "nope"]) == 2
    assert main(["bench", "claims", "--tasks", "imagenet", "--quick", "--no-progress"]) == 1
    assert "unknown task(s) ['imagenet']" in capsys.readouterr().err
