"""cosmic_fx: torch.fx / torch.compile passes for the cosmic mechanisms.

``torch.compile(model, backend="cosmic")`` works without importing this package (entry point).
The public API is re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapter import load_adapter
from .backend import backend_records, cosmic_backend
from .config import CCEMode, CDGMode, CosmicConfig, CSCPlacement, Lowering, QCIForm, QCIInit
from .export import export
from .hooks import CosmicHooks, attach_hooks, detach_hooks, hooks_of
from .inspect import explain
from .modules import (
    CosmicSite,
    CosmicStateCompression,
    DiagonalQCI,
    LowRankQCI,
    QuantumClassicalInterface,
    cosmic_state_compression,
)
from .quantities import efficiency, entropy, info
from .report import Report
from .tracer import Site, find_sites
from .transform import TransformInfo, transform, transform_info

__version__ = "0.1.0"


def compile(model: nn.Module, config: CosmicConfig | None = None, **compile_kwargs: Any) -> nn.Module:
    """Transform ``model`` (QCI + CSC) and ``torch.compile`` it with the ``cosmic`` backend.

    Args:
        model: the model (left untouched).
        config: a :class:`CosmicConfig` (default preset when omitted).
        **compile_kwargs: passed to ``torch.compile`` (``dynamic=``, ``fullgraph=``, ...).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> cm = cosmic_fx.compile(model, cosmic_fx.CosmicConfig(lower="aot_eager"))
        >>> cm(torch.randn(2, 8)).shape   # doctest: +SKIP
        torch.Size([2, 4])
    """
    config = config or CosmicConfig()
    for key in ("backend", "options", "mode"):
        if key in compile_kwargs:
            raise TypeError(f"cosmic_fx.compile sets torch.compile's {key!r} itself; put settings in the CosmicConfig")
    return torch.compile(transform(model, config), backend=cosmic_backend, options={"config": config}, **compile_kwargs)


__all__ = [
    "CCEMode",
    "CDGMode",
    "CSCPlacement",
    "CosmicConfig",
    "CosmicHooks",
    "CosmicSite",
    "CosmicStateCompression",
    "DiagonalQCI",
    "LowRankQCI",
    "Lowering",
    "QCIForm",
    "QCIInit",
    "QuantumClassicalInterface",
    "Report",
    "Site",
    "TransformInfo",
    "attach_hooks",
    "backend_records",
    "compile",
    "cosmic_backend",
    "cosmic_state_compression",
    "detach_hooks",
    "efficiency",
    "entropy",
    "explain",
    "export",
    "find_sites",
    "hooks_of",
    "info",
    "load_adapter",
    "transform",
    "transform_info",
]
