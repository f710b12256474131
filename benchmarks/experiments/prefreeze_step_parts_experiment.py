"""Where a fast-preset step before the first freeze spends its extra time (issue 17, item 1).

Produced: docs/guide/performance.md, section "What a step costs before anything freezes", the
paragraph "Where the rest goes", and the parts paragraphs of "The quiet step" and "The quiet step looks
at one gradient".

DigitsMLP on digits (batch 64), SGD lr 0.05 (``--adamw``: AdamW 1e-3), one thread, ``aot_eager``;
three arms from the same init, interleaved, 400 rounds after a warm-up: ``torch.compile``,
``cosmic_fx.compile`` with every mechanism off (``CosmicConfig.off``: the backend's wrapper alone) and
the fast preset (``cdg_prefix_window`` 10**6, so nothing freezes while measuring; ``--signal grad``
for the gradient signal). Prints the median of the forward, the forward+backward and the full step
per arm (ratio to torch.compile's), then, for the fast arm, the median of ``optimizer.step()`` and of
the runtime's optimizer pre-hook inside it, against ``optimizer.step()`` of the torch.compile arm.

    python benchmarks/experiments/prefreeze_step_parts_experiment.py [--adamw] [--signal drift|grad]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.data import load_digits
from cosmic_fx.models import DigitsMLP


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adamw", action="store_true")
    ap.add_argument("--signal", default="drift", choices=("drift", "grad"))
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    x, y = data.x_train[:64], data.y_train[:64]

    def make_opt(m: nn.Module) -> torch.optim.Optimizer:
        if args.adamw:
            return torch.optim.AdamW(m.parameters(), lr=1e-3)
        return torch.optim.SGD(m.parameters(), lr=0.05)

    torch.manual_seed(0)
    base = DigitsMLP()
    plain = copy.deepcopy(base)
    arms = {"torch.compile": (torch.compile(plain, backend="aot_eager"), make_opt(plain))}
    for name, cfg in (("cosmic, all off", CosmicConfig.off(lower="aot_eager")),
                      ("fast", CosmicConfig.fast(lower="aot_eager", cdg_prefix_window=10**6,
                                                 cdg_prefix_signal=args.signal))):
        tm = cosmic_fx.transform(copy.deepcopy(base), cfg)
        opt = make_opt(tm)
        cosmic_fx.watch_optimizer(tm, opt)
        arms[name] = (cosmic_fx.compile(tm), opt)
        if name == "fast":
            fast_model = tm

    def forward(run, opt):
        opt.zero_grad(set_to_none=True)
        return nn.functional.cross_entropy(run(x), y)

    def forward_backward(run, opt):
        forward(run, opt).backward()

    def step(run, opt):
        forward_backward(run, opt)
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for what, part in (("forward", forward), ("forward+backward", forward_backward), ("full step", step)):
            for run, opt in arms.values():
                for _ in range(20):
                    step(run, opt)
            times: dict[str, list[float]] = {k: [] for k in arms}
            for _ in range(args.rounds):
                for k, (run, opt) in arms.items():
                    t0 = time.perf_counter()
                    part(run, opt)
                    times[k].append(time.perf_counter() - t0)
                    if part is not step:
                        opt.step()
            ref = statistics.median(times["torch.compile"])
            print(f"{what}: " + ", ".join(f"{k} {statistics.median(v) * 1e6:.0f} us ({statistics.median(v) / ref:.3f}x)"
                                          for k, v in times.items()))
        rt = cosmic_fx.runtime_of(fast_model)
        inner, hook_ns = rt._at_optimizer_step, []

        def timed() -> None:
            t0 = time.perf_counter_ns()
            inner()
            hook_ns.append(time.perf_counter_ns() - t0)

        rt._at_optimizer_step = timed  # pre_step calls it through the instance
        opt_ns = {"fast": [], "torch.compile": []}
        for _ in range(args.rounds):
            for k in opt_ns:
                run, opt = arms[k]
                forward_backward(run, opt)
                t0 = time.perf_counter_ns()
                opt.step()
                opt_ns[k].append(time.perf_counter_ns() - t0)
    print(f"optimizer.step(): fast {statistics.median(opt_ns['fast']) / 1e3:.1f} us (of which the runtime's "
          f"pre-hook {statistics.median(hook_ns) / 1e3:.1f} us), torch.compile "
          f"{statistics.median(opt_ns['torch.compile']) / 1e3:.1f} us")


if __name__ == "__main__":
    main()
