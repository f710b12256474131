"""``cosmic-fx demo`` / ``make demo``: a CNN on scikit-learn's digits, with and without cosmic."""

from __future__ import annotations

import time

import torch
from tabulate import tabulate

from .config import CosmicConfig
from .data import load_digits
from .models import DigitsCNN
from .training import Arm, train_classifier
from .transform import transform, transform_info


def run_demo(epochs: int = 30, lower: str = "inductor", show_progress: bool = True, seed: int = 0) -> dict:
    """Train ``DigitsCNN`` twice on the same data and seed: plain PyTorch, then ``cosmic_fx.compile``;
    print the rewritten sites and a results table (one row per arm).

    Args:
        epochs: training epochs of each arm.
        lower: what the cosmic backend lowers the rewritten graph to (``"inductor"``, ``"aot_eager"``,
            ``"eager"``).
        show_progress: show a progress bar per arm (stderr).
        seed: the seed of the models' initialisation and of the batch order (both arms alike).

    Returns:
        ``{arm name: RunResult}``, in the order the table prints them.

    Example:
        >>> results = run_demo(epochs=1, lower="aot_eager", show_progress=False)   # doctest: +SKIP
    """
    from .bench.common import progress

    with torch.random.fork_rng(devices=[]):  # the demo seeds torch itself; the caller's RNG stays as it was
        return _run(epochs, lower, show_progress, seed, progress)


def _run(epochs: int, lower: str, show_progress: bool, seed: int, progress) -> dict:
    data = load_digits(image=True)
    cfg = CosmicConfig(lower=lower)
    print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test images (scikit-learn, bundled)")
    print(f"model: DigitsCNN, {epochs} epochs, SGD lr 0.1, batch 32, seed {seed}\n")

    torch.manual_seed(seed)
    info = transform_info(transform(DigitsCNN(), cfg))
    rows = [(s.name, s.kind, s.width, "yes" if s.name in info.rewritten else f"no ({s.reason or 'not rewritten'})")
            for s in info.sites]
    print(f"rewritten sites (path: {info.path}; QCI init {cfg.qci_init.value}, CSC at {cfg.csc.value}):")
    print(tabulate(rows, headers=["site", "kind", "width", "QCI inserted"], tablefmt="github"))
    print()

    results = {}
    # No plain torch.compile arm: torch 2.13.0's CPU Inductor computes zero gradients for this CNN's
    # convolutions (README, "Known upstream issue"), which would show a torch bug as a result.
    arms = (
        ("plain PyTorch (eager)", Arm("plain")),
        (f"cosmic_fx.compile ({lower})", Arm("cosmic", cfg, engine="compile")),
    )
    for name, arm in arms:
        t0 = time.perf_counter()
        with progress(epochs, name, show_progress) as bar:
            results[name] = train_classifier(DigitsCNN, data, arm, epochs=epochs, seed=seed, progress=bar.update)
        results[name].total_seconds = time.perf_counter() - t0
    table = [
        (name, f"{100 - r.final_error:.2f}%", f"{r.train_loss[-1]:.4f}", f"{r.first_step_time:.1f}",
         f"{1e3 * r.median_step:.2f}", f"{100 * r.frozen_fraction:.0f}%", f"{100 * r.scaled_fraction:.0f}%")
        for name, r in results.items()
    ]
    print(tabulate(table, headers=["arm", "test accuracy", "final train loss", "first step s (compile)",
                                   "median step ms", "CDG frozen", "CCE scaled"], tablefmt="github"))
    return results
