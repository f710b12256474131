"""Compile time (issue 18): recompiles per event against plain torch.compile, warm starts that hit
Inductor's FX graph cache and AOTAutograd's cache in a second process, the cache-artifacts round trip,
and ``cosmic-fx bench compile``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cosmic_fx.bench import compile_time
from cosmic_fx.cli.app import main


def _events(arm: str) -> dict[str, int]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = compile_time.measure("mlp", arm, lower="aot_eager", batch=8)
    assert out["graphs"] == 1  # the first step: one graph, no graph break
    return {event: v["graphs"] for event, v in out["events"].items()}


def test_recompiles_per_event_are_plain_torch_compiles():
    """A second step, eval mode under no_grad, a new batch size and a freeze event (a site's weight stops
    requiring grad) compile exactly as many graphs under cosmic as under plain torch.compile."""
    cosmic, plain = _events("cosmic"), _events("torch")
    assert set(cosmic) == set(compile_time.EVENTS)
    assert cosmic == plain
    assert cosmic["step 2"] == 0 and cosmic["freeze"] == 1


def test_a_cdg_freeze_event_recompiles_exactly_once():
    """The runtime's own freeze event (prefix CDG of the fast preset, block 0 at step 7) costs one graph."""
    import cosmic_fx
    from tests import recipes

    torch._dynamo.reset()
    tm, run = recipes.prepare(recipes.make_model(0), recipes.config("fast"), "compile")
    rt = cosmic_fx.runtime_of(tm)
    opt = recipes.optimizer(tm)
    graphs = torch._dynamo.utils.counters["stats"]
    graphs_per_step, events_per_step = [], []
    for step in range(9):
        before, events = int(graphs["unique_graphs"]), len(rt.freeze_events)
        recipes.train(run, opt, 0, step, step + 1)
        graphs_per_step.append(int(graphs["unique_graphs"]) - before)
        events_per_step.append(len(rt.freeze_events) - events)
    assert sum(events_per_step) == 1
    # the new frozen set is traced at the forward after the decision, and only there
    assert graphs_per_step[0] == 1 and sum(graphs_per_step[1:]) == 1
    event_step = events_per_step.index(1)
    assert graphs_per_step[event_step + 1] == 1


def _run_child(code: str, cache_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_STEP = """
    import json, sys
    import torch
    import cosmic_fx
    from torch._dynamo.utils import counters
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    {before}
    cm = cosmic_fx.compile(model)
    loss = cm(torch.randn(4, 16, generator=torch.Generator().manual_seed(1))).square().mean()
    loss.backward()
    {after}
    print(json.dumps({{"loss": loss.item(), "grad": model[0].weight.grad.sum().item(),
                      "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
                      "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
                      "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
                      "aot_bypass": counters["aot_autograd"]["autograd_cache_bypass"]}}))
"""


@pytest.mark.slow
def test_a_second_process_hits_the_fx_graph_and_aot_autograd_caches(tmp_path):
    """The default preset (QCI, CSC at the output, E_out for CDG): the cold process saves, the warm one
    hits both caches for the forward and the backward, with the same numbers."""
    code = _STEP.format(before="", after="")
    cold = _run_child(code, str(tmp_path))
    warm = _run_child(code, str(tmp_path))
    assert cold["aot_bypass"] == 0 and cold["fx_miss"] >= 2
    assert warm["aot_hit"] == 1 and warm["fx_hit"] >= 2 and warm["fx_miss"] == 0 and warm["aot_bypass"] == 0
    assert warm["loss"] == cold["loss"] and warm["grad"] == cold["grad"]


@pytest.mark.slow
def test_cache_artifacts_round_trip_with_the_cosmic_backend(tmp_path):
    """save_cache_artifacts() after a cosmic step, load_cache_artifacts() in a process with an empty cache
    directory: the second process compiles nothing from scratch."""
    blob = tmp_path / "artifacts.bin"
    saved = _run_child(_STEP.format(before="", after=textwrap.dedent(f"""
        artifacts = torch.compiler.save_cache_artifacts()
        assert artifacts is not None, "nothing to save"
        open({str(blob)!r}, "wb").write(artifacts[0])""").replace("\n", "\n    ")), str(tmp_path / "a"))
    loaded = _run_child(_STEP.format(before=textwrap.dedent(f"""
        info = torch.compiler.load_cache_artifacts(open({str(blob)!r}, "rb").read())
        assert info is not None, "no artifacts loaded" """).replace("\n", "\n    "), after=""), str(tmp_path / "b"))
    assert saved["aot_bypass"] == 0
    assert loaded["aot_hit"] == 1 and loaded["fx_miss"] == 0 and loaded["fx_hit"] >= 2
    assert loaded["loss"] == saved["loss"] and loaded["grad"] == saved["grad"]


@pytest.mark.slow
def test_bench_compile_quick_prints_the_tables(capsys):
    assert main(["bench", "compile", "--quick", "--lower", "aot_eager"]) == 0
    out = capsys.readouterr().out
    assert "lower=aot_eager" in out
    assert "| mlp | torch | " in out and "| mlp | cosmic | " in out
    assert "eval: CPU s (graphs)" in out


def test_bench_compile_rejects_unknown_models_and_bad_numbers(capsys):
    assert main(["bench", "compile", "--models", "resnet9000", "--lower", "aot_eager"]) == 1
    assert "unknown model 'resnet9000'; choose from mlp, gpt2, bert, convnext" in capsys.readouterr().err
    assert main(["bench", "compile", "--threads", "0"]) == 1
    assert "--threads must be >= 1; got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown arm 'cosmic-x'; choose from torch, cosmic"):
        compile_time.run(compile_time.Settings(models=("mlp",), arms=("torch", "cosmic-x")))


