"""Find every ``nn.Linear`` / ``nn.Conv2d`` site in an FX graph, whatever produced the graph.

Three flavours of graph are understood:

* ``torch.fx.symbolic_trace`` graphs: ``call_module`` nodes whose target is a Linear/Conv2d;
* the dynamo graphs a ``torch.compile`` backend receives: ``call_function`` nodes
  (``torch._C._nn.linear``, ``torch.conv2d``, their ``torch.nn.functional`` forms) whose weights are
  placeholders; names come from ``nn_module_stack`` / dynamo's name map;
* ATen graphs (``aten.linear``, ``aten.addmm``/``aten.mm`` on a transposed weight,
  ``aten.convolution`` with a 4-d weight).

Nodes that belong to cosmic's own modules (a QCI's matmul) are never sites.
"""

from __future__ import annotations

import dataclasses
import enum
import re

import torch
import torch.nn.functional as F
from torch import fx, nn

from .config import CosmicConfig
from .modules import CosmicSite, CosmicStateCompression, QuantumClassicalInterface

__all__ = ["CosmicTracer", "Site", "SiteKind", "find_sites", "module_name_of", "symbolic_trace"]

COSMIC_MODULES = (QuantumClassicalInterface, CosmicStateCompression, CosmicSite)
META_KEY = "cosmic_fx"


class SiteKind(str, enum.Enum):
    LINEAR = "linear"
    CONV2D = "conv2d"

    @property
    def feature_dim(self) -> int:
        return -1 if self is SiteKind.LINEAR else -3


@dataclasses.dataclass
class Site:
    """One Linear/Conv2d application in a graph.

    Attributes:
        name: qualified module name (``"features.0"``), or the weight's name for functional calls.
        kind: linear or conv2d.
        width: output features (``out_features`` / ``out_channels``), ``None`` if unknown.
        node: the graph node that produces the site's output.
        qualifies: whether the passes rewrite it under the config used.
        reason: why it does not qualify ('' when it does).
        weight: the weight's node (placeholder / get_attr) in functional graphs, else ``None``.
        bias: the bias node, if any.
    """

    name: str
    kind: SiteKind
    width: int | None
    node: fx.Node
    qualifies: bool = True
    reason: str = ""
    weight: fx.Node | None = None
    bias: fx.Node | None = None

    @property
    def feature_dim(self) -> int:
        return self.kind.feature_dim


class CosmicTracer(fx.Tracer):
    """``fx.Tracer`` that keeps cosmic's own modules as leaves (their internals are not sites)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, COSMIC_MODULES) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with :class:`CosmicTracer`; the result shares the model's modules."""
    tracer = CosmicTracer()
    graph = tracer.trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


_LINEAR_FNS = {F.linear, torch._C._nn.linear}
_CONV_FNS = {F.conv2d, torch.conv2d}
_aten = torch.ops.aten
_ATEN_LINEAR = {_aten.linear.default}
_ATEN_MM = {_aten.addmm.default, _aten.mm.default}
_ATEN_CONV = {_aten.convolution.default}
_ATEN_TRANSPOSE = {_aten.t.default, _aten.permute.default, _aten.transpose.int}
_ATEN_VIEWS = {_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.detach.default}

_STACK_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\]\.?")
_GETATTR = re.compile(r"getattr\(([^,]+),\s*['\"]([^'\"]+)['\"]\)")


def _normalize_dynamo_path(path: str) -> str:
    """``"L['self'].layers[0].fc"`` -> ``"layers.0.fc"``."""
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
    """True for nodes dynamo traced from inside a QCI / CSC / CosmicSite wrapper's extra modules."""
    for _, cls in _stack(node):
        if isinstance(cls, type) and issubclass(cls, (QuantumClassicalInterface, CosmicStateCompression)):
            return True
    return node.meta.get(META_KEY, {}).get("inserted_by") is not None


