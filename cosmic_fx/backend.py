"""The ``cosmic`` backend for ``torch.compile``.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(model,
backend="cosmic")`` works without importing cosmic_fx. For each graph dynamo hands it, the backend:

1. finds the sites (the table in :mod:`cosmic_fx.sites`) (:func:`cosmic_fx.tracer.find_sites`);
2. checks that each qualifying site already has its QCI — QCI parameters cannot be created inside a
   compiled region, so an untransformed model gets a one-time warning pointing to
   ``cosmic_fx.transform`` / ``cosmic_fx.compile``, and everything else still happens;
3. runs the parameter-free pass (CSC at the output or after each site);
4. attaches the CDG/CCE hooks to the real parameters (once per parameter), and makes the graph also
   return ``E(output)`` for CDG, stripped again before the caller sees it;
5. lowers to Inductor (default), ``aot_eager`` or ``eager``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .config import CDGMode, CosmicConfig, Lowering
from .hooks import _warn_once, runtime_for
from .quantities import efficiency
from .sites import SiteInfo
from .tracer import META_KEY, find_sites, placeholder_fqn, site_has_qci
from .transform import is_transformed_parameter

__all__ = ["BackendRecord", "backend_records", "cosmic_backend"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BackendRecord:
    """What the backend did to one graph (see :func:`backend_records`)."""

    compile_id: str
    graph_before: str
    graph_after: str
    sites: list[SiteInfo]
    missing_qci: list[str]
    csc_inserted: int
    hooked_params: int
    lowering: str
    graph_break: bool


_RECORDS: list[BackendRecord] = []
_MAX_RECORDS = 256


def backend_records(clear: bool = False) -> list[BackendRecord]:
    """The graphs the cosmic backend rewrote in this process, oldest first (at most 256 kept)."""
    out = list(_RECORDS)
    if clear:
        _RECORDS.clear()
    return out


def _real_params(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list[tuple[str, nn.Parameter]], dict[fx.Node, nn.Parameter]]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    named, by_node = [], {}
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, nn.Parameter) and not isinstance(value, torch._subclasses.FakeTensor):
            named.append((placeholder_fqn(node), value))
            by_node[node] = value
    return named, by_node


def _output_layer(gm: fx.GraphModule, sites, by_node: dict[fx.Node, nn.Parameter]) -> list[nn.Parameter]:
    """Parameters read by the last site of a returning graph and by every node after it."""
    if not sites:
        return []
    last = sites[-1].node
    protected, seen_last = [], False
    for node in gm.graph.nodes:
        seen_last = seen_last or node is last
        if seen_last:
            protected.extend(by_node[a] for a in node.all_input_nodes if a in by_node)
    return protected


def _primary_output(gm: fx.GraphModule) -> fx.Node | None:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves: list[fx.Node] = []
    fx.node.map_arg(output.args, leaves.append)
    for leaf in leaves:
        value = leaf.meta.get("val", leaf.meta.get("example_value"))
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 1:
            return leaf
    return None


def _add_efficiency_output(gm: fx.GraphModule, node: fx.Node, eps: float) -> None:
    """Make the graph also return ``E(node, last dim)`` (detached) as its last output."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    with gm.graph.inserting_before(output):
        detached = gm.graph.call_function(torch.ops.aten.detach.default, (node,))
        e_node = gm.graph.call_function(efficiency, (detached, -1, eps))
    e_node.meta[META_KEY] = {"inserted_by": "cosmic_backend"}
    (outs,) = output.args
    output.args = ((*outs, e_node),) if isinstance(outs, (tuple, list)) else ((outs, e_node),)
    gm.graph.lint()
    gm.recompile()


