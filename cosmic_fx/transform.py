"""``cosmic_fx.transform``: give a model its QCI parameters (and CSC) before anything compiles it.

Two paths, never a crash:

* **symbolic_trace** — the model is traced with :class:`~cosmic_fx.tracer.CosmicTracer` and the
  passes rewrite the graph; the result is a ``GraphModule`` sharing the model's modules, with the new
  QCIs under ``cosmic_qci.<site name>``.
* **module_swap** — for models that do not trace (data-dependent control flow, most third-party
  models): a structural copy of the model (parameters and buffers shared, module objects new) gets
  each qualifying ``nn.Linear`` / ``nn.Conv2d`` replaced by a :class:`~cosmic_fx.modules.CosmicSite`
  holding the original layer as ``base_layer``; output CSC is a forward hook on the copy.

The user's model is never modified: its modules, parameters and mode stay as they were.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import fx, nn

from . import policy
from .config import CosmicConfig, CSCPlacement
from .modules import CosmicSite, make_csc, make_qci
from .runtime import STATE_NAME, CosmicRuntime, CosmicState
from .runtime.distributed import check_not_wrapped
from .runtime.eager import is_site_module
from .tracer import COSMIC_MODULES, Site, SiteKind, find_sites, qualify, symbolic_trace

__all__ = ["TransformInfo", "transform", "transform_info"]

log = logging.getLogger(__name__)

INFO_ATTR = "cosmic_transform"

@dataclasses.dataclass
class TransformInfo:
    """What :func:`transform` did.

    Attributes:
        path: ``"symbolic_trace"`` or ``"module_swap"``.
        config: the config used.
        sites: every Linear/Conv2d site found, with whether it qualified.
        rewritten: names of the sites that got a QCI (and CSC when ``csc="sites"``).
        trace_error: why symbolic tracing failed (module_swap path only).
    """

    path: str
    config: CosmicConfig
    sites: list[tuple[str, str, int | None, bool, str]]
    rewritten: list[str]
    trace_error: str | None = None


def transform_info(model: nn.Module) -> TransformInfo | None:
    """The :class:`TransformInfo` of a model returned by :func:`transform` (else ``None``)."""
    return getattr(model, INFO_ATTR, None)


def _site_summary(sites: list[Site]) -> list[tuple[str, str, int | None, bool, str]]:
    return [(s.name, s.kind.value, s.width, s.qualifies, s.reason) for s in sites]


def _check_has_sites(model: nn.Module, sites: list[Site], config: CosmicConfig) -> None:
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer: cosmic_fx has nothing to rewrite. "
            "The passes act on Linear/Conv2d sites only."
        )
    if (config.targets or config.exclude) and not any(s.qualifies for s in sites):
        raise ValueError(
            f"no Linear or Conv2d layer matched targets={list(config.targets)} exclude={list(config.exclude)} "
            f"(width > {config.min_width}); the model has: {', '.join(f'{s.name} ({s.width})' for s in sites)}"
        )


def transform(model: nn.Module, config: CosmicConfig | None = None) -> nn.Module:
    """Insert QCI and CSC into ``model`` per ``config``; returns a new module, the input is untouched.

    The result shares the original weights and owns the new QCI parameters (they are in
    ``.parameters()`` and ``state_dict()``, so an optimizer built on the result trains them). With the
    default identity init, the result computes exactly what the model did (up to CSC, if enabled).
    ``cosmic_fx.transform_info(result)`` says which path was taken and what was rewritten.

    Args:
        model: any ``nn.Module``.
        config: a :class:`CosmicConfig` (default: ``CosmicConfig()``).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> tm = cosmic_fx.transform(model, cosmic_fx.CosmicConfig(csc="none"))
        >>> cosmic_fx.transform_info(tm).rewritten
        ['0']
        >>> x = torch.randn(2, 8)
        >>> torch.equal(tm(x), model(x))
        True
    """
    config = config or CosmicConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"cosmic_fx.transform expects an nn.Module; got {type(model).__name__}")
    check_not_wrapped(model, "cosmic_fx.transform")
    if transform_info(model) is not None:
        raise ValueError(
            "this model was already transformed by cosmic_fx.transform; transform the original model "
            "instead (transforming twice would stack a second QCI on every site)"
        )
    try:
        gm = symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any trace failure means: use the fallback path
        log.info("cosmic_fx.transform: symbolic_trace failed (%s); using module swap", err)
        return _module_swap(model, config, f"{type(err).__name__}: {err}".splitlines()[0])
    return _rewrite_traced(model, gm, config)


def _rewrite_traced(model: nn.Module, gm: fx.GraphModule, config: CosmicConfig) -> fx.GraphModule:
    from cosmic_fx.passes import InsertCSC, InsertQCI

    sites = find_sites(gm, config)
    _check_has_sites(model, sites, config)
    if config.qci:
        InsertQCI(config)(gm)
    InsertCSC(config)(gm)
    gm.train(model.training)
    setattr(gm, INFO_ATTR, TransformInfo(
        path="symbolic_trace",
        config=config,
        sites=_site_summary(sites),
        rewritten=[s.name for s in sites if s.qualifies and (config.qci or config.csc is CSCPlacement.SITES)],
    ))
    return _add_runtime(gm, config, _traced_output_layer(gm))


def _add_runtime(result: nn.Module, config: CosmicConfig, output_layer: list[str] | None) -> nn.Module:
    """Give the result its runtime (registered last, as ``cosmic_state``): it hooks every trainable
    parameter now, and acts once activated (``attach_hooks``, the backend, ``cosmic_fx.compile``)."""
    runtime = CosmicRuntime(config, transformed=True)
    result.add_module(STATE_NAME, CosmicState(runtime))
    runtime.bind(result)
    if output_layer is not None:
        runtime.set_protected(output_layer)
    return result


def _traced_output_layer(gm: fx.GraphModule) -> list[str]:
    """The output layer of a traced graph (:func:`cosmic_fx.policy.output_layer` over its calls)."""
    functional_sites = (torch.nn.functional.linear, torch.conv2d, torch.nn.functional.conv2d)
    calls = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        reads = [str(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
        site = node.op == "call_function" and node.target in functional_sites
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            site = is_site_module(mod.base_layer if isinstance(mod, CosmicSite) else mod)
            reads += [f"{node.target}.{n}" for n, _ in mod.named_parameters()]
        calls.append(policy.Call(site, tuple(reads)))
    return [str(n) for n in policy.output_layer(calls)]


def _structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``."""
    memo = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def _module_swap(model: nn.Module, config: CosmicConfig, trace_error: str) -> nn.Module:
    sites = []
    for name, mod in model.named_modules():
        if isinstance(mod, COSMIC_MODULES):
            continue
        if isinstance(mod, nn.Conv2d):
            sites.append(qualify(Site(name, SiteKind.CONV2D, mod.out_channels, node=None), config))  # type: ignore[arg-type]
        elif isinstance(mod, nn.Linear):
            sites.append(qualify(Site(name, SiteKind.LINEAR, mod.out_features, node=None), config))  # type: ignore[arg-type]
    _check_has_sites(model, sites, config)
    out = _structural_copy(model)
    rewritten = []
    for site in sites:
        if not site.qualifies or not (config.qci or config.csc is CSCPlacement.SITES):
            continue
        parent_name, _, child = site.name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        layer = getattr(parent, child)
        like = next(layer.parameters(), None)
        qci = make_qci(site.width, site.feature_dim, config, like) if config.qci else None
        csc = make_csc(config, site.feature_dim) if config.csc is CSCPlacement.SITES else None
        setattr(parent, child, CosmicSite(layer, qci, csc))
        rewritten.append(site.name)
    if config.csc is CSCPlacement.OUTPUT:
        csc = make_csc(config, passthrough=True)
        out.register_forward_hook(lambda m, a, o: _map_output(o, csc))
    setattr(out, INFO_ATTR, TransformInfo("module_swap", config, _site_summary(sites), rewritten, trace_error))
    return _add_runtime(out, config, None)  # the output layer is known at the first forward


def _map_output(out, csc: nn.Module):
    if isinstance(out, tuple):
        return tuple(_map_output(o, csc) for o in out)
    if isinstance(out, list):
        return [_map_output(o, csc) for o in out]
    if isinstance(out, dict):
        return {k: _map_output(v, csc) for k, v in out.items()}
    return csc(out)
