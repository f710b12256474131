"""Costs nothing until it acts: on a step where nothing is measured, the runtime runs no Python per
parameter (issue 17, item 1), and CCE is off where the optimizer normalises it away (fast preset).

The per-parameter methods are counted with a class-level counter: ``CosmicRuntime._on_grad`` (what a
gradient hook runs), ``CosmicRuntime._decide`` (one parameter's readings, CDG and CCE) and
``PrefixState.note_grad`` (one gradient's contribution to prefix CDG's block reading)."""

import collections
import logging

import pytest
import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.runtime import CosmicRuntime
from cosmic_fx.runtime.cce import scale_invariant_optimizer
from cosmic_fx.runtime.prefix import PrefixState

from . import recipes

PER_PARAMETER = ((CosmicRuntime, "_on_grad"), (CosmicRuntime, "_decide"), (PrefixState, "note_grad"))
EVERY = 4  # efficiency_every: steps 1-3, 5-7, ... measure nothing


@pytest.fixture
def calls(monkeypatch):
    """Counts of the per-parameter methods, by name, since the last ``clear()``."""
    counts: collections.Counter = collections.Counter()
    for cls, name in PER_PARAMETER:
        original = getattr(cls, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)
    return counts


def config(preset: str, **overrides) -> CosmicConfig:
    return recipes.PRESETS[preset](lower="aot_eager", efficiency_every=EVERY, **overrides)


def train(tm: nn.Module, run: nn.Module, opt: torch.optim.Optimizer, steps: int, calls=None) -> list[dict]:
    """``steps`` optimizer steps; returns, per step, the per-parameter calls it made."""
    per_step = []
    for step in range(steps):
        if calls is not None:
            calls.clear()
        x, y = recipes.batch(step, 5)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(run(x), y).backward()
        opt.step()
        per_step.append(dict(calls) if calls is not None else {})
    return per_step


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("engine", ["eager", "compile"])
@pytest.mark.parametrize("preset", ["fast", "default"])
def test_a_step_that_measures_nothing_runs_no_python_per_parameter(preset, engine, optim, calls):
    tm, run = recipes.prepare(recipes.make_model(0), config(preset), engine)
    opt = (torch.optim.SGD(tm.parameters(), lr=0.05) if optim == "sgd"
           else torch.optim.AdamW(tm.parameters(), lr=1e-3))
    cosmic_fx.watch_optimizer(tm, opt)
    rt = cosmic_fx.runtime_of(tm)
    per_step = train(tm, run, opt, 2 * EVERY + 2, calls)
    unmeasured = [s for s in range(len(per_step)) if s % EVERY]
    assert unmeasured and all(per_step[s] == {} for s in unmeasured), per_step
    assert rt.steps == 2 * EVERY + 2 and rt.step_boundary == "optimizer"
    assert rt.num_grad_hooks == 0 and rt.num_hooked == len(rt.names)
    if preset == "default":  # the fast preset reads no E(p) at all: CCE off, prefix CDG on gradient norms
        # the steps that measure still decide each parameter (E(p) is a softmax over each one)
        assert per_step[EVERY].get("_decide", 0) == len(rt.names)
        assert rt.last_step["scale"] and any(v != 1.0 for v in rt.last_step["scale"].values())


def test_the_batched_step_equals_the_per_parameter_one_bit_for_bit(monkeypatch):
    """The same run decided per parameter on every step (the path of a measured step) and batched on the
    unmeasured ones: the same parameters, block readings, multipliers and freeze events, exactly."""
    def run(batched: bool):
        if not batched:
            monkeypatch.setattr(CosmicRuntime, "_measures_now", lambda self, todo: True)
        cfg = config("fast", **{**recipes.SCHEDULE["fast"], "cdg_prefix_window": 4, "cce": "relative"})
        tm, call = recipes.prepare(recipes.make_model(0), cfg, "eager")
        opt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
        cosmic_fx.watch_optimizer(tm, opt)
        rt = cosmic_fx.runtime_of(tm)
        scales = []
        for step in range(14):
            x, y = recipes.batch(step, 7)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(call(x), y).backward()
            opt.step()
            scales.append(rt.last_step["scale"])
        monkeypatch.undo()
        return ({n: p.detach().clone() for n, p in tm.named_parameters()}, rt.prefix.history, scales,
                rt.freeze_events)

    params, history, scales, events = run(batched=True)
    ref_params, ref_history, ref_scales, ref_events = run(batched=False)
    assert events == ref_events and events, "the schedule must cross a freeze event"
    assert history == ref_history and scales == ref_scales
    for n, p in params.items():
        assert torch.equal(p, ref_params[n]), n


