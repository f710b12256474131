"""``cosmic-fx bench perf``: what the cosmic mechanisms cost, and what CDG/CCE save, as ratios.

Every ratio compares arms measured side by side in one run: arms are interleaved round by round and
each figure is the median of many calls. On CPU the default is one thread, timed with the thread's
CPU clock, so that other processes on a shared machine do not distort the ratios (wall time is used
with ``--threads`` > 1). The targets (issue 5):

1. CSC forward <= 5x ``t.clone()``, forward+backward <= 10x (fast CSC under Inductor, which is what
   the cosmic backend runs); references: the literal formula eager and under Inductor, fast CSC eager.
2. QCI forward+backward <= 1.15x ``Linear(dim, dim + 1)`` forward+backward on the same input.
3. Backend overhead: all passes/hooks off vs Inductor alone (step <= 1.03x, compile <= 1.2x);
   default preset vs the same rewritten model written by hand and compiled with Inductor (<= 1.1x);
   the pass pipeline's ms per 1,000 nodes for graphs of 100 to 10,000 nodes (grows linearly).
4. CDG: backward time with half of an MLP's Linear weights frozen (``requires_grad=False``) <= 0.75x
   nothing frozen.
5. CCE fused into backward (``cce_fused_lr``): peak training-step memory <= 0.8x the same model with
   a separate optimizer step, each arm in a fresh process (the parameters plus the peak RSS above
   the idle RSS during the steps), eager and under ``torch.compile``.

``--quick`` is a smoke test (under a minute): small sizes, few repetitions, and ``aot_eager`` instead
of Inductor for the compiled arms; its figures are not the targets' figures.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Row", "Sizes", "register_cli", "run"]

COLUMNS = ["#", "target", "measured", "goal", "status", "reference arms"]


@dataclasses.dataclass
class Row:
    """One line of the table: ``measured`` passes when it is at most ``goal`` (``None``: report only)."""

    item: str
    target: str
    measured: float
    goal: float | None
    references: str = ""
    unit: str = "x"

    @property
    def status(self) -> str:
        if self.goal is None:
            return "info"
        if not math.isfinite(self.measured):
            return "error"
        return "pass" if self.measured <= self.goal else "short"

    def cells(self) -> list[str]:
        goal = "—" if self.goal is None else f"≤ {self.goal:g}{self.unit}"
        return [self.item, self.target, f"{self.measured:.3g}{self.unit}", goal, self.status, self.references]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes and repetitions; ``quick()`` is the smoke-test version (< 1 minute)."""

    csc_shapes: tuple[tuple[int, ...], ...] = ((4096, 1024), (64, 128, 768))
    qci: tuple[int, int] = (4096, 256)  # (rows, dim)
    mlp: tuple[int, int, int] = (128, 512, 4)  # (batch, width, hidden layers) for the backend rows
    cdg_mlp: tuple[int, int, int] = (256, 1024, 8)  # (batch, width, Linear layers)
    mem_mlp: tuple[int, int, int] = (16, 2048, 8)  # (batch, width, Linear layers): parameters dominate
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
            csc_shapes=((8, 32, 192),), qci=(512, 128), mlp=(32, 128, 2), cdg_mlp=(64, 256, 4),
            mem_mlp=(8, 512, 4), compiler="aot_eager", graph_nodes=(100, 1000), rounds=2, reps=3, compile_reps=1,
            fresh_process_compile=False,
        )


