"""Find the sites of an FX graph, whatever produced it, from the table in :mod:`cosmic_fx.sites`.

Three flavours of graph are understood:

* ``torch.fx.symbolic_trace`` graphs: ``call_module`` nodes of a site module (``nn.Linear``, HF
  ``Conv1D``, ``nn.MultiheadAttention``, ...) and ``call_function`` nodes (``F.linear``,
  ``torch.addmm``) whose weight is a ``get_attr`` of the model;
* the dynamo graphs a ``torch.compile`` backend receives: ``call_function`` nodes whose weights are
  parameter placeholders; names come from ``nn_module_stack`` and the parameters' sources;
* ATen graphs (``aten.linear``, ``aten.addmm``/``aten.mm``, ``aten.convolution`` with a 4-d weight).

Sizes are read without guarding: a symbolic size stays symbolic (``int()`` on it would add a guard
such as ``Eq(s77, 8)`` and recompile for every batch size); widths come from the weights, which are
static. Nodes that belong to cosmic's own modules (a QCI's matmul) are never sites.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections import OrderedDict
from typing import Any

import torch
from torch import fx, nn

from .config import CosmicConfig
from .modules import CosmicStateCompression, QuantumClassicalInterface
from .sites import SITE_KINDS, Site, SiteInfo, SiteKind, qualify, site_module_kinds

__all__ = [
    "CosmicTracer",
    "Site",
    "SiteInfo",
    "find_sites",
    "module_name_of",
    "output_layer_params",
    "params_in_forward_order",
    "sites_in_forward_order",
    "symbolic_trace",
]

COSMIC_MODULES = (QuantumClassicalInterface, CosmicStateCompression)
META_KEY = "cosmic_fx"


class CosmicTracer(fx.Tracer):
    """``fx.Tracer`` that keeps site modules and cosmic's own modules as leaves.

    ``torch.nn`` modules that hold sites among their children (``nn.TransformerEncoderLayer``) are
    traced into, so that their layers are sites of the graph; a forward that cannot be traced then
    fails the trace (and :func:`cosmic_fx.transform` swaps modules instead).

    Args:
        site_modules: ``id(module) -> kinds`` from :func:`cosmic_fx.sites.site_module_kinds`.
    """

    def __init__(self, site_modules: dict[int, tuple[SiteKind, ...]] | None = None) -> None:
        super().__init__()
        self.site_modules = site_modules or {}

    def create_arg(self, a: Any) -> Any:
        # fx turns every mapping into a plain dict: a forward returning a ``ModelOutput`` (or an
        # ``OrderedDict`` subclass) would come back as a dict, and ``out.logits`` would fail. A mapping
        # whose class can be rebuilt from keyword arguments becomes a call of that class instead.
        if isinstance(a, dict) and type(a) is not dict and _rebuilds_from_kwargs(a):
            kwargs = {k: self.create_arg(v) for k, v in a.items()}
            return self.create_node("call_function", type(a), (), kwargs)
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, COSMIC_MODULES) or id(m) in self.site_modules:
            return True
        if type(m).__module__.startswith("torch.nn") and any(id(c) in self.site_modules for c in m.modules()):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def _rebuilds_from_kwargs(mapping: dict) -> bool:
    """``type(mapping)(**mapping)`` gives back an equal object of the same class: dataclass mappings
    (Hugging Face ``ModelOutput``) and dict subclasses that keep ``dict``'s constructor, with string keys."""
    cls = type(mapping)
    if not all(isinstance(k, str) and k.isidentifier() for k in mapping):
        return False
    return dataclasses.is_dataclass(cls) or cls.__init__ in (dict.__init__, OrderedDict.__init__)


