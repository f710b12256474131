"""Where a warm first step's CPU time goes, ``torch.compile`` against the default cosmic preset (issue 18:
"each remaining gap explained by its measured cause").

Produced: docs/guide/performance.md, section "Compile time", table "The warm first step, by phase".

For each arm (``torch``, ``cosmic``) one cold process fills a new ``TORCHINDUCTOR_CACHE_DIR`` (the
``cosmic-fx bench compile`` child, ``python -m cosmic_fx.bench.compile_time --no-events``, same
environment: one OpenMP thread, one compile thread), then warm processes on that directory run the
first forward + backward of :func:`cosmic_fx.bench.compile_time.measure` (model built, imports done
before the clock starts) and report:

* **phases**: process CPU seconds (``time.process_time``) attributed to the innermost of a set of
  wrapped torch / cosmic functions running (exclusive times, they add up to the step's CPU): dynamo's
  frame conversion and its tracing of each inlined function, grouped by the file the function lives in
  (``cosmic_fx``, ``transformers``, ``torch``), guard building, the backend (cosmic's passes, the
  AOTAutograd cache key and lookup, the FX graph cache lookup, loading the generated Python modules and
  C++ kernels, ``post_compile``), and what runs outside all of them (the first forward's execution and
  the backward). Each wrapped call adds a Python call and two ``process_time`` reads (about a thousand
  calls in a ConvNeXt step); the counter table lists how many of each ran.
* **counters**: ``torch._dynamo.utils.counters`` (calls captured, frames, graphs, cache hits), the
  inlined calls into cosmic_fx code by function name, the generated modules and kernels loaded, and the
  child processes Inductor started.
* with ``--cprofile``, a further warm process per arm under ``cProfile`` (around the step only);
  ``.prof`` files go to ``--out`` and the functions whose cumulative time differs most between the arms
  are printed (cProfile inflates Python-heavy phases; the phase table is measured without it).

Run (both arms, fastest of ``--repeats`` warm processes reported per arm, every repeat's total listed)::

    nice -n 19 .venv/bin/python benchmarks/experiments/warm_start_profile_experiment.py --model convnext \
        --cache /tmp/warmprof --repeats 3 --cprofile --out /tmp/warmprof
    (the same with --model bert)

``--trace-only`` times dynamo alone instead (``backend="eager"``: no AOTAutograd, Inductor or cache; both
arms in one process, ``torch._dynamo.reset()`` before each first forward), with each cosmic_fx and torch
function dynamo inlines named::

    nice -n 19 .venv/bin/python benchmarks/experiments/warm_start_profile_experiment.py --model convnext \
        --trace-only --repeats 3

``--cache DIR`` keeps the cache directories (``DIR/<model>-<arm>``) and reuses them when present, so a
rerun after a change that leaves the graphs alike skips the cold processes.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# (phase, "module:Class.attr" or "module:function"): wrapped in the warm process, innermost wins
TARGETS: tuple[tuple[str, str], ...] = (
    ("dynamo: convert frame (top frame, bytecode)", "torch._dynamo.convert_frame:_compile"),
    ("dynamo: guards", "torch._dynamo.guards:CheckFunctionManager.__init__"),
    ("backend: other (AOTAutograd, wrappers)", "torch._dynamo.output_graph:OutputGraph.call_user_compiler"),
    ("backend: cosmic passes", "cosmic_fx.backend:_prepare"),
    ("backend: AOTAutograd cache key", "torch._functorch._aot_autograd.autograd_cache:autograd_cache_key"),
    ("backend: AOTAutograd cache lookup", "torch._functorch._aot_autograd.autograd_cache:AOTAutogradCache._lookup"),
    ("backend: FX graph cache lookup", "torch._inductor.codecache:FxGraphCache._lookup_graph"),
    ("backend: load generated Python modules", "torch._inductor.codecache:PyCodeCache.load_by_key_path"),
    ("backend: load C++ kernels (hash source, dlopen)", "torch._inductor.async_compile:AsyncCompile.cpp_pybinding"),
    ("backend: load C++ kernels (hash source, dlopen)", "torch._inductor.async_compile:AsyncCompile.cpp"),
    ("backend: CompiledFxGraph.post_compile", "torch._inductor.output_code:CompiledFxGraph.post_compile"),
    ("dynamo: fake-tensor propagation of traced ops", "torch._dynamo.utils:get_fake_value"),
    ("dynamo: wrapping tensors (parameters, inputs) as graph inputs",
     "torch._dynamo.variables.builder:VariableBuilder.wrap_tensor"),
    ("backward (autograd.backward)", "torch.autograd:backward"),
)
INLINE = ("torch._dynamo.symbolic_convert:InliningInstructionTranslator.inline_call_",
          "torch._dynamo.symbolic_convert:InliningGeneratorInstructionTranslator.inline_call_")
OUTSIDE = "outside all: first forward's execution, eager Python"
# the rows of the table: (label, phases summed); dynamo's rows first
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dynamo: tracing cosmic_fx code (QCI, site hooks, CSC)", ("dynamo: tracing cosmic_fx code (inlined calls)",)),
    ("dynamo: fake-tensor propagation of the traced ops", ("dynamo: fake-tensor propagation of traced ops",)),
    ("dynamo: tracing torch code (`nn.Module` call paths)", ("dynamo: tracing torch code (inlined calls)",)),
    ("dynamo: tracing the model's own code (transformers, other)",
     ("dynamo: tracing transformers code (inlined calls)", "dynamo: tracing other code (inlined calls)")),
    ("dynamo: wrapping parameters and inputs as graph inputs",
     ("dynamo: wrapping tensors (parameters, inputs) as graph inputs",)),
    ("dynamo: guards", ("dynamo: guards",)),
    ("dynamo: top frame, bytecode", ("dynamo: convert frame (top frame, bytecode)",)),
    ("backend: AOTAutograd cache key (hashing the graph)", ("backend: AOTAutograd cache key",)),
    ("backend: loading the C++ kernels", ("backend: load C++ kernels (hash source, dlopen)",)),
    ("backend: loading the generated Python modules", ("backend: load generated Python modules",)),
    ("backend: cosmic's passes", ("backend: cosmic passes",)),
    ("backend: cache lookups, post_compile, wrappers",
     ("backend: AOTAutograd cache lookup", "backend: FX graph cache lookup", "backend: CompiledFxGraph.post_compile",
      "backend: other (AOTAutograd, wrappers)")),
    ("running the first forward and backward", (OUTSIDE, "backward (autograd.backward)")),
    ("child processes (Inductor's compiler probes)", ("child processes",)),
)


class PhaseClock:
    """Process CPU time attributed to the innermost phase entered (exclusive times)."""

    def __init__(self) -> None:
        self.stack: list[str] = [OUTSIDE]
        self.totals: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.last = time.process_time()

    def _switch(self) -> None:
        now = time.process_time()
        self.totals[self.stack[-1]] += now - self.last
        self.last = now

    def enter(self, phase: str) -> None:
        self._switch()
        self.stack.append(phase)
        self.calls[phase] += 1

    def exit(self) -> None:
        self._switch()
        self.stack.pop()

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()
        self.last = time.process_time()


def _wrap(target: str, phase_of, clock: PhaseClock) -> bool:
    """Wrap ``target`` in place; ``phase_of(args)`` names the phase of one call. False if absent."""
    import importlib

    module_name, _, attr = target.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError:
        return False
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return False
    raw = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if raw is None:
        return False
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    fn = raw.__func__ if kind else raw

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        clock.enter(phase_of(args))
        try:
            return fn(*args, **kwargs)
        finally:
            clock.exit()

    setattr(owner, name, kind(wrapper) if kind else wrapper)
    if not isinstance(owner, type):  # a module function: also where other modules imported it by name
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith(("torch.", "cosmic_fx")) and mod.__dict__.get(name) is fn:
                setattr(mod, name, wrapper)
    return True


def _category(filename: str) -> str:
    for key in ("cosmic_fx", "transformers", "torch"):
        if f"/{key}/" in filename:
            return key
    return "other"


def _child(args: argparse.Namespace) -> None:
    """One warm process: phases (or cProfile) around the first step, printed as one JSON line."""
    import torch
    from torch._dynamo.utils import counters

    from cosmic_fx.bench import compile_time as ct

    torch.set_num_threads(1)
    ct._preload("inductor")
    import torch._functorch._aot_autograd.autograd_cache  # noqa: F401
    import torch._inductor.output_code  # noqa: F401

    import cosmic_fx

    clock = PhaseClock()
    spawned: list[str] = []
    popen_init = subprocess.Popen.__init__

    def recording_init(self, cmd, *a, **k):
        text = " ".join(map(str, cmd[:3])) if isinstance(cmd, (list, tuple)) else str(cmd)
        spawned.append(" ".join(text.split())[:60])
        popen_init(self, cmd, *a, **k)

    subprocess.Popen.__init__ = recording_init  # type: ignore[method-assign]
    inlined: collections.Counter[str] = collections.Counter()
    wrapped = []
    if not args.cprofile:
        for phase, target in TARGETS:
            if _wrap(target, lambda _a, p=phase: p, clock):
                wrapped.append(target)

        def inline_phase(a):
            code = a[0].f_code
            cat = _category(code.co_filename)
            if cat == "cosmic_fx":
                inlined[f"{Path(code.co_filename).stem}.{code.co_qualname}"] += 1
            return f"dynamo: tracing {cat} code (inlined calls)"

        for target in INLINE:
            if _wrap(target, inline_phase, clock):
                wrapped.append(target)
    build, inputs = ct.MODELS[args.model]
    kind, _ = ct.ARMS[args.arm]
    torch.manual_seed(0)
    model = build()
    model.train()
    x = inputs(8)
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
    total_cpu = ct._cpu_seconds()
    children = os.times().children_user + os.times().children_system
    clock.reset()
    if profiler:
        profiler.enable()
    compiled = torch.compile(model, backend="inductor") if kind == "torch" else cosmic_fx.compile(model)
    ct._step(compiled, x)
    if profiler:
        profiler.disable()
    clock.exit()  # closes OUTSIDE
    total_cpu = ct._cpu_seconds() - total_cpu
    t = os.times()
    clock.totals["child processes"] = t.children_user + t.children_system - children
    if profiler:
        profiler.dump_stats(args.prof)
    out = {
        "model": args.model, "arm": args.arm, "cpu": total_cpu, "phases": dict(clock.totals),
        "calls": dict(clock.calls), "wrapped": wrapped, "inlined_cosmic": dict(inlined.most_common()),
        "spawned": spawned,
        "counters": {g: {k: int(v) for k, v in counters[g].items()}
                     for g in ("stats", "frames", "inductor", "aot_autograd") if g in counters},
    }
    print(json.dumps(out))


def _trace_only(args: argparse.Namespace) -> None:
    """Dynamo alone (``lower="eager"`` / ``backend="eager"``: no AOTAutograd, no Inductor, no cache), both
    arms alternating in this process, ``torch._dynamo.reset()`` before each: process CPU per phase, the
    cosmic_fx functions dynamo inlines named one by one. Prints a table (the fastest of ``--repeats``)."""
    import torch

    from cosmic_fx.bench import compile_time as ct

    torch.set_num_threads(1)
    ct._preload("inductor")
    import cosmic_fx

    clock = PhaseClock()
    for phase, target in TARGETS:
        _wrap(target, lambda _a, p=phase: p, clock)

    def inline_phase(a):
        code = a[0].f_code
        cat = _category(code.co_filename)
        return f"dynamo: tracing {cat} code" + (f": {code.co_qualname}" if cat in ("cosmic_fx", "torch") else "")

    for target in INLINE:
        _wrap(target, inline_phase, clock)
    build, inputs = ct.MODELS[args.model]
    torch.manual_seed(0)
    model = build()
    model.train()
    x = inputs(8)
    transformed = cosmic_fx.transform(model)  # not timed: what is timed is dynamo's trace of its forward
    best: dict[str, tuple[float, dict[str, float]]] = {}
    each: dict[str, list[float]] = {}
    for arm in ("torch", "cosmic") * args.repeats:
        torch._dynamo.reset()
        clock.reset()
        start = time.process_time()
        if arm == "torch":
            fn = torch.compile(model, backend="eager")
        else:
            fn = cosmic_fx.compile(transformed, cosmic_fx.CosmicConfig(lower="eager"))
        fn(*x)
        clock._switch()
        total = time.process_time() - start
        each.setdefault(arm, []).append(total)
        if arm not in best or total < best[arm][0]:
            best[arm] = (total, dict(clock.totals))
    phases = sorted(set(best["torch"][1]) | set(best["cosmic"][1]),
                    key=lambda p: -(best["cosmic"][1].get(p, 0.0) - best["torch"][1].get(p, 0.0)))
    lines = [f"| {args.model}: dynamo alone, phase (CPU s) | torch | cosmic | delta |", "|---|---|---|---|"]
    for p in phases:
        t, c = best["torch"][1].get(p, 0.0), best["cosmic"][1].get(p, 0.0)
        if max(t, c) >= 0.005:
            lines.append(f"| {p} | {t:.3f} | {c:.3f} | {c - t:+.3f} |")
    t, c = best["torch"][0], best["cosmic"][0]
    lines.append(f"| **first forward, dynamo alone** | {t:.3f} | {c:.3f} | {c - t:+.3f} |")
    for arm in ("torch", "cosmic"):
        lines.append(f"| {arm}: each repeat's CPU s | " + " / ".join(f"{v:.2f}" for v in each[arm]) + " | | |")
    print("\n".join(lines))


def _env(cache: str) -> dict[str, str]:
    return dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")


def _run(cmd: list[str], cache: str) -> dict[str, Any]:
    proc = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n" + "\n".join(proc.stderr.strip().splitlines()[-10:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _warm(model: str, arm: str, cache: str, prof: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--arm", arm]
    if prof:
        cmd += ["--cprofile", "--prof", prof]
    return _run(cmd, cache)


def _cprofile_diff(paths: dict[str, str], top: int) -> str:
    import pstats

    cum: dict[str, dict[str, tuple[int, float]]] = {}
    for arm, path in paths.items():
        stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
        cum[arm] = {f"{Path(f).name}:{line}({fn})": (nc, ct) for (f, line, fn), (_cc, nc, _tt, ct, _) in stats.items()}
    names = set(cum["torch"]) | set(cum["cosmic"])
    rows = sorted(names, key=lambda n: cum["cosmic"].get(n, (0, 0.0))[1] - cum["torch"].get(n, (0, 0.0))[1],
                  reverse=True)[:top]
    lines = ["| function (cProfile, cumulative) | torch calls | torch s | cosmic calls | cosmic s | delta s |",
             "|---|---|---|---|---|---|"]
    for n in rows:
        (tc, ts), (cc, cs) = cum["torch"].get(n, (0, 0.0)), cum["cosmic"].get(n, (0, 0.0))
        lines.append(f"| `{n}` | {tc} | {ts:.2f} | {cc} | {cs:.2f} | {cs - ts:+.2f} |")
    return "\n".join(lines)


def _render(model: str, best: dict[str, dict[str, Any]], totals: dict[str, list[float]]) -> str:
    lines = [f"| {model}: phase (warm, CPU s) | torch | cosmic | delta |", "|---|---|---|---|"]
    sums = {"torch": 0.0, "cosmic": 0.0}
    for label, members in GROUPS:
        t, c = (sum(best[a]["phases"].get(p, 0.0) for p in members) for a in ("torch", "cosmic"))
        if label.startswith("dynamo"):
            sums["torch"], sums["cosmic"] = sums["torch"] + t, sums["cosmic"] + c
        lines.append(f"| {label} | {t:.2f} | {c:.2f} | {c - t:+.2f} |")
    t, c = sums["torch"], sums["cosmic"]
    lines.append(f"| **dynamo, all of it** | {t:.2f} | {c:.2f} | {c - t:+.2f} |")
    t, c = (sum(best[a]["phases"].values()) for a in ("torch", "cosmic"))
    lines.append(f"| **sum of the phases** | {t:.2f} | {c:.2f} | {c - t:+.2f} |")
    t, c = best["torch"]["cpu"], best["cosmic"]["cpu"]
    lines.append(f"| **warm first step** (CPU s with children, as the bench) | {t:.2f} | {c:.2f} | {c - t:+.2f} "
                 f"({c / t:.2f}x) |")
    for arm in ("torch", "cosmic"):
        lines.append(f"| {arm}: each repeat's CPU s | " + " / ".join(f"{v:.2f}" for v in totals[arm]) + " | | |")
    lines += ["", "| counter | torch | cosmic |", "|---|---|---|"]
    keys = [("stats", "calls_captured"), ("stats", "unique_graphs"), ("frames", "total"), ("frames", "ok"),
            ("inductor", "fxgraph_cache_hit"), ("aot_autograd", "autograd_cache_hit")]
    for g, k in keys:
        lines.append(f"| {g}.{k} | " + " | ".join(str(best[a]["counters"].get(g, {}).get(k, 0))
                                                   for a in ("torch", "cosmic")) + " |")
    for label, phase in (("dynamo inlined calls (all code)", None),
                         ("fake-tensor propagations (get_fake_value calls)",
                          "dynamo: fake-tensor propagation of traced ops"),
                         ("tensors wrapped as graph inputs",
                          "dynamo: wrapping tensors (parameters, inputs) as graph inputs"),
                         ("generated Python modules loaded", "backend: load generated Python modules"),
                         ("C++ kernels loaded", "backend: load C++ kernels (hash source, dlopen)"),
                         ("guard managers built", "dynamo: guards")):
        cells = []
        for a in ("torch", "cosmic"):
            calls = best[a]["calls"]
            if phase is None:
                cells.append(str(sum(v for p, v in calls.items() if p.startswith("dynamo: tracing"))))
            else:
                cells.append(str(calls.get(phase, 0)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for a in ("torch", "cosmic"):
        lines.append(f"\n{a}: child processes run: " + ("; ".join(best[a]["spawned"]) or "none"))
    lines += ["", "inlined calls into cosmic_fx code (cosmic arm): " + ", ".join(
        f"{k} {v}" for k, v in best["cosmic"]["inlined_cosmic"].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=("mlp", "gpt2", "bert", "convnext"))
    parser.add_argument("--arm", default="cosmic", help="(child only)")
    parser.add_argument("--repeats", type=int, default=2, help="warm processes per arm (fastest reported)")
    parser.add_argument("--cache", default=None, help="keep the cache directories here (reused when present)")
    parser.add_argument("--cprofile", action="store_true", help="also one warm process per arm under cProfile")
    parser.add_argument("--out", default="/tmp", help="where the .prof files go")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace-only", action="store_true",
                        help="dynamo alone (backend eager), both arms in one process; no cache directories")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prof", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_trace:
        _trace_only(args)
        return
    if args.child:
        _child(args)
        return
    if args.trace_only:
        proc = subprocess.run([sys.executable, __file__, "--child-trace", "--model", args.model, "--repeats",
                               str(args.repeats)], env=_env(tempfile.mkdtemp(prefix="warm-profile-trace-")),
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        print(proc.stdout, end="")
        return
    root = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="warm-profile-"))
    best: dict[str, dict[str, Any]] = {}
    totals: dict[str, list[float]] = {}
    profs: dict[str, str] = {}
    for arm in ("torch", "cosmic"):
        cache = root / f"{args.model}-{arm}"
        if not (cache / ".cold-done").exists():
            cache.mkdir(parents=True, exist_ok=True)
            print(f"{args.model} / {arm}: cold process", file=sys.stderr)
            _run([sys.executable, "-m", "cosmic_fx.bench.compile_time", "--model", args.model, "--arm", arm,
                  "--no-events"], str(cache))
            (cache / ".cold-done").touch()
    for rep in range(args.repeats):
        for arm in ("torch", "cosmic") if rep % 2 == 0 else ("cosmic", "torch"):
            print(f"{args.model} / {arm}: warm process {rep + 1}/{args.repeats}", file=sys.stderr)
            res = _warm(args.model, arm, str(root / f"{args.model}-{arm}"))
            totals.setdefault(arm, []).append(res["cpu"])
            if arm not in best or res["cpu"] < best[arm]["cpu"]:
                best[arm] = res
    if args.cprofile:
        for arm in ("torch", "cosmic"):
            profs[arm] = str(Path(args.out) / f"warm_{args.model}_{arm}.prof")
            print(f"{args.model} / {arm}: warm process under cProfile", file=sys.stderr)
            _warm(args.model, arm, str(root / f"{args.model}-{arm}"), prof=profs[arm])
    print(_render(args.model, best, totals))
    if profs:
        print()
        print(_cprofile_diff(profs, args.top))
    print(json.dumps({"best": best, "totals": totals}), file=sys.stderr)


if __name__ == "__main__":
    main()
