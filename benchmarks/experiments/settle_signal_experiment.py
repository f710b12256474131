"""Which settle signal tells a converged block from a learning one: the fast preset with the gradient
signal (``cdg_prefix_signal="grad"``) and with the weight drift (``"drift"``) at a few thresholds.

Produced: docs/guide/presets.md, section "Settle signal".

    python benchmarks/experiments/settle_signal_experiment.py [--quick] [--seeds 0] [--tasks ...] [--arms ...]

Tasks: ``digits-deep`` (a 6-Linear MLP on scikit-learn's digits from scratch, AdamW 1e-3, 500 steps),
``stdlib-lm-deep`` (the 6-block LM from scratch), ``docs-finetune``, ``mnist-transfer`` (the claims
tasks, :mod:`cosmic_fx.bench.workloads`) and ``wide-transfer`` (new: a 4-block MLP of width 600, so
that ``fast`` puts a diagonal QCI on every block, pretrained with AdamW on digits 0-4 for 400 steps,
head replaced, fine-tuned with AdamW 1e-3 on 5-9 for 400 steps). Arms: ``compile`` (torch.compile)
and ``grad`` / ``drift:THRESHOLD`` (``cosmic_fx.compile`` with ``CosmicConfig.fast``); every arm of a
seed starts from the same weights and sees the same batches; the lowering is ``aot_eager`` for every
arm (the question is what freezes and what it costs in accuracy, not Inductor's kernels). Prints one
table row per (task, seed, arm): the blocks that froze and at which step, the final validation
metric and its difference to ``compile``, and the training time; and, for the drift arms, the drift
readings of the candidate blocks.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import cosmic_fx
from cosmic_fx.bench.tasks import Task, _error_of, make_tasks
from cosmic_fx.config import CosmicConfig
from cosmic_fx.data import load_digits

ARMS = ("compile", "grad", "drift:0.01", "drift:0.03")


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int):
    def make(seed: int):
        g = torch.Generator().manual_seed(1000 + seed)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            yield x[idx], y[idx]

    return make


def _mlp(width: int, depth: int, classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def digits_deep_task(quick: bool) -> Task:
    d = load_digits()
    steps = 60 if quick else 500
    return Task(name="digits-deep", factory=lambda seed: _mlp(128, 6, 10),
                batches=_batches(d.x_train, d.y_train, 64, steps), loss=nn.functional.cross_entropy,
                evaluate=_error_of(d.x_test, d.y_test), metric="error %", target=5.0, steps=steps, eval_every=50,
                optimizer="adamw", lr=1e-3, adamw_lr=1e-3, tolerance=1.0)


def wide_transfer_task(quick: bool) -> Task:
    d = load_digits()

    def split(x, y, first):
        keep = (y >= first) & (y < first + 5)
        return x[keep], y[keep] - first

    ax, ay = split(d.x_train, d.y_train, 0)
    bx, by = split(d.x_train, d.y_train, 5)
    bvx, bvy = split(d.x_test, d.y_test, 5)
    pre_steps, steps = (30, 60) if quick else (400, 400)
    cache: dict[int, dict] = {}

    def factory(seed: int) -> nn.Module:
        if seed not in cache:  # pretraining on 0-4, eager AdamW, once per seed
            torch.manual_seed(seed)
            pre = _mlp(600, 5, 5)
            opt = torch.optim.AdamW(pre.parameters(), lr=1e-3)
            for x, y in _batches(ax, ay, 64, pre_steps)(seed + 7):
                opt.zero_grad()
                nn.functional.cross_entropy(pre(x), y).backward()
                opt.step()
            cache[seed] = {k: v.clone() for k, v in pre.state_dict().items()}
        torch.manual_seed(10_000 + seed)  # the same new head for every arm
        model = _mlp(600, 5, 5)
        model.load_state_dict(cache[seed])
        model[-1] = nn.Linear(600, 5)  # new classes, a new head
        return model

    return Task(name="wide-transfer", factory=factory, batches=_batches(bx, by, 64, steps),
                loss=nn.functional.cross_entropy, evaluate=_error_of(bvx, bvy), metric="error %", target=3.0,
                steps=steps, eval_every=50, optimizer="adamw", lr=1e-3, adamw_lr=1e-3, tolerance=1.0,
                tags=frozenset({"fine-tune"}))


def get_tasks(names: list[str], quick: bool) -> list[Task]:
    own = {"digits-deep": digits_deep_task, "wide-transfer": wide_transfer_task}
    theirs = [n for n in names if n not in own]
    built = dict(zip(theirs, make_tasks(theirs, quick=quick, cache_dir="results/pretrained"), strict=True))
    return [own[n](quick) if n in own else built[n] for n in names]


def run(task: Task, arm: str, seed: int) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = task.factory(seed)
    if arm == "compile":
        train_mod, eval_mod = torch.compile(model, backend="aot_eager"), model
    else:
        signal, _, thr = arm.partition(":")
        extra = {"cdg_prefix_threshold": float(thr)} if thr else {}
        # qci=True: the preset when this ran (a diagonal QCI on sites wider than 511, so on every block of
        # wide-transfer); the preset has had qci=False since 2026-12-04
        cfg = CosmicConfig.fast(lower="aot_eager", cdg_prefix_signal=signal, qci=True, **extra)
        train_mod = cosmic_fx.compile(model, cfg)
        eval_mod = train_mod._orig_mod
    params = list(train_mod.parameters())
    opt = (torch.optim.AdamW(params, lr=task.lr) if task.optimizer == "adamw"
           else torch.optim.SGD(params, lr=task.lr, momentum=0.9 if task.optimizer == "momentum" else 0.0))
    events, drifts, length, seen = [], [], 0, 0
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(task.batches(seed)):
        loss = task.loss(train_mod(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rt = cosmic_fx.hooks_of(eval_mod) if arm != "compile" else None
        if rt is None:
            continue
        p = rt.prefix
        if p.length < len(p.units) and len(p.history[p.length]) and arm.startswith("drift"):
            h = p.history[p.length]
            if p._snap_step != seen or p.length != length:  # a new reading (the history keeps 4)
                drifts.append(f"{p.length}@{step}:{h[-1]:.3f}")
                seen = p._snap_step
        if p.length != length:
            events += [f"{p.units[u].name}@{step}" for u in range(length, p.length)]
            length, seen = p.length, 0
    elapsed = time.perf_counter() - t0
    return {"final": task.evaluate(eval_mod), "time": elapsed, "events": events, "drifts": drifts,
            "units": len(rt.prefix.units) if arm != "compile" and rt is not None else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="digits-deep,stdlib-lm-deep,docs-finetune,mnist-transfer,wide-transfer")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    tasks = get_tasks(args.tasks.split(","), args.quick)
    print("| task | seed | arm | froze (block@step) | final | vs compile | time s |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    for task in tasks:
        for seed in map(int, args.seeds.split(",")):
            if task.prepare is not None:
                task.prepare(seed)
            base = None
            for arm in args.arms.split(","):
                r = run(task, arm, seed)
                base = r["final"] if arm == "compile" else base
                delta = "-" if base is None or arm == "compile" else f"{r['final'] - base:+.3f}"
                froze = ", ".join(r["events"]) or ("-" if arm == "compile" else f"none (of {r['units']})")
                print(f"| {task.name} | {seed} | {arm} | {froze} | {r['final']:.3f} {task.metric} | {delta} | "
                      f"{r['time']:.1f} |", flush=True)
                if r["drifts"]:
                    notes.append(f"{task.name} seed {seed} {arm}: drift block@step:value " + " ".join(r["drifts"]))
                    print(f"<!-- {notes[-1]} -->", flush=True)
    print()
    for line in notes:
        print(line)


if __name__ == "__main__":
    main()
