"""The learning curve that sets the target of ``docs-finetune-big``, and its pretraining time (issue 17, item 6).

Produced: docs/claims/workloads.md, section "docs-finetune-big: the budget": the task's target (run
2026-12-04 on an idle 2-core machine: 2.768 bits/char after 180 of 300 steps, target 2.80; the
pretraining 320 s), and docs/claims/big_run.md, the first run's target.

Builds the task exactly as ``cosmic-fx bench claims --tasks docs-finetune-big`` does (same pretraining,
same :class:`~cosmic_fx.bench.pretrain.PretrainCache` key, so ``--cache DIR`` can be the claims run's
``OUT/pretrained`` and the claims run then loads these weights), pretrains seed 0 (eager AdamW; its
seconds are printed), then fine-tunes with eager AdamW at the task's learning rate, evaluating every
``eval_every`` steps. The target rule (docs-finetune's: its 2.35 bits/char was reached at ~57% of
its budget): the held-out bits/char after 60% of the fine-tuning budget, rounded up to 0.05.

``--steps N`` stops the fine-tuning after N steps (a partial curve; the rule needs 60% of the budget).

usage: python benchmarks/experiments/big_finetune_curve_experiment.py [--cache DIR] [--steps N] [--threads 2]
"""

import argparse
import math
import os
import time

import torch

from cosmic_fx.bench.tasks import make_tasks

p = argparse.ArgumentParser()
p.add_argument("--cache", default=None, help="PretrainCache folder (default: memory only)")
p.add_argument("--steps", type=int, default=None, help="stop the fine-tuning after this many steps")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
task = make_tasks(["docs-finetune-big"], quick=False, cache_dir=args.cache)[0]
info = task.prepare(0)
print(f"pretraining seed 0: {info['seconds']:.0f} s (cached: {info['cached']}), code held-out "
      f"{info['metric']:.3f} bits/char; load average {os.getloadavg()}", flush=True)
torch.manual_seed(0)
model = task.factory(0)
opt = torch.optim.AdamW(model.parameters(), lr=task.adamw_lr)
curve = [(0, task.evaluate(model))]
print(f"step 0: {curve[-1][1]:.3f} bits/char on the docs (before fine-tuning)", flush=True)
stop = args.steps or task.steps
t0 = time.perf_counter()
for step, (x, y) in enumerate(task.batches(0), start=1):
    loss = task.loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step % task.eval_every == 0:
        curve.append((step, task.evaluate(model)))
        print(f"step {step}: {curve[-1][1]:.3f} bits/char ({time.perf_counter() - t0:.0f} s)", flush=True)
    if step == stop:
        break
at = round(0.6 * task.steps)
reached = [v for s, v in curve if s >= at]
if reached:
    print(f"rule: value after {at} of {task.steps} steps {reached[0]:.3f} -> target "
          f"{math.ceil(reached[0] / 0.05) * 0.05:.2f} (task's: {task.target})")
else:
    print(f"partial curve (to step {curve[-1][0]}); the rule needs step {at}")
