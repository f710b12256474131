"""Insert a QuantumClassicalInterface after every qualifying Linear/Conv2d site."""

from __future__ import annotations

import logging

from torch import fx
from torch._dynamo.utils import counters
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from cosmic_fx.config import CosmicConfig
from cosmic_fx.modules import make_qci
from cosmic_fx.tracer import META_KEY, find_sites, site_has_qci

log = logging.getLogger(__name__)

QCI_ROOT = "cosmic_qci"


class InsertQCI(PassBase):
    """Insert a QCI module (new parameters) after each qualifying site of a ``call_module`` graph.

    The QCI for site ``layers.0`` is registered as submodule ``cosmic_qci.layers.0`` of the graph
    module, so the user's own modules are never modified. Only graphs that can own parameters
    (``symbolic_trace`` graphs) are rewritten; a dynamo graph is left alone (see the backend).

    Example:
        >>> gm = cosmic_fx.tracer.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 32)))  # doctest: +SKIP
        >>> InsertQCI(cosmic_fx.CosmicConfig())(gm).modified   # doctest: +SKIP
        True
    """

    def __init__(self, config: CosmicConfig | None = None) -> None:
        self.config = config or CosmicConfig()

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        todo = [s for s in find_sites(gm, self.config) if s.qualifies and not site_has_qci(gm, s)]
        todo = [s for s in todo if s.node.op == "call_module"]  # functional sites own no module to follow
        if not todo:
            log.debug("insert_qci: nothing to do (no qualifying site without a QCI)")
            return PassResult(gm, False)
        # build every module first so that a failure leaves the graph untouched
        modules = []
        for site in todo:
            layer = gm.get_submodule(str(site.node.target))
            like = next(layer.parameters(), None)
            modules.append(make_qci(site.width, site.feature_dim, self.config, like))
        for site, qci in zip(todo, modules):
            target = f"{QCI_ROOT}.{site.name}"
            gm.add_submodule(target, qci)
            with gm.graph.inserting_after(site.node):
                new = gm.graph.call_module(target, (site.node,))
            site.node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
            new.meta[META_KEY] = {"inserted_by": "insert_qci", "site": site.name}
            counters["cosmic_fx"]["insert_qci"] += 1
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)
