"""Interleaved, median-of-many timing for ``cosmic-fx bench perf``.

Arms are interleaved round by round, so that drift on a shared machine hits every arm alike; with one
torch thread the clock is the thread's CPU time (other processes do not count), else wall time.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Timer", "ms", "no_gc", "torch_threads"]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous number."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Collect once, then keep the garbage collector from pausing inside the timed block."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Timer:
    """Interleaved, median-of-many timing: ``rounds x reps`` calls per arm, the arms taking turns call
    by call. An arm's call is timed, unless it returns an ``int``: the nanoseconds it measured itself
    (e.g. the backward only)."""

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
        with no_gc():
            for _ in range(self.rounds):
                # one call per arm in turn: load that drifts within a round (neighbours on a shared
                # machine) hits every arm alike, not the arm that happened to run then
                for _ in range(self.reps):
                    for name, fn in arms.items():
                        t0 = self.clock()
                        own = fn()
                        samples[name].append(own if isinstance(own, int) else self.clock() - t0)
                self.tick()
        reduce = statistics.median if stat == "median" else statistics.fmean
        return {k: reduce(v) / 1e9 for k, v in samples.items()}


def ms(seconds: float) -> str:
    """``0.0123`` -> ``"12.3 ms"`` (three significant digits)."""
    return f"{seconds * 1e3:.3g} ms"
