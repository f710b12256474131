"""The one table of site kinds: every layer cosmic_fx can put a QuantumClassicalInterface after.

Each :class:`SiteKind` says how to recognise the layer as a module (``nn.Linear``), as a call in a
``symbolic_trace`` or dynamo graph (``F.linear``, ``torch._C._nn.linear``, ``torch.addmm``), and in
an ATen graph (``aten.linear``, ``aten.addmm``), how wide its output is, which dimension holds its
features, and where its QCI applies (the call's output, or item ``output_index`` of it). The tracer,
the qualifying rule, the QCI pass, :func:`cosmic_fx.transform` (both paths), :func:`cosmic_fx.explain`
and the adapter export all read :data:`SITE_KINDS`; adding a kind is one entry here plus its tests.

Layers that are *not* sites, and why, are in :data:`NOT_SITES`.

Example:
    >>> [kind.name for kind in SITE_KINDS]
    ['linear', 'conv2d', 'hf_conv1d', 'mha_out_proj', 'mha_in_proj']
    >>> [(s.name, s.kind.name, s.width) for s in module_sites(nn.Sequential(nn.Linear(4, 32)))]
    [('0', 'linear', 32)]
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .site import Site, SiteInfo, qualify

__all__ = [
    "NOT_SITES",
    "SITE_KINDS",
    "CallForm",
    "Site",
    "SiteInfo",
    "SiteKind",
    "apply_at",
    "is_site_module",
    "kind_by_name",
    "module_sites",
    "qualify",
    "site_module_kinds",
    "with_item",
]

_aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class CallForm:
    """How a kind appears as a ``call_function`` node.

    Attributes:
        targets: the callables / ATen overloads of this form.
        weight_arg: positional index of the weight (a ``weight=`` keyword is read too).
        bias_arg: positional index of the bias, if the call has one.
        transposed: for matmuls (``addmm``/``mm``): whether the weight is read through a transpose
            (``nn.Linear`` lowered to ATen) or as it is stored (HF ``Conv1D``); ``None`` for others.
        weight_ndim: the weight's rank this form requires (``aten.convolution`` serves 1-d, 2-d, 3-d).
        output_index: the call returns a tuple and the site's output is this item of it.
        out_dim: which dimension of the weight *as the call receives it* is the output width
            (0 for ``F.linear``'s ``(out, in)``, -1 for ``addmm``'s ``(in, out)`` matrix).
    """

    targets: frozenset
    weight_arg: int
    bias_arg: int | None = None
    transposed: bool | None = None
    weight_ndim: int | None = None
    output_index: int | None = None
    out_dim: int = 0


@dataclasses.dataclass(frozen=True)
class SiteKind:
    """One kind of site: how to recognise it and where its QCI goes.

    Attributes:
        name: short name (``"linear"``), shown by ``explain`` and stored in adapters.
        feature_dim: the dimension of the output that holds the features (-1, or -3 for NCHW).
        summary: one line for documentation and error messages.
        match_module: whether a module is this kind (called once per module, children first).
        module_width: the output width of a matching module (from its weights, never from a run).
        sites_of: the sites a matching module contributes, as ``(suffix, width, params)``: suffix
            is appended to the module's name (``""`` for the module itself), params are the
            names, relative to the module, of the parameters the site reads. Default: the module.
        calls: the call forms in ``symbolic_trace``, dynamo and ATen graphs.
        output_index: the module's output is a tuple; the site's output is this item.
        blocked: why such sites can never be rewritten ('' when they can).
        leaf: the tracer keeps a matching module as one ``call_module`` node.
        claims_children: the module computes its sub-layers itself (never calls them): they are
            sites of this kind, not of their own.
        owner_types: module classes whose own code runs this kind's calls (a dynamo graph records
            them in ``nn_module_stack``): a call there is this kind even if another kind's form
            matches it first (``nn.MultiheadAttention``'s packed projection).
        param_names: with ``owner_types``: the parameter names (last component) that make a call
            this kind.
        module_types: classes whose instances are this kind (graphs record only a module's class):
            a call traced from inside one is named after the module, not after its weight.
    """

    name: str
    feature_dim: int
    summary: str
    match_module: Callable[[nn.Module], bool]
    module_width: Callable[[nn.Module], int | None]
    calls: tuple[CallForm, ...] = ()
    sites_of: Callable[[nn.Module], list[tuple[str, int | None, tuple[str, ...]]]] | None = None
    output_index: int | None = None
    blocked: str = ""
    leaf: bool = True
    claims_children: bool = False
    owner_types: tuple[type, ...] = ()
    param_names: tuple[str, ...] = ()
    module_types: tuple[type, ...] = ()

    def module_site_specs(self, module: nn.Module) -> list[tuple[str, int | None, tuple[str, ...]]]:
        if self.sites_of is not None:
            return self.sites_of(module)
        params = tuple(n for n, _ in module.named_parameters(recurse=False))
        return [("", self.module_width(module), params)]


# ------------------------------------------------------------------------- structural Conv1D
_VIEWS = frozenset({"view", "reshape", "flatten", "contiguous"})


def _traced_addmm_weight(module: nn.Module) -> bool:
    """Whether ``module.forward`` is ``addmm(bias, x.view(-1, in), weight)`` (HF ``Conv1D``), found by
    symbolic-tracing that one module: a ``torch.addmm`` whose matrix operand is the module's own
    ``weight``, read as stored (not transposed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fx.Tracer().trace(module)
    except Exception:  # noqa: BLE001 - a forward that does not trace alone is not this structure
        return False
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.addmm and len(node.args) >= 3:
            w = node.args[2]
            while isinstance(w, fx.Node) and w.op == "call_method" and w.target in _VIEWS:
                w = w.args[0]
            if isinstance(w, fx.Node) and w.op == "get_attr" and w.target == "weight":
                return True
    return False


def _is_hf_conv1d(module: nn.Module) -> bool:
    weight = getattr(module, "_parameters", {}).get("weight")
    if weight is None or type(module).__module__.startswith("torch.nn") or any(True for _ in module.children()):
        return False
    if isinstance(weight, nn.parameter.UninitializedParameter) or not _traced_addmm_weight(module):
        return False
    if weight.dim() != 2:
        raise ValueError(
            f"{type(module).__name__} computes torch.addmm(bias, x, weight) like Hugging Face's Conv1D, but its "
            f"weight has shape {tuple(weight.shape)}; a Conv1D-like layer needs a 2-D weight of shape "
            "(in_features, out_features). Exclude it with CosmicConfig(exclude=[...]) is not enough: reshape the "
            "weight to 2-D or use nn.Linear."
        )
    return True


# ------------------------------------------------------------------------- nn.MultiheadAttention
_MHA_PROJ = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _mha_in_proj_sites(mha: nn.Module) -> list[tuple[str, int | None, tuple[str, ...]]]:
    out = []
    for pname in _MHA_PROJ:
        w = getattr(mha, pname, None)
        if isinstance(w, torch.Tensor):
            reads = (pname, "in_proj_bias") if getattr(mha, "in_proj_bias", None) is not None else (pname,)
            out.append((f".{pname}", int(w.shape[0]), reads))
    return out


_MHA_FORWARD = frozenset({F.multi_head_attention_forward})


# ------------------------------------------------------------------------- the table
LINEAR = SiteKind(
    name="linear",
    feature_dim=-1,
    summary="nn.Linear (and subclasses), F.linear / aten.linear / addmm(b, x, w.t()) with a model parameter",
    match_module=lambda m: isinstance(m, nn.Linear),
    module_width=lambda m: m.out_features,
    module_types=(nn.Linear,),
    calls=(
        CallForm(frozenset({F.linear, torch._C._nn.linear, _aten.linear.default}), weight_arg=1, bias_arg=2),
        CallForm(frozenset({torch.addmm, _aten.addmm.default}), weight_arg=2, bias_arg=0, transposed=True, out_dim=-1),
        CallForm(frozenset({torch.mm, _aten.mm.default}), weight_arg=1, transposed=True, out_dim=-1),
    ),
)

CONV2D = SiteKind(
    name="conv2d",
    feature_dim=-3,
    summary="nn.Conv2d, F.conv2d / aten.convolution with a 4-d model parameter (features: channel dim)",
    match_module=lambda m: isinstance(m, nn.Conv2d),
    module_width=lambda m: m.out_channels,
    module_types=(nn.Conv2d,),
    calls=(
        CallForm(frozenset({F.conv2d, torch.conv2d, _aten.conv2d.default}), weight_arg=1, bias_arg=2),
        CallForm(frozenset({_aten.convolution.default}), weight_arg=1, bias_arg=2, weight_ndim=4),
    ),
)

HF_CONV1D = SiteKind(
    name="hf_conv1d",
    feature_dim=-1,
    summary="Hugging Face-style Conv1D: weight (in, out), forward addmm(bias, x.view(-1, in), weight); "
            "recognised by structure",
    match_module=_is_hf_conv1d,
    module_width=lambda m: int(m.weight.shape[1]),
    calls=(CallForm(frozenset({torch.addmm, _aten.addmm.default}), weight_arg=2, bias_arg=0, transposed=False,
                    out_dim=-1),
           CallForm(frozenset({torch.mm, _aten.mm.default}), weight_arg=1, transposed=False, out_dim=-1)),
)

MHA_OUT_PROJ = SiteKind(
    name="mha_out_proj",
    feature_dim=-1,
    summary="nn.MultiheadAttention's out_proj: its forward reads out_proj.weight itself, so the QCI applies to "
            "the attention output (item 0), which is out_proj's output",
    match_module=lambda m: isinstance(m, nn.MultiheadAttention),
    module_width=lambda m: m.out_proj.out_features,
    sites_of=lambda m: [(".out_proj", m.out_proj.out_features, ("out_proj.weight", "out_proj.bias"))],
    calls=(CallForm(_MHA_FORWARD, weight_arg=11, bias_arg=12, output_index=0),),
    output_index=0,
    claims_children=True,
)

MHA_IN_PROJ = SiteKind(
    name="mha_in_proj",
    feature_dim=-1,
    summary="nn.MultiheadAttention's q/k/v input projection",
    match_module=lambda m: isinstance(m, nn.MultiheadAttention),
    module_width=lambda m: 3 * m.embed_dim,
    sites_of=_mha_in_proj_sites,
    calls=(CallForm(_MHA_FORWARD, weight_arg=5, bias_arg=6),),
    blocked="read inside F.multi_head_attention_forward, which splits it into heads at once: its output "
            "never exists as a tensor a QCI could follow",
    claims_children=True,
    owner_types=(nn.MultiheadAttention,),
    param_names=_MHA_PROJ,
)

#: Every site kind, in the order they are tried (first match wins).
SITE_KINDS: tuple[SiteKind, ...] = (LINEAR, CONV2D, HF_CONV1D, MHA_OUT_PROJ, MHA_IN_PROJ)

#: Layers that are not sites, and why (checked by tests/test_sites.py).
NOT_SITES: dict[type, str] = {
    nn.Embedding: "a lookup: a QCI after it is a function of the token id alone, so it equals a re-parameterised "
                  "embedding table (qci(E)[ids]) and adds no capacity the table lacks",
    nn.Conv1d: "channels sit at dim -2 of (N, C, L): the QCI formula carries over, but the source text defines "
               "QCI for Linear/Conv2d and QuantumClassicalInterface supports feature dims -1 and -3 only",
    nn.Conv3d: "channels sit at dim -4 of (N, C, D, H, W): as nn.Conv1d, outside the text's Linear/Conv2d rule "
               "and QuantumClassicalInterface's feature dims",
}


def kind_by_name(name: str) -> SiteKind:
    """The :class:`SiteKind` called ``name`` (``"linear"``, ...).

    Example:
        >>> kind_by_name("conv2d").feature_dim
        -3
    """
    for kind in SITE_KINDS:
        if kind.name == name:
            return kind
    raise ValueError(f"unknown site kind {name!r}; the kinds are {', '.join(k.name for k in SITE_KINDS)}")


def describe_kinds() -> str:
    """One line listing the site kinds, for error messages."""
    return "; ".join(f"{k.name}: {k.summary}" for k in SITE_KINDS if not k.blocked)


def site_module_kinds(model: nn.Module) -> dict[int, tuple[SiteKind, ...]]:
    """``id(module) -> kinds`` for every module of ``model`` that holds sites.

    A module usually matches one kind; ``nn.MultiheadAttention`` matches two (its output projection
    and its input projection). Modules inside a module that claims its children (MHA's
    ``out_proj``) and cosmic's own modules are left out.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 32), nn.ReLU())
        >>> [k.name for k in site_module_kinds(model)[id(model[0])]]
        ['linear']
    """
    from .modules import CosmicStateCompression, QuantumClassicalInterface

    out: dict[int, tuple[SiteKind, ...]] = {}
    claimed: set[int] = set()
    for _, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in claimed or id(mod) in out or isinstance(mod, (QuantumClassicalInterface, CosmicStateCompression)):
            continue
        kinds = tuple(kind for kind in SITE_KINDS if kind.match_module(mod))
        if kinds:
            out[id(mod)] = kinds
            if any(kind.claims_children for kind in kinds):
                claimed.update(id(m) for m in mod.modules() if m is not mod)
    return out


def is_site_module(module: nn.Module) -> bool:
    """Whether ``module`` holds a site (any kind of :data:`SITE_KINDS` matches it).

    Example:
        >>> is_site_module(nn.Linear(2, 3)), is_site_module(nn.ReLU())
        (True, False)
    """
    return any(kind.match_module(module) for kind in SITE_KINDS)


def module_sites(model: nn.Module, config=None, *, kinds: dict[int, tuple[SiteKind, ...]] | None = None) -> list[Site]:
    """Every site of ``model``'s module tree, in ``named_modules`` order, qualified under ``config``.

    A shared module is listed once (under its first name). Functional calls (``F.linear`` on a
    parameter) are graph sites only: :func:`cosmic_fx.tracer.find_sites` finds them.

    Args:
        model: the model.
        config: a :class:`~cosmic_fx.CosmicConfig` (default ``CosmicConfig()``).
        kinds: the result of :func:`site_module_kinds`, if already computed.

    Example:
        >>> mha = nn.MultiheadAttention(16, 2)
        >>> [(s.name, s.kind.name, s.qualifies) for s in module_sites(mha)]
        [('out_proj', 'mha_out_proj', True), ('in_proj_weight', 'mha_in_proj', False)]
    """
    from .config import CosmicConfig

    config = config or CosmicConfig()
    kinds = site_module_kinds(model) if kinds is None else kinds
    sites = []
    for name, mod in model.named_modules():
        if id(mod) not in kinds:
            continue
        for kind in kinds[id(mod)]:  # one module may hold sites of several kinds (MHA)
            for suffix, width, params in kind.module_site_specs(mod):
                full = f"{name}{suffix}".lstrip(".")
                prefixed = tuple(f"{name}.{p}" if name else p for p in params)
                sites.append(qualify(Site(full, kind, width, module=name, params=prefixed,
                                          output_index=kind.output_index), config))
    return sites


def with_item(out, index: int, value):
    """``out`` with item ``index`` replaced (the same tuple type); graphs call it after a QCI on a
    tuple-returning site (``nn.MultiheadAttention``)."""
    items = list(out)
    items[index] = value
    return type(out)(items) if type(out) in (tuple, list) else type(out)(*items)


def apply_at(out, index: int | None, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Apply ``fn`` to a site's output: ``out`` itself, or item ``index`` of the tuple it is."""
    if index is None:
        return fn(out)
    return with_item(out, index, fn(out[index]))

