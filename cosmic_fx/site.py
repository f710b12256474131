"""One site (:class:`Site`, its graph-free summary :class:`SiteInfo`) and the rules that select the
sites a transform rewrites: :func:`qualify` (rewritable, wide enough, in ``targets``, not in
``exclude``), :func:`check_selection` (patterns that match nothing) and :func:`check_materialized`
(lazy modules). The kinds of site are the table in :mod:`cosmic_fx.sites`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import fx, nn

if TYPE_CHECKING:
    from .sites import SiteKind

__all__ = ["Site", "SiteInfo", "check_materialized", "check_selection", "qualify"]


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """What is known about a site without its graph: a row of ``TransformInfo.sites``.

    Attributes:
        name: the site's name (``"blocks.0.fc1"``); ``targets`` / ``exclude`` regexes match it.
        kind: the :class:`SiteKind` name.
        width: output features, ``None`` when unknown.
        qualifies: whether the passes rewrite it under the config used.
        reason: why not ('' when it does).
        form: ``"module"`` (a layer module) or ``"call"`` (a functional call on a parameter).
        params: names of the parameters the site reads.
    """

    name: str
    kind: str
    width: int | None
    qualifies: bool
    reason: str
    form: str = "module"
    params: tuple[str, ...] = ()


@dataclasses.dataclass
class Site:
    """One application of a site kind, in a graph (``node``) or a module tree (``module``).

    Attributes:
        name: qualified name: the module's (``"features.0"``), or the weight's without ``.weight``
            for functional calls.
        kind: the :class:`SiteKind`.
        width: output features, ``None`` if unknown.
        node: graph sites: the node that produces the site's output (or the tuple holding it).
        module: module sites: the qualified name of the module whose call produces the output.
        params: names of the parameters the site reads (graph sites: as the graph names them).
        qualifies: whether the passes rewrite it under the config used.
        reason: why it does not qualify ('' when it does).
        weight: graph call sites: the weight's node (placeholder / get_attr).
        bias: graph call sites: the bias node, if any.
        output_index: the producing call returns a tuple; the site's output is this item.
        out_node: graph call sites whose layer reshapes the call's result (``addmm`` on a flattened
            input, then ``view``): the node holding the layer's output; ``None`` when it is ``node``.
    """

    name: str
    kind: SiteKind
    width: int | None
    node: fx.Node | None = None
    module: str | None = None
    params: tuple[str, ...] = ()
    qualifies: bool = True
    reason: str = ""
    weight: fx.Node | None = None
    bias: fx.Node | None = None
    output_index: int | None = None
    out_node: fx.Node | None = None

    @property
    def feature_dim(self) -> int:
        return self.kind.feature_dim

    @property
    def form(self) -> str:
        """``"module"`` when a module call produces the output, else ``"call"``."""
        if self.node is not None:
            return "module" if self.node.op == "call_module" else "call"
        return "module"

    def info(self) -> SiteInfo:
        """The graph-free summary of this site."""
        return SiteInfo(self.name, self.kind.name, self.width, self.qualifies, self.reason, self.form, self.params)


def qualify(site: Site, config) -> Site:
    """Set ``site.qualifies`` / ``site.reason``: rewritable, width > ``config.min_width`` (the text's
    rule), in ``config.targets`` (when given), not in ``config.exclude``. A qualifying site narrower
    than ``config.qci_min_width`` + 1 gets no QCI; its reason says so.

    Args:
        site: the site (changed in place and returned).
        config: a :class:`~cosmic_fx.CosmicConfig`.

    Example:
        >>> from cosmic_fx import CosmicConfig
        >>> from cosmic_fx.sites import LINEAR
        >>> qualify(Site("head", LINEAR, 4), CosmicConfig()).reason
        'width 4 <= 10'
    """
    if site.kind.blocked:
        site.qualifies, site.reason = False, f"not rewritable: {site.kind.blocked}"
    elif site.width is None:
        site.qualifies, site.reason = False, "output width unknown"
    elif site.width <= config.min_width:
        site.qualifies, site.reason = False, f"width {site.width} <= {config.min_width}"
    elif config.targets and not any(re.fullmatch(p, site.name) for p in config.targets):
        site.qualifies, site.reason = False, "not in targets"
    elif any(re.fullmatch(p, site.name) for p in config.exclude):
        site.qualifies, site.reason = False, "excluded"
    elif config.qci and not config.qci_at(site.width):  # qualifies; the note says why it gets no QCI
        site.qualifies, site.reason = True, f"no QCI: width {site.width} <= qci_min_width={config.qci_min_width}"
    else:
        site.qualifies, site.reason = True, ""
    return site


def check_materialized(model: nn.Module) -> None:
    """Raise a ``ValueError`` naming the first lazy module whose parameters are not materialised yet
    (its width is only known after a forward).

    Example:
        >>> check_materialized(nn.Sequential(nn.LazyLinear(4)))
        Traceback (most recent call last):
        ...
        ValueError: 0 (LazyLinear) has parameters that are not materialised yet (weight, bias): ...
    """
    for name, mod in model.named_modules():
        lazy = [n for n, p in mod.named_parameters(recurse=False) if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:
            raise ValueError(
                f"{name or type(model).__name__} ({type(mod).__name__}) has parameters that are not materialised yet "
                f"({', '.join(lazy)}): a lazy module learns its width on its first forward. Run one forward pass "
                "(model(example_input)) before cosmic_fx.transform."
            )


def check_selection(sites: Iterable[Site], config) -> None:
    """Warn about each ``targets`` / ``exclude`` regex that matches no site name (like peft's
    "target modules not found"), listing the names there are.

    Args:
        sites: the model's sites.
        config: the :class:`~cosmic_fx.CosmicConfig` whose patterns to check.
    """
    names = list(dict.fromkeys(s.name for s in sites))
    for field in ("targets", "exclude"):
        unmatched = [p for p in getattr(config, field) if not any(re.fullmatch(p, n) for n in names)]
        if unmatched:
            warnings.warn(
                f"CosmicConfig.{field} pattern(s) {unmatched} match no site; the sites are: {', '.join(names)} "
                "(patterns must match a whole name: use 'blocks\\..*\\.fc1' rather than 'fc1')",
                UserWarning, stacklevel=4,
            )