# ---------------------------------------------------------------------------------------------- timing
@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Timer:
    """Interleaved, median-of-many timing. An arm's call is timed, unless it returns an ``int``: the
    nanoseconds it measured itself (e.g. the backward only)."""

    def __init__(self, threads: int, rounds: int, reps: int, tick: Callable[[], None] = lambda: None) -> None:
        self.clock = time.thread_time_ns if threads == 1 else time.perf_counter_ns
        self.rounds, self.reps, self.tick = rounds, reps, tick

    def compare(self, arms: dict[str, Callable[[], Any]], warmup: int = 2, stat: str = "median") -> dict[str, float]:
        """Seconds per call of each arm: the median, or the mean where some calls do periodic extra
        work that a median would hide (the hooks measure E(p) every ``efficiency_every`` steps)."""
        for fn in arms.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {k: [] for k in arms}
        with _no_gc():
            for _ in range(self.rounds):
                for name, fn in arms.items():
                    for _ in range(self.reps):
                        t0 = self.clock()
                        own = fn()
                        samples[name].append(own if isinstance(own, int) else self.clock() - t0)
                self.tick()
        reduce = statistics.median if stat == "median" else statistics.fmean
        return {k: reduce(v) / 1e9 for k, v in samples.items()}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


# ---------------------------------------------------------------------------------------------- 1. CSC
def literal_csc(t, alpha: float = 0.5, dim: int = -1, eps: float = 1e-8):
    """The source text's formula, verbatim (the reference arms)."""
    import torch

    s = -(t.softmax(dim) * t.log_softmax(dim))
    return t * torch.sigmoid(t.abs() / (s + eps) - alpha)


def _bench_csc(shape: tuple[int, ...], timer: _Timer, compiler: str, cname: str) -> list[Row]:
    import torch

    from ..modules import cosmic_state_compression

    torch.manual_seed(0)
    x = torch.randn(shape)
    xg = x.clone().requires_grad_()
    g = torch.randn(shape)
    impls = {
        "literal eager": literal_csc,
        f"literal {cname}": torch.compile(literal_csc, backend=compiler, dynamic=False),
        "fast eager": cosmic_state_compression,
        f"fast {cname}": torch.compile(cosmic_state_compression, backend=compiler, dynamic=False),
    }

    def fwd(f):
        return lambda: f(x)

    def fwd_bwd(f):
        def run():
            xg.grad = None
            f(xg).backward(g)
        return run

    arms: dict[str, Callable[[], Any]] = {"clone": lambda: x.clone()}
    for name, f in impls.items():
        arms[f"{name} fwd"] = fwd(f)
        arms[f"{name} fwd+bwd"] = fwd_bwd(f)
    t = timer.compare(arms)
    clone = t["clone"]
    label = "x".join(map(str, shape))
    rows = []
    for kind, goal in (("fwd", 5.0), ("fwd+bwd", 10.0)):
        refs = "; ".join(
            [f"clone {_ms(clone)}"]
            + [f"{n} {t[f'{n} {kind}'] / clone:.3g}x" for n in ("literal eager", f"literal {cname}", "fast eager")]
            + [f"fast {cname} {_ms(t[f'fast {cname} {kind}'])}"]
        )
        rows.append(Row("1 CSC", f"CSC {kind} ({label}) / clone, fast CSC under {cname}",
                        t[f"fast {cname} {kind}"] / clone, goal, refs))
    return rows


# ---------------------------------------------------------------------------------------------- 2. QCI
def _bench_qci(rows_dim: tuple[int, int], timer: _Timer, compiler: str, cname: str) -> list[Row]:
    import torch
    from torch import nn

    from ..modules import QuantumClassicalInterface

    n, d = rows_dim
    torch.manual_seed(0)
    qci = QuantumClassicalInterface(d, init="seed")
    lin = nn.Linear(d, d + 1)
    x = torch.randn(n, d, requires_grad=True)
    g, g1 = torch.randn(n, d), torch.randn(n, d + 1)

    def step(module, grad):
        def run():
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(grad)
        return run

    arms = {
        "Linear eager": step(lin, g1),
        "QCI eager": step(qci, g),
        f"Linear {cname}": step(torch.compile(lin, backend=compiler, dynamic=False), g1),
        f"QCI {cname}": step(torch.compile(qci, backend=compiler, dynamic=False), g),
    }
    t = timer.compare(arms)
    rows = []
    for mode in (cname, "eager"):
        rows.append(Row(
            "2 QCI", f"QCI fwd+bwd / Linear({d}, {d + 1}) fwd+bwd, {mode}, input {n}x{d}",
            t[f"QCI {mode}"] / t[f"Linear {mode}"], 1.15,
            f"plain Linear {mode} {_ms(t[f'Linear {mode}'])}; QCI {mode} {_ms(t[f'QCI {mode}'])}",
        ))
    return rows


