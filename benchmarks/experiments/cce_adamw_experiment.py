"""What relative CCE does under AdamW, against SGD (issue 17, item 1: "CCE under Adam/AdamW").

Produced: docs/guide/presets.md, section "CCE under Adam and AdamW", its table.

A digits MLP (``DigitsMLP(hidden=48)``, the same init and batches in every arm) trains N steps with CCE
``"relative"`` and with ``cce="off"`` (everything else: the fast preset with ``cdg="off"``, so that no
freezing confounds it; ``cce_skip_adaptive=False``, so that CCE acts), eagerly. Reported per optimizer:
the largest parameter difference between the two runs, the same divided by the largest distance any
parameter moved from its init (how much of the training CCE changed), and the test error of each. The
``constant`` row measures ``E(p)`` once (``efficiency_every`` larger than N): the multiplier
is then constant per parameter, which Adam's ``m / sqrt(v)`` cancels exactly up to ``eps``.

Measured 2026-12-02 (numerics, not timings: the machine's load does not matter), 300 steps:

    optimizer                max |dp|  / max move   err cce   err off
    AdamW lr 1e-3            3.09e-02    9.54e-02     7.50%     7.50%
    AdamW, constant c        3.55e-04    1.10e-03     7.50%     7.50%
    SGD lr 0.1               5.25e-02    7.10e-02    10.00%    10.56%

A constant multiplier is normalised away (0.1% of the movement); what CCE still does under AdamW comes
from the multiplier's *changes* (every ``efficiency_every`` steps): ``m`` (beta1 0.9) follows a new
multiplier within ~10 steps, ``sqrt(v)`` (beta2 0.999) only over ~1000, so for a while the update is
scaled by the ratio of the new multiplier to the old ones. That is a lagged side effect, not CCE's rule
(scale each update by the parameter's efficiency), and it did not change the test error here: the fast
preset turns CCE off under Adam/AdamW (``cce_skip_adaptive``) rather than pay for it.

usage: python benchmarks/experiments/cce_adamw_experiment.py [steps]
"""

import copy
import sys

import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.data import load_digits
from cosmic_fx.models import DigitsMLP

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
torch.manual_seed(0)
torch.set_num_threads(1)
BASE = DigitsMLP(hidden=48)
DATA = load_digits()
g = torch.Generator().manual_seed(1)
BATCHES = [torch.randint(0, len(DATA.y_train), (64,), generator=g) for _ in range(STEPS)]


def train(optim: str, cce: str, every: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    cfg = CosmicConfig.fast(cdg="off", cce=cce, cce_skip_adaptive=False, efficiency_every=every, lower="aot_eager")
    tm = cosmic_fx.transform(copy.deepcopy(BASE), cfg)
    cosmic_fx.attach_hooks(tm)
    init = {n: p.detach().clone() for n, p in tm.named_parameters()}
    opt = (torch.optim.AdamW(tm.parameters(), lr=1e-3) if optim == "adamw"
           else torch.optim.SGD(tm.parameters(), lr=0.1))
    cosmic_fx.watch_optimizer(tm, opt)
    for idx in BATCHES:
        loss = nn.functional.cross_entropy(tm(DATA.x_train[idx]), DATA.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        error = (tm(DATA.x_test).argmax(-1) != DATA.y_test).float().mean().item()
    return init, {n: p.detach().clone() for n, p in tm.named_parameters()}, error


print(f"{STEPS} steps, digits MLP, batch 64; CCE relative vs off")
print(f"{'optimizer':<22} {'max |dp|':>10} {'/ max move':>11} {'err cce':>9} {'err off':>9}")
for optim, every, label in (("adamw", 10, "AdamW lr 1e-3"), ("adamw", 10**9, "AdamW, constant c"),
                            ("sgd", 10, "SGD lr 0.1")):
    init, on, err_on = train(optim, "relative", every)
    _, off, err_off = train(optim, "off", every)
    diff = max((on[n] - off[n]).abs().max().item() for n in on)
    moved = max((off[n] - init[n]).abs().max().item() for n in off)
    print(f"{label:<22} {diff:>10.2e} {diff / moved:>11.2e} {err_on:>9.2%} {err_off:>9.2%}")
