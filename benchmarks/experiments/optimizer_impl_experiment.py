"""Which torch.optim implementation is fastest under torch.compile on this CPU (issue 17, item 5).

Produced: docs/guide/claims.md, section "Peers", its optimizer-implementation table.

The claims peers include "torch.compile with the best plain optimizer setting on this machine".
torch.optim's AdamW and SGD have three implementations on CPU: the per-parameter loop (``foreach`` and
``fused`` unset: torch picks foreach only for CUDA tensors, so the loop is the CPU default),
``foreach=True`` (``torch._foreach_*`` over all parameters) and ``fused=True`` (one C++ kernel per
parameter). This script trains the two fine-tuning/transfer models of ``cosmic-fx bench claims``
(``docs-finetune``'s 6-block LM with AdamW, ``mnist-transfer``'s CNN with SGD momentum 0.9, from
random init: the step cost does not depend on the weights) under ``torch.compile`` with each
implementation, interleaved round by round, and reports the median full training-step time (forward,
backward, ``zero_grad``, ``step``) and the median of the ``optimizer.step()`` call alone.

The arm ``"torch.compile, best optimizer"`` (:mod:`cosmic_fx.bench.peers`) uses the winner for each
optimizer; :data:`cosmic_fx.bench.peers.BEST_IMPL` records it, with this script's command.

usage: python benchmarks/experiments/optimizer_impl_experiment.py [steps] [rounds] [lowering]
       (defaults 40 steps, 3 rounds, inductor)
"""

import statistics
import sys
import time

import torch

from cosmic_fx.bench.tasks import VOCAB, lm_loss
from cosmic_fx.bench.workloads import MnistCNN
from cosmic_fx.models import TinyTransformerLM

IMPLS = {"default (loop)": {}, "foreach=True": {"foreach": True}, "fused=True": {"fused": True}}


def _lm():
    torch.manual_seed(0)
    model = TinyTransformerLM(VOCAB, dim=64, heads=4, layers=6, context=64)
    x = torch.randint(0, VOCAB, (32, 64))
    return model, x, torch.roll(x, -1, 1), lm_loss, lambda p, kw: torch.optim.AdamW(p, lr=1e-3, **kw)


def _cnn():
    torch.manual_seed(0)
    model = MnistCNN()
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 5, (32,))
    return (model, x, y, torch.nn.functional.cross_entropy,
            lambda p, kw: torch.optim.SGD(p, lr=0.01, momentum=0.9, **kw))


def measure(built, impl: dict, steps: int) -> tuple[float, float]:
    """Median step and median ``opt.step()`` seconds of ``steps`` compiled training steps (3 warm-up).
    The compiled module is shared by the implementations (the optimizer step runs outside the graph)."""
    model, compiled, x, y, loss_fn, make_opt = built
    opt = make_opt(model.parameters(), impl)
    full, opt_only = [], []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        loss = loss_fn(compiled(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i >= 3:
            full.append(t2 - t0)
            opt_only.append(t2 - t1)
    return statistics.median(full), statistics.median(opt_only)


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    lower = sys.argv[3] if len(sys.argv) > 3 else "inductor"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {lower}, {steps} steps x {rounds} rounds")
    print(f"{'model / optimizer':34} {'implementation':16} {'step ms':>9} {'opt.step ms':>12}")
    for label, make in (("6-block LM / AdamW", _lm), ("MnistCNN / SGD momentum", _cnn)):
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in IMPLS}
        torch._dynamo.reset()
        model, x, y, loss_fn, make_opt = make()
        built = (model, torch.compile(model, backend=lower), x, y, loss_fn, make_opt)
        for _ in range(rounds):  # interleaved: a load change hits every implementation alike
            for name, impl in IMPLS.items():
                times[name].append(measure(built, impl, steps))
        for name in IMPLS:
            step = statistics.median(t[0] for t in times[name])
            opt = statistics.median(t[1] for t in times[name])
            print(f"{label:34} {name:16} {1e3 * step:9.2f} {1e3 * opt:12.3f}")


if __name__ == "__main__":
    main()
