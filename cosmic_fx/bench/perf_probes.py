"""The measurements of ``cosmic-fx bench perf`` that each run in a fresh Python process.

A compile time is only cold in a process whose caches are empty, and a peak RSS only belongs to one
arm in a process that ran nothing else: each probe is a function of plain arguments that a child
process imports from this module, calls, and answers as one JSON line on stdout.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from .common import linear_relu_stack, relu_mlp

__all__ = ["FUSED_HP", "compile_times", "first_step_seconds", "fused_training_step", "peak_memory", "peak_step_memory"]

_PROBE = """
import json, torch
torch.set_num_threads({threads})
from cosmic_fx.bench.perf_probes import {name}
print(json.dumps({name}(*{args!r})))
"""


def _probe_argv(name: str, args: tuple[Any, ...], threads: int) -> list[str]:
    """The command line of a child that prints ``name(*args)`` of this module as JSON."""
    return [sys.executable, "-c", _PROBE.format(threads=threads, name=name, args=args)]


def _probe_answer(what: str, returncode: int, stdout: str, stderr: str) -> Any:
    if returncode != 0:
        raise RuntimeError(f"{what} failed:\n{stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])  # the last line: imports may print before it


# ---------------------------------------------------------------------------------------------- compile time
def first_step_seconds(arm: str, mlp: tuple[int, int, int], compiler: str) -> float:
    """Wall time of the first training step (dynamo, the backend, the compiler's fwd and bwd)."""
    import torch

    batch, width, hidden = mlp
    torch.manual_seed(0)
    model = relu_mlp(64, width, hidden)
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    if arm == "cosmic off":
        compiled = torch.compile(model, backend="cosmic", options={"preset": "off", "lower": compiler})
    else:
        compiled = torch.compile(model, backend=compiler)
    t0 = time.perf_counter()
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    return time.perf_counter() - t0


def compile_times(mlp: tuple[int, int, int], compiler: str, threads: int, reps: int,
                  fresh_process: bool = True) -> dict[str, float]:
    """Seconds of the first step, ``"cosmic off"`` and ``"alone"``: the median over ``reps`` fresh
    processes with cold caches each, or (``fresh_process=False``, quick mode) one call each in this one."""
    arms = ("cosmic off", "alone")
    if not fresh_process:
        import torch

        # quick mode: one process, graph caches off; the second arm still reuses compiled kernels
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            return {arm: first_step_seconds(arm, mlp, compiler) for arm in arms}
    samples: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(reps):
        for arm in arms:
            with tempfile.TemporaryDirectory(prefix="cosmic_perf_") as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}  # cold caches, every time
                argv = _probe_argv("first_step_seconds", (arm, mlp, compiler), threads)
                out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            answer = _probe_answer(f"compile-time probe ({arm})", out.returncode, out.stdout, out.stderr)
            samples[arm].append(float(answer))
    return {arm: statistics.median(v) for arm, v in samples.items()}


# ---------------------------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


FUSED_HP = {"sgd": {"lr": 0.01, "momentum": 0.9}, "adamw": {"lr": 1e-3, "weight_decay": 0.01}}


def fused_training_step(arm: str, kind: str, model, lower: str | None):
    """One training-step function ``step(x, y)`` of the fused-CCE comparison, and the runtime of
    the model it trains.

    ``arm="separate"``: CCE scales the gradients in the hooks and ``torch.optim`` (SGD with momentum,
    or AdamW) steps after backward; ``arm="fused"``: the same update inside backward
    (``cce_fused=kind``), driven by :func:`cosmic_fx.fused_optimizer` (compiled autograd when compiled).
    ``lower=None``: eager hooks; else ``torch.compile`` with the cosmic backend and that lowering.
    """
    import torch
    from torch import nn

    import cosmic_fx

    from ..config import CosmicConfig
    from ..runtime import attach_hooks, runtime_of

    hp = FUSED_HP[kind]
    fused = arm == "fused"
    knobs = {"cce_fused_momentum": hp["momentum"]} if kind == "sgd" else {"cce_fused_weight_decay": hp["weight_decay"]}
    cfg = CosmicConfig.off(cce="relative", lower=lower or "eager",
                           **({"cce_fused": kind, "cce_fused_lr": hp["lr"], **knobs} if fused else {}))
    if lower is None:
        runtime, run = attach_hooks(model, cfg), model
    else:
        run = cosmic_fx.compile(model, cfg)  # trains a transformed copy (here: the same layers, no QCI)
        runtime = runtime_of(run)
    if fused:
        opt = cosmic_fx.fused_optimizer(run)
    else:
        opt = (torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)(run.parameters(), **hp)

    def step(x, y):
        loss = nn.functional.mse_loss(run(x), y)
        if fused:
            opt.backward(loss)
            opt.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step, runtime


def peak_step_memory(arm: str, mlp: tuple[int, int, int], lower: str | None, kind: str = "sgd") -> dict[str, float]:
    """Peak memory (MiB) of a training step: the parameters plus the peak RSS above the idle RSS
    (model built, two warm-up steps done: the optimizer state exists) over ``efficiency_every + 1``
    steps, so that a step in which the hooks measure E(p) is included (Linux). The arms:
    :func:`fused_training_step`."""
    import torch

    from ..config import CosmicConfig

    batch, width, layers = mlp
    torch.manual_seed(0)
    model = linear_relu_stack(width, layers)
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    step, runtime = fused_training_step(arm, kind, model, lower)
    for _ in range(2):
        step(x, y)  # warm-up (and compilation): one-time allocations are not a step's memory
    gc.collect()
    idle = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) to the current RSS
    for _ in range(CosmicConfig().efficiency_every + 1):
        step(x, y)
    transient = (_rss_kib("VmHWM") - idle) / 1024
    runtime.remove()
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"peak_mib": params + transient, "params_mib": params, "transient_mib": transient}


def peak_memory(mlp: tuple[int, int, int], cases: tuple[tuple[str | None, str], ...]
                ) -> dict[tuple[str, str | None, str], dict[str, float]]:
    """:func:`peak_step_memory` of the ``"separate"`` and ``"fused"`` arms for each ``(lowering, kind)``
    (lowering ``None``: eager), each arm in its own fresh process (Linux)."""
    # large blocks come straight from mmap and go back at free: RSS follows live tensors exactly
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    # one fresh process per arm; memory, not time, is measured, so they may run concurrently
    arms = [(arm, lower, kind) for lower, kind in cases for arm in ("separate", "fused")]
    procs = {
        key: subprocess.Popen(_probe_argv("peak_step_memory", (key[0], mlp, key[1], key[2]), threads=1),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key in arms
    }
    out: dict[tuple[str, str | None, str], dict[str, float]] = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate()
        out[key] = _probe_answer(f"memory probe {key}", proc.returncode, stdout, stderr)
    return out
