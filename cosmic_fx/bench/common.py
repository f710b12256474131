"""Helpers shared by the benchmarks: progress bars, mean/spread formatting, result folders, small MLPs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar on stderr when tqdm is installed and enabled, else a silent counter."""
    bar = None
    if enabled:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        except ImportError:
            bar = None

    class _Silent:
        def update(self, n: int = 1) -> None:
            pass

        def set_postfix_str(self, s: str) -> None:
            pass

    try:
        yield bar if bar is not None else _Silent()
    finally:
        if bar is not None:
            bar.close()


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def write_results(out_dir: str | None, name: str, markdown: str, payload: dict[str, Any]) -> None:
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as fh:
        fh.write(markdown + "\n")
    with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
        json.dump(payload, fh, indent=2, default=str)


def relu_mlp(in_dim: int, width: int, hidden: int, out_dim: int = 10) -> nn.Sequential:
    """``hidden`` layers ``Linear, ReLU`` of ``width`` features (the first reads ``in_dim``), then
    ``Linear(width, out_dim)``."""
    from torch import nn

    layers: list[nn.Module] = []
    dims = [in_dim] + [width] * hidden
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


def linear_relu_stack(width: int, layers: int) -> nn.Sequential:
    """``layers`` times ``Linear(width, width), ReLU`` as an ``nn.Sequential`` (square: every layer alike)."""
    from torch import nn

    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])
