"""``cosmic_fx.transform``: give a model its QCI parameters (and CSC) before anything compiles it.

The result is always an instance of the user's class: a structural copy of the model (module
objects new, every parameter and buffer shared), so its methods, attributes, ``config``,
``generate()`` and the forward hooks the user registered keep working, and its ``state_dict`` has
the model's own keys plus the QCIs' (``cosmic_qci.<site>.*``). Two ways to put the QCIs in:

* **symbolic_trace** — the copy is traced with :class:`~cosmic_fx.tracer.CosmicTracer`, the passes
  rewrite the graph (QCI and CSC nodes), and the rewritten graph's ``forward`` is bound to the copy.
  ``transform_info(result).graph_module`` is that graph (sharing the copy's modules);
  :func:`cosmic_fx.explain` shows it.
* **module_swap** — for models that do not trace (data-dependent control flow, most third-party
  models), or whose non-leaf submodules carry forward hooks a graph would bypass: every site's
  layer stays in place and a forward hook applies its QCI (see :mod:`cosmic_fx.site_hooks` for why
  hooks rather than wrappers).

Which layers are sites is the table in :mod:`cosmic_fx.sites`. The user's model is never modified.

On the traced path the QCIs live in ``forward``'s graph: another method of the model that calls a
layer directly (``self.fc1(x)`` in a custom ``encode``) runs it without its QCI. On the module-swap
path every call of a layer gets its QCI. An ``nn.Sequential`` result still indexes, iterates and
counts its own layers only (:mod:`cosmic_fx.sequential`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import types

import torch
from torch import fx, nn

from .config import CosmicConfig, CSCPlacement
from .runtime import STATE_NAME, CosmicRuntime, CosmicState
from .runtime.distributed import check_not_wrapped
from .sequential import keep_sequential_face
from .site_hooks import CSC_ROOT, QCI_ROOT, attach_output_csc, attach_sites
from .site import Site, SiteInfo, check_materialized, check_selection
from .sites import NOT_SITES, describe_kinds, module_sites, site_module_kinds
from .tracer import META_KEY, CosmicTracer, find_sites, output_layer_params, params_in_forward_order, symbolic_trace

__all__ = ["TransformInfo", "transform", "transform_info"]

log = logging.getLogger(__name__)

INFO_ATTR = "cosmic_transform"

@dataclasses.dataclass
class TransformInfo:
    """What :func:`transform` did.

    Attributes:
        path: ``"symbolic_trace"`` or ``"module_swap"``.
        config: the config used.
        sites: every site found (:class:`~cosmic_fx.sites.SiteInfo`), with whether it qualified.
        rewritten: names of the sites that got a QCI (and CSC when ``csc="sites"``), read from what
            the passes inserted (traced path) or the hooks attached (module swap), in order.
        trace_error: why symbolic tracing was not used (module_swap path only).
        graph_module: traced path: the rewritten graph, whose ``forward`` the result runs.
    """

    path: str
    config: CosmicConfig
    sites: list[SiteInfo]
    rewritten: list[str]
    trace_error: str | None = None
    graph_module: fx.GraphModule | None = dataclasses.field(default=None, repr=False, compare=False)


def transform_info(model: nn.Module) -> TransformInfo | None:
    """The :class:`TransformInfo` of a model returned by :func:`transform` (else ``None``)."""
    return getattr(model, INFO_ATTR, None)


def as_config(config: object, where: str) -> CosmicConfig:
    """``config`` if it is a :class:`CosmicConfig` (``None``: the default); else a ``TypeError`` that
    says what to pass instead."""
    if config is None:
        return CosmicConfig()
    if isinstance(config, CosmicConfig):
        return config
    hint = {dict: "CosmicConfig.from_options(your_dict)", str: f"CosmicConfig.from_options({{'preset': {config!r}}})"}
    raise TypeError(
        f"{where}: config must be a CosmicConfig; got a {type(config).__name__}. Pass "
        f"{hint.get(type(config), 'CosmicConfig(...)')} (an options dict as torch.compile(..., options=...) takes "
        "becomes a config with CosmicConfig.from_options; presets are CosmicConfig.seed() and CosmicConfig.off())."
    )


def _check_has_sites(model: nn.Module, sites: list[Site], config: CosmicConfig) -> None:
    if not sites:
        others = sorted({cls.__name__ for m in model.modules() for cls in NOT_SITES if isinstance(m, cls)})
        note = (f" It has {', '.join(others)}, which are not sites (see cosmic_fx.sites.NOT_SITES for why)."
                if others else "")
        raise ValueError(
            f"{type(model).__name__} has no site: no layer that cosmic_fx can rewrite. The site kinds are "
            f"{describe_kinds()}.{note}"
        )
    if (config.targets or config.exclude) and not any(s.qualifies for s in sites):
        raise ValueError(
            f"no site matched targets={list(config.targets)} exclude={list(config.exclude)} "
            f"(width > {config.min_width}); the model has: {', '.join(f'{s.name} ({s.width})' for s in sites)}"
        )


def transform(model: nn.Module, config: CosmicConfig | None = None) -> nn.Module:
    """Insert QCI and CSC into ``model`` per ``config``; returns a new model of the same class.

    The result shares the original weights and owns the new QCI parameters (they are in
    ``.parameters()`` and ``state_dict()``, so an optimizer built on the result trains them). With the
    default identity init, the result computes exactly what the model did (up to CSC, if enabled).
    ``cosmic_fx.transform_info(result)`` says which path was taken and what was rewritten.

    Args:
        model: any ``nn.Module`` (left untouched).
        config: a :class:`CosmicConfig` (default: ``CosmicConfig()``).

    Returns:
        an instance of ``type(model)``.

    Raises:
        TypeError: ``model`` is not a module, or ``config`` is not a ``CosmicConfig``.
        ValueError: the model has no site, no site matches ``targets``, a lazy module is not
            materialised yet, or the model was transformed already.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> tm = cosmic_fx.transform(model, cosmic_fx.CosmicConfig(csc="none"))
        >>> cosmic_fx.transform_info(tm).rewritten, isinstance(tm, torch.nn.Sequential)
        (['0'], True)
        >>> x = torch.randn(2, 8)
        >>> torch.equal(tm(x), model(x))
        True
    """
    config = as_config(config, "cosmic_fx.transform")
    if not isinstance(model, nn.Module):
        raise TypeError(f"cosmic_fx.transform expects an nn.Module; got {type(model).__name__}")
    check_not_wrapped(model, "cosmic_fx.transform")
    if transform_info(model) is not None:
        raise ValueError(
            "this model was already transformed by cosmic_fx.transform; transform the original model "
            "instead (transforming twice would stack a second QCI on every site)"
        )
    check_materialized(model)
    out = _structural_copy(model)
    kinds = site_module_kinds(out)
    try:
        _check_no_bypassed_hooks(out, kinds)
        gm = _trace_in_both_modes(out, kinds)
    except Exception as err:  # noqa: BLE001 - any trace failure means: use the fallback path
        log.debug("cosmic_fx.transform: not traced (%s); using module swap", err, exc_info=True)
        return _module_swap(model, out, config, kinds, f"{type(err).__name__}: {err}".splitlines()[0])
    return _rewrite_traced(model, out, gm, config)


def _add_runtime(result: nn.Module, config: CosmicConfig, output_layer: list[str] | None,
                 order: list[str] | None = None) -> nn.Module:
    """Give the result its runtime (registered last, as ``cosmic_state``): it hooks every trainable
    parameter now, and acts once activated (``attach_hooks``, the backend, ``cosmic_fx.compile``).
    ``output_layer`` and the parameters' forward ``order`` come from the traced graph (module swap:
    from the first forward)."""
    runtime = CosmicRuntime(config, transformed=True)
    result.add_module(STATE_NAME, CosmicState(runtime))
    runtime.bind(result)
    if output_layer is not None:
        runtime.set_protected(output_layer)
    if order is not None:
        runtime.set_forward_order(order)
    return result


def _structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``."""
    memo = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    try:
        return copy.deepcopy(model, memo)
    except Exception as err:
        raise TypeError(
            f"cosmic_fx.transform copies the module tree of {type(model).__name__} (sharing its parameters and "
            f"buffers) and could not: {type(err).__name__}: {err}. Make the model deep-copyable (keep handles "
            "such as open files or locks out of module attributes)."
        ) from err