def test_a_second_optimizer_step_without_a_backward_is_no_step():
    tm, run = recipes.prepare(recipes.make_model(0), config("default"), "eager")
    opt = torch.optim.SGD(tm.parameters(), lr=0.05)
    cosmic_fx.watch_optimizer(tm, opt)
    rt = cosmic_fx.runtime_of(tm)
    train(tm, run, opt, 3)
    opt.step()  # the gradients of step 3 are still there: they were that step's
    assert rt.steps == 3
    opt.zero_grad(set_to_none=False)  # zeroed in place, then a real backward
    x, y = recipes.batch(9, 5)
    nn.functional.cross_entropy(run(x), y).backward()
    opt.step()
    assert rt.steps == 4


def test_hooks_stay_while_the_step_ends_with_the_backward_and_for_the_fused_update():
    tm = cosmic_fx.transform(recipes.make_model(0), config("default"))
    rt = cosmic_fx.attach_hooks(tm)
    assert rt.step_boundary == "backward" and rt.num_grad_hooks == len(rt.names)  # no optimizer known yet
    opt = torch.optim.SGD(tm.parameters(), lr=0.05)
    train(tm, tm, opt, 2)  # found on its first step(): from then on the step pre-hook does the work
    assert rt.step_boundary == "optimizer" and rt.num_grad_hooks == 0
    cosmic_fx.detach_hooks(tm)
    assert rt.num_hooked == 0
    fused = cosmic_fx.transform(recipes.make_model(0), config("default", cce_fused="sgd", cce_fused_lr=0.05))
    frt = cosmic_fx.attach_hooks(fused)
    train(fused, fused, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 2)
    assert frt.step_boundary == "backward" and frt.num_grad_hooks == len(frt.names)


# ---------------------------------------------------------------------------------------------- CCE under Adam
@pytest.mark.parametrize("make, invariant", [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3), True),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3), True),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True), True),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1), False),  # coupled L2: added after CCE
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), False),
])
def test_scale_invariant_optimizers(make, invariant):
    assert scale_invariant_optimizer(make([nn.Parameter(torch.zeros(2))])) is invariant


@pytest.mark.parametrize("engine", ["eager", "compile"])
def test_cce_skip_adaptive_turns_cce_off_under_adamw_and_says_so_once(engine, caplog):
    tm, run = recipes.prepare(recipes.make_model(0), config("fast", cce="relative"), engine)
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-3)
    rt = cosmic_fx.runtime_of(tm)
    with caplog.at_level(logging.INFO, logger="cosmic_fx.runtime.step"):
        cosmic_fx.watch_optimizer(tm, opt)
        train(tm, run, opt, EVERY + 1)
        cosmic_fx.watch_optimizer(tm, opt)
    said = [r.getMessage() for r in caplog.records if "CCE is off" in r.getMessage()]
    assert len(said) == 1 and "AdamW" in said[0] and "cce_skip_adaptive" in said[0], said
    assert all(not rt.readings.has[i] for i in range(len(rt.names)))  # nothing read E(p)
    assert rt.last_step["scale"] == {}