def test_a_graph_traced_under_no_grad_computes_no_e_out():
    """E_out feeds CDG's training decisions only; the evaluation graph (no_grad, guarded by dynamo) skips it."""
    import cosmic_fx
    from cosmic_fx.backend import add_listener

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    cm = cosmic_fx.compile(model, cosmic_fx.CosmicConfig(lower="aot_eager"))
    records = []
    handle = add_listener(records.append)
    try:
        x = torch.randn(4, 16)
        cm(x).square().mean().backward()
        cm.eval()
        with torch.no_grad():
            out = cm(x)
        cm.train()
    finally:
        handle.remove()
    assert len(records) == 2
    train_graph, eval_graph = (r.graph_after for r in records)
    assert "output_sums" in train_graph and "output_sums" not in eval_graph
    assert isinstance(out, torch.Tensor) and out.shape == (4, 8)  # nothing stripped from the eval output


def test_bench_compile_repeats_alternate_the_order_and_report_the_fastest(monkeypatch):
    """Every arm is measured `repeats` times, the arms in alternating order (so drift hits them alike), after one
    discarded priming process; each result is its fastest repeat, and every repeat's CPU seconds are kept."""
    calls = []
    cpu = iter([50.0, 9.0, 7.0, 8.0, 3.0, 2.0, 4.0, 6.0, 5.0])  # priming, then cold/warm per (arm, repeat)

    def fake_child(model, arm, settings, cache, events):
        calls.append((arm, events))
        return {"cpu": next(cpu), "first_step": 1.0, "events": {}, "counters": {}}

    monkeypatch.setattr(compile_time, "_child", fake_child)
    out = compile_time.run(compile_time.Settings(models=("mlp",), arms=("torch", "cosmic"), repeats=2))
    assert [a for a, _ in calls] == ["torch"] * 3 + ["cosmic"] * 4 + ["torch"] * 2
    rows = {r["arm"]: r for r in out["results"]}
    assert rows["torch"]["cold_cpu"] == [9.0, 6.0] and rows["torch"]["cold"]["cpu"] == 6.0
    assert rows["torch"]["warm_cpu"] == [7.0, 5.0] and rows["torch"]["warm"]["cpu"] == 5.0
    assert rows["cosmic"]["cold_cpu"] == [8.0, 2.0] and rows["cosmic"]["cold"]["cpu"] == 2.0
    assert rows["cosmic"]["warm"]["cpu"] == 3.0
    assert "| mlp | cosmic | 2.00 | 0.33x |" in compile_time.render(out)
    with pytest.raises(ValueError, match="repeats must be >= 1; got 0"):
        compile_time.run(compile_time.Settings(models=("mlp",), repeats=0))


def test_bench_compile_without_events_times_cold_and_warm_only(monkeypatch):
    calls = []

    def fake_child(model, arm, settings, cache, events):
        calls.append(events)
        return {"cpu": 1.0, "first_step": 1.0, "events": {}, "counters": {}}

    monkeypatch.setattr(compile_time, "_child", fake_child)
    out = compile_time.run(compile_time.Settings(models=("mlp",), arms=("torch", "cosmic"), repeats=1, events=False))
    assert calls and not any(calls)
    text = compile_time.render(out)
    assert "| mlp | cosmic | 1.00 | 1.00x |" in text and "eval: CPU s (graphs)" not in text