_CONSTANT = re.compile(r"_tensor_constant\d+")


def _trace_in_both_modes(model: nn.Module, kinds) -> fx.GraphModule:
    """Trace ``model``; refuse (module swap then) a forward whose graph depends on ``self.training``.

    ``symbolic_trace`` reads ``self.training`` as a Python bool, so code outside the leaf modules that
    branches on it (timm's ``BatchNormAct2d``, torchvision's ``StochasticDepth``) would be frozen in
    the mode the model had when it was traced: ``.eval()`` would no longer change it. Tracing in both
    modes and comparing the graphs finds it.
    """
    gm = symbolic_trace(model, kinds)
    modes = [(m, m.training) for m in model.modules()]
    before = set(vars(model))
    try:
        model.train(not model.training)
        other = symbolic_trace(model, kinds)
    finally:
        for m, training in modes:
            m.training = training
        for name in set(vars(model)) - before:  # tensor constants the second trace stored on the root
            delattr(model, name)
    # the tracer numbers the tensor constants it stores on the root, so a second trace renames them
    if _CONSTANT.sub("_tensor_constant", other.code) != _CONSTANT.sub("_tensor_constant", gm.code):
        raise RuntimeError("its forward depends on self.training, which a traced graph would fix in the "
                           "mode it was traced in")
    return gm


