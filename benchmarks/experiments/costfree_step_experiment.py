"""A fast-preset training step before any freeze against a torch.compile step (issue 17, item 1).

Produced: docs/guide/performance.md, section "What a step costs before anything freezes", its tables
(the latest in "The quiet step looks at one gradient").

Arms, side by side from the same init, on digits (batch 64), one thread, ``aot_eager`` lowering:

* ``torch.compile``: ``torch.compile(model, backend="aot_eager")``;
* ``fast, grad``: ``cosmic_fx.compile`` of the fast preset with the gradient settle signal (the
  preset's until 2026-12-02; ``cdg_prefix_window`` large, so nothing freezes while measuring), the
  optimizer watched: no per-parameter hook, unmeasured steps batched, the block gradient norms read
  every step;
* ``fast, grad, per parameter``: the same, with the runtime forced back onto the per-parameter path
  it took before (a post-accumulate-grad hook per parameter, ``_decide`` per parameter every step,
  and CCE on under AdamW);
* ``fast, grad, cdg_prefix_every=5``: reading the block gradient norms (and deciding) on every 5th
  step only; the other four steps do no prefix work;
* ``fast (drift), full step``: the fast preset, ``cdg_prefix_signal="drift"``: it reads the next
  block's weights once per ``cdg_prefix_window`` steps (here never: the window is 10**6 steps), with
  the runtime's quiet-step path switched off (every step closed in full, as before 2026-12-03);
* ``fast (drift)``: the fast preset as it is: the steps between drift readings take the quiet path.

Steps run interleaved (one of each arm per round, after a warm-up) and the median of each is reported,
with its ratio to torch.compile's. Models: ``DigitsMLP()`` (6 parameter tensors) and a deep MLP of 8
Linear(128, 128) + ReLU blocks (18 tensors, 1 measured step in 10 with ``efficiency_every=10``).

The tables, with the runs they come from, are in docs/guide/performance.md. The latest (the quiet
step looking at one gradient, 2026-12-03; two runs of 300 rounds on a quiet machine, median step over
torch.compile's, run 1 / run 2):

    model, optimizer        fast, grad     drift, full step  fast (drift), quiet step
    DigitsMLP, AdamW        1.13x / 1.14x  1.03x / 1.04x     1.00x / 1.00x
    DigitsMLP, SGD          1.18x / 1.17x  1.07x / 1.06x     1.02x / 1.02x
    deep MLP, AdamW         1.09x / 1.09x  1.02x / 1.03x     1.01x / 1.00x
    deep MLP, SGD           1.14x / 1.13x  1.04x / 1.04x     1.00x / 1.01x

usage: python benchmarks/experiments/costfree_step_experiment.py [rounds]
"""

import copy
import statistics
import sys
import time

import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.data import load_digits
from cosmic_fx.models import DigitsMLP

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 60
WARMUP = 8
torch.set_num_threads(1)
DATA = load_digits()


def deep_mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(64, 128), nn.ReLU()]
    for _ in range(7):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


def arms(base: nn.Module, optim: str) -> dict:
    def make_opt(m: nn.Module) -> torch.optim.Optimizer:
        if optim == "adamw":
            return torch.optim.AdamW(m.parameters(), lr=1e-3)
        return torch.optim.SGD(m.parameters(), lr=0.05)

    plain = copy.deepcopy(base)
    out = {"torch.compile": (torch.compile(plain, backend="aot_eager"), make_opt(plain))}
    for name, per_parameter, every, signal in (("fast, grad", False, 1, "grad"),
                                               ("fast, grad, per parameter", True, 1, "grad"),
                                               ("fast, grad, cdg_prefix_every=5", False, 5, "grad"),
                                               ("fast (drift), full step", False, 1, "drift"),
                                               ("fast (drift)", False, 1, "drift")):
        cfg = CosmicConfig.fast(lower="aot_eager", cdg_prefix_window=10**6, cce_skip_adaptive=not per_parameter,
                                cdg_prefix_every=every, cdg_prefix_signal=signal)
        tm = cosmic_fx.transform(copy.deepcopy(base), cfg)
        run, opt = cosmic_fx.compile(tm), make_opt(tm)
        cosmic_fx.watch_optimizer(tm, opt)
        if per_parameter:
            rt = cosmic_fx.runtime_of(tm)
            rt._sync_hooks = lambda: None  # keep the hooks (instance attributes shadow the methods)
            rt._measures_now = lambda todo: True
            rt._attach_hooks()
        if name.endswith("full step"):
            cosmic_fx.runtime_of(tm)._quiet_step = lambda: False  # every step takes the full close
        out[name] = (run, opt)
    return out


def step(run: nn.Module, opt: torch.optim.Optimizer, i: int) -> float:
    g = torch.Generator().manual_seed(i)
    idx = torch.randint(0, len(DATA.y_train), (64,), generator=g)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(run(DATA.x_train[idx]), DATA.y_train[idx]).backward()
    opt.step()
    return time.perf_counter() - t0


for model_name, make in (("DigitsMLP()", DigitsMLP), ("deep MLP 8x128", deep_mlp)):
    for optim in ("adamw", "sgd"):
        torch.manual_seed(0)
        torch._dynamo.reset()
        runs = arms(make(), optim)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(WARMUP + ROUNDS):
            for k, (run, opt) in runs.items():
                dt = step(run, opt, i)
                if i >= WARMUP:
                    times[k].append(dt)
        ref = statistics.median(times["torch.compile"])
        cells = ", ".join(f"{k} {statistics.median(v) * 1e3:.3f} ms ({statistics.median(v) / ref:.2f}x)"
                          for k, v in times.items())
        print(f"{model_name}, {optim}: {cells}", flush=True)
