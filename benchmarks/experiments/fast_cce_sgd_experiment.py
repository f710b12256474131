"""Is it the freezing or CCE that puts ``fast`` over the accuracy budget on ``mnist-transfer``?

The transfer task trains with SGD + momentum, where the fast preset's CCE is on (it is skipped only
for Adam/AdamW). This runs, per seed, the claims task's own arms: ``torch.compile``, ``cosmic fast``,
``cosmic fast`` with ``cce="off"`` and the ``FreezeOut schedule`` peer, all lowered with ``aot_eager``
(the question is accuracy, not kernels), and prints the final error, what froze and the training time.

Produced: docs/guide/presets.md, section "CCE under SGD".

    python benchmarks/experiments/fast_cce_sgd_experiment.py [--seeds 0,1,2] [--tasks mnist-transfer]
"""

from __future__ import annotations

import argparse
import time

import torch

from cosmic_fx.bench.claims_train import train_run
from cosmic_fx.bench.tasks import make_tasks
from cosmic_fx.config import CosmicConfig
from cosmic_fx.training import Arm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="mnist-transfer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the tasks' quick budgets (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lower = "aot_eager"
    for task in make_tasks(args.tasks.split(","), quick=args.quick):
        opt, lr = task.optimizer, task.lr
        arms = [
            Arm("torch.compile", None, "compile", opt, lr, lower=lower),
            Arm("fast", CosmicConfig.fast(lower=lower), "compile", opt, lr),
            Arm("fast, cce off", CosmicConfig.fast(lower=lower, cce="off"), "compile", opt, lr),
            Arm("FreezeOut", None, "compile", opt, lr, lower=lower, peer="freezeout"),
        ]
        print(f"| task | seed | arm | final {task.metric} | frozen share | scaled share | seconds | note |")
        print("|---|---|---|---|---|---|---|---|")
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm in arms:
                t0 = time.perf_counter()
                r = train_run(task, arm, seed)
                print(f"| {task.name} | {seed} | {arm.name} | {r.final:.2f} | {r.frozen_fraction:.2f} | "
                      f"{r.scaled_fraction:.2f} | {time.perf_counter() - t0:.0f} | {r.note} |", flush=True)


if __name__ == "__main__":
    main()
