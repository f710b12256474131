"""Issue 17's targets for the fast preset, read from one ``cosmic-fx bench claims`` run's claims.json.

The claims table judges issue 10's targets and the two peer targets; issue 17 adds two that it does
not print: peak step memory at most 0.7x ``torch.compile``'s on the transformer fine-tuning tasks, and
the median step at most 1.03x. This prints every issue-17 target per task, with the verdict rule of
the claims table (:func:`cosmic_fx.bench.verdicts.target_verdict`: the mean must clear the bound and
the difference of means must exceed the two seeds' spreads).

The run's median step is over all its steps, after any freeze too: on a task where the preset froze
nothing it is the median step before the first freeze; where it froze, the pre-freeze step is
measured by benchmarks/experiments/costfree_step_experiment.py instead, and the row says so.

Produced: docs/claims/peers_full_run.md, section "Issue 17's targets".

    python benchmarks/experiments/issue17_targets_report.py results/claims-peers/claims.json
"""

from __future__ import annotations

import json
import math
import sys

from cosmic_fx.bench.common import mean_std
from cosmic_fx.bench.verdicts import Target, target_verdict

FINE_TUNE = {"docs-finetune", "mnist-transfer", "docs-finetune-big"}
TRANSFORMER_FINE_TUNE = {"docs-finetune", "docs-finetune-big"}
FAST = "cosmic fast"

TARGETS = (  # (target, the tasks it applies to, the arm judged, the baseline)
    (Target("time to the validation target at most 0.7x (fine-tuning / transfer tasks)", "time_to_target",
            "improvement", 30.0), FINE_TUNE, FAST, "torch.compile"),
    (Target("time to target at most 0.5x with the activation cache (multi-epoch fine-tuning)", "time_to_target",
            "improvement", 50.0), FINE_TUNE, "cosmic fast + cache", "torch.compile"),
    (Target("time to target no later than peft LoRA (fine-tuning tasks)", "time_to_target", "slowdown", 0.0),
     FINE_TUNE, FAST, "peft LoRA r=8"),
    (Target("peak training-step memory at most 0.7x (transformer fine-tuning tasks)", "peak_memory_mb",
            "improvement", 30.0), TRANSFORMER_FINE_TUNE, FAST, "torch.compile"),
    (Target("final metric within the accuracy budget (every task)", "final", "budget"), None, FAST, None),
    (Target("median step at most 1.03x (every task; before the first freeze)", "median_step", "slowdown", 3.0),
     None, FAST, "torch.compile"),
)
TOLERANCE = {"error %": 1.0, "bits/char": 0.05}


def _fmt(values: list[float]) -> str:
    missed = sum(math.isnan(v) for v in values)
    if missed == len(values):
        return "not reached"
    m, s = mean_std([v for v in values if not math.isnan(v)] or [math.nan])
    return f"{m:.3f} ± {s:.3f}" + (f" ({missed} not reached)" if missed else "")


def main(path: str) -> None:
    with open(path) as f:
        tasks = json.load(f)["tasks"]
    print("| target | task | baseline | fast arm | change | verdict |")
    print("|---|---|---|---|---|---|")
    for target, applies, arm, baseline in TARGETS:
        for name, task in tasks.items():
            arms = task["arms"]
            if (applies is not None and name not in applies) or arm not in arms:
                continue
            base_name = baseline
            if base_name is None:  # the budget: the better of torch.compile and the same-optimizer eager arm
                candidates = [a for a in arms if a == "torch.compile" or a.startswith("eager")]
                base_name = min(candidates, key=lambda a: mean_std([r["final"] for r in arms[a]])[0])
            if base_name not in arms:
                continue
            base = [r[target.measure] for r in arms[base_name]]
            values = [r[target.measure] for r in arms[arm]]
            measured, verdict = target_verdict(target, base, values, TOLERANCE.get(task["metric"], 0.0))
            if target.measure == "median_step" and any(r["frozen_fraction"] > 0 for r in arms[arm]):
                verdict += " (whole run, after freezing too: pre-freeze step in costfree_step_experiment.py)"
            print(f"| {target.text} | {name} | {base_name}: {_fmt(base)} | {arm}: {_fmt(values)} | {measured} | "
                  f"{verdict} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/claims-peers/claims.json")
