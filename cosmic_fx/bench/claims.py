"""``cosmic-fx bench claims``: the source text's four claims, and issue 10's targets, measured on real data.

Claims (the source text): 30-50% faster training, 20-40% less memory, 15-35% fewer iterations to
converge, 5-15% lower generalization error. Every arm of a task trains the same model from the same
init (for the fine-tuning tasks: the same pretrained weights, pretrained once per seed) on the same
batches for the same number of steps; the figures are means ± standard deviations over seeds, and a
verdict says "holds" only when the effect is in the claimed direction, at least the claimed minimum,
and larger than the seed-to-seed spread (:mod:`cosmic_fx.bench.verdicts`).

Tasks: :mod:`cosmic_fx.bench.tasks` (digits MLP/CNN, a 2-block stdlib LM) and
:mod:`cosmic_fx.bench.workloads` (a 6-block LM, code-to-docs LM fine-tuning, MNIST 0-4 to 5-9
transfer). Arms: :mod:`cosmic_fx.bench.arms` (baselines, the presets in ``PRESETS``, the ablations).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
from typing import Any

import torch
from tabulate import tabulate

from .arms import PRESETS, arm_names, arms_for
from .claims_train import Run, train_run
from .common import fmt, mean_std, progress, write_results
from .peers import PeerSkipped
from .tasks import LONG_TASK_NAMES, TASK_NAMES, Task, make_tasks
from .timing import torch_threads
from .verdicts import CLAIMS, budget_table, claims_table, targets_table, verdict

__all__ = ["CLAIMS", "DEFAULT_TASKS", "run", "verdict"]

# every task but the long ones (docs-finetune-big: ~20 min per arm on 2 cores), which run when named
DEFAULT_TASKS = tuple(n for n in TASK_NAMES if n not in LONG_TASK_NAMES)


def _censored(values: list[float], digits: int) -> str:
    """mean ± std of the runs that reached the target, and how many did not."""
    reached = [v for v in values if not math.isnan(v)]
    if not reached:
        return "not reached"
    text = fmt(reached, digits)
    return text if len(reached) == len(values) else f"{text} ({len(values) - len(reached)} not reached)"


def _arm_table(tasks: list[Task], results: dict[str, dict[str, list[Run]]]) -> str:
    rows = []
    for task in tasks:
        for name, runs in results[task.name].items():
            rows.append([
                task.name, name, fmt([r.final for r in runs], 3), _censored([r.steps_to_target for r in runs], 0),
                fmt([1e3 * r.median_step for r in runs]), _censored([r.time_to_target for r in runs], 2),
                fmt([r.compile_time for r in runs], 1), fmt([r.peak_memory_mb for r in runs], 2),
                f"{100 * statistics.fmean(r.frozen_fraction for r in runs):.0f}%",
                f"{100 * statistics.fmean(r.scaled_fraction for r in runs):.0f}%",
            ])
    return tabulate(rows, headers=[
        "task", "arm", "final val metric", "steps to target", "median step ms", "time to target s",
        "compile s", "peak step MiB", "CDG frozen", "CCE scaled"], tablefmt="github")


def _skipped_md(skipped: dict[str, dict[str, str]]) -> list[str]:
    lines = [f"- {task} / {arm}: {why}" for task, arms in skipped.items() for arm, why in arms.items()]
    return ["### Arms not run", "\n".join(lines)] if lines else []


def _task_table(tasks: list[Task], pretrain: dict[str, list[dict[str, Any]]],
                results: dict[str, dict[str, list[Run]]]) -> str:
    rows = []
    for t in tasks:
        info = pretrain.get(t.name, [])
        pre = "-"
        if info:
            pre = (f"{fmt([i['seconds'] for i in info], 1)} s, metric {fmt([i['metric'] for i in info], 3)}, "
                   f"cached: {', '.join(i['cached'] for i in info)}")
        checks = sorted({r.gradient_check for r in results[t.name].get("torch.compile", [])}) or ["-"]
        rows.append([t.name, t.metric, t.target, t.steps, t.optimizer, t.lr, pre, " / ".join(checks)])
    return tabulate(rows, headers=["task", "metric", "target", "steps", "optimizer", "lr",
                                   "pretraining per seed (eager; once per seed)",
                                   "torch.compile gradients vs eager (first batch)"], tablefmt="github")


def _check_arms(arms: list[str] | None) -> None:
    if arms is None:
        return
    valid = arm_names()
    unknown = [a for a in arms if a not in valid]
    if unknown:
        # quoted: some names contain a comma ('cosmic fast, freeze more')
        raise ValueError(f"unknown arm(s) {unknown}; valid: {' '.join(repr(a) for a in valid)}")


def run(
    tasks: list[str] | None = None,
    seeds: int = 3,
    quick: bool = False,
    out_dir: str | None = None,
    show_progress: bool = True,
    arms: list[str] | None = None,
    lower: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every arm on every task; return the tables (markdown) and the raw figures.

    Args:
        tasks: task names (default: all of :data:`DEFAULT_TASKS`).
        seeds: seeds per arm (>= 1; verdicts need >= 2 for a spread).
        quick: smoke-test budgets (the LMs on smaller batches), ``eager`` lowering (dynamo's graph
            capture without AOTAutograd or code generation), no ablations.
        out_dir: folder for claims.md, claims.json, the plots and ``pretrained/`` (the cache of
            pretrained weights, reused by a later run with the same specification).
        show_progress: a tqdm bar on stderr.
        arms: keep only these arms (plus the baselines every verdict needs).
        lower: the compiled arms' lowering (default ``"eager"`` with ``quick``, else ``"inductor"``).
        threads: torch intra-op threads for the whole run (default: torch's own setting).

    Example:
        >>> out = run(["digits-mlp"], seeds=2, quick=True, show_progress=False)   # doctest: +SKIP
        >>> print(out["targets"])                                                 # doctest: +SKIP
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    if lower not in (None, "inductor", "aot_eager", "eager"):
        raise ValueError(f"unknown lowering {lower!r}; valid: inductor, aot_eager, eager")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    _check_arms(arms)
    if threads is not None:
        with torch_threads(threads):
            return run(tasks, seeds, quick, out_dir, show_progress, arms, lower)
    lower = lower or ("eager" if quick else "inductor")  # quick: capture the graphs, compile nothing
    cache_dir = os.path.join(out_dir, "pretrained") if out_dir else None
    task_objs = make_tasks(list(tasks or DEFAULT_TASKS), quick, cache_dir=cache_dir)
    plan = [(t, name, arm) for t in task_objs for name, arm in arms_for(t, lower, quick, arms).items()]
    # the bar counts training steps, pretraining steps included (a big pretraining is many minutes long)
    total = (sum(task.steps for task, _, _ in plan) * seeds
             + sum(t.prepare_steps * seeds for t in task_objs if t.prepare is not None))
    results: dict[str, dict[str, list[Run]]] = {}
    skipped: dict[str, dict[str, str]] = {}  # task -> arm -> why it did not run
    pretrain: dict[str, list[dict[str, Any]]] = {}
    with progress(total, "bench claims", show_progress) as bar:
        for task in task_objs:
            if task.prepare is None:
                continue
            for seed in range(seeds):  # pretraining: once per seed, before (and outside) every arm
                bar.set_postfix_str(f"{task.name} / pretraining / seed {seed}")
                info = task.prepare(seed, bar.update)  # one tick per pretraining step
                pretrain.setdefault(task.name, []).append(info)
                if info.get("cached", "no") != "no":  # weights from the cache: no step ran
                    bar.update(task.prepare_steps)
        for task, name, arm in plan:
            results.setdefault(task.name, {})
            for seed in range(seeds):
                bar.set_postfix_str(f"{task.name} / {name} / seed {seed}")
                try:
                    run_ = train_run(task, arm, seed, tick=bar.update)
                except PeerSkipped as e:  # not applicable here, or an optional package is missing
                    skipped.setdefault(task.name, {})[name] = str(e)
                    print(f"{task.name} / {name}: {e}", file=sys.stderr)  # one line per arm and task
                    bar.update(task.steps * (seeds - seed))
                    break
                results[task.name].setdefault(name, []).append(run_)

    claim_md, claim_payload = claims_table(task_objs, results)
    target_md, target_payload = targets_table(task_objs, results, skipped)
    budget_md = budget_table(task_objs, results)
    arm_md, task_md = _arm_table(task_objs, results), _task_table(task_objs, pretrain, results)
    payload = {
        "lower": lower, "seeds": seeds, "quick": quick, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "claims": claim_payload, "targets": target_payload,
        "skipped": skipped,
        "tasks": {t.name: {"metric": t.metric, "target": t.target, "steps": t.steps,
                           "pretraining": pretrain.get(t.name),
                           "arms": {k: [dataclasses.asdict(r) for r in v] for k, v in results[t.name].items()}}
                  for t in task_objs},
    }
    targeted = ", ".join(p.short for p in PRESETS if p.targets) or "none"
    markdown = "\n\n".join([
        "### Tasks", task_md, "### The source text's claims", claim_md,
        f"### Issue 10's targets against torch.compile (presets: {targeted})", target_md,
        "### Accuracy budget (each preset against the best plain arm)", budget_md,
        "### Every arm", arm_md, *_skipped_md(skipped)])
    write_results(out_dir, "claims", markdown, payload)
    if out_dir:
        _plots(out_dir, task_objs, results)
    return {"markdown": markdown, "tasks": task_md, "claims": claim_md, "targets": target_md,
            "budget": budget_md, "arms": arm_md, "payload": payload}


def _plots(out_dir: str, tasks: list[Task], results: dict[str, dict[str, list[Run]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return

    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        for name, runs in results[task.name].items():
            r = runs[0]
            times = [s * (r.median_step if not math.isnan(r.median_step) else 0) for s, _ in r.curve]
            ax.plot(times, [m for _, m in r.curve], label=name)
        ax.set_title(f"{task.name} (seed 0)")
        ax.set_xlabel("training time s (median step x steps, compile excluded)")
        ax.set_ylabel(f"validation {task.metric}")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "claims_val_vs_time.png"), dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        names = list(results[task.name])
        means = [mean_std([r.peak_memory_mb for r in results[task.name][n]]) for n in names]
        ax.barh(names, [m for m, _ in means], xerr=[s for _, s in means])
        ax.set_title(f"{task.name}: peak training-step memory")
        ax.set_xlabel("MiB (CPU allocator, torch.profiler)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "claims_memory.png"), dpi=110)
    plt.close(fig)