def _lower(gm: fx.GraphModule, example_inputs: Sequence[Any], lowering: Lowering) -> Callable:
    if lowering is Lowering.EAGER:
        return gm.forward
    if lowering is Lowering.AOT_EAGER:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def cosmic_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: dict[str, Any] | CosmicConfig | None = None,
    **unexpected: Any,
) -> Callable:
    """``torch.compile`` backend: cosmic passes + CDG/CCE hooks, then the lowering.

    Args:
        gm: the graph dynamo captured.
        example_inputs: its inputs (real parameters are among them).
        options: the ``options=`` dict of ``torch.compile`` (any :class:`CosmicConfig` field, plus
            ``"preset"``), or a :class:`CosmicConfig`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> compiled = torch.compile(model, backend="cosmic", options={"lower": "aot_eager", "csc": "none"})
        >>> compiled(torch.randn(2, 8)).shape   # doctest: +SKIP
        torch.Size([2, 4])
    """
    if unexpected:
        raise TypeError(
            f"cosmic backend got unexpected keyword(s) {sorted(unexpected)}; pass settings as "
            "torch.compile(model, backend='cosmic', options={...})"
        )
    config = CosmicConfig.from_options(options)
    from cosmic_fx.passes import InsertCSC

    before = gm.code
    sites = find_sites(gm, config)
    reason = getattr(gm, "compile_subgraph_reason", None)
    graph_break = bool(getattr(reason, "graph_break", False))

    named, by_node = _real_params(gm, example_inputs)
    # a transformed model carries its own QCI and CSC, placed by `transform` with the model in view
    transformed = any(is_transformed_parameter(p) for _, p in named)
    missing = [s.name for s in sites if s.qualifies and not site_has_qci(gm, s)] if config.qci and not transformed else []
    if missing:
        _warn_once(
            "cosmic backend: this model was not transformed, so no QuantumClassicalInterface can be "
            f"inserted (sites {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): a compiled "
            "graph cannot own new trainable parameters. Use cosmic_fx.compile(model) or "
            "torch.compile(cosmic_fx.transform(model), backend='cosmic'); CSC and the CDG/CCE hooks "
            "still apply.",
            key="untransformed",
        )
    csc_count = 0
    if not transformed and InsertCSC(config)(gm).modified:
        csc_count = sum(1 for n in gm.graph.nodes if n.meta.get(META_KEY, {}).get("inserted_by") == "insert_csc")
    if config.hooks_enabled and not named and any(isinstance(t, torch._subclasses.FakeTensor) for t in example_inputs):
        _warn_once(
            "cosmic backend: received fake parameters (DDP / export tracing); CDG/CCE hooks are not "
            "attached to this graph's parameters."
        )
    hooks = None
    if config.hooks_enabled and named:
        hooks = runtime_for(config)
        protected = _output_layer(gm, sites, by_node) if not graph_break else []
        hooks.attach(named, protected=protected)
        _check_recompile_budget(config)

    wants_e_out = hooks is not None and config.cdg is not CDGMode.OFF and not graph_break
    primary = _primary_output(gm) if wants_e_out else None
    if primary is not None:
        _add_efficiency_output(gm, primary, config.eps)

    _RECORDS.append(BackendRecord(
        compile_id=str(gm.meta.get("dynamo_compile_id", "")) if hasattr(gm, "meta") else "",
        graph_before=before,
        graph_after=gm.code,
        sites=[s.info() for s in sites],
        missing_qci=missing,
        csc_inserted=csc_count,
        hooked_params=len(named) if hooks is not None else 0,
        lowering=config.lower.value,
        graph_break=graph_break,
    ))
    del _RECORDS[:-_MAX_RECORDS]

    compiled = _lower(gm, example_inputs, config.lower)
    if hooks is None:
        return compiled
    return _report_to_hooks(compiled, hooks, strip_efficiency=primary is not None)


def _check_recompile_budget(config: CosmicConfig) -> None:
    """Warn when calibrated CDG's frozen sets alone could exhaust dynamo's recompile limit."""
    limit = torch._dynamo.config.recompile_limit
    # each distinct frozen set, and the empty one, is a compiled graph; keep one more for eval mode
    if config.cdg is CDGMode.CALIBRATED and config.cdg_max_sets + 2 > limit:
        _warn_once(
            f"cosmic backend: cdg_max_sets={config.cdg_max_sets} frozen sets plus the unfrozen model "
            f"need {config.cdg_max_sets + 1} compiled graphs, and torch._dynamo.config.recompile_limit "
            f"is {limit}: leave room for an eval-mode graph by lowering cdg_max_sets to at most "
            f"{max(limit - 2, 1)} or raising the limit. Steps that fall back to eager are reported in "
            "CosmicHooks.uncompiled_steps.",
            key=f"recompile_budget:{config.cdg_max_sets}:{limit}",
        )


def _report_to_hooks(compiled: Callable, hooks, strip_efficiency: bool) -> Callable:
    """Tell the hooks that a compiled graph ran (and give them E_out, which it returns last)."""

    def run(*args):
        outs = compiled(*args)
        if torch.is_grad_enabled():
            hooks.note_compiled_forward()
            if strip_efficiency:
                hooks.set_output_efficiency(outs[-1])
        if strip_efficiency and isinstance(outs, (tuple, list)):
            return type(outs)(outs[:-1])
        return outs

    return run
