"""Issue 17's targets for the fast preset, read from one ``cosmic-fx bench claims`` run's claims.json.

The claims table judges issue 10's targets and the two peer targets; issue 17 adds two that it does
not print: peak step memory at most 0.7x ``torch.compile``'s on the transformer fine-tuning tasks, and
the median step at most 1.03x. This prints every issue-17 target per task, with the verdict rule of
the claims table (:func:`cosmic_fx.bench.verdicts.target_verdict`: the mean must clear the bound and
the difference of means must exceed the two seeds' spreads).

The run's median step is over all its steps, after any freeze too: on a task where the preset froze
nothing it is the median step before the first freeze; where it froze, the pre-freeze step is
measured by benchmarks/experiments/costfree_step_experiment.py instead, and the row says so.

Produced: docs/claims/peers_full_run.md and docs/claims/peers_drift015_run.md, section "Issue 17's targets".

    python benchmarks/experiments/issue17_targets_report.py results/claims-peers/claims.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

from cosmic_fx.bench.arms import eager_arm_name
from cosmic_fx.bench.common import mean_std
from cosmic_fx.bench.tasks import make_tasks
from cosmic_fx.bench.verdicts import PEER_TARGETS, TARGETS, Target, target_verdict

FINE_TUNE, TRANSFORMER = frozenset({"fine-tune"}), frozenset({"transformer"})
# Issue 17's targets: the claims table's own (time to target and the budget from issue 10, the two peer rows)
# with issue 17's bounds, and the two it adds. A target applies to a task with all of its tags here.
ISSUE17 = (
    Target("time to the validation target at most 0.7x (fine-tuning / transfer tasks)", "time_to_target",
           "improvement", 30.0, FINE_TUNE, arm="cosmic fast"),
    *PEER_TARGETS,
    Target("peak training-step memory at most 0.7x (transformer fine-tuning tasks)", "peak_memory_mb",
           "improvement", 30.0, FINE_TUNE | TRANSFORMER, arm="cosmic fast"),
    dataclasses.replace(TARGETS[3], measure="final", arm="cosmic fast"),
    Target("median step at most 1.03x (every task; before the first freeze)", "median_step", "slowdown", 3.0,
           arm="cosmic fast"),
)
MEASURE = {"time_to_target": "time_to_target", "generalization": "final"}  # Target.measure -> Run field


def _fmt(values: list[float]) -> str:
    missed = sum(math.isnan(v) for v in values)
    if missed == len(values):
        return "not reached"
    m, s = mean_std([v for v in values if not math.isnan(v)] or [math.nan])
    return f"{m:.3f} ± {s:.3f}" + (f" ({missed} not reached)" if missed else "")


def main(path: str) -> None:
    with open(path) as f:
        results = json.load(f)["tasks"]
    tasks = {t.name: t for t in make_tasks(list(results), quick=True)}  # tags and tolerances only
    print("| target | task | baseline | fast arm | change | verdict |")
    print("|---|---|---|---|---|---|")
    for target in ISSUE17:
        field = MEASURE.get(target.measure, target.measure)
        for name, result in results.items():
            task, arms = tasks[name], result["arms"]
            if not target.tags <= task.tags or target.arm not in arms:
                continue
            base_name = target.baseline
            if target.kind == "budget":  # as the claims table: the better same-optimizer reference
                base_name = min(("torch.compile", eager_arm_name(task)),
                                key=lambda a: mean_std([r["final"] for r in arms[a]])[0])
            if base_name not in arms:
                continue
            base = [r[field] for r in arms[base_name]]
            values = [r[field] for r in arms[target.arm]]
            measured, verdict = target_verdict(target, base, values, task.tolerance)
            if field == "median_step" and any(r["frozen_fraction"] > 0 for r in arms[target.arm]):
                verdict += " (whole run, after freezing too: pre-freeze step in costfree_step_experiment.py)"
            print(f"| {target.text} | {name} | {base_name}: {_fmt(base)} | {target.arm}: {_fmt(values)} | "
                  f"{measured} | {verdict} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/claims-peers/claims.json")
