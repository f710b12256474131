"""Is it the freezing or CCE that puts ``fast`` over the accuracy budget on ``mnist-transfer``?

The transfer task trains with SGD + momentum, where the fast preset's CCE is on (it is skipped only
for Adam/AdamW). This runs, per seed, the claims task's own arms: ``torch.compile``, ``cosmic fast``,
``cosmic fast`` with ``cce="off"`` and the ``FreezeOut schedule`` peer, all lowered with ``aot_eager``
(the question is accuracy, not kernels), and prints the final error, what froze and the training time.
``--variant NAME=FIELD:VALUE[,FIELD:VALUE]`` (repeatable) replaces the two fast arms by fast-preset
variants, e.g. ``--variant k1=cdg_prefix_every:1 --variant k5=cdg_prefix_every:5``.

Produced: docs/guide/presets.md, section "CCE in the fast preset".

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
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FIELD:VALUE[,FIELD:VALUE]",
                    help="a fast-preset variant arm (repeatable); replaces the two default fast arms")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lower = "aot_eager"
    for task in make_tasks(args.tasks.split(","), quick=args.quick):
        opt, lr = task.optimizer, task.lr
        fast = [("fast, cce relative", {"cce": "relative"}), ("fast, cce off", {"cce": "off"})]
        if args.variant:
            fast = [_variant(v) for v in args.variant]
        arms = [Arm("torch.compile", None, "compile", opt, lr, lower=lower),
                *(Arm(name, CosmicConfig.fast(lower=lower, **kw), "compile", opt, lr) for name, kw in fast),
                Arm("FreezeOut", None, "compile", opt, lr, lower=lower, peer="freezeout")]
        print(f"| task | seed | arm | final {task.metric} | frozen share | scaled share | seconds | note |")
        print("|---|---|---|---|---|---|---|---|")
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm in arms:
                t0 = time.perf_counter()
                r = train_run(task, arm, seed)
                print(f"| {task.name} | {seed} | {arm.name} | {r.final:.3f} | {r.frozen_fraction:.2f} | "
                      f"{r.scaled_fraction:.2f} | {time.perf_counter() - t0:.0f} | {r.note} |", flush=True)


def _variant(text: str) -> tuple[str, dict]:
    """``"k5=cdg_prefix_every:5"`` -> ``("k5", {"cdg_prefix_every": 5})`` (numbers parsed, else strings)."""
    name, _, fields = text.partition("=")
    kw = {}
    for item in fields.split(","):
        key, _, value = item.partition(":")
        try:
            kw[key] = int(value)
        except ValueError:
            try:
                kw[key] = float(value)
            except ValueError:
                kw[key] = value
    return name, kw


if __name__ == "__main__":
    main()
