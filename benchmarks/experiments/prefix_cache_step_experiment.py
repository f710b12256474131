"""A training step with the frozen-prefix cache against the same step without it (issue 17, item 3).

Produced: docs/guide/presets.md, section "Caching the frozen prefix", the step ratio (0.67x) quoted there.

An MLP of 8 Linear(512, 512) + ReLU blocks and a Linear(512, 10) head, batch 64, SGD, one thread, eager.
Prefix CDG (a 2-step window, a threshold nothing misses, cdg_prefix_max=0.75) freezes 6 of the 8 blocks;
after the cache is full (every sample a hit) the two steps run interleaved from the same state, 30 each,
and the medians are compared. Without the cache the frozen blocks still run their forward (their
backward is already skipped); with it they run nothing. Expected from the step's parts (forward ~1/3,
backward ~2/3 of a step, 3 of 9 layers trained): about (3 + 2 * 3) / (9 + 2 * 3) = 0.6.

Measured once, 2026-12-02, on the shared 2-core machine while other jobs ran (timings noisy):
median 11.5 ms with the cache, 17.3 ms without, ratio 0.67.
usage: python benchmarks/experiments/prefix_cache_step_experiment.py
"""

import time

import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig

torch.manual_seed(0)
torch.set_num_threads(1)
layers: list[nn.Module] = []
for _ in range(8):
    layers += [nn.Linear(512, 512), nn.ReLU()]
model = nn.Sequential(*layers, nn.Linear(512, 10))
cfg = CosmicConfig.off(cdg="prefix", cdg_prefix_window=2, cdg_prefix_threshold=100.0, cdg_prefix_max=0.75)
tm = cosmic_fx.transform(model, cfg)
rt = cosmic_fx.attach_hooks(tm)
opt = torch.optim.SGD(tm.parameters(), lr=1e-3)
cache = cosmic_fx.PrefixCache(tm)
data = [(torch.randn(64, 512), torch.randint(0, 10, (64,))) for _ in range(4)]


def step(use: bool, x: torch.Tensor, y: torch.Tensor, b: int) -> None:
    out = cache(x, keys=[(b, j) for j in range(64)]) if use else tm(x)
    nn.functional.cross_entropy(out, y).backward()
    opt.step()
    opt.zero_grad()


for _ in range(6):
    for b, (x, y) in enumerate(data):
        step(True, x, y, b)
print("frozen blocks:", rt.prefix.length, "of", len(rt.prefix.units), cache)
times: dict[bool, list[float]] = {True: [], False: []}
for r in range(30):
    for use in (True, False):
        x, y = data[r % 4]
        start = time.perf_counter()
        step(use, x, y, r % 4)
        times[use].append(time.perf_counter() - start)
med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
print(
    f"median step with cache {med[True] * 1e3:.2f} ms, without {med[False] * 1e3:.2f} ms, "
    f"ratio {med[True] / med[False]:.2f}"
)
