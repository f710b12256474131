"""``cosmic-fx bench compile``: the first training step's compile time, cosmic against ``torch.compile``.

Every measurement runs in a fresh process (``python -m cosmic_fx.bench.compile_time``), so no arm
inherits another's in-memory caches:

* **cold** — a new, empty ``TORCHINDUCTOR_CACHE_DIR`` per arm: the first forward + backward, compile
  included, timed from the ``compile`` call;
* **warm** — a second process on the same cache directory: Inductor's FX graph cache and AOTAutograd's
  cache may hit (their hit counters are reported next to the time);
* **recompile** events in the cold process, after the first step: a second step (none expected), the
  first call in eval mode under ``no_grad``, a new batch size, and a freeze event (the first site's
  weight stops requiring grad, what CDG does): the time of that step and the graphs it compiled.

With ``breakdown`` the cold process also reports where the first step's time went, from dynamo's own
timers (``torch._dynamo.utils.compilation_time_metrics``, what ``compile_times()`` prints), and the
cosmic arms without one mechanism each (no CSC, no QCI, no CDG/CCE hooks and hence no ``E_out``) show
what each costs to compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .zoo_models import VOCAB, _hf, images, tokens

__all__ = ["ARMS", "MODELS", "PHASES", "Settings", "measure", "render", "run"]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _features(batch: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 64, generator=torch.Generator().manual_seed(batch)),)


# name -> (builder, inputs for a batch size): tiny configs, random init, no download
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[Any, ...]]]] = {
    "mlp": (_mlp, _features),
    "gpt2": (_hf("GPT2LMHeadModel", "GPT2Config", n_positions=64, n_embd=64, n_layer=2, n_head=2, vocab_size=VOCAB,
                 use_cache=False), tokens),
    "bert": (_hf("BertForSequenceClassification", "BertConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=128, max_position_embeddings=64, num_labels=3), tokens),
    "convnext": (_hf("ConvNextForImageClassification", "ConvNextConfig", num_channels=3,
                     hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], image_size=32, num_labels=10), images),
}


# arm -> (kind, CosmicConfig overrides): "torch" is plain torch.compile; the others cosmic_fx.compile
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "torch": ("torch", {}),
    "cosmic": ("default", {}),
    "cosmic-fast": ("fast", {}),
    "cosmic-no-csc": ("default", {"csc": "none"}),
    "cosmic-no-qci": ("default", {"qci": False}),
    "cosmic-no-hooks": ("default", {"cdg": "off", "cce": "off"}),
}
ABLATIONS = ("cosmic-no-csc", "cosmic-no-qci", "cosmic-no-hooks")

# (label, dynamo timer): the phases of the breakdown. AOTAutograd is what the backend spent outside
# cosmic's passes and Inductor's forward compile; Inductor's backward compiles at the first backward.
PHASES: tuple[tuple[str, str], ...] = (
    ("dynamo tracing", "bytecode_tracing"),
    ("cosmic passes", "cosmic_backend.passes"),
    ("Inductor forward", "compile_fx.<locals>.fw_compiler_base"),
    ("Inductor backward", "compile_fx.<locals>.bw_compiler"),
    ("  of which codegen", "GraphLowering.codegen"),
    ("  of which C++ compile", "compile_file"),
    ("backend total", "OutputGraph.call_user_compiler"),
)
EVENTS = ("step 2", "eval", "new batch", "freeze")


@dataclasses.dataclass
class Settings:
    """What one ``bench compile`` run measures."""

    models: tuple[str, ...] = ("mlp", "gpt2", "bert", "convnext")
    arms: tuple[str, ...] = ("torch", "cosmic", "cosmic-fast")
    lower: str = "inductor"
    batch: int = 8
    threads: int = 1
    warm: bool = True
    breakdown: bool = False
    repeats: int = 2
    events: bool = True


def _first_site_weight(model: nn.Module) -> nn.Parameter:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.requires_grad:
            return module.weight
    raise ValueError("the model has no trainable Linear or Conv2d weight to freeze")


def _step(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    from .zoo_runs import primary_tensor

    primary_tensor(model(*inputs)).float().square().mean().backward()


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (Inductor's C++ compiler runs as a child:
    ``TORCHINDUCTOR_COMPILE_THREADS=1``, set by :func:`run`). Unlike wall time it does not grow when
    other work shares the machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _kernels() -> int:
    """Kernels Inductor generated in this process so far (0 under aot_eager): what its codegen and C++
    compile scale with."""
    from torch._inductor import metrics

    return int(metrics.generated_kernel_count)


def _timed_event(fn: Callable[[], None]) -> dict[str, float]:
    before, cpu = _graphs(), _cpu_seconds()
    start = time.perf_counter()
    fn()
    return {"seconds": time.perf_counter() - start, "cpu": _cpu_seconds() - cpu, "graphs": _graphs() - before}


def _preload(lower: str) -> None:
    """Import what either arm's first step imports lazily (dynamo's and Inductor's modules, cosmic's
    backend), before the clock starts: an import is not compile time, and each arm would otherwise pay
    for a different subset (measured: the torch arm's ``torch.compile`` call took 1.3 s against cosmic's
    0.3 s, all of it imports)."""
    import torch._dynamo  # noqa: F401
    import torch._functorch.aot_autograd  # noqa: F401

    if lower == "inductor":
        import torch._inductor.codecache  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401
    import cosmic_fx.backend  # noqa: F401
    import cosmic_fx.compiling  # noqa: F401
    import cosmic_fx.transform  # noqa: F401


def measure(model_name: str, arm: str, lower: str = "inductor", batch: int = 8, events: bool = True) -> dict[str, Any]:
    """Compile ``model_name`` with ``arm`` in this process and time its first training step.

    Args:
        model_name: a key of :data:`MODELS`.
        arm: a key of :data:`ARMS`.
        lower: ``"inductor"`` or ``"aot_eager"`` (both arms use it).
        batch: the first step's batch size (the "new batch" event uses ``batch + 3``).
        events: also time the recompile events after the first step.

    Returns:
        a JSON-able dict: ``first_step`` wall seconds, ``cpu`` seconds (see :func:`_cpu_seconds`), ``phases``
        (dynamo timer -> wall seconds), the cache
        ``counters``, ``captured`` (calls dynamo traced), and per event ``seconds`` and ``graphs``.

    Example:
        >>> out = measure("mlp", "torch", lower="aot_eager", events=False)  # doctest: +SKIP
        >>> out["first_step"] > 0  # doctest: +SKIP
        True
    """
    from torch._dynamo.utils import compilation_time_metrics, counters

    import cosmic_fx

    build, inputs = MODELS[model_name]
    kind, overrides = ARMS[arm]
    _preload(lower)
    torch.manual_seed(0)
    model = build()
    model.train()
    x = inputs(batch)
    cpu = _cpu_seconds()
    start = time.perf_counter()
    if kind == "torch":
        compiled = torch.compile(model, backend=lower)
        target = model
    else:
        preset = cosmic_fx.CosmicConfig.fast if kind == "fast" else cosmic_fx.CosmicConfig
        compiled = cosmic_fx.compile(model, preset(lower=lower, **overrides))
        target = compiled._orig_mod
    wrapped = time.perf_counter() - start
    _step(compiled, x)
    first = time.perf_counter() - start
    out: dict[str, Any] = {
        "model": model_name, "arm": arm, "lower": lower, "first_step": first, "cpu": _cpu_seconds() - cpu,
        "transform": wrapped,
        "phases": {k: sum(v) for k, v in compilation_time_metrics.items()},
        "counters": {f"{g}.{k}": int(v) for g in ("inductor", "aot_autograd") for k, v in counters[g].items()
                     if "cache" in k},
        "captured": int(counters["stats"]["calls_captured"]), "graphs": _graphs(), "events": {},
        "kernels": _kernels(),
    }
    if events:
        weight = _first_site_weight(target)

        def eval_call() -> None:
            compiled.eval()
            try:
                with torch.no_grad():
                    compiled(*x)
            finally:
                compiled.train()

        def freeze() -> None:
            weight.requires_grad_(False)
            _step(compiled, x)

        out["events"] = {
            "step 2": _timed_event(lambda: _step(compiled, x)),
            "eval": _timed_event(eval_call),
            "new batch": _timed_event(lambda: _step(compiled, inputs(batch + 3))),
            "freeze": _timed_event(freeze),
        }
        weight.requires_grad_(True)
    return out


def _child(model_name: str, arm: str, settings: Settings, cache_dir: str, events: bool) -> dict[str, Any]:
    # one compile thread: C++ compiles run as reaped children, so their CPU time is counted (both arms alike)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, OMP_NUM_THREADS=str(settings.threads),
               TORCHINDUCTOR_COMPILE_THREADS="1")
    cmd = [sys.executable, "-m", "cosmic_fx.bench.compile_time", "--model", model_name, "--arm", arm,
           "--lower", settings.lower, "--batch", str(settings.batch), "--threads", str(settings.threads)]
    if not events:
        cmd.append("--no-events")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"bench compile: the {arm} arm on {model_name} failed in its process:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(settings: Settings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every model x arm of ``settings`` in fresh processes (see the module docstring).

    Args:
        settings: models, arms, lowering, batch size, threads, whether to run warm and breakdown, and
            how many times to repeat every measurement (arms in alternating order; the fastest repeat
            is reported, every repeat's CPU seconds listed).
        progress: called with a line before each process starts.

    Returns:
        ``{"settings": ..., "results": [{"model", "arm", "cold", "warm", "cold_cpu", "warm_cpu"}...]}``;
        ``render`` makes tables.

    Example:
        >>> out = run(Settings(models=("mlp",), lower="aot_eager", warm=False))  # doctest: +SKIP
        >>> render(out).startswith("| model")  # doctest: +SKIP
        True
    """
    for name in settings.models:
        if name not in MODELS:
            raise ValueError(f"bench compile: unknown model {name!r}; choose from {', '.join(MODELS)}")
    arms = list(dict.fromkeys((*settings.arms, *(ABLATIONS if settings.breakdown else ()))))
    for arm in arms:
        if arm not in ARMS:
            raise ValueError(f"bench compile: unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    if settings.repeats < 1:
        raise ValueError(f"bench compile: repeats must be >= 1; got {settings.repeats}")
    if settings.lower == "inductor":
        # a discarded first process: it brings torch's libraries and headers into the page cache and
        # builds nothing that a later arm reuses (its cache directory is thrown away). Without it the
        # first arm measured paid 50% more CPU for the same graph (MLP: torch 23.9 s, fast 15.8 s).
        if progress:
            progress("priming (a discarded process)")
        with tempfile.TemporaryDirectory(prefix="cosmic-compile-cache-") as cache:
            _child(settings.models[0], "torch", settings, cache, events=False)
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(settings.repeats):
        order = arms if rep % 2 == 0 else arms[::-1]  # alternate the order: drift hits every arm alike
        for name in settings.models:
            for arm in order:
                with tempfile.TemporaryDirectory(prefix="cosmic-compile-cache-") as cache:
                    tag = f" (repeat {rep + 1}/{settings.repeats})" if settings.repeats > 1 else ""
                    if progress:
                        progress(f"{name} / {arm}: cold{tag}")
                    cold = _child(name, arm, settings, cache, events=settings.events and arm in settings.arms)
                    warm = None
                    if settings.warm and arm in settings.arms:
                        if progress:
                            progress(f"{name} / {arm}: warm{tag}")
                        warm = _child(name, arm, settings, cache, events=False)
                samples.setdefault((name, arm), []).append({"cold": cold, "warm": warm})
    results = []
    for name in settings.models:
        for arm in arms:
            runs = samples[(name, arm)]
            # the fastest repeat (timeit's rule: noise only ever adds time), the same rule for every arm
            cold = min((r["cold"] for r in runs), key=lambda c: c["cpu"])
            warms = [r["warm"] for r in runs if r["warm"] is not None]
            warm = min(warms, key=lambda c: c["cpu"]) if warms else None
            results.append({"model": name, "arm": arm, "cold": cold, "warm": warm,
                            "cold_cpu": [r["cold"]["cpu"] for r in runs], "warm_cpu": [w["cpu"] for w in warms]})
    return {"settings": dataclasses.asdict(settings), "results": results}


def _each(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in values) or "n/a"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def render(out: dict[str, Any]) -> str:
    """The tables of a :func:`run` result as Markdown: times against ``torch.compile``, recompile
    events, and (with breakdown) the phases and the ablations."""
    settings = out["settings"]
    rows = {(r["model"], r["arm"]): r for r in out["results"]}
    arms = [a for a in settings["arms"] if a != "torch"]
    lines = ["| model | arm | cold CPU s | cold vs torch | warm CPU s | warm vs torch | wall s cold / warm "
             "| warm cache hits (fx / aot) | CPU s of each repeat, cold; warm |", "|---" * 9 + "|"]
    for model in settings["models"]:
        base = rows.get((model, "torch"))
        for arm in settings["arms"]:
            r = rows[(model, arm)]
            cold, warm = r["cold"]["cpu"], r["warm"]["cpu"] if r["warm"] else None
            walls = f"{r['cold']['first_step']:.1f} / " + (f"{r['warm']['first_step']:.1f}" if r["warm"] else "n/a")
            hits = "n/a"
            if r["warm"]:
                c = r["warm"]["counters"]
                hits = f"{c.get('inductor.fxgraph_cache_hit', 0)} / {c.get('aot_autograd.autograd_cache_hit', 0)}"
            lines.append(
                f"| {model} | {arm} | {cold:.2f} | {_ratio(cold, base['cold']['cpu']) if base else 'n/a'} | "
                f"{f'{warm:.2f}' if warm is not None else 'n/a'} | "
                f"{_ratio(warm, base['warm']['cpu']) if base and base['warm'] and warm else 'n/a'} | "
                f"{walls} | {hits} | "
                f"{_each(r.get('cold_cpu', [cold]))}; {_each(r.get('warm_cpu', []))} |"
            )
    if settings.get("events", True):
        lines += ["", "| model | arm | " + " | ".join(f"{e}: CPU s (graphs)" for e in EVENTS) + " |",
                  "|---|---|" + "---|" * len(EVENTS)]
        for model in settings["models"]:
            for arm in settings["arms"]:
                ev = rows[(model, arm)]["cold"]["events"]
                cells = [f"{ev[e]['cpu']:.2f} ({ev[e]['graphs']})" if e in ev else "n/a" for e in EVENTS]
                lines.append(f"| {model} | {arm} | " + " | ".join(cells) + " |")
    if settings["breakdown"]:
        lines += ["", _render_breakdown(out, rows, arms)]
    return "\n".join(lines)


def _render_breakdown(out: dict[str, Any], rows: dict, arms: Sequence[str]) -> str:
    settings = out["settings"]
    shown = [a for a in ("torch", *arms) if a in settings["arms"]]
    lines = ["| model | phase (cold, wall s; CPU s first) | " + " | ".join(shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for model in settings["models"]:
        colds = {a: rows[(model, a)]["cold"] for a in shown}
        table = [("first step, CPU", lambda c: c["cpu"]), ("first step, wall", lambda c: c["first_step"]),
                 ("compile() call (transform)", lambda c: c["transform"]),
                 *[(label, lambda c, key=key: c["phases"].get(key, 0.0)) for label, key in PHASES],
                 ("calls traced by dynamo", lambda c: c["captured"]),
                 ("kernels generated", lambda c: c.get("kernels", "n/a")), ("graphs", lambda c: c["graphs"])]
        for label, get in table:
            cells = [f"{get(colds[a]):.2f}" if isinstance(get(colds[a]), float) else str(get(colds[a])) for a in shown]
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "| model | ablation | cold CPU s | vs cosmic | calls traced | kernels generated |",
              "|---|---|---|---|---|---|"]
    for model in settings["models"]:
        full = rows.get((model, "cosmic"))
        for arm in ABLATIONS:
            r = rows[(model, arm)]["cold"]
            vs = _ratio(r["cpu"], full["cold"]["cpu"]) if full else "n/a"
            lines.append(f"| {model} | {arm} | {r['cpu']:.2f} | {vs} | {r['captured']} | {r.get('kernels', 'n/a')} |")
    return "\n".join(lines)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one bench-compile measurement (run by cosmic-fx bench compile)")
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--arm", required=True, choices=sorted(ARMS))
    parser.add_argument("--lower", default="inductor")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-events", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.model, args.arm, args.lower, args.batch, events=not args.no_events)
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