def is_mapping_call(node: Any) -> bool:
    """A graph node that builds a mapping of the model's own class from its keyword arguments."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and isinstance(node.target, type)
            and issubclass(node.target, dict))


def symbolic_trace(model: nn.Module, site_modules: dict[int, tuple[SiteKind, ...]] | None = None) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with :class:`CosmicTracer`; the result shares the model's modules.

    Example:
        >>> gm = symbolic_trace(nn.Sequential(nn.Linear(4, 32), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    tracer = CosmicTracer(site_module_kinds(model) if site_modules is None else site_modules)
    graph = tracer.trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


# ---------------------------------------------------------------------- reading graphs without guards
def static_int(size: Any) -> int | None:
    """``size`` as an ``int`` if it is one, or a symbolic size known to be constant; ``None`` for a
    symbolic size. Never adds a guard."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        return size.node.maybe_as_int()
    return None


def _value(node: fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def _static_shape(node: fx.Node, gm: fx.GraphModule | None = None) -> tuple[int | None, ...] | None:
    """The node's shape, symbolic sizes as ``None``; a ``get_attr`` tensor's shape if no metadata."""
    shape = getattr(_value(node), "shape", None)
    if shape is None and gm is not None and node.op == "get_attr":
        tensor = _get_attr(gm, node)
        shape = tensor.shape if isinstance(tensor, torch.Tensor) else None
    return None if shape is None else tuple(static_int(s) for s in shape)


def _get_attr(gm: fx.GraphModule, node: fx.Node) -> Any:
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj


# ---------------------------------------------------------------------- names
# The frame's local that holds the compiled module: `L['self']`, or `L['args'][0]` when dynamo starts in a
# wrapper `f(*args, **kwargs)` around the forward (Hugging Face's output decorators on Mistral, Phi, ...);
# an index is part of the root only when a path follows it, so an input `L['args'][1]` keeps its "1".
_STACK_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\](?:\[\d+\](?=\.))?\.?")
_GETATTR = re.compile(r"getattr\(([^,]+),\s*['\"]([^'\"]+)['\"]\)")
_MANGLED = re.compile(r"_(?:modules|parameters|buffers)_")


