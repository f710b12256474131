"""The benchmarks' quick modes: table shapes, and every figure finite (never a timing assertion)."""

import json
import math
import re

import pytest

from cosmic_fx.bench import claims, presets, verdicts
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


def tables(markdown: str) -> dict[str, list[list[str]]]:
    """Every github-style table in ``markdown``, keyed by its header row (cells joined by "|")."""
    out: dict[str, list[list[str]]] = {}
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: ") and "-" in lines[i + 1]:
            header = "|".join(c.strip() for c in line.strip("|").split("|"))
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            out[header] = rows
    return out


VERDICTS = {"holds", "smaller than claimed", "no effect beyond seed spread", "opposite (worse)",
            "not measurable (target never reached)"}
TARGET_VERDICTS = VERDICTS | {"fails", "not shown (over the bound, within seed spread)"}


@pytest.mark.slow
def test_claims_quick_end_to_end(tmp_path, capsys):
    """The transfer task (pretrained once per seed, then fine-tuned), its baselines and one preset, through
    the CLI. The table machinery on every kind of task is tested on made-up runs (test_claims.py)."""
    task = "mnist-transfer"
    argv = ["bench", "claims", "--quick", "--no-progress", "--out", str(tmp_path), "--tasks", task,
            "--arms", "cosmic default"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "compiled arms lowered with eager" in text
    found = tables(text)
    claim_rows = found["task|claim|default: reduction|default verdict"]
    assert [r[0] for r in claim_rows] == [task] * len(claims.CLAIMS)
    assert all(r[3] in VERDICTS for r in claim_rows)
    target_rows = found["preset|target (issue 10)|task|baseline|preset|change|verdict"]
    # a fine-tuning task: the 30% time target applies; not a transformer: no memory target
    assert [r[1].split(" ")[:3] for r in target_rows] == [["time", "to", "the"]] * 2 + [["final", "validation", "metric"]]
    assert all(r[0] == "default" and r[2] == task and r[6] in TARGET_VERDICTS for r in target_rows)
    arm_rows = found["task|arm|final val metric|steps to target|median step ms|time to target s|compile s|"
                     "peak step MiB|CDG frozen|CCE scaled"]
    assert [r[1] for r in arm_rows] == ["eager SGD+momentum", "torch.compile", "cosmic default"]
    for row in arm_rows:
        for cell in row[2:]:
            if cell.startswith("not reached"):
                continue  # a target not reached within the budget is reported, not averaged
            values = numbers_in(cell)
            assert values and all(math.isfinite(v) for v in values), (row[:2], cell)
    task_rows = found["task|metric|target|steps|optimizer|lr|pretraining per seed (eager; once per seed)|"
                      "torch.compile gradients vs eager (first batch)"]
    assert "cached: no, no" in task_rows[0][-2] and task_rows[0][-1] == "match"
    payload = json.loads((tmp_path / "claims.json").read_text())
    assert list(payload["tasks"]) == [task] and payload["lower"] == "eager"
    assert [len(runs) for runs in payload["tasks"][task]["arms"].values()] == [2, 2, 2]
    assert len(list((tmp_path / "pretrained").glob("mnist-0-4-cnn-seed*.pt"))) == 2  # once per seed
    assert (tmp_path / "claims_val_vs_time.png").stat().st_size > 0
    assert (tmp_path / "claims_memory.png").stat().st_size > 0


@pytest.mark.parametrize("reduction,beyond,expected", [
    (35.0, True, "holds"), (10.0, True, "smaller than claimed"), (40.0, False, "no effect beyond seed spread"),
    (-5.0, True, "opposite (worse)"), (float("nan"), False, "not measurable (target never reached)"),
])
def test_verdict_follows_from_numbers(reduction, beyond, expected):
    assert claims.verdict(reduction, beyond, 30.0) == expected


def test_effect_uses_seed_spread():
    red, beyond = verdicts._effect([10.0, 10.2, 9.8], [9.9, 10.1, 10.0])
    assert abs(red) < 1 and not beyond
    red, beyond = verdicts._effect([10.0, 10.1, 9.9], [5.0, 5.1, 4.9])
    assert red == pytest.approx(50.0) and beyond


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "imagenet"], r"unknown task\(s\) \['imagenet'\]; valid: digits-mlp, .*mnist-transfer"),
    (["--tasks", "digits-mlp,digits-mlp"], r"task\(s\) named twice"),
    (["--arms", "cosmic turbo"], r"--arms: 'cosmic turbo' is not an arm name; valid: 'eager SGD\+momentum' .*'cosmic "
                                 r"default' .*'cosmic fast, freeze more'"),
    (["--arm", "cosmic turbo"], r"unknown arm\(s\) \['cosmic turbo'\]; valid: 'eager SGD\+momentum' .*'cosmic default' "
                                r".*'cosmic fast, freeze more'"),
    (["--seeds", "0"], r"seeds must be an int >= 1, got 0"),
    (["--threads", "0"], r"threads must be an int >= 1, got 0"),
])
def test_claims_cli_bad_input_exits_1_with_the_reason(argv, message, capsys):
    assert main(["bench", "claims", "--quick", "--no-progress", *argv]) == 1
    assert re.search(message, capsys.readouterr().err)


def test_claims_run_rejects_bad_input_before_training():
    with pytest.raises(ValueError, match=r"unknown lowering 'tvm'; valid: inductor, aot_eager, eager"):
        claims.run(["digits-mlp"], seeds=2, lower="tvm", show_progress=False)
    with pytest.raises(ValueError, match=r"seeds must be an int >= 1, got True"):
        claims.run(["digits-mlp"], seeds=True, show_progress=False)


def test_cli_usage_errors_exit_2():
    assert main(["bench", "nope"]) == 2
    assert main(["bench", "claims", "--lower", "tvm"]) == 2