# ---------------------------------------------------------------------------------------------- 3. backend
def _mlp(in_dim: int, width: int, hidden: int, out_dim: int = 10):
    from torch import nn

    layers: list[nn.Module] = []
    dims = [in_dim] + [width] * hidden
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


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
            seq = [m for name, m in transformed.named_children() if name not in ("cosmic_qci", "cosmic_csc")]
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


def _bench_backend(sizes: Sizes, timer: _Timer, threads: int) -> list[Row]:
    import torch
    from torch.testing import assert_close

    import cosmic_fx

    from ..config import CosmicConfig
    from ..hooks import detach_hooks

    batch, width, hidden = sizes.mlp
    torch.manual_seed(0)
    base = _mlp(64, width, hidden)
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
    compile_s = _compile_times(sizes, threads)
    rows = [
        Row("3 backend", f"step (mean), all passes and hooks off / {cname} alone (MLP {hidden}x{width}, batch {batch})",
            t["cosmic off"] / t["alone"], 1.03,
            f"{cname} alone {_ms(t['alone'])}; cosmic off {_ms(t['cosmic off'])}"),
        Row("3 backend", f"compile time (first step), all off / {cname} alone"
            + ("" if sizes.fresh_process_compile else " [quick: one process, caches shared]"),
            compile_s["cosmic off"] / compile_s["alone"], 1.2,
            f"{cname} alone {compile_s['alone']:.3g} s; cosmic off {compile_s['cosmic off']:.3g} s"),
        Row("3 backend", f"step (mean over {timer.rounds * timer.reps} steps), default preset / the same rewritten "
            f"model by hand + {cname}",
            t["cosmic default"] / t["hand-written"], 1.1,
            f"hand-written + {cname} {_ms(t['hand-written'])}; cosmic default {_ms(t['cosmic default'])}"),
    ]
    return rows + _bench_pipeline(sizes.graph_nodes, timer.clock)


_COMPILE_PROBE = """
import json, torch
torch.set_num_threads({threads})
from cosmic_fx.bench.perf import _first_step_seconds
print(json.dumps(_first_step_seconds({arm!r}, {mlp!r}, {compiler!r})))
"""


def _first_step_seconds(arm: str, mlp: tuple[int, int, int], compiler: str) -> float:
    """Wall time of the first training step (dynamo, the backend, the compiler's fwd and bwd)."""
    import torch

    batch, width, hidden = mlp
    torch.manual_seed(0)
    model = _mlp(64, width, hidden)
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    if arm == "cosmic off":
        compiled = torch.compile(model, backend="cosmic", options={"preset": "off", "lower": compiler})
    else:
        compiled = torch.compile(model, backend=compiler)
    t0 = time.perf_counter()
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    return time.perf_counter() - t0


def _compile_times(sizes: Sizes, threads: int) -> dict[str, float]:
    arms = ("cosmic off", "alone")
    if not sizes.fresh_process_compile:
        import torch

        # quick mode: one process, graph caches off; the second arm still reuses compiled kernels
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            return {arm: _first_step_seconds(arm, sizes.mlp, sizes.compiler) for arm in arms}
    samples: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(sizes.compile_reps):
        for arm in arms:
            with tempfile.TemporaryDirectory(prefix="cosmic_perf_") as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}  # cold caches, every time
                code = _COMPILE_PROBE.format(threads=threads, arm=arm, mlp=sizes.mlp, compiler=sizes.compiler)
                out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"compile-time probe ({arm}) failed:\n{out.stderr[-2000:]}")
            samples[arm].append(float(out.stdout.strip().splitlines()[-1]))
    return {arm: statistics.median(v) for arm, v in samples.items()}


