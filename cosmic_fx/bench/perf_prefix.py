"""``cosmic-fx bench perf`` section ``prefix``: what prefix CDG saves once ``k`` of ``n`` blocks froze.

A character-level transformer (:class:`~cosmic_fx.models.TinyTransformerLM`) is transformed with
``cdg="prefix"`` alone (no QCI, no CSC, no CCE, so only the freezing differs between arms), and its
runtime freezes the first ``k`` blocks through :meth:`~cosmic_fx.runtime.CosmicRuntime.freeze_prefix`
(the same code path as a decision). Each arm is its own copy of the model with the same weights and
batch: nothing frozen, and each ``k`` of ``Sizes.prefix_frozen`` (the final norm and head always
train). Rows: backward time (interleaved, median) and the peak of the CPU allocator during one
training step (forward + backward; the profiler's raw allocation events), eager and compiled.
"""

from __future__ import annotations

import copy

from .perf_table import Row
from .timing import Timer, ms

__all__ = ["bench_prefix", "peak_step_mib"]


def peak_step_mib(step) -> float:
    """Peak of the CPU allocator's running total during one call of ``step()``, in MiB above its start.

    Reads the profiler's raw ``[memory]`` events (every allocation and free with its own timestamp),
    so frees inside an enclosing op are ordered correctly.
    """
    from torch.profiler import ProfilerActivity, profile

    from ..scoped import quiet_native_stderr

    with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak / 2**20


def bench_prefix(lm: tuple[int, int, int, int], frozen: tuple[int, ...], timer: Timer, compiler: str | None,
                 compiled_name: str) -> list[Row]:
    """Backward time and peak step memory with ``k`` of ``n`` blocks frozen against none.

    Args:
        lm: ``(batch, context, dim, layers)`` of the transformer.
        frozen: the ``k`` of each arm compared with nothing frozen.
        timer: the interleaving timer.
        compiler: the lowering of the compiled arms (``"inductor"``, ``"aot_eager"``; ``None``: eager
            arms only).
        compiled_name: its name in the table.
    """
    import torch

    import cosmic_fx

    from ..config import CosmicConfig
    from ..models import TinyTransformerLM

    batch, context, dim, layers = lm
    vocab = 97
    torch.manual_seed(0)
    base = TinyTransformerLM(vocab, dim=dim, heads=4, layers=layers, context=context)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, context), generator=g)
    y = torch.randint(0, vocab, (batch, context), generator=g)
    frozen_counts = sorted({0, *frozen})
    clock = timer.clock

    def loss_of(run):
        return torch.nn.functional.cross_entropy(run(x).flatten(0, 1), y.flatten())

    modes = ("eager", compiled_name) if compiler is not None else ("eager",)
    arms, steps, units = {}, {}, 0
    for mode in modes:
        for k in frozen_counts:
            cfg = CosmicConfig(qci=False, csc="none", cdg="prefix", cce="off", lower=compiler or "inductor")
            tm = cosmic_fx.transform(copy.deepcopy(base), cfg)
            rt = cosmic_fx.runtime_of(tm)
            units = len(rt.prefix_units)
            rt.freeze_prefix(min(k, units))
            if mode == "eager":
                cosmic_fx.attach_hooks(tm)
                run = tm
            else:
                run = cosmic_fx.compile(tm)

            def backward(run=run, tm=tm):
                tm.zero_grad(set_to_none=True)
                loss = loss_of(run)
                t0 = clock()
                loss.backward()
                return clock() - t0

            def step(run=run, tm=tm):
                tm.zero_grad(set_to_none=True)
                loss_of(run).backward()

            backward()  # compile, and the first-call allocations, outside the timing
            arms[f"{k} {mode}"], steps[f"{k} {mode}"] = backward, step
    t = timer.compare(arms)
    peak = {name: peak_step_mib(step) for name, step in steps.items()}
    shape = f"TinyTransformerLM {layers}x{dim}, context {context}, batch {batch}"
    rows = []
    for mode in modes:
        none = f"0 {mode}"
        for k in frozen_counts[1:]:
            arm = f"{k} {mode}"
            what = f"{min(k, units)} of {units} blocks frozen (embedding first) / none ({shape}), {mode}"
            rows.append(Row("4 CDG prefix", f"backward, {what}", t[arm] / t[none], None,
                            f"none {ms(t[none])}; frozen {ms(t[arm])}"))
            rows.append(Row("4 CDG prefix", f"peak step memory, {what}", peak[arm] / peak[none], None,
                            f"none {peak[none]:.4g} MiB; frozen {peak[arm]:.4g} MiB (allocator peak above the "
                            "step's start)"))
    return rows
