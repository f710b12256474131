"""What a training step is: one optimizer step, however many backward passes (micro-batches) feed it.

N micro-batches of B/N (each loss divided by N) must train like one batch of B: the same readings,
decisions and freeze events at the same steps, and the same parameters up to float rounding."""

import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig

from . import recipes

STEPS, MICRO, BATCH = 12, 4, 32

# the presets on schedules that cross decisions within 12 optimizer steps: calibrated CDG decides every
# 3 steps and reads E(p) every 2; prefix CDG decides after 2 x 3 steps; seed reads every step
SCHEDULES = {"default": {"cdg_interval": 3, "efficiency_every": 2, "cdg_patience": 1},
             "fast": recipes.SCHEDULE["fast"], "seed": {}}


def config(preset: str) -> CosmicConfig:
    return recipes.PRESETS[preset](lower="aot_eager", **SCHEDULES[preset])


def run(preset: str, engine: str, micro: int, *, watch: bool = True) -> tuple:
    """12 SGD steps on the same 32 samples per step, taken whole or in ``micro`` micro-batches."""
    tm, call = recipes.prepare(recipes.make_model(0), config(preset), engine)
    opt = torch.optim.SGD(tm.parameters(), lr=0.05)
    if watch:
        cosmic_fx.watch_optimizer(tm, opt)
    rt = cosmic_fx.runtime_of(tm)
    scales = []
    for step in range(STEPS):
        x, y = recipes.batch(step, 3, size=BATCH)
        opt.zero_grad(set_to_none=True)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (nn.functional.cross_entropy(call(xs), ys) / micro).backward()
        opt.step()
        scales.append(dict(rt.last_step["scale"]))
    torch._dynamo.reset()
    return rt, {n: p.detach().clone() for n, p in tm.named_parameters()}, scales


@pytest.mark.parametrize("engine", ["eager", "compile"])
@pytest.mark.parametrize("preset", ["default", "fast", "seed"])
def test_micro_batches_train_like_the_whole_batch(preset, engine):
    """Tolerance: rtol 1e-4, atol 1e-5 on the parameters (float32 sums of 4 partial gradients against
    one; measured: at most 7.5e-9 absolute, 3.5e-7 relative, every preset and engine), exact equality
    of the step count, freeze events, readings' verdicts and CDG counters."""
    whole_rt, whole, whole_scales = run(preset, engine, 1)
    micro_rt, micro, micro_scales = run(preset, engine, MICRO)
    assert whole_rt.steps == micro_rt.steps == STEPS
    assert micro_rt.freeze_events == whole_rt.freeze_events
    if preset != "seed":
        assert whole_rt.freeze_events, "the schedule must cross a freeze event"
    assert micro_rt.cdg.low_count == whole_rt.cdg.low_count
    assert micro_rt.readings.low == whole_rt.readings.low
    assert [sorted(s) for s in micro_scales] == [sorted(s) for s in whole_scales]
    for a, b in zip(micro_scales, whole_scales, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for n, p in whole.items():
        assert_close(micro[n], p, rtol=1e-4, atol=1e-5, msg=n)


def test_an_optimizer_found_on_its_first_step_counts_from_then_on_and_says_so():
    """Without watch_optimizer the runtime finds the optimizer on its first step(): the 4 backwards
    before it were 4 steps (warned once), every later optimizer step is one step."""
    tm = cosmic_fx.transform(recipes.make_model(0), config("default"))
    cosmic_fx.attach_hooks(tm)
    opt = torch.optim.SGD(tm.parameters(), lr=0.05)
    rt = cosmic_fx.runtime_of(tm)
    x, y = recipes.batch(0, 3, size=BATCH)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for xs, ys in zip(x.chunk(MICRO), y.chunk(MICRO), strict=True):
            (nn.functional.cross_entropy(tm(xs), ys) / MICRO).backward()
        opt.step()

    with pytest.warns(UserWarning, match=r"4 backward passes ran before the first SGD.step\(\).*"
                                         r"cosmic_fx.watch_optimizer\(model, optimizer\) before training"):
        step()
    assert rt.steps == 4 and rt.step_boundary == "optimizer"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        step()
        step()
    assert rt.steps == 6


def test_explicit_optimizer_step_for_a_loop_that_updates_by_hand():
    """watch_optimizer(model, None): a step ends only at runtime.optimizer_step(); 4 micro-batches and a
    hand-written SGD update train like the whole batch."""
    results = []
    for micro in (1, MICRO):
        tm = cosmic_fx.transform(recipes.make_model(0), config("default"))
        cosmic_fx.attach_hooks(tm)
        rt = cosmic_fx.watch_optimizer(tm, None)
        for step in range(STEPS):
            x, y = recipes.batch(step, 3, size=BATCH)
            for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
                (nn.functional.cross_entropy(tm(xs), ys) / micro).backward()
            rt.optimizer_step()
            with torch.no_grad():
                for p in tm.parameters():
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-0.05)
                        p.grad = None
        assert rt.steps == STEPS and rt.step_boundary == "explicit"
        results.append((rt.freeze_events, {n: p.detach().clone() for n, p in tm.named_parameters()}))
    (events, whole), (micro_events, micro_params) = results
    assert micro_events == events and events
    for n, p in whole.items():
        assert_close(micro_params[n], p, rtol=1e-4, atol=1e-5, msg=n)


def test_bad_uses_of_watch_optimizer_say_what_to_do():
    tm = cosmic_fx.transform(recipes.make_model(0), config("default"))
    with pytest.raises(TypeError, match="watch_optimizer expects an nn.Module; got function"):
        cosmic_fx.watch_optimizer(lambda x: x, None)
    with pytest.raises(ValueError, match="has no cosmic runtime.*cosmic_fx.attach_hooks"):
        cosmic_fx.watch_optimizer(nn.Linear(2, 2), None)
    with pytest.raises(TypeError, match=r"expects a torch.optim.Optimizer \(or None .*\); got list"):
        cosmic_fx.watch_optimizer(tm, [])
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"this SGD steps none of the parameters.*model.parameters\(\)"):
        cosmic_fx.watch_optimizer(tm, other)
    fused = cosmic_fx.transform(recipes.make_model(0), CosmicConfig.off(cce_fused="sgd", cce_fused_lr=0.1))
    with pytest.raises(ValueError, match=r"updated inside each backward \(cce_fused='sgd'\).*every backward is a step"
                                         r".*cce_fused='off'"):
        cosmic_fx.watch_optimizer(fused, torch.optim.SGD(fused.parameters(), lr=0.1))


def test_fused_updates_refuse_accumulation():
    """The fused update steps inside every backward: two backwards before FusedOptimizer.step() is an error."""
    cm = cosmic_fx.compile(recipes.make_model(0), CosmicConfig.off(cce_fused="sgd", cce_fused_lr=0.1,
                                                                  lower="aot_eager"))
    opt = cosmic_fx.fused_optimizer(cm)
    x, y = recipes.batch(0, 3, size=BATCH)
    for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
        opt.backward(nn.functional.cross_entropy(cm(xs), ys) / 2)
    with pytest.raises(RuntimeError, match="2 backward passes since the last step.*Gradient accumulation cannot"):
        opt.step()
    assert cosmic_fx.runtime_of(cm).step_boundary == "backward"
