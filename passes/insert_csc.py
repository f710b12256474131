"""Insert cosmic state compression at the model output or after every qualifying site."""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from cosmic_fx.config import CosmicConfig, CSCPlacement
from cosmic_fx.modules import make_csc
from cosmic_fx.outputs import primary_path, replace_at_path
from cosmic_fx.tracer import META_KEY, find_sites, is_csc_node, is_mapping_call, site_has_csc, site_output

from .site_value import ensure_site_value

log = logging.getLogger(__name__)

CSC_ROOT = "cosmic_csc"


def _is_float_value(node: fx.Node, min_dim: int = 0) -> bool:
    """False only when the graph's metadata says the value is not a floating-point tensor with at
    least ``min_dim`` dimensions."""
    value = node.meta.get("val", node.meta.get("example_value"))
    if value is None:
        return True  # symbolic_trace graphs carry no metadata: the output CSC passes non-floats through
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= min_dim


class InsertCSC(PassBase):
    """Insert ``CosmicStateCompression`` modules where ``config.csc`` says (output / sites / none).

    ``"sites"`` puts CSC after each qualifying site (after its QCI, if one follows), as submodule
    ``cosmic_csc.<site name>``. ``"output"`` puts ``cosmic_csc.output`` on the output of the output
    layer (:func:`cosmic_fx.policy.output_site`: the graph's last site, after its QCI), and every use
    of that value reads the compressed one: a loss the forward computes from its logits (Hugging
    Face ``out.loss``) is the loss of the logits it returns. A graph without a site gets it on the
    primary value it returns (the logits of a dict or tuple output, see :mod:`cosmic_fx.outputs`).
    CSC is a module call (not an inlined function) so that a later dynamo trace of the rewritten
    model still sees where it is and the backend never applies it twice. A dynamo graph that ends in
    a graph break returns values that are not the model's output: ``"output"`` leaves such graphs
    alone.
    """

    def __init__(self, config: CosmicConfig | None = None) -> None:
        self.config = config or CosmicConfig()

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        placement = self.config.csc
        if placement is CSCPlacement.NONE:
            return PassResult(graph_module, False)
        if placement is CSCPlacement.SITES:
            n = self._after_sites(graph_module)
        else:
            n = self._at_output(graph_module)
        if n:
            counters["cosmic_fx"]["insert_csc"] += n
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, n > 0)

    def _new_node(self, gm: fx.GraphModule, target: str, arg: fx.Node) -> fx.Node:
        node = gm.graph.call_module(target, (arg,))
        node.meta[META_KEY] = {"inserted_by": "insert_csc"}
        for key in ("val", "example_value"):
            if key in arg.meta:
                node.meta[key] = arg.meta[key]
        return node

    def _after_sites(self, gm: fx.GraphModule) -> int:
        sites = [s for s in find_sites(gm, self.config) if s.qualifies and not site_has_csc(gm, s)]
        for site in sites:
            ensure_site_value(gm, site, "insert_csc")
            anchor = site_output(gm, site)
            target = f"{CSC_ROOT}.{site.name}"
            gm.add_submodule(target, make_csc(self.config, site.feature_dim))
            with gm.graph.inserting_after(anchor):
                new = self._new_node(gm, target, anchor)
            anchor.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            new.meta[META_KEY]["site"] = site.name
        return len(sites)

    def _at_output(self, gm: fx.GraphModule) -> int:
        reason = getattr(gm, "compile_subgraph_reason", None)
        if reason is not None and getattr(reason, "graph_break", False):
            log.debug("insert_csc: graph ends in a graph break; its outputs are not the model output")
            return 0
        sites = find_sites(gm, self.config)
        if sites:  # the output layer (cosmic_fx.policy.output_site): the last site; graph order is execution order
            return self._after_output_layer(gm, sites[-1])
        return self._at_returned_value(gm)

    def _after_output_layer(self, gm: fx.GraphModule, site) -> int:
        ensure_site_value(gm, site, "insert_csc")
        anchor = site_output(gm, site)
        if anchor is None or any(is_csc_node(gm, u) for u in anchor.users):
            return 0  # the graph never uses the site's output, or CSC is there already
        target = f"{CSC_ROOT}.output"
        gm.add_submodule(target, make_csc(self.config, -1, passthrough=True))
        with gm.graph.inserting_after(anchor):
            new = self._new_node(gm, target, anchor)
        anchor.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        new.meta[META_KEY]["output_layer"] = site.name
        return 1

    def _at_returned_value(self, gm: fx.GraphModule) -> int:
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        (returned,) = output.args
        container = None  # a ModelOutput built by a node of its own: CSC goes into its arguments
        if is_mapping_call(returned):
            container, returned = returned, dict(returned.kwargs)
        # in a tuple or dict the prediction has a dimension (a 0-d loss is not it)
        path = primary_path(returned, lambda n: isinstance(n, fx.Node) and _is_float_value(n, min_dim=1))
        if path is None:
            return 0
        leaf = returned
        for key in path:
            leaf = leaf[key]
        if not isinstance(leaf, fx.Node) or not _is_float_value(leaf):
            return 0
        if leaf.op in ("placeholder", "get_attr") or is_csc_node(gm, leaf):
            return 0  # returns an input unchanged, or CSC is there already
        target = f"{CSC_ROOT}.output"
        gm.add_submodule(target, make_csc(self.config, -1, passthrough=True))
        with gm.graph.inserting_before(container if container is not None else output):
            new = self._new_node(gm, target, leaf)
        if container is not None:
            container.kwargs = replace_at_path(returned, path, new)
        else:
            output.args = (replace_at_path(returned, path, new),)
        return 1
