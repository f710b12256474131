"""cosmic_fx: torch.fx / torch.compile passes for the cosmic mechanisms.

``torch.compile(model, backend="cosmic")`` works without importing this package (entry point).
The public API is re-exported here, lazily: ``import cosmic_fx`` is cheap (it imports neither torch nor
the library), and the first use of a name (``cosmic_fx.transform``, ``from cosmic_fx import explain``)
imports the module that defines it. The command line (``cosmic-fx --help``) relies on this.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import load_adapter
    from .backend import cosmic_backend
    from .compiling import compile
    from .config import CCEFused, CCEMode, CDGMode, CosmicConfig, CSCPlacement, Lowering, PrefixSignal, QCIForm, QCIInit
    from .export import export
    from .inspect import explain
    from .modules import (
        CosmicStateCompression,
        DiagonalQCI,
        LowRankQCI,
        QuantumClassicalInterface,
        cosmic_state_compression,
    )
    from .prefix_cache import PrefixCache
    from .quantities import efficiency, entropy, info
    from .report import Report
    from .runtime import (
        CosmicRuntime,
        FusedOptimizer,
        attach_hooks,
        detach_hooks,
        fused_optimizer,
        hooks_of,
        runtime_of,
        watch_optimizer,
    )
    from .sites import SITE_KINDS, Site, SiteInfo, SiteKind, module_sites
    from .tracer import find_sites, sites_in_forward_order
    from .transform import TransformInfo, transform, transform_info

__version__ = "0.1.0"

# public name -> the module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    **{name: "adapter" for name in ("load_adapter",)},
    **{name: "backend" for name in ("cosmic_backend",)},
    **{name: "compiling" for name in ("compile",)},
    **{name: "config" for name in ("CCEFused", "CCEMode", "CDGMode", "CSCPlacement", "CosmicConfig", "Lowering",
                                   "PrefixSignal", "QCIForm", "QCIInit")},
    **{name: "export" for name in ("export",)},
    **{name: "inspect" for name in ("explain",)},
    **{name: "modules" for name in ("CosmicStateCompression", "DiagonalQCI", "LowRankQCI",
                                    "QuantumClassicalInterface", "cosmic_state_compression")},
    **{name: "prefix_cache" for name in ("PrefixCache",)},
    **{name: "quantities" for name in ("efficiency", "entropy", "info")},
    **{name: "report" for name in ("Report",)},
    **{name: "runtime" for name in ("CosmicRuntime", "FusedOptimizer", "attach_hooks", "detach_hooks",
                                    "fused_optimizer", "hooks_of", "runtime_of", "watch_optimizer")},
    **{name: "sites" for name in ("SITE_KINDS", "Site", "SiteInfo", "SiteKind", "module_sites")},
    **{name: "tracer" for name in ("find_sites", "sites_in_forward_order")},
    **{name: "transform" for name in ("TransformInfo", "transform", "transform_info")},
}

__all__ = [
    "CCEFused",
    "CCEMode",
    "CDGMode",
    "CSCPlacement",
    "CosmicConfig",
    "CosmicRuntime",
    "CosmicStateCompression",
    "DiagonalQCI",
    "FusedOptimizer",
    "LowRankQCI",
    "Lowering",
    "PrefixCache",
    "PrefixSignal",
    "QCIForm",
    "QCIInit",
    "QuantumClassicalInterface",
    "Report",
    "SITE_KINDS",
    "Site",
    "SiteInfo",
    "SiteKind",
    "TransformInfo",
    "attach_hooks",
    "compile",
    "cosmic_backend",
    "cosmic_state_compression",
    "detach_hooks",
    "efficiency",
    "entropy",
    "explain",
    "export",
    "find_sites",
    "fused_optimizer",
    "hooks_of",
    "info",
    "load_adapter",
    "module_sites",
    "runtime_of",
    "sites_in_forward_order",
    "transform",
    "transform_info",
    "watch_optimizer",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # A submodule (``cosmic_fx.inspect.watch_backend``) loads on first use too, as it did when this
        # package imported every module eagerly.
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module 'cosmic_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package's module type: importing a submodule that shares its name with a public function
    (``cosmic_fx.transform``, ``cosmic_fx.export``) must not rebind ``cosmic_fx.transform`` to the
    submodule, as the import system does for a package attribute; the submodule stays in ``sys.modules``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
