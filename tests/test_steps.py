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
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (nn.functional.cross_entropy(call(xs), ys) / micro).backward()
        opt.step()
        scales.append(dict(rt.last_step["scale"]))
    torch._dynamo.reset()
    return rt, {n: p.detach().clone() for n, p in tm.named_parameters()}, scales


@pytest.mark.parametrize("engine", ["eager", "compile"])
@pytest.mark.parametrize("preset", ["default", "fast", "seed"])
def test_micro_batches_train_like_the_whole_batch(preset, engine):
    """Tolerance: rtol 1e-4, atol 1e-5 on the parameters (float32 sums of 4 partial gradients against
    one; measured differences are ~1e-7), exact equality of the step count, freeze events, readings
    and CDG counters."""
    whole_rt, whole, whole_scales = run(preset, engine, 1)
    micro_rt, micro, micro_scales = run(preset, engine, MICRO)
    assert whole_rt.steps == micro_rt.steps == STEPS
    assert micro_rt.freeze_events == whole_rt.freeze_events
    if preset != "seed":
        assert whole_rt.freeze_events, "the schedule must cross a freeze event"
    assert micro_rt.cdg.low_count == whole_rt.cdg.low_count
    assert micro_rt.readings.low == whole_rt.readings.low
    assert [sorted(s) for s in micro_scales] == [sorted(s) for s in whole_scales]
    for a, b in zip(micro_scales, whole_scales):
        assert a == pytest.approx(b, rel=1e-5)
    for n, p in whole.items():
        assert_close(micro[n], p, rtol=1e-4, atol=1e-5, msg=n)