def _normalize_dynamo_path(path: str) -> str:
    """``"L['self'].layers[0].fc"`` (or ``"L['args'][0].layers[0].fc"``) -> ``"layers.0.fc"``: the names
    ``model.named_modules()`` gives, the ones :func:`cosmic_fx.explain` shows."""
    while _GETATTR.search(path):
        path = _GETATTR.sub(r"\1.\2", path)
    path = re.sub(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = _STACK_ROOT.sub("", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    return path.strip(".")


def _stack(node: fx.Node) -> list[tuple[str, type]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value[0], value[1]
        out.append((_normalize_dynamo_path(path) if isinstance(path, str) else str(path), cls))
    return out


def module_name_of(node: fx.Node) -> tuple[str | None, type | None]:
    """The innermost module (qualified name, class) a node was traced from, if the graph recorded it."""
    stack = _stack(node)
    return stack[-1] if stack else (None, None)


def inside_cosmic_module(node: fx.Node) -> bool:
    """True for nodes dynamo traced from inside a QCI / CSC module, or inserted by a cosmic pass."""
    for _, cls in _stack(node):
        if isinstance(cls, type) and issubclass(cls, COSMIC_MODULES):
            return True
    return node.meta.get(META_KEY, {}).get("inserted_by") is not None


def placeholder_fqn(node: fx.Node) -> str:
    """The user-facing name of a dynamo placeholder (``"layers.0.weight"``), else its target.

    Dynamo names a parameter placeholder after its source (``L_self_modules_fc_parameters_weight_``);
    that mangled name is read back when the graph carries no source.
    """
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", None)
    if callable(name):
        name = name()
    if isinstance(name, str) and name.startswith("L["):
        return _normalize_dynamo_path(name)
    target = str(node.target)
    if target.startswith("L_") and _MANGLED.search(target):
        parts = _MANGLED.split(target[1:].rstrip("_"))
        return ".".join(parts[1:])
    return target


def _param_fqn(node: fx.Node, gm: fx.GraphModule | None = None) -> str | None:
    """The name of the parameter a weight node reads, or ``None`` when it is not a parameter."""
    if node.op == "get_attr":
        return str(node.target) if gm is None or isinstance(_get_attr(gm, node), nn.Parameter) else None
    if node.op != "placeholder":
        return None
    example = node.meta.get("example_value")
    if example is not None and not isinstance(example, nn.Parameter):
        return None  # a dynamo graph input that is not a parameter: an activation
    return placeholder_fqn(node)


def _strip_weight(fqn: str) -> str:
    return fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn


# ---------------------------------------------------------------------- call sites
_TRANSPOSES = {torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.t}
_VIEW_FNS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default,
             torch.ops.aten.detach.default, torch.reshape}
_VIEW_METHODS = {"view", "reshape", "contiguous"}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}


def _source(node: Any) -> tuple[Any, bool]:
    """Follow transposes and views back to the tensor they read; whether a transpose was crossed."""
    transposed = False
    while isinstance(node, fx.Node) and node.args:
        if (node.op == "call_function" and node.target in _TRANSPOSES) or (
                node.op == "call_method" and node.target in _TRANSPOSE_METHODS):
            transposed = not transposed
        elif not ((node.op == "call_function" and node.target in _VIEW_FNS) or (
                node.op == "call_method" and node.target in _VIEW_METHODS)):
            break
        node = node.args[0]
    return node, transposed


def _is_view(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _VIEW_FNS) or (
        node.op == "call_method" and node.target in _VIEW_METHODS)


def _through_output_views(node: fx.Node, width: int | None) -> fx.Node:
    """For a matmul site (``addmm`` on a flattened input): the reshape back to the input's shape that
    the layer itself does, when the graph shows it in the same module and keeps the features last."""
    scope = list((node.meta.get("nn_module_stack") or {}).keys())
    while len(node.users) == 1 and scope and width is not None:
        (user,) = node.users
        shape = _static_shape(user)
        if (not _is_view(user) or list((user.meta.get("nn_module_stack") or {}).keys()) != scope
                or not shape or shape[-1] != width):
            break
        node = user
    return node


def _arg(node: fx.Node, index: int | None, keyword: str) -> Any:
    if index is None:
        return None
    if keyword in node.kwargs:
        return node.kwargs[keyword]
    return node.args[index] if index < len(node.args) else None


def _call_sites(gm: fx.GraphModule, node: fx.Node) -> list[Site]:
    if inside_cosmic_module(node):
        return []
    out = []
    mod_name, mod_cls = module_name_of(node)
    for kind in SITE_KINDS:
        for form in kind.calls:
            if node.target not in form.targets:
                continue
            arg = _arg(node, form.weight_arg, "weight")
            weight, transposed = _source(arg)
            if not isinstance(weight, fx.Node) or (form.transposed is not None and form.transposed != transposed):
                continue
            fqn = _param_fqn(weight, gm)
            if fqn is None:
                continue  # an activation-by-activation product (attention scores), not a layer
            shape = _static_shape(weight, gm)
            if form.weight_ndim is not None and shape is not None and len(shape) != form.weight_ndim:
                continue  # aten.convolution of a Conv1d / Conv3d
            # the width is read off the weight as the call receives it (transposed or not)
            received = _static_shape(arg) if isinstance(arg, fx.Node) else None
            if received is None and shape is not None:
                received = tuple(reversed(shape)) if transposed and len(shape) == 2 else shape
            width = received[form.out_dim] if received else None
            site_kind = _owner_kind(kind, mod_cls, fqn)
            if site_kind.module_types and isinstance(mod_cls, type) and issubclass(mod_cls, site_kind.module_types):
                name = mod_name
            elif fqn is not None:
                name = _strip_weight(fqn)
            else:
                name = mod_name or node.name
            bias = _arg(node, form.bias_arg, "bias")
            bias = bias if isinstance(bias, fx.Node) else None
            params = tuple(p for p in (fqn, _param_fqn(bias, gm) if bias is not None else None) if p)
            anchor = node if form.transposed is None else _through_output_views(node, width)
            out.append(Site(name=name, kind=site_kind, width=width, node=node, params=params, weight=weight,
                            bias=bias, output_index=form.output_index, out_node=anchor if anchor is not node else None))
    return out


def _owner_kind(kind: SiteKind, mod_cls: Any, fqn: str | None) -> SiteKind:
    """A call traced from inside a module that owns it (MHA's packed projection) is the owner's kind."""
    if fqn is None or not isinstance(mod_cls, type):
        return kind
    leaf = fqn.rsplit(".", 1)[-1]
    for owner in SITE_KINDS:
        if owner.owner_types and issubclass(mod_cls, owner.owner_types) and leaf in owner.param_names:
            return owner
    return kind


def _module_sites(gm: fx.GraphModule, node: fx.Node, kinds: dict[int, tuple[SiteKind, ...]]) -> list[Site]:
    try:
        mod = gm.get_submodule(str(node.target))
    except AttributeError:
        return []
    out = []
    for kind in kinds.get(id(mod), ()):
        for suffix, width, params in kind.module_site_specs(mod):
            name = f"{node.target}{suffix}"
            out.append(Site(name=name, kind=kind, width=width, node=node, module=str(node.target),
                            params=tuple(f"{node.target}.{p}" for p in params), output_index=kind.output_index))
    return out


def find_sites(gm: fx.GraphModule, config: CosmicConfig | None = None) -> list[Site]:
    """Every site of ``gm`` in graph (= forward) order, qualified under ``config``.

    Args:
        gm: a ``symbolic_trace``, dynamo or ATen graph module.
        config: a :class:`CosmicConfig` (default ``CosmicConfig()``).

    Example:
        >>> gm = symbolic_trace(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2)))
        >>> [(s.name, s.width, s.qualifies) for s in find_sites(gm)]
        [('0', 32, True), ('2', 2, False)]
    """
    config = config or CosmicConfig()
    kinds = site_module_kinds(gm) if any(n.op == "call_module" for n in gm.graph.nodes) else {}
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            found = _module_sites(gm, node, kinds)
        elif node.op == "call_function":
            found = _call_sites(gm, node)
        else:
            continue
        sites.extend(qualify(site, config) for site in found)
    return sites


def sites_in_forward_order(gm: fx.GraphModule, config: CosmicConfig | None = None) -> list[SiteInfo]:
    """The sites of a graph in forward order, each with the names of the parameters it reads.

    Args:
        gm: a traced or dynamo graph (graph order is execution order).
        config: qualifies the sites (default ``CosmicConfig()``).

    Example:
        >>> gm = symbolic_trace(nn.Sequential(nn.Linear(4, 32), nn.Linear(32, 2)))
        >>> [(s.name, s.params) for s in sites_in_forward_order(gm)]
        [('0', ('0.weight', '0.bias')), ('1', ('1.weight', '1.bias'))]
    """
    return [s.info() for s in find_sites(gm, config)]


def output_layer_params(gm: fx.GraphModule) -> list[str]:
    """Names of the parameters of the graph's output layer (:func:`cosmic_fx.policy.output_layer`:
    those read by the last site and by every node after it, which calibrated CDG never freezes), in
    graph order.

    Example:
        >>> gm = symbolic_trace(nn.Sequential(nn.Linear(4, 32), nn.Linear(32, 2), nn.LayerNorm(2)))
        >>> output_layer_params(gm)
        ['1.weight', '1.bias', '2.weight', '2.bias']
    """
    from . import policy

    return [str(n) for n in policy.output_layer(_calls(gm))]


def params_in_forward_order(gm: fx.GraphModule) -> list[str]:
    """Names of the parameters the graph reads, in the order it first reads them (prefix CDG's order).

    Example:
        >>> gm = symbolic_trace(nn.Sequential(nn.Linear(4, 32), nn.Linear(32, 2)))
        >>> params_in_forward_order(gm)
        ['0.weight', '0.bias', '1.weight', '1.bias']
    """
    return [str(n) for n in dict.fromkeys(p for call in _calls(gm) for p in call.params)]


def _calls(gm: fx.GraphModule) -> list:
    """The graph's nodes as :class:`cosmic_fx.policy.Call` records (site or not, parameters read)."""
    from . import policy

    sites = {s.node: s for s in find_sites(gm) if s.node is not None}
    calls = []
    for node in gm.graph.nodes:
        if node in sites:
            calls.append(policy.Call(True, tuple(sites[node].params)))
            continue
        reads = []
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            reads += [f"{node.target}.{n}" for n, _ in mod.named_parameters()]
        for arg in node.all_input_nodes:
            fqn = _param_fqn(arg, gm) if arg.op in ("get_attr", "placeholder") else None
            if fqn is not None and (arg.op == "get_attr" or isinstance(arg.meta.get("example_value"), nn.Parameter)):
                reads.append(fqn)
        if node.op not in ("placeholder", "get_attr", "output"):
            calls.append(policy.Call(False, tuple(reads)))
    return calls


# ---------------------------------------------------------------------- what follows a site
def _module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def _is_qci_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module_of(gm, node), QuantumClassicalInterface) or any(
        isinstance(cls, type) and issubclass(cls, QuantumClassicalInterface) for _, cls in _stack(node)
    )


