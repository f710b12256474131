"""Which settle signal should prefix CDG read? Fine-tuning a pretrained character transformer.

Produced: docs/guide/presets.md, section "The fast preset: prefix freezing", the table "Which signal"
(no CDG / prefix `grad` / prefix `efficiency`).

Model: ``cosmic_fx.models.TinyTransformerLM(97, dim=64, heads=4, layers=6, context=64)`` pretrained on
Python standard-library code (AdamW lr 2e-3, batch 32, 2000 steps; ``PRETRAINED``), fine-tuned on
``pydoc_data/topics.py`` (documentation prose: another kind of text), first 90% train, 128 windows of
the last 10% for validation; AdamW lr 1e-3, batch 32, ``STEPS`` steps, eager, one thread.

Arms (every other mechanism off, so only CDG differs): no CDG; prefix CDG reading the gradient norm
(``cdg_prefix_signal="grad"``) and reading the efficiency (``"efficiency"``), window 100, threshold
0.02. Reports the final validation bits per character, the freeze events and the training thread time.

usage: python benchmarks/experiments/prefix_signal_experiment.py PRETRAINED ARM [STEPS] [SEED]
    ARM: off | grad | efficiency
"""

from __future__ import annotations

import math
import os
import sys
import sysconfig
import time

import torch
from torch import nn

import cosmic_fx
from cosmic_fx.models import TinyTransformerLM

torch.set_num_threads(1)
CTX, BATCH = 64, 32
PRINTABLE = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
TABLE = {c: i + 1 for i, c in enumerate(PRINTABLE)}


def encode(text: str) -> torch.Tensor:
    return torch.tensor([TABLE.get(c, 0) for c in text], dtype=torch.long)


def main(pretrained: str, arm: str, steps: int = 1500, seed: int = 0) -> None:
    text = open(os.path.join(sysconfig.get_paths()["stdlib"], "pydoc_data", "topics.py"), encoding="utf-8").read()
    tokens = encode(text)
    train, held = tokens[: int(0.9 * len(tokens))], tokens[int(0.9 * len(tokens)):]
    starts = torch.linspace(0, len(held) - CTX - 2, 128).long()
    vx = torch.stack([held[s:s + CTX] for s in starts])
    vy = torch.stack([held[s + 1:s + CTX + 1] for s in starts])
    torch.manual_seed(1234)
    model = TinyTransformerLM(97, dim=64, heads=4, layers=6, context=CTX)
    model.load_state_dict(torch.load(pretrained, weights_only=True))
    cfg = cosmic_fx.CosmicConfig.off(lower="eager") if arm == "off" else \
        cosmic_fx.CosmicConfig.off(cdg="prefix", cdg_prefix_signal=arm, lower="eager")
    tm = cosmic_fx.transform(model, cfg)
    rt = cosmic_fx.attach_hooks(tm) if arm != "off" else None
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)

    def loss_of(x, y):
        return nn.functional.cross_entropy(tm(x).reshape(-1, 97), y.reshape(-1))

    spent = 0.0
    for step in range(1, steps + 1):
        s = torch.randint(0, len(train) - CTX - 1, (BATCH,), generator=gen)
        idx = s[:, None] + torch.arange(CTX)
        t0 = time.thread_time()
        loss = loss_of(train[idx], train[idx + 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        spent += time.thread_time() - t0
    tm.eval()
    with torch.no_grad():
        bpc = loss_of(vx, vy).item() / math.log(2)
    events = [(s, len(names)) for s, names in rt.freeze_events] if rt is not None else []
    blocks = [name for name, _ in rt.prefix_units] if rt is not None else []
    print(f"arm={arm} seed={seed} steps={steps} val_bpc={bpc:.4f} train_thread_s={spent:.1f} "
          f"events(step, frozen tensors)={events} frozen_blocks={rt.prefix.length if rt else 0}/{len(blocks)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
