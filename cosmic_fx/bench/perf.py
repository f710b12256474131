"""``cosmic-fx bench perf``: what the cosmic mechanisms cost, and what CDG/CCE save, as ratios.

Every ratio compares arms measured side by side in one run: arms are interleaved round by round and
each figure is the median of many calls. On CPU the default is one thread, timed with the thread's
CPU clock, so that other processes on a shared machine do not distort the ratios (wall time is used
with ``--threads`` > 1). The targets (issue 5):

1. CSC forward <= 5x ``t.clone()``, forward+backward <= 10x (fast CSC under Inductor, which is what
   the cosmic backend runs); references: the literal formula eager and under Inductor, fast CSC eager.
   The public function called eagerly within 2x of its compiled form (issue 10).
2. QCI forward+backward <= 1.15x ``Linear(dim, dim + 1)`` forward+backward on the same input; every
   QCI form after ``Linear(w, w)`` against ``Linear(w, w)`` alone at widths 256-1024, eager and
   compiled: the cheap forms (low-rank, diagonal) add <= 10% at width >= 512 (issue 10).
3. Backend overhead: all passes/hooks off vs Inductor alone (step <= 1.03x, compile <= 1.2x);
   default preset vs the same rewritten model written by hand and compiled with Inductor (<= 1.1x);
   the pass pipeline's ms per 1,000 nodes for graphs of 100 to 10,000 nodes (grows linearly).
4. CDG: backward time with half of an MLP's Linear weights frozen (``requires_grad=False``) <= 0.75x
   nothing frozen.
4b. CDG as prefix freezing (issue 10): backward time and peak step memory of a character transformer
   with ``k`` of ``n`` blocks frozen (embedding first) against none, eager and compiled (report only).
5. CCE fused into backward (``cce_fused``): peak training-step memory <= 0.8x the same model with
   the same optimizer (SGD with momentum, AdamW) stepping after backward, each arm in a fresh
   process (the parameters plus the peak RSS above the idle RSS during the steps), eager and under
   ``torch.compile`` (the fused arm's backward by compiled autograd, both arms the same lowering);
   and the compiled step time of the two, interleaved (issue 10: <= 1x).

``--quick`` is a smoke test (under a minute): small sizes, few repetitions, and ``aot_eager`` instead
of Inductor for the compiled arms (the QCI forms: eager arms only); its figures are not the targets'
figures.

The interleaved timer is in ``timing.py``; the measurements that need a fresh process (cold compile
time, peak memory) are in ``perf_probes.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
from collections.abc import Callable
from typing import Any

from .common import linear_relu_stack, progress, relu_mlp, write_results
from .perf_modules import bench_csc, bench_qci, bench_qci_forms
from .perf_prefix import bench_prefix
from .perf_probes import compile_times, peak_memory
from .perf_table import COLUMNS, Row
from .timing import Timer, ms, torch_threads

__all__ = ["COLUMNS", "Row", "SECTIONS", "Sizes", "run"]

@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes and repetitions; ``quick()`` is the smoke-test version (< 1 minute)."""

    csc_shapes: tuple[tuple[int, ...], ...] = ((4096, 1024), (64, 128, 768))
    qci: tuple[int, int] = (4096, 256)  # (rows, dim)
    qci_form_rows: int = 1024  # rows of the input of Linear(w, w) [+ QCI] at every width
    qci_form_widths: tuple[int, ...] = (256, 512, 1024)
    qci_forms: tuple[str, ...] = ("dense", "lowrank", "diagonal")
    qci_forms_compiled: bool = True  # quick mode: eager only (four more compilations would double its QCI part)
    mlp: tuple[int, int, int] = (128, 512, 4)  # (batch, width, hidden layers) for the backend rows
    cdg_mlp: tuple[int, int, int] = (256, 1024, 8)  # (batch, width, Linear layers)
    mem_mlp: tuple[int, int, int] = (16, 2048, 8)  # (batch, width, Linear layers): parameters dominate
    fused_kinds: tuple[str, ...] = ("sgd", "adamw")  # compiled fused-CCE arms (eager: SGD only)
    prefix_lm: tuple[int, int, int, int] = (16, 128, 256, 6)  # (batch, context, dim, blocks) of the transformer
    prefix_frozen: tuple[int, ...] = (3, 6)  # blocks frozen in the arms compared with none
    prefix_compiled: bool = True  # quick mode: eager only (its three compilations would double the section)
    compiler: str = "inductor"  # what the compiled arms use (quick mode: aot_eager, seconds less per graph)
    graph_nodes: tuple[int, ...] = (100, 300, 1000, 3000, 10000)
    rounds: int = 5
    reps: int = 6
    compile_reps: int = 3  # fresh processes per compile-time arm
    fresh_process_compile: bool = True

    @property
    def compiled_name(self) -> str:
        return {"inductor": "Inductor"}.get(self.compiler, self.compiler)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            csc_shapes=((8, 32, 192),), qci=(512, 128), qci_form_rows=128, qci_form_widths=(64,),
            qci_forms_compiled=False, mlp=(32, 128, 2), cdg_mlp=(64, 256, 4),
            mem_mlp=(8, 512, 4), fused_kinds=("sgd",), prefix_lm=(4, 32, 64, 2), prefix_frozen=(2,),
            prefix_compiled=False, compiler="aot_eager", graph_nodes=(100, 1000), rounds=2, reps=3, compile_reps=1,
            fresh_process_compile=False,
        )