def _check_no_bypassed_hooks(model: nn.Module, kinds) -> None:
    """A traced graph inlines every non-leaf submodule: forward hooks on one would never run (and
    tracing would run them once, on proxies). Checked before tracing."""
    tracer = CosmicTracer(kinds)
    leaves: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(f"{leaf}.") for leaf in leaves):
            continue
        if tracer.is_leaf_module(mod, name):
            leaves.append(name)
        elif mod._forward_hooks or mod._forward_pre_hooks:
            raise RuntimeError(f"submodule {name} has forward hooks, which a traced graph would bypass")


def _rewrite_traced(model: nn.Module, out: nn.Module, gm: fx.GraphModule, config: CosmicConfig) -> nn.Module:
    from cosmic_fx.passes import InsertCSC, InsertQCI

    sites = find_sites(gm, config)
    _check_has_sites(model, sites, config)
    check_selection(sites, config)
    if config.qci:
        InsertQCI(config)(gm)
    InsertCSC(config)(gm)
    _bind_graph(out, gm)
    keep_sequential_face(out)
    info = TransformInfo("symbolic_trace", config, [s.info() for s in sites], _inserted_sites(gm), graph_module=gm)
    setattr(out, INFO_ATTR, info)
    return _add_runtime(out, config, output_layer_params(gm), params_in_forward_order(gm))


def _inserted_sites(gm: fx.GraphModule) -> list[str]:
    """Names of the sites the passes inserted a QCI or CSC after, in graph order."""
    names = (n.meta.get(META_KEY, {}) for n in gm.graph.nodes)
    return list(dict.fromkeys(m["site"] for m in names if m.get("inserted_by") and "site" in m))


def _bind_graph(out: nn.Module, gm: fx.GraphModule) -> None:
    """Make ``out`` run ``gm``'s code: the new modules move to ``out`` and ``gm.forward`` is bound to it.

    ``gm`` was traced from ``out``, so its code's ``self.<path>`` names exist on ``out``.
    """
    for root in (QCI_ROOT, CSC_ROOT):
        if hasattr(gm, root) and not hasattr(out, root):
            getattr(gm, root).train(out.training)
            out.add_module(root, getattr(gm, root))
    for node in gm.graph.nodes:  # tensor constants the tracer created (`_tensor_constant0`)
        if node.op == "get_attr" and not _has_path(out, str(node.target)):
            setattr(out, str(node.target), getattr(gm, str(node.target)))
    out.forward = types.MethodType(type(gm).forward, out)


def _has_path(module: nn.Module, target: str) -> bool:
    obj = module
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _module_swap(model: nn.Module, out: nn.Module, config: CosmicConfig, kinds, trace_error: str) -> nn.Module:
    sites = module_sites(out, config, kinds=kinds)
    _check_has_sites(model, sites, config)
    check_selection(sites, config)
    rewritten = attach_sites(out, sites, config)
    if config.csc is CSCPlacement.OUTPUT:
        attach_output_csc(out, config)
    keep_sequential_face(out)
    info = TransformInfo("module_swap", config, [s.info() for s in sites], rewritten, trace_error)
    setattr(out, INFO_ATTR, info)
    return _add_runtime(out, config, None)  # the output layer is known at the first forward