def _chain(nodes: int):
    """An MLP whose transformed graph has about ``nodes`` nodes (3 per layer: Linear, QCI, ReLU)."""
    from torch import nn

    layers = max(1, (nodes - 3) // 3)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(16, 16), nn.ReLU())])


def _bench_pipeline(graph_nodes: tuple[int, ...], clock: Callable[[], int]) -> list[Row]:
    import torch

    import cosmic_fx

    from ..backend import backend_records, cosmic_backend
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
            gm = cosmic_fx.transform(model, cfg)  # symbolic_trace + InsertQCI + InsertCSC
            cosmic_backend(gm, [x], options=cfg)  # the backend's own passes on the rewritten graph
            runs.append((clock() - t0) / 1e9)
        backend_records(clear=True)
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
def _bench_cdg(sizes: Sizes, timer: _Timer) -> list[Row]:
    import torch
    from torch import nn

    batch, width, layers = sizes.cdg_mlp
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])
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
            f"nothing frozen {_ms(t[f'none {mode}'])}; frozen {_ms(t[f'{frozen} {mode}'])}")
        for frozen in ("alternate", "first") for mode in ("eager", cname)
    ]


# ---------------------------------------------------------------------------------------------- 5. CCE fused
_MEMORY_PROBE = """
import json, torch
torch.set_num_threads(1)
from cosmic_fx.bench.perf import _peak_step_memory
print(json.dumps(_peak_step_memory({arm!r}, {mlp!r}, {lower!r})))
"""


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_step_memory(arm: str, mlp: tuple[int, int, int], lower: str | None) -> dict[str, float]:
    """Peak memory (MiB) of a training step: the parameters plus the peak RSS above the idle RSS
    (model built, two warm-up steps done) over ``efficiency_every + 1`` steps, so that a step in
    which the hooks measure E(p) is included (Linux). ``lower=None``: eager hooks; else
    ``torch.compile`` with the cosmic backend and that lowering."""
    import torch
    from torch import nn

    from ..config import CosmicConfig
    from ..hooks import attach_hooks, hooks_of

    batch, width, layers = mlp
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    fused = arm == "fused"
    cfg = CosmicConfig.off(cce="relative", cce_fused_lr=0.01 if fused else None, lower=lower or "eager")
    if lower is None:
        hooks, run = attach_hooks(model, cfg), model
    else:
        hooks, run = None, torch.compile(model, backend="cosmic", options={"config": cfg})
    opt = None if fused else torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        loss = nn.functional.mse_loss(run(x), y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()  # warm-up (and compilation): one-time allocations are not a step's memory
    gc.collect()
    idle = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) to the current RSS
    for _ in range(cfg.efficiency_every + 1):
        step()
    transient = (_rss_kib("VmHWM") - idle) / 1024
    (hooks or hooks_of(model)).remove()
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"peak_mib": params + transient, "params_mib": params, "transient_mib": transient}


