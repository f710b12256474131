"""What freezing a prefix can buy at all on the fine-tuning tasks: fixed schedules against torch.compile.

Produced: docs/guide/presets.md, section "What a frozen prefix can buy: fixed schedules".

Issue 17 asks the fast preset for time to the validation target at most 0.7x torch.compile's and peak
step memory at most 0.7x on the fine-tuning tasks. The fast preset freezes at most a third of the
blocks (``cdg_prefix_max=0.34``), when its drift signal says they settled. This measures the ceiling
of any such signal: fixed schedules that freeze the first K blocks from step S, known in advance (no
signal, no reading: ``torch.compile`` with those parameters' ``requires_grad_(False)``, as the claims
run's FreezeOut arm, :func:`cosmic_fx.bench.peers.freeze_schedule`), beside ``torch.compile`` and
``cosmic fast``, each task's own model, batches, optimizer and budget, Inductor, 2 threads, 3 seeds,
trained by the claims run's own :func:`cosmic_fx.bench.claims_train.train_run`.

Prints, per task, one row per arm: time to the target and peak step memory (mean ± std over the seeds,
and the ratio of means to torch.compile's), the steps to the target, and the final metric against
torch.compile's (the accuracy budget: 0.05 bits/char, 1 point of error).

usage: python benchmarks/experiments/prefix_ceiling_experiment.py [--tasks docs-finetune,mnist-transfer]
           [--seeds 3] [--pretrained results/claims/pretrained]
           [--schedules docs-finetune=freezeout:2@0,freezeout:3@0 ...]
"""

from __future__ import annotations

import argparse
import math

import torch

from cosmic_fx.bench.arms import arms_for
from cosmic_fx.bench.claims_train import train_run
from cosmic_fx.bench.common import mean_std
from cosmic_fx.bench.tasks import make_tasks
from cosmic_fx.training import Arm

SCHEDULES = {  # per task: the fixed schedules (the claims run's FreezeOut arm is "freezeout" = a third from 30%)
    "docs-finetune": ["freezeout:2@0", "freezeout:3@0", "freezeout:2@45"],
    "mnist-transfer": ["freezeout:1@0", "freezeout:2@0"],
}

ap = argparse.ArgumentParser()
ap.add_argument("--tasks", default="docs-finetune,mnist-transfer")
ap.add_argument("--seeds", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--pretrained", default=None,
                help="the fine-tuning tasks' pretrained weights (a claims run's pretrained/); default: in memory")
ap.add_argument("--schedules", nargs="*", default=[],
                help="TASK=SPEC,SPEC... replacing a task's schedules (SPEC: freezeout:K@S)")
args = ap.parse_args()
torch.set_num_threads(args.threads)
schedules = dict(SCHEDULES)
for item in args.schedules:
    name, _, specs = item.partition("=")
    schedules[name] = specs.split(",")


for task in make_tasks(args.tasks.split(","), quick=False, cache_dir=args.pretrained):
    arms = arms_for(task, "inductor", only=["torch.compile", "cosmic fast"])
    arms = {"torch.compile": arms["torch.compile"], "cosmic fast": arms["cosmic fast"]}
    for spec in schedules.get(task.name, []):
        arms[spec] = Arm(spec, None, "compile", task.optimizer, task.lr, lower="inductor", peer=spec)
    runs: dict[str, list] = {name: [] for name in arms}
    for seed in range(args.seeds):
        if task.prepare is not None:
            task.prepare(seed)
        for name, arm in arms.items():  # the arms of one seed one after the other, seeds in turn
            runs[name].append(train_run(task, arm, seed))
            r = runs[name][-1]
            print(f"  {task.name} seed {seed} {name}: time to target {r.time_to_target:.2f} s, steps "
                  f"{r.steps_to_target}, memory {r.peak_memory_mb:.2f} MiB, final {r.final:.3f}, {r.note}",
                  flush=True)
    ref_t = mean_std([r.time_to_target for r in runs["torch.compile"]])[0]
    ref_m = mean_std([r.peak_memory_mb for r in runs["torch.compile"]])[0]
    ref_f = mean_std([r.final for r in runs["torch.compile"]])[0]
    print(f"\n{task.name} ({task.steps} steps, target {task.target} {task.metric}, {args.seeds} seeds)\n")
    print("| arm | time to target (s) | vs torch.compile | steps to target | peak step memory (MiB) | vs torch.compile "
          "| final | vs torch.compile |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        t, ts = mean_std([r.time_to_target for r in rs])
        m, ms = mean_std([r.peak_memory_mb for r in rs])
        f, fs = mean_std([r.final for r in rs])
        missed = sum(math.isnan(r.time_to_target) for r in rs)
        steps = " / ".join("-" if math.isnan(r.steps_to_target) else str(int(r.steps_to_target)) for r in rs)
        print(f"| {name} | {t:.2f} ± {ts:.2f}{f' ({missed} not reached)' if missed else ''} | {t / ref_t:.2f}x "
              f"| {steps} | {m:.2f} ± {ms:.2f} | {m / ref_m:.2f}x | {f:.3f} ± {fs:.3f} | {f - ref_f:+.3f} |",
              flush=True)
    print()