def _meta_shape(node: fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("val", node.meta.get("example_value"))
    shape = getattr(value, "shape", None)
    try:
        return tuple(int(s) for s in shape) if shape is not None else None
    except (TypeError, ValueError):  # symbolic sizes
        return None


def _fqn_of_param(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "get_attr":
        return str(node.target)
    if node.op == "placeholder":
        return placeholder_fqn(node)
    return None


def placeholder_fqn(node: fx.Node) -> str:
    """The user-facing name of a dynamo placeholder (``"layers.0.weight"``), else its target."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", None)
    if callable(name):
        name = name()
    if isinstance(name, str) and name.startswith("L["):
        return _normalize_dynamo_path(name)
    return str(node.target)


def _strip_param(fqn: str) -> str:
    for suffix in (".weight", ".bias"):
        if fqn.endswith(suffix):
            return fqn[: -len(suffix)]
    return fqn


def _source_param(node: fx.Node) -> fx.Node:
    """Follow transposes/views back to the tensor they read (for ATen ``addmm(b, x, t(w))``)."""
    while node.op == "call_function" and node.target in (_ATEN_TRANSPOSE | _ATEN_VIEWS) and node.args:
        node = node.args[0]
    return node


def _get_attr_tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    if node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _functional_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    target = node.target
    args = list(node.args) + [None] * 3
    if target in _LINEAR_FNS or target in _ATEN_LINEAR:
        kind, weight, bias = SiteKind.LINEAR, node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
    elif target in _CONV_FNS:
        kind, weight, bias = SiteKind.CONV2D, node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
    elif target in _ATEN_CONV:
        kind, weight, bias = SiteKind.CONV2D, args[1], args[2]
        shape = _meta_shape(weight) if isinstance(weight, fx.Node) else None
        if shape is not None and len(shape) != 4:
            return None  # conv1d / conv3d
    elif target in _ATEN_MM:
        kind = SiteKind.LINEAR
        weight = _source_param(args[2] if target == _aten.addmm.default else args[1])
        bias = args[0] if target == _aten.addmm.default else None
        if weight.op not in ("placeholder", "get_attr"):
            return None  # an activation-by-activation matmul (attention), not a layer
    else:
        return None
    if not isinstance(weight, fx.Node) or inside_cosmic_module(node):
        return None
    weight = _source_param(weight)
    mod_name, mod_cls = module_name_of(node)
    fqn = _fqn_of_param(gm, weight)
    if mod_name is not None and isinstance(mod_cls, type) and issubclass(mod_cls, (nn.Linear, nn.Conv2d)):
        name = mod_name
    elif fqn is not None:
        name = _strip_param(fqn)
    else:
        name = node.name
    width = None
    out_shape = _meta_shape(node)
    if out_shape:
        width = out_shape[-1] if kind is SiteKind.LINEAR else (out_shape[-3] if len(out_shape) >= 3 else None)
    if width is None:
        w_shape = _meta_shape(weight)
        tensor = _get_attr_tensor(gm, weight)
        if w_shape is None and tensor is not None:
            w_shape = tuple(tensor.shape)
        if w_shape:
            width = w_shape[0] if target not in _ATEN_MM else w_shape[-1] if weight is not args[2] else w_shape[0]
    return Site(name=name, kind=kind, width=width, node=node, weight=weight,
                bias=bias if isinstance(bias, fx.Node) else None)


def _module_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    try:
        mod = gm.get_submodule(str(node.target))
    except AttributeError:
        return None
    if isinstance(mod, CosmicSite):
        mod = mod.base_layer
    if isinstance(mod, nn.Conv2d):
        return Site(name=str(node.target), kind=SiteKind.CONV2D, width=mod.out_channels, node=node)
    if isinstance(mod, nn.Linear):
        return Site(name=str(node.target), kind=SiteKind.LINEAR, width=mod.out_features, node=node)
    return None


def qualify(site: Site, config: CosmicConfig) -> Site:
    """Set ``site.qualifies`` / ``site.reason`` by the source text's width rule and the user's regexes."""
    if site.width is None:
        site.qualifies, site.reason = False, "output width unknown"
    elif site.width <= config.min_width:
        site.qualifies, site.reason = False, f"width {site.width} <= {config.min_width}"
    elif config.targets and not any(re.fullmatch(p, site.name) for p in config.targets):
        site.qualifies, site.reason = False, "not in targets"
    elif any(re.fullmatch(p, site.name) for p in config.exclude):
        site.qualifies, site.reason = False, "excluded"
    else:
        site.qualifies, site.reason = True, ""
    return site


def find_sites(gm: fx.GraphModule, config: CosmicConfig | None = None) -> list[Site]:
    """Every Linear/Conv2d site of ``gm`` in graph order, qualified under ``config``.

    Example:
        >>> gm = symbolic_trace(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2)))
        >>> [(s.name, s.width, s.qualifies) for s in find_sites(gm)]
        [('0', 32, True), ('2', 2, False)]
    """
    config = config or CosmicConfig()
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            site = _module_site(gm, node)
        elif node.op == "call_function":
            site = _functional_site(gm, node)
        else:
            site = None
        if site is not None:
            sites.append(qualify(site, config))
    return sites


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


def site_has_qci(gm: fx.GraphModule, site: Site) -> bool:
    """Whether a QCI already follows the site (its own module, a swapped ``CosmicSite``, or inlined)."""
    mod = _module_of(gm, site.node)
    if isinstance(mod, CosmicSite):
        return mod.qci is not None
    return any(_is_qci_node(gm, user) for user in site.node.users)


def site_output(gm: fx.GraphModule, site: Site) -> fx.Node:
    """The node that carries the site's value onward: its QCI's output if one follows, else the site.

    For an inlined (dynamo) QCI, that is the QCI node whose users are all outside the QCI.
    """
    mod = _module_of(gm, site.node)
    if isinstance(mod, CosmicSite):
        return site.node
    qci_users = [u for u in site.node.users if _is_qci_node(gm, u)]
    if not qci_users:
        return site.node
    if qci_users[0].op == "call_module":
        return qci_users[0]
    # inlined QCI: walk its nodes and return the last one (in graph order) used outside it
    seen, frontier, last = set(), list(qci_users), site.node
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
    mod = _module_of(gm, site.node)
    if isinstance(mod, CosmicSite):
        return mod.csc is not None
    return any(is_csc_node(gm, u) for u in site_output(gm, site).users)
