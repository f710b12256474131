"""The step costs that set the budget of ``docs-finetune-big`` (issue 17, item 6).

Produced: docs/claims/workloads.md, section "docs-finetune-big: the budget", the step times and the
pretraining and fine-tuning budgets derived from them.

The task's model (:class:`~cosmic_fx.models.TinyTransformerLM`, 12 blocks, width 256, 8 heads,
context 64; 9.5 M parameters) on its batches (32 windows of 64 characters), 2 torch threads:

* eager AdamW (what :class:`~cosmic_fx.bench.pretrain.PretrainCache` runs once per seed), and
* ``torch.compile`` with Inductor (the claims benchmark's baseline arm): the first step's seconds
  (compilation included) and the median of the steps after it.

Each median is over ``--steps`` timed steps after two warm-up steps: wall seconds, and this process's
CPU seconds (both threads). On a shared machine the wall clock is inflated by the other jobs (the load
average is printed with it); CPU seconds / 2 is what the step would take on an idle 2-core machine
if both threads were busy throughout (an optimistic bound). The task's budgets are these step times
extrapolated: fine-tuning steps ~ 20 min / compiled step (idle), pretraining as many eager steps.

usage: python benchmarks/experiments/big_finetune_budget_experiment.py [--steps 10] [--skip-compile]
"""

import argparse
import os
import statistics
import time

import torch

from cosmic_fx.bench.tasks import VOCAB, lm_loss
from cosmic_fx.models import TinyTransformerLM

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=10)
p.add_argument("--skip-compile", action="store_true")
args = p.parse_args()
torch.set_num_threads(2)
torch.manual_seed(0)
SHAPE = {"vocab": VOCAB, "dim": 256, "heads": 8, "layers": 12, "context": 64}
BATCH = 32
batches = [(torch.randint(1, VOCAB, (BATCH, 64)), torch.randint(1, VOCAB, (BATCH, 64))) for _ in range(4)]


def timed(model, opt, n):
    """Wall seconds and this process's CPU seconds of each of ``n`` steps."""
    out = []
    for k in range(n):
        x, y = batches[k % 4]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def med(samples):
    return statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples)


model = TinyTransformerLM(**SHAPE)
print(f"parameters: {sum(q.numel() for q in model.parameters()):,}; load average {os.getloadavg()}")
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
timed(model, opt, 2)
eager, eager_cpu = med(timed(model, opt, args.steps))
print(f"eager AdamW step: median {eager:.3f} s wall, {eager_cpu:.3f} s CPU (both threads) over {args.steps}; "
      f"load average {os.getloadavg()}")
if not args.skip_compile:
    model = TinyTransformerLM(**SHAPE)
    cm = torch.compile(model)
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    first = timed(cm, opt, 2)
    comp, comp_cpu = med(timed(cm, opt, args.steps))
    print(f"torch.compile (inductor) first step {first[0][0]:.1f} s wall (compilation included), "
          f"median step {comp:.3f} s wall, {comp_cpu:.3f} s CPU over {args.steps}; load average {os.getloadavg()}")
    print(f"20 min / compiled step: {1200 / comp:.0f} steps at this load, {1200 / (comp_cpu / 2):.0f} on an idle "
          "machine (CPU seconds / 2 threads: an optimistic bound)")
print(f"eager pretraining: {eager:.3f} s per step here, {eager_cpu / 2:.3f} s idle (CPU / 2)")
