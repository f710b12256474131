"""The fast preset's QCI form and CSC placement on digits: test error after 40 and 400 steps.

Produced: docs/guide/presets.md, section "The fast preset: prefix freezing", the table "Test error on
digits" (after 40 and after 400 steps).

DigitsMLP (64-128-64-10), SGD lr 0.05 momentum 0.9, batch 32, eager with the cosmic hooks, seeds 0-2;
prints each arm's test error per seed and the mean.
usage: python benchmarks/experiments/fast_preset_forms_experiment.py
"""

import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.data import load_digits
from cosmic_fx.models import DigitsMLP

torch.set_num_threads(1)
d = load_digits()


def run(cfg, seed, steps):
    torch.manual_seed(seed)
    m = DigitsMLP()
    tm = cosmic_fx.transform(m, cfg) if cfg else m
    if cfg:
        cosmic_fx.attach_hooks(tm)
    opt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(d.y_train), (32,), generator=g)
        loss = nn.functional.cross_entropy(tm(d.x_train[idx]), d.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tm.eval()
    with torch.no_grad():
        return 100 * (tm(d.x_test).argmax(-1) != d.y_test).float().mean().item()


# the fast preset as it was when this ran (README's table): a QCI on every site, a 100-step window,
# three quarters of the blocks; CosmicConfig.fast() has since changed these three, and turned the QCI
# off (qci=False, 2026-12-04): qci=True keeps the QCI this run measured
FIRST = dict(qci=True, qci_min_width=0, cdg_prefix_window=100, cdg_prefix_max=0.75, lower="eager")
arms = {
    "plain PyTorch": None,
    "default preset": CosmicConfig(lower="eager"),
    "fast": CosmicConfig.fast(**FIRST),
    "fast, CSC on the output": CosmicConfig.fast(csc="output", **FIRST),
    "fast, CSC output, dense QCI": CosmicConfig.fast(csc="output", qci_form="dense", **FIRST),
    "fast, CSC output, low-rank QCI": CosmicConfig.fast(csc="output", qci_form="lowrank", **FIRST),
    "fast, CSC output, no CCE": CosmicConfig.fast(csc="output", cce="off", **FIRST),
}
for steps in (40, 400):
    for name, cfg in arms.items():
        errs = [run(cfg, s, steps) for s in (0, 1, 2)]
        print(steps, f"{name:32s}", " ".join(f"{e:5.1f}" for e in errs), f"mean {sum(errs) / 3:.1f}", flush=True)
