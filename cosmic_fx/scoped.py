"""Context managers that change state for one block and put it back: the modes and grad mode of
models run on example inputs (:func:`eval_no_grad`), and the level of torch's loggers
(:func:`quiet_torch_logs`). Shared by :mod:`cosmic_fx.inspect`, :mod:`cosmic_fx.export` and the CLI.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["eval_no_grad", "quiet_native_stderr", "quiet_torch_logs"]


@contextlib.contextmanager
def eval_no_grad(*models: nn.Module) -> Iterator[None]:
    """Eval mode (no BatchNorm statistics update, no dropout) and no grad; every module's mode restored."""
    modes = {id(m): (m, m.training) for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.values():
            m.training = training


@contextlib.contextmanager
def quiet_torch_logs(*names: str) -> Iterator[None]:
    """Silence torch's own warnings (graph dumps, optional-package notes) that our error replaces."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for one block: torch.profiler's C++ side prints start/stop
    lines there that no logger controls. Python exceptions still propagate normally."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