def _bench_memory(sizes: Sizes) -> list[Row]:
    if not os.path.exists("/proc/self/clear_refs"):
        return [Row("5 CCE fused", f"peak step memory, fused / separate optimizer step, {mode} (needs Linux /proc)",
                    float("nan"), 0.8, "not measured on this platform") for mode in ("eager", "torch.compile")]
    # large blocks come straight from mmap and go back at free: RSS follows live tensors exactly
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    # one fresh process per arm; memory, not time, is measured, so they may run concurrently
    arms = [(arm, lower) for lower in (None, sizes.compiler) for arm in ("separate", "fused")]
    procs = {
        key: subprocess.Popen([sys.executable, "-c", _MEMORY_PROBE.format(arm=key[0], mlp=sizes.mem_mlp, lower=key[1])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key in arms
    }
    out: dict[tuple[str, str | None], dict[str, float]] = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {key} failed:\n{stderr[-2000:]}")
        out[key] = json.loads(stdout.strip().splitlines()[-1])
    batch, width, layers = sizes.mem_mlp
    rows = []
    for lower in (None, sizes.compiler):
        sep, fused = out[("separate", lower)], out[("fused", lower)]
        mode = "eager" if lower is None else f"torch.compile, {sizes.compiled_name}"
        rows.append(Row(
            "5 CCE fused", f"peak training-step memory, update in backward hook / separate SGD step "
            f"({layers}x Linear({width}, {width}), batch {batch}), {mode}",
            fused["peak_mib"] / sep["peak_mib"], 0.8,
            f"separate {sep['peak_mib']:.4g} MiB; fused {fused['peak_mib']:.4g} MiB; parameters {sep['params_mib']:.4g} MiB",
        ))
    return rows


# ---------------------------------------------------------------------------------------------- run
SECTIONS = ("csc", "qci", "backend", "cdg", "memory")


def run(quick: bool = False, threads: int = 1, sections: tuple[str, ...] = SECTIONS, out_dir: str | None = None,
        show_progress: bool = True) -> dict[str, Any]:
    """Measure every target; returns ``{"rows": [...], "markdown": str, ...}``."""
    import torch
    from tabulate import tabulate

    from .common import progress, write_results

    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown perf section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    sizes = Sizes.quick() if quick else Sizes()
    total = sizes.rounds * (len(sizes.csc_shapes) * ("csc" in sections) + ("qci" in sections)
                            + ("backend" in sections) + ("cdg" in sections)) + ("memory" in sections)
    rows: list[Row] = []
    with progress(total, "bench perf", show_progress) as bar, _threads(threads):
        timer = _Timer(threads, sizes.rounds, sizes.reps, tick=bar.update)
        if "csc" in sections:
            for shape in sizes.csc_shapes:
                rows += _bench_csc(shape, timer, sizes.compiler, sizes.compiled_name)
        if "qci" in sections:
            rows += _bench_qci(sizes.qci, timer, sizes.compiler, sizes.compiled_name)
        if "backend" in sections:
            rows += _bench_backend(sizes, timer, threads)
        if "cdg" in sections:
            rows += _bench_cdg(sizes, timer)
        if "memory" in sections:
            rows += _bench_memory(sizes)
            bar.update()
    markdown = tabulate([r.cells() for r in rows], headers=COLUMNS, tablefmt="github")
    clock = "thread CPU time" if threads == 1 else "wall time"
    header = (f"torch {torch.__version__}, {threads} thread(s), {clock}, median of "
              f"{sizes.rounds}x{sizes.reps} interleaved calls per arm, compiled arms: {sizes.compiled_name}"
              + (" (quick: small sizes, aot_eager instead of Inductor; not the targets' figures)" if quick else ""))
    payload = {"header": header, "rows": [dataclasses.asdict(r) | {"status": r.status} for r in rows]}
    write_results(out_dir, "perf", header + "\n\n" + markdown, payload)
    return {"rows": rows, "markdown": markdown, "header": header}


def _cmd(args) -> int:
    from ..cli import CLIError

    if args.threads < 1:
        raise CLIError(f"--threads must be >= 1; got {args.threads}")
    sections = tuple(s.strip() for s in args.sections.split(",")) if args.sections else SECTIONS
    try:
        out = run(quick=args.quick, threads=args.threads, sections=sections, out_dir=args.out,
                  show_progress=not args.no_progress)
    except (ValueError, RuntimeError) as err:
        raise CLIError(str(err)) from err
    print(out["header"])
    print(out["markdown"])
    return 0


def register_cli(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "perf", help="cost of each mechanism and savings of CDG/CCE, as side-by-side ratios (issue 5 targets)",
        epilog="examples:\n  cosmic-fx bench perf\n  cosmic-fx bench perf --quick\n"
               "  cosmic-fx bench perf --sections csc,qci --threads 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (under a minute)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: timed with the thread's CPU clock, robust on a shared machine)")
    p.add_argument("--sections", default=None, help=f"comma list of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--out", default=None, help="folder for perf.md and perf.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd)
