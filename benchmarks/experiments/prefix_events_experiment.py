"""When do the fast preset's freeze events fire? Steps and blocks, per task, seed 0, eager engine.

Produced: docs/guide/claims.md, section "Do the claims hold?", "What the numbers say", the bullet
"Prefix freezing hurts training from scratch" (the freeze events at steps 79 and 153, and 51).

    python benchmarks/experiments/prefix_events_experiment.py [--tasks stdlib-lm-deep,docs-finetune] \
        [--steps 200] [key=value ...]

Trains ``cosmic_fx.transform(model, CosmicConfig.fast(overrides))`` with hooks attached (eager: the
same decisions as compiled, see tests/test_runtime.py) on the task's batches and prints every freeze
event of prefix CDG with the reason the runtime gave at that step.
"""

from __future__ import annotations

import argparse
import ast

import torch

import cosmic_fx
from cosmic_fx.bench.tasks import make_tasks
from cosmic_fx.config import CosmicConfig
from cosmic_fx.training import Arm, _optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--tasks", default="stdlib-lm-deep,docs-finetune")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    over = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    for task in make_tasks(args.tasks.split(","), quick=False, cache_dir="results/pretrained"):
        if task.prepare is not None:
            task.prepare(0)
        torch.manual_seed(0)
        tm = cosmic_fx.transform(task.factory(0), CosmicConfig.fast(lower="eager", **over))
        cosmic_fx.attach_hooks(tm)
        opt = _optimizer(Arm("fast", None, "eager", task.optimizer, task.lr), tm.parameters())  # the task's
        rt = cosmic_fx.runtime_of(tm)
        seen = 0
        for step, (x, y) in enumerate(task.batches(0)):
            if step == args.steps:
                break
            loss = task.loss(tm(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if len(rt.freeze_events) != seen:
                seen = len(rt.freeze_events)
                print(f"{task.name}: step {rt.freeze_events[-1][0]}: {rt.last_step['prefix']}", flush=True)
        print(f"{task.name}: blocks {[name for name, _ in rt.prefix_units]}; events at steps "
              f"{[s for s, _ in rt.freeze_events]} in {args.steps} steps", flush=True)


if __name__ == "__main__":
    main()
