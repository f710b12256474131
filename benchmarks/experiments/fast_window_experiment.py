"""Which prefix window (and QCI or not) makes the `fast` preset freeze within a fine-tuning budget?

Produced: docs/guide/presets.md, section "The fast preset: prefix freezing", the table "Choosing the
window and the cap" (docs-finetune and mnist-transfer, one seed); and the shorter-window paragraph of
"What a frozen prefix can buy: fixed schedules" (mnist-transfer, three seeds); docs/claims/big_run.md
(docs-finetune-big: what QCI and CDG each cost, and the fast preset without the QCI over three seeds).

    python benchmarks/experiments/fast_window_experiment.py [--seeds 0] [--tasks docs-finetune,mnist-transfer] ARM ...
        [--json runs.json]

ARM is ``compile`` (plain torch.compile with the task's optimizer) or ``fast:key=value,...``
(``CosmicConfig.fast`` with overrides, e.g. ``fast:qci=False,cdg_prefix_window=25``). Every arm trains
the task's model from the same pretrained weights on the same batches (``cosmic-fx bench claims``'s
``train_run``, Inductor), one after the other; pretrained weights are cached in results/pretrained.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json

from cosmic_fx.bench.claims_train import train_run
from cosmic_fx.bench.tasks import make_tasks
from cosmic_fx.config import CosmicConfig
from cosmic_fx.training import Arm


def parse_arm(text: str, task) -> Arm:
    if text == "compile":
        return Arm("torch.compile", None, "compile", task.optimizer, task.lr, lower="inductor")
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    cfg = CosmicConfig.preset(name, lower="inductor", **overrides)
    return Arm(text, cfg, "compile", task.optimizer, task.lr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("arms", nargs="+")
    ap.add_argument("--tasks", default="docs-finetune,mnist-transfer")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--json", default=None, help="also write every run (curve, step seconds) to this file")
    args = ap.parse_args()
    runs = []
    tasks = make_tasks(args.tasks.split(","), quick=False, cache_dir="results/pretrained")
    print(
        "| task | seed | arm | final | steps to target | time to target s | median step ms | peak step MiB | frozen |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for task in tasks:
        for seed in map(int, args.seeds.split(",")):
            if task.prepare is not None:
                task.prepare(seed)
            for text in args.arms:
                r = train_run(task, parse_arm(text, task), seed)
                print(
                    f"| {task.name} | {seed} | {text} | {r.final:.3f} | {r.steps_to_target:.0f} | "
                    f"{r.time_to_target:.2f} | {1000 * r.median_step:.1f} | {r.peak_memory_mb:.1f} | "
                    f"{100 * r.frozen_fraction:.0f}% |",
                    flush=True,
                )
                runs.append({"task": task.name, "seed": seed, "arm": text, **dataclasses.asdict(r)})
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(runs, f)


if __name__ == "__main__":
    main()
