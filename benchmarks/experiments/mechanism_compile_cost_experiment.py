"""What each mechanism of the default preset costs to compile, alone (issue 18: "each remaining gap
explained by its measured cause").

Produced: docs/guide/performance.md, section "Compile time", table "Each mechanism compiled alone".

A Linear(64, 10) on a batch of 8 is compiled with Inductor (one thread, one compile thread, a new cache
directory) in a fresh process per measurement, with nothing after it, with CSC after it (the default
preset's output CSC: the fused ``autograd.Function``), with the same CSC written out of place so that
AOTAutograd derives the backward (``composite``), with a dense identity QCI before it, and with the
``E_out`` statistic the backend adds to a graph that returns the model output. Reported: CPU seconds of
the first forward + backward (compile included, the process and its compiler children) and the kernels
Inductor generated; the fastest of ``--repeats`` (default 3), every repeat listed.

    python benchmarks/experiments/mechanism_compile_cost_experiment.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

VARIANTS = ("linear", "csc", "csc composite", "qci", "e_out")

_CHILD = r"""
import os, sys, json
import torch
torch.set_num_threads(1)
import torch._inductor.compile_fx  # noqa: F401  (imports are not compile time)
import torch._inductor.metrics as metrics
from cosmic_fx import csc
from cosmic_fx.qci import QuantumClassicalInterface
from cosmic_fx.runtime.readings import output_sums
variant = sys.argv[1]
torch.manual_seed(0)
lin = torch.nn.Linear(64, 10)
qci = QuantumClassicalInterface(64)
def f(x):
    if variant == "qci":
        x = qci(x)
    y = lin(x)
    if variant == "csc":
        y = csc._compress(y, 0.5, -1, 1e-8)
    elif variant == "csc composite":
        y = csc._csc_composite(y, 0.5, -1, 1e-8)
    if variant == "e_out":
        return y, output_sums(y)
    return y, None
c = torch.compile(f)
x = torch.randn(8, 64)
t = os.times(); t0 = t.user + t.system + t.children_user + t.children_system
c(x)[0].square().mean().backward()
t = os.times()
print(json.dumps({"cpu": t.user + t.system + t.children_user + t.children_system - t0,
                  "kernels": int(metrics.generated_kernel_count)}))
"""


def measure(variant: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="cosmic-mech-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_COMPILE_THREADS="1", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", _CHILD, variant], env=env, capture_output=True, text=True,
                              check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    measure("linear")  # priming: brings libraries and headers into the page cache (discarded)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(args.repeats):
        for v in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
            runs[v].append(measure(v))
    base = min(r["cpu"] for r in runs["linear"])
    print("| graph | cold CPU s | extra vs Linear alone | kernels | each repeat |")
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        best = min(r["cpu"] for r in runs[v])
        each = " / ".join(f"{r['cpu']:.1f}" for r in runs[v])
        print(f"| {v} | {best:.2f} | {best - base:+.2f} | {runs[v][0]['kernels']} | {each} |")


if __name__ == "__main__":
    main()