def is_csc_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for a CSC application: a CSC module call (marked or not), or, in a dynamo graph, a node
    traced from inside a ``CosmicStateCompression`` module."""
    if isinstance(_module_of(gm, node), CosmicStateCompression):
        return True
    if node.meta.get(META_KEY, {}).get("inserted_by") == "insert_csc":
        return True
    return any(isinstance(cls, type) and issubclass(cls, CosmicStateCompression) for _, cls in _stack(node))


def site_value(site: Site) -> fx.Node | None:
    """The node holding the site's output: the site node, or for a tuple-returning call the
    ``getitem`` of its output item (``None`` when the graph never takes that item)."""
    if site.output_index is None:
        return site.out_node or site.node
    for user in site.node.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] == site.output_index:
            return user
    return None


def site_input(site: Site) -> fx.Node | None:
    """The node a site's layer is applied to: the module call's first argument, or the call's first
    argument that is not its weight or bias (``addmm(bias, x, weight)`` reads ``x``)."""
    params = {site.weight, site.bias} - {None}
    for node in site.node.all_input_nodes:
        if node not in params and _source(node)[0] not in params:
            return node
    return None


def site_has_qci(gm: fx.GraphModule, site: Site) -> bool:
    """Whether a QCI already follows the site (its own module, or inlined in a dynamo graph)."""
    value = site_value(site)
    return value is not None and any(_is_qci_node(gm, user) for user in value.users)


def site_output(gm: fx.GraphModule, site: Site) -> fx.Node | None:
    """The node that carries the site's value onward: its QCI's output if one follows, else the
    site's value (see :func:`site_value`).

    For an inlined (dynamo) QCI, that is the QCI node whose users are all outside the QCI.
    """
    value = site_value(site)
    if value is None:
        return None
    qci_users = [u for u in value.users if _is_qci_node(gm, u)]
    if not qci_users:
        return value
    if qci_users[0].op == "call_module":
        return qci_users[0]
    # inlined QCI: walk its nodes and return the last one (in graph order) used outside it
    seen, frontier, last = set(), list(qci_users), value
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if _is_qci_node(gm, user):
                frontier.append(user)
            else:
                last = node if _after(node, last) else last
    return last


def _after(a: fx.Node, b: fx.Node) -> bool:
    """Whether ``a`` comes after ``b`` in graph order."""
    node = b.next
    while node.op != "root":
        if node is a:
            return True
        node = node.next
    return False


def site_has_csc(gm: fx.GraphModule, site: Site) -> bool:
    """Whether CSC is already applied right after the site (after its QCI, if any)."""
    out = site_output(gm, site)
    return out is not None and any(is_csc_node(gm, u) for u in out.users)