# ---------------------------------------------------------------------------------------------- 3. backend
def _hand_written(transformed, config):
    """The default rewrite of an MLP written by hand in PyTorch: Linear -> QCI -> ReLU ..., CSC at the
    output. Copies the weights of ``transformed`` (a ``cosmic_fx.transform`` result) so both compute
    the same function."""
    import torch
    from torch import nn

    from ..modules import cosmic_state_compression

    class HandMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            extra = ("cosmic_qci", "cosmic_csc", "cosmic_state")
            seq = [m for name, m in transformed.named_children() if name not in extra]
            self.layers = nn.ModuleList(copy.deepcopy(seq))
            qcis = transformed.get_submodule("cosmic_qci")
            self.qci = nn.ModuleDict({k: copy.deepcopy(v) for k, v in qcis.named_children()})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if str(i) in self.qci:
                    x = self.qci[str(i)](x)
            return cosmic_state_compression(x, config.csc_alpha, -1, config.eps)

    return HandMLP()


def _train_step(model, params, x, y):
    import torch

    def run():
        for p in params:
            p.grad = None
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-0.01)
    return run


def _bench_backend(sizes: Sizes, timer: Timer, threads: int) -> list[Row]:
    import torch
    from torch.testing import assert_close

    import cosmic_fx

    from ..config import CosmicConfig
    from ..runtime import detach_hooks

    batch, width, hidden = sizes.mlp
    torch.manual_seed(0)
    base = relu_mlp(64, width, hidden)
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    compiler, cname = sizes.compiler, sizes.compiled_name
    cfg = CosmicConfig(lower=compiler)
    plain_a, plain_b = copy.deepcopy(base), copy.deepcopy(base)
    transformed = cosmic_fx.transform(copy.deepcopy(base), cfg)
    hand = _hand_written(transformed, cfg)
    with torch.no_grad():
        assert_close(hand(x), transformed(x))  # the same function, written by hand
    models = {
        "alone": (torch.compile(plain_a, backend=compiler), plain_a),
        "cosmic off": (torch.compile(plain_b, backend="cosmic", options={"preset": "off", "lower": compiler}), plain_b),
        "cosmic default": (torch.compile(transformed, backend="cosmic", options={"config": cfg}), transformed),
        "hand-written": (torch.compile(hand, backend=compiler), hand),
    }
    # the default's calibrated CDG first decides at step cdg_interval: stay below it, so that every
    # step of both arms does the same work (freezing would make the cosmic arm cheaper)
    if 2 + timer.rounds * timer.reps >= cfg.cdg_interval:
        raise ValueError(f"perf sizes: {timer.rounds}x{timer.reps} steps per arm must stay below cdg_interval")
    arms = {name: _train_step(m, list(orig.parameters()), x, y) for name, (m, orig) in models.items()}
    t = timer.compare(arms, stat="mean")
    detach_hooks(transformed)
    compile_s = compile_times(sizes.mlp, sizes.compiler, threads, sizes.compile_reps, sizes.fresh_process_compile)
    rows = [
        Row("3 backend", f"step (mean), all passes and hooks off / {cname} alone (MLP {hidden}x{width}, batch {batch})",
            t["cosmic off"] / t["alone"], 1.03,
            f"{cname} alone {ms(t['alone'])}; cosmic off {ms(t['cosmic off'])}"),
        Row("3 backend", f"compile time (first step), all off / {cname} alone"
            + ("" if sizes.fresh_process_compile else " [quick: one process, caches shared]"),
            compile_s["cosmic off"] / compile_s["alone"], 1.2,
            f"{cname} alone {compile_s['alone']:.3g} s; cosmic off {compile_s['cosmic off']:.3g} s"),
        Row("3 backend", f"step (mean over {timer.rounds * timer.reps} steps), default preset / the same rewritten "
            f"model by hand + {cname}",
            t["cosmic default"] / t["hand-written"], 1.1,
            f"hand-written + {cname} {ms(t['hand-written'])}; cosmic default {ms(t['cosmic default'])}"),
    ]
    return rows + _bench_pipeline(sizes.graph_nodes, timer.clock)