@pytest.mark.parametrize("why", ["sgd", "option off", "default preset"])
def test_cce_keeps_acting_where_it_can(why):
    """CCE scales the gradients under SGD, with ``cce_skip_adaptive=False``, and in the default preset."""
    cfg = {"sgd": config("fast", cce="relative"), "option off": config("fast", cce="relative", cce_skip_adaptive=False),
           "default preset": config("default")}[why]
    tm, run = recipes.prepare(recipes.make_model(0), cfg, "eager")
    opt = (torch.optim.SGD(tm.parameters(), lr=0.05) if why == "sgd"
           else torch.optim.AdamW(tm.parameters(), lr=1e-3))
    cosmic_fx.watch_optimizer(tm, opt)
    train(tm, run, opt, 2)
    scale = cosmic_fx.runtime_of(tm).last_step["scale"]
    assert len(scale) == len(cosmic_fx.runtime_of(tm).names) and any(v != 1.0 for v in scale.values())


def test_cce_skip_adaptive_must_be_a_bool():
    with pytest.raises(ValueError, match=r"CosmicConfig.cce_skip_adaptive must be a bool; got 'yes'"):
        CosmicConfig(cce_skip_adaptive="yes")
    assert CosmicConfig.fast().cce_skip_adaptive and not CosmicConfig().cce_skip_adaptive


@pytest.mark.parametrize("engine", ["eager", "compile"])
def test_prefix_every_reads_the_blocks_on_every_kth_step_only(engine, monkeypatch):
    """cdg_prefix_every=k: the block gradient norms are read (one torch._foreach_norm) and the prefix decided on
    steps 0, k, 2k, ... only; every other step does no prefix work at all. The window stays in steps: it holds
    window // k readings, so a block can freeze once 2 x window steps have passed, as with k=1."""
    norms, decisions = [], []
    real_norm, real_decision = torch._foreach_norm, cosmic_fx.policy.prefix_decision
    monkeypatch.setattr(torch, "_foreach_norm", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    monkeypatch.setattr(cosmic_fx.policy, "prefix_decision",
                        lambda *a, **k: decisions.append(1) or real_decision(*a, **k))
    k, window = 4, 8
    cfg = config("fast", cdg_prefix_window=window, cdg_prefix_every=k, cdg_prefix_threshold=1e9,
                 cdg_prefix_max=0.75, cdg_prefix_signal="grad")
    tm, run = recipes.prepare(recipes.make_model(0), cfg, engine)
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-3)  # CCE off (fast, AdamW): nothing else reads gradients
    cosmic_fx.watch_optimizer(tm, opt)
    rt = cosmic_fx.runtime_of(tm)
    read_steps = []
    for step in range(3 * window):
        before = (len(norms), len(decisions))
        train(tm, run, opt, 1)
        if (len(norms), len(decisions)) != before:
            read_steps.append(step)
            assert len(norms) - before[0] == 1 and len(decisions) - before[1] == 1, step
    assert read_steps == list(range(0, 3 * window, k))
    assert all(len(h) <= 2 * (window // k) for h in rt.prefix.history)
    # any change counts as settled: the first block freezes as soon as both windows (2 x 8 steps = 4 readings) are full
    assert len(rt.freeze_events) == 1 and rt.prefix.last_event == 2 * window - k, (rt.prefix.reason, rt.prefix.history)


def test_prefix_every_must_be_a_positive_int():
    with pytest.raises(ValueError, match="cdg_prefix_every must be an int >= 1; got 0"):
        CosmicConfig.fast(cdg_prefix_every=0)


@pytest.mark.slow
def test_the_side_by_side_pre_freeze_step_experiment_runs_and_prints_every_arm():
    """The script the README's fast row cites (benchmarks/experiments/claims_prefreeze_step_experiment.py),
    on its smallest task: it trains the three arms under Inductor and prints one line with each."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments" / "claims_prefreeze_step_experiment.py"
    proc = subprocess.run([sys.executable, str(script), "--tasks", "digits-mlp", "--rounds", "3", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("digits-mlp (3 rounds): torch.compile "), line
    for arm in ("torch.compile", "cosmic fast", "cosmic off"):
        assert f"{arm} " in line, line
    assert line.count("x; optimizer.step() ") == 3, line  # each arm's ratio and its optimizer step
