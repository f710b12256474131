"""Insert a QuantumClassicalInterface after every qualifying site."""

from __future__ import annotations

import logging

import torch
from torch import fx, nn
from torch._dynamo.utils import counters
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from cosmic_fx.config import CosmicConfig
from cosmic_fx.modules import make_qci
from cosmic_fx.sites import Site
from cosmic_fx.tracer import META_KEY, find_sites, site_has_qci

from .site_value import ensure_site_value

log = logging.getLogger(__name__)

QCI_ROOT = "cosmic_qci"


def _owns_parameters(gm: fx.GraphModule, site: Site) -> bool:
    """Whether the graph module owns the site's layer (a module call, or a ``get_attr`` weight): a
    dynamo graph reads parameters as inputs and cannot own new ones."""
    return site.node.op == "call_module" or (site.weight is not None and site.weight.op == "get_attr")


def _like(gm: fx.GraphModule, site: Site) -> torch.Tensor | None:
    """A tensor of the site's device and dtype (its weight)."""
    if site.node.op == "call_module":
        return next(gm.get_submodule(str(site.node.target)).parameters(), None)
    obj = gm
    for part in str(site.weight.target).split("."):
        obj = getattr(obj, part)
    return obj


class InsertQCI(PassBase):
    """Insert a QCI module (new parameters) after each qualifying site of a graph that owns its layers.

    The QCI for site ``layers.0`` is registered as submodule ``cosmic_qci.layers.0`` of the graph
    module (one per site name: a layer called twice shares its QCI), so the user's own modules are
    never modified. Module calls and functional calls on a ``get_attr`` weight (``F.linear(x,
    self.w)``) are rewritten; a dynamo graph, whose weights are inputs, is left alone (see the
    backend). For a site whose call returns a tuple (``nn.MultiheadAttention``) the QCI applies to
    the site's item of it.

    Example:
        >>> gm = cosmic_fx.tracer.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 32)))  # doctest: +SKIP
        >>> InsertQCI(cosmic_fx.CosmicConfig())(gm).modified   # doctest: +SKIP
        True
    """

    def __init__(self, config: CosmicConfig | None = None) -> None:
        self.config = config or CosmicConfig()

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        todo = [s for s in find_sites(gm, self.config)
                if s.qualifies and self.config.qci_at(s.width) and not site_has_qci(gm, s)]
        skipped = [s.name for s in todo if not _owns_parameters(gm, s)]
        if skipped:
            log.debug("insert_qci: %s read weights the graph does not own (dynamo graph): no QCI", skipped)
        todo = [s for s in todo if _owns_parameters(gm, s)]
        if not todo:
            log.debug("insert_qci: nothing to do (no qualifying site without a QCI)")
            return PassResult(gm, False)
        # build every module first so that a failure leaves the graph untouched
        modules: dict[str, nn.Module] = {}
        for site in todo:
            target = f"{QCI_ROOT}.{site.name}"
            if target not in modules and not _has_submodule(gm, target):
                modules[target] = make_qci(site.width, site.feature_dim, self.config, _like(gm, site), site.name)
        for target, qci in modules.items():
            gm.add_submodule(target, qci)
        for site in todo:
            target = f"{QCI_ROOT}.{site.name}"
            value = ensure_site_value(gm, site, "insert_qci")
            with gm.graph.inserting_after(value):
                new = gm.graph.call_module(target, (value,))
            value.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            new.meta[META_KEY] = {"inserted_by": "insert_qci", "site": site.name}
            counters["cosmic_fx"]["insert_qci"] += 1
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)


def _has_submodule(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_submodule(target)
    except AttributeError:
        return False
    return True
