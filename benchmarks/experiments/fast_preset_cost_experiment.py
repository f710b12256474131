"""What the fast preset costs before any block freezes, against torch.compile (Inductor both).

Produced: docs/guide/presets.md, section "The fast preset: prefix freezing", the paragraph "Before any
block freezes, the fast preset costs what its QCIs cost" (41.8 / 61.6 MiB, 148 / 197 / 154 ms), and the
`fast(qci=False)` figures in docs/claims/fast_first_run.md.

TinyTransformerLM(97, dim=64, heads=4, layers=6, context=64), batch 32, AdamW, one thread: the peak
step memory (CPU allocator, profiler) and the median step thread time of 11 steps after warm-up.
usage: python benchmarks/experiments/fast_preset_cost_experiment.py "torch.compile" | fast | "fast qci off"
"""

import sys
import time

import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.bench.perf_prefix import peak_step_mib
from cosmic_fx.models import TinyTransformerLM

torch.set_num_threads(1)
name = sys.argv[1]
torch.manual_seed(0)
m = TinyTransformerLM(97, dim=64, heads=4, layers=6, context=64)
if name == "torch.compile":
    tm = m
    run = torch.compile(m)
else:
    # the fast preset as it was when this ran (README): a QCI on every site; the CDG fields never act
    # within this run's steps. CosmicConfig.fast() has since left QCIs off sites narrower than 512, and
    # since 2026-12-04 off altogether (qci=False): qci=True puts back the form this run measured.
    first = dict(qci=True, qci_min_width=0, cdg_prefix_window=100, cdg_prefix_max=0.75)
    cfg = {"fast": CosmicConfig.fast(**first), "fast qci off": CosmicConfig.fast(**{**first, "qci": False})}[name]
    tm = cosmic_fx.transform(m, cfg)
    run = cosmic_fx.compile(tm)
opt = torch.optim.AdamW(tm.parameters(), lr=1e-3)
x = torch.randint(0, 97, (32, 64))
y = torch.randint(0, 97, (32, 64))


def step():
    loss = nn.functional.cross_entropy(run(x).flatten(0, 1), y.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()


step()
step()
peaks = [peak_step_mib(step) for _ in range(3)]
t = []
for _ in range(11):
    t0 = time.thread_time()
    step()
    t.append(time.thread_time() - t0)
print(f"{name:14s} Inductor peak MiB {peaks[-1]:.1f} median step {sorted(t)[5] * 1e3:.0f} ms", flush=True)
