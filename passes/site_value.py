"""Where a pass inserts after a site: the node holding the site's output, made explicit for sites
whose call returns a tuple (``nn.MultiheadAttention``: the output is item 0)."""

from __future__ import annotations

import operator

from torch import fx

from cosmic_fx.sites import Site, with_item
from cosmic_fx.tracer import META_KEY, site_value


def ensure_site_value(gm: fx.GraphModule, site: Site, inserted_by: str) -> fx.Node:
    """The node holding the site's output; for a tuple-returning site, first rewrite
    ``t = call(...)`` into ``item = t[i]; t' = with_item(t, i, item)`` with every use of ``t`` reading
    ``t'``, so that a pass can insert after ``item`` like after any other site."""
    if site.output_index is None:
        return site_value(site)
    existing = site_value(site)
    if existing is not None and existing.meta.get(META_KEY, {}).get("site_item"):
        return existing
    node, index = site.node, site.output_index
    with gm.graph.inserting_after(node):
        item = gm.graph.call_function(operator.getitem, (node, index))
    with gm.graph.inserting_after(item):
        merged = gm.graph.call_function(with_item, (node, index, item))
    node.replace_all_uses_with(merged, delete_user_cb=lambda user: user not in (item, merged))
    for new in (item, merged):
        new.meta[META_KEY] = {"inserted_by": inserted_by, "site": site.name}
    item.meta[META_KEY]["site_item"] = True
    return item