def _chain(nodes: int):
    """An MLP whose transformed graph has about ``nodes`` nodes (3 per layer: Linear, QCI, ReLU)."""
    return linear_relu_stack(16, max(1, (nodes - 3) // 3))


def _bench_pipeline(graph_nodes: tuple[int, ...], clock: Callable[[], int]) -> list[Row]:
    import torch

    import cosmic_fx

    from ..backend import cosmic_backend
    from ..config import CosmicConfig

    cfg = CosmicConfig(lower="eager")
    per_k: dict[int, float] = {}
    rows = []
    for target in graph_nodes:
        model = _chain(target)
        x = torch.randn(2, 16)
        runs = []
        for _ in range(3):
            t0 = clock()
            tm = cosmic_fx.transform(model, cfg)  # symbolic_trace + InsertQCI + InsertCSC
            gm = cosmic_fx.transform_info(tm).graph_module  # the rewritten graph tm runs
            cosmic_backend(gm, [x], options=cfg)  # the backend's own passes on the rewritten graph
            runs.append((clock() - t0) / 1e9)
        n = len(gm.graph.nodes)
        per_k[n] = statistics.median(runs) * 1e3 / (n / 1000)
        rows.append(Row("3 pipeline", f"pass pipeline (transform + backend passes), {n} nodes",
                        per_k[n], None, f"total {statistics.median(runs) * 1e3:.3g} ms", unit=" ms/1k nodes"))
    sizes = sorted(per_k)
    growth = per_k[sizes[-1]] / per_k[sizes[0]] if len(sizes) > 1 else 1.0
    rows.append(Row("3 pipeline", f"linear growth: ms/1k nodes at {sizes[-1]} / at {sizes[0]} nodes", growth, 1.5,
                    "1.0 = exactly linear"))
    return rows


# ---------------------------------------------------------------------------------------------- 4. CDG
def _bench_cdg(sizes: Sizes, timer: Timer) -> list[Row]:
    import torch
    from torch import nn

    batch, width, layers = sizes.cdg_mlp
    torch.manual_seed(0)
    model = linear_relu_stack(width, layers)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    x = torch.randn(batch, width)
    clock = timer.clock

    half = len(linears) // 2

    def backward_only(run, frozen: str):
        def arm():
            for i, lin in enumerate(linears):
                # "alternate": every other Linear weight frozen, every bias still trains (only the
                # weight-gradient GEMMs can go); "first half": the first half of the layers, weights
                # and biases (FreezeOut-style: their backward goes entirely)
                lin.weight.requires_grad_(not (frozen == "alternate" and i % 2 == 0 or frozen == "first" and i < half))
                lin.bias.requires_grad_(not (frozen == "first" and i < half))
            model.zero_grad(set_to_none=True)
            loss = run(x).pow(2).mean()
            t0 = clock()
            loss.backward()
            return clock() - t0
        return arm

    cname = sizes.compiled_name
    compiled = torch.compile(model, backend=sizes.compiler)
    arms = {}
    for mode, run in (("eager", model), (cname, compiled)):
        for frozen in ("none", "alternate", "first"):
            arms[f"{frozen} {mode}"] = backward_only(run, frozen)
    t = timer.compare(arms)
    for p in model.parameters():
        p.requires_grad_(True)
    what = {"alternate": "every other Linear weight frozen (biases train)",
            "first": f"the first {half} Linear layers frozen (weights and biases)"}
    return [
        Row("4 CDG", f"backward, {what[frozen]} / nothing frozen ({layers}x Linear({width}, {width}), "
            f"batch {batch}), {mode}", t[f"{frozen} {mode}"] / t[f"none {mode}"], 0.75,
            f"nothing frozen {ms(t[f'none {mode}'])}; frozen {ms(t[f'{frozen} {mode}'])}")
        for frozen in ("alternate", "first") for mode in ("eager", cname)
    ]


# ---------------------------------------------------------------------------------------------- 5. CCE fused
def _fused_label(kind: str) -> str:
    return {"sgd": "SGD momentum 0.9", "adamw": "AdamW"}[kind]


def _bench_memory(sizes: Sizes, timer: Timer) -> list[Row]:
    """Fused CCE (the update inside backward) against the same update by ``torch.optim`` after
    backward: peak step memory (fresh processes) and, compiled, step time (interleaved here)."""
    import torch

    from .perf_probes import fused_training_step

    batch, width, layers = sizes.mem_mlp
    cname = sizes.compiled_name
    cases = ((None, "sgd"), *((sizes.compiler, kind) for kind in sizes.fused_kinds))
    what = f"({layers}x Linear({width}, {width}), batch {batch})"
    rows = []
    if not os.path.exists("/proc/self/clear_refs"):
        rows += [Row("5 CCE fused", f"peak step memory, fused / separate {_fused_label(kind)} step, "
                     f"{'eager' if lower is None else cname} (needs Linux /proc)", float("nan"), 0.8,
                     "not measured on this platform") for lower, kind in cases]
    else:
        out = peak_memory(sizes.mem_mlp, cases)
        for lower, kind in cases:
            sep, fused = out[("separate", lower, kind)], out[("fused", lower, kind)]
            mode = "eager" if lower is None else f"torch.compile, {cname}, backward by compiled autograd"
            rows.append(Row(
                "5 CCE fused", f"peak training-step memory, {_fused_label(kind)} inside backward / after backward "
                f"{what}, {mode}", fused["peak_mib"] / sep["peak_mib"], 0.8,
                f"separate {sep['peak_mib']:.4g} MiB; fused {fused['peak_mib']:.4g} MiB; parameters "
                f"{sep['params_mib']:.4g} MiB",
            ))
    torch.manual_seed(0)
    base = linear_relu_stack(width, layers)
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    arms, hooks = {}, []
    for lower, kind in cases:
        if lower is None:
            continue
        for arm in ("separate", "fused"):
            step, h = fused_training_step(arm, kind, copy.deepcopy(base), lower)
            hooks.append(h)
            arms[(arm, kind)] = (lambda step=step: step(x, y))
    t = timer.compare(arms, stat="mean")  # mean: the steps that measure E(p) count
    for h in hooks:
        h.remove()
    for kind in sorted({k for _, k in arms}, key=["sgd", "adamw"].index):
        sep, fused = t[("separate", kind)], t[("fused", kind)]
        rows.append(Row("5 CCE fused", f"training step (mean), {_fused_label(kind)} inside backward / after backward "
                        f"{what}, torch.compile, {cname}", fused / sep, 1.0,
                        f"separate {ms(sep)}; fused {ms(fused)}"))
    return rows


# ---------------------------------------------------------------------------------------------- run
SECTIONS = ("csc", "qci", "backend", "cdg", "prefix", "memory")


def run(quick: bool = False, threads: int = 1, sections: tuple[str, ...] = SECTIONS, out_dir: str | None = None,
        show_progress: bool = True) -> dict[str, Any]:
    """Measure every target; returns ``{"rows": [...], "markdown": str, ...}``."""
    import torch
    from tabulate import tabulate

    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown perf section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    sizes = Sizes.quick() if quick else Sizes()
    total = sizes.rounds * (len(sizes.csc_shapes) * ("csc" in sections)
                            + (1 + len(sizes.qci_form_widths)) * ("qci" in sections)
                            + ("backend" in sections) + ("cdg" in sections) + ("prefix" in sections)
                            + ("memory" in sections))
    rows: list[Row] = []
    with progress(total, "bench perf", show_progress) as bar, torch_threads(threads):
        timer = Timer(threads, sizes.rounds, sizes.reps, tick=bar.update)
        if "csc" in sections:
            for shape in sizes.csc_shapes:
                rows += bench_csc(shape, timer, sizes.compiler, sizes.compiled_name)
        if "qci" in sections:
            rows += bench_qci(sizes.qci, timer, sizes.compiler, sizes.compiled_name)
            rows += bench_qci_forms(sizes.qci_form_rows, sizes.qci_form_widths, sizes.qci_forms, timer,
                                    sizes.compiler if sizes.qci_forms_compiled else None, sizes.compiled_name)
        if "backend" in sections:
            rows += _bench_backend(sizes, timer, threads)
        if "cdg" in sections:
            rows += _bench_cdg(sizes, timer)
        if "prefix" in sections:
            rows += bench_prefix(sizes.prefix_lm, sizes.prefix_frozen, timer,
                                 sizes.compiler if sizes.prefix_compiled else None, sizes.compiled_name)
        if "memory" in sections:
            rows += _bench_memory(sizes, timer)
    markdown = tabulate([r.cells() for r in rows], headers=COLUMNS, tablefmt="github")
    clock = "thread CPU time" if threads == 1 else "wall time"
    header = (f"torch {torch.__version__}, {threads} thread(s), {clock}, median of "
              f"{sizes.rounds}x{sizes.reps} interleaved calls per arm, compiled arms: {sizes.compiled_name}"
              + (" (quick: small sizes, aot_eager instead of Inductor; not the targets' figures)" if quick else ""))
    payload = {"header": header, "rows": [dataclasses.asdict(r) | {"status": r.status} for r in rows]}
    write_results(out_dir, "perf", header + "\n\n" + markdown, payload)
    return {"rows": rows, "markdown": markdown, "header": header}
