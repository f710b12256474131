"""The fast preset's step before any freeze against a torch.compile step on the claims tasks, interleaved.

Produced: docs/claims/peers_drift015_run.md, section "The step before the first freeze, side by side"
(and its "After the quiet step looks at one gradient").

The claims run's median-step rows compare arms trained one after the other, so the machine's drift
between them enters the ratio (``torch.compile`` on ``stdlib-lm-deep``: 81, 101 and 96 ms in the three
seeds of one run). This runs the arms side by side from the same init, one step of each per round, on
the task's own model, batches, optimizer and learning rate, under Inductor, 2 threads (the claims
run's); the arms are built by the bench's own code (``cosmic_fx.bench.arms.arms_for``,
``cosmic_fx.training.build``):

* ``torch.compile``: ``torch.compile(model)`` (Inductor);
* ``cosmic fast``: ``cosmic_fx.compile(model, CosmicConfig.fast())`` as ``cosmic-fx bench claims``
  trains it, the optimizer watched on its first step (the first freeze is not before step 50: the drift
  needs two 25-step windows; the script stops if anything froze while measuring: lower ``--rounds``);
* ``cosmic off``: ``CosmicConfig.off()`` through the same backend: what the backend alone costs.

Each line also gives each arm's ``optimizer.step()`` alone (the runtime's optimizer pre-hook is in it).

usage: python benchmarks/experiments/claims_prefreeze_step_experiment.py [--tasks digits-mlp,stdlib-lm,stdlib-lm-deep]
           [--rounds 45] [--pretrained results/claims/pretrained]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time

import torch

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.bench.arms import arms_for
from cosmic_fx.bench.tasks import make_tasks
from cosmic_fx.training import Arm, _optimizer, build

WARMUP = 5

ap = argparse.ArgumentParser()
ap.add_argument("--tasks", default="digits-mlp,stdlib-lm,stdlib-lm-deep")
ap.add_argument("--rounds", type=int, default=45)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--pretrained", default=None,
                help="the fine-tuning tasks' pretrained weights (a claims run's pretrained/); default: in memory")
args = ap.parse_args()
torch.set_num_threads(args.threads)

for task in make_tasks(args.tasks.split(","), quick=False, cache_dir=args.pretrained):
    if task.prepare is not None:
        task.prepare(0)
    torch.manual_seed(0)
    torch._dynamo.reset()
    base = task.factory(0)
    arms = arms_for(task, "inductor", only=["torch.compile", "cosmic fast"])
    arms = {"torch.compile": arms["torch.compile"], "cosmic fast": arms["cosmic fast"],
            "cosmic off": Arm("cosmic off", CosmicConfig.off(lower="inductor"), "compile", task.optimizer, task.lr)}
    runs = {}
    for name, arm in arms.items():
        run, trained, _ = build(arm, copy.deepcopy(base))
        runs[name] = (run, _optimizer(arm, trained.parameters()))
    times: dict[str, list[float]] = {k: [] for k in runs}
    opt_times: dict[str, list[float]] = {k: [] for k in runs}  # optimizer.step() alone (pre-hooks included)
    batches = list(itertools.islice(task.batches(0), WARMUP + args.rounds))
    for i, (x, y) in enumerate(batches):
        for k, (run, opt) in runs.items():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            task.loss(run(x), y).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if i >= WARMUP:
                times[k].append(t2 - t0)
                opt_times[k].append(t2 - t1)
    frozen = cosmic_fx.runtime_of(runs["cosmic fast"][0]).prefix.length
    if frozen:
        raise SystemExit(f"{task.name}: the fast arm froze {frozen} block(s) while measuring; lower --rounds")
    ref = statistics.median(times["torch.compile"])
    cells = ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms ({statistics.median(v) / ref:.3f}x; "
                      f"optimizer.step() {statistics.median(opt_times[k]) * 1e6:.0f} us)"
                      for k, v in times.items())
    print(f"{task.name} ({args.rounds} rounds): {cells}", flush=True)
