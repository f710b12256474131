"""The ``cosmic`` backend for ``torch.compile``.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(model,
backend="cosmic")`` works without importing cosmic_fx. :func:`cosmic_fx.compile` binds the model's
runtime explicitly (``functools.partial(cosmic_backend, runtime=...)``); the entry-point path finds
it through the graph's parameters (the runtime of a transformed model hooks them all), or through the
``DistributedDataParallel`` wrapper whose forward is running. For each graph dynamo hands it, the
backend:

1. finds the sites (the table in :mod:`cosmic_fx.sites`) (:func:`cosmic_fx.tracer.find_sites`);
2. checks that each qualifying site already has its QCI — QCI parameters cannot be created inside a
   compiled region, so an untransformed model gets a one-time warning pointing to
   ``cosmic_fx.transform`` / ``cosmic_fx.compile``, and everything else still happens;
3. runs the parameter-free pass (CSC at the output or after each site) on untransformed models;
4. activates the model's runtime (a plain model gets one, hooked on all its trainable parameters),
   records which of its parameters the graph reads, and makes a graph that returns the model output
   also return ``E(output)`` for CDG, stripped again before the caller sees it;
5. lowers to Inductor (default), ``aot_eager`` or ``eager``.

What it did to each graph goes to the listeners :func:`cosmic_fx.inspect.watch_backend` registers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch._functorch.autograd_function import AutogradFunctionApply

from . import policy
from .config import CDGMode, CosmicConfig, Lowering
from .notices import warn_once
from .runtime import CosmicRuntime, runtime_of
from .runtime.distributed import active_ddp
from .runtime.readings import output_sums
from .sites import SiteInfo
from .tracer import META_KEY, find_sites, placeholder_fqn, site_has_qci

__all__ = ["BackendRecord", "add_listener", "cosmic_backend"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BackendRecord:
    """What the backend did to one graph (see :func:`cosmic_fx.inspect.watch_backend`)."""

    compile_id: str
    graph_before: str
    graph_after: str
    sites: list[SiteInfo]
    missing_qci: list[str]
    csc_inserted: int
    hooked_params: int
    lowering: str
    graph_break: bool
    runtime: weakref.ref | None = None  # the runtime the graph reports to (weakly)


# Active observers (watch_backend blocks): empty outside them. Records are handed over, never kept.
_LISTENERS: list[Callable[[BackendRecord], None]] = []


class _ListenerHandle:
    def __init__(self, fn: Callable[[BackendRecord], None]) -> None:
        self.fn = fn

    def remove(self) -> None:
        if self.fn in _LISTENERS:
            _LISTENERS.remove(self.fn)


def add_listener(fn: Callable[[BackendRecord], None]) -> _ListenerHandle:
    """Call ``fn(record)`` for every graph the backend compiles until ``handle.remove()``."""
    _LISTENERS.append(fn)
    return _ListenerHandle(fn)


def _real_params(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[fx.Node, nn.Parameter]:
    """The graph's parameter placeholders bound to real parameters (none under DDP: fake tensors)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {node: value for node, value in zip(placeholders, example_inputs)
            if isinstance(value, nn.Parameter) and not isinstance(value, torch._subclasses.FakeTensor)}


def _graph_param_keys(gm: fx.GraphModule, real: dict[fx.Node, nn.Parameter], rt: CosmicRuntime) -> dict[fx.Node, int]:
    """The runtime's index of every parameter placeholder: by object when real, else by name."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node in real:
            found = rt.indices_of([real[node]])
            index = next(iter(found)) if found else None
        else:
            index = rt.index_of(placeholder_fqn(node))
        if index is not None:
            out[node] = index
    return out


def _output_layer(gm: fx.GraphModule, sites, keys: dict[fx.Node, int], rt: CosmicRuntime) -> list[str]:
    """:func:`cosmic_fx.policy.output_layer` over the nodes of a graph that returns the model output."""
    site_nodes = {s.node for s in sites}
    calls = [policy.Call(node in site_nodes, tuple(rt.names[keys[a]] for a in node.all_input_nodes if a in keys))
             for node in gm.graph.nodes if node.op == "call_function" or node.op == "call_module"]
    return [str(n) for n in policy.output_layer(calls)]


def _forward_order(gm: fx.GraphModule, keys: dict[fx.Node, int], rt: CosmicRuntime) -> list[str]:
    """The runtime's parameter names in the order the graph's nodes first read them."""
    order = (rt.names[keys[a]] for node in gm.graph.nodes for a in node.all_input_nodes if a in keys)
    return list(dict.fromkeys(order))


def _find_runtime(real: dict[fx.Node, nn.Parameter]) -> CosmicRuntime | None:
    """The runtime that covers most of the graph's parameters (two transforms of one base model share
    its weights; each has its own QCIs), else the runtime of the running DDP wrapper's module."""
    votes: dict[int, tuple[CosmicRuntime, int]] = {}
    for p in real.values():
        from .runtime import runtimes_of_param

        for rt in runtimes_of_param(p):
            votes[id(rt)] = (rt, votes.get(id(rt), (rt, 0))[1] + 1)
    if votes:
        return max(votes.values(), key=lambda v: (v[1], v[0].mode is not None))[0]
    ddp = active_ddp()
    return runtime_of(ddp.module) if ddp is not None else None


def _frame_modules() -> list[nn.Module]:
    """The modules among the locals of the frame dynamo is compiling (``self`` of a forward)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        f_locals = InstructionTranslator.current_tx().f_locals
    except Exception:  # noqa: BLE001 - a dynamo internal; callers fall back to what the graph says
        return []
    return [v for v in f_locals.values() if isinstance(v, nn.Module)]


def _compiled_module(real: dict[fx.Node, nn.Parameter]) -> nn.Module | None:
    """The module whose forward dynamo is compiling (a plain model given to the entry point)."""
    params = {id(p) for p in real.values()}
    return max(_frame_modules(), key=lambda m: sum(id(p) in params for p in m.parameters()), default=None)


def _returns_model_output(graph_break: bool, rt: CosmicRuntime) -> bool:
    """Whether the graph returns the model's own output: it ends its frame, and that frame is the
    model's forward. When dynamo gives up on a forward (an LSTM in it), it compiles the submodules'
    frames on their own, and their returns are not the model output."""
    if graph_break:
        return False
    modules = _frame_modules()
    return not modules or any(m is rt.model for m in modules)


def _resolve_config(options: dict[str, Any] | CosmicConfig | None, rt: CosmicRuntime | None) -> CosmicConfig:
    """The backend's config: the options, or for a transformed model its runtime's config (the options
    may change the lowering only)."""
    if rt is None or not rt.transformed:
        return CosmicConfig.from_options(options)
    if options is None:
        return rt.config
    whole = isinstance(options, dict) and ("config" in options or "preset" in options)
    if isinstance(options, CosmicConfig) or whole:
        config = CosmicConfig.from_options(options)
    else:
        try:
            config = rt.config.replace(**dict(options))
        except TypeError:
            config = CosmicConfig.from_options(options)  # raises the error listing the valid keys
    if config.replace(lower=rt.config.lower) != rt.config:
        mine, given = rt.config.to_options(), config.to_options()
        diff = ", ".join(f"{k}: {mine[k]!r} (transform) vs {given[k]!r} (options)"
                         for k in mine if k != "lower" and mine[k] != given[k])
        raise ValueError(
            f"cosmic backend: this model was transformed with another CosmicConfig ({diff}); a transformed "
            "model's runtime applies its transform's config, and options may only change 'lower'. Transform "
            "the original model with the config you want (cosmic_fx.compile(model, config))."
        )
    return config


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
    """Make the graph also return ``output_sums(node)`` (its efficiency sums, detached) as its last
    output: sums add up over the micro-batches of an accumulated step and over DDP ranks."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    with gm.graph.inserting_before(output):
        detached = gm.graph.call_function(torch.ops.aten.detach.default, (node,))
        e_node = gm.graph.call_function(output_sums, (detached,))
    e_node.meta[META_KEY] = {"inserted_by": "cosmic_backend"}
    # AOTAutograd's cache bypasses any graph that calls a Python function it cannot hash; a node marked
    # as fx-wrapped with a hash of the function's source is keyed on that hash instead (torch's own
    # contract for wrapped functions), so a warm process hits the cache for the E_out graph too
    e_node.meta["is_wrapped"] = True
    e_node.meta["user_cache_hash"] = _e_out_cache_hash()
    (outs,) = output.args
    output.args = ((*outs, e_node),) if isinstance(outs, (tuple, list)) else ((outs, e_node),)
    gm.graph.lint()
    gm.recompile()


@functools.cache
def _e_out_cache_hash() -> str:
    """A hash of the code behind the E_out node (:func:`~cosmic_fx.runtime.readings.output_sums` and the
    quantities it computes) and of the torch version."""
    from . import quantities
    from .runtime import readings

    source = inspect.getsource(readings) + inspect.getsource(quantities)
    return hashlib.sha256((source + torch.__version__).encode()).hexdigest()


def _csc_function_nodes(gm: fx.GraphModule) -> tuple[int, int]:
    """``(cosmic CSC nodes, all nodes)`` among the graph's ``autograd.Function`` calls (dynamo's
    ``autograd_function_apply``); a CSC call is one made by a :class:`CosmicStateCompression` module."""
    from .csc import CosmicStateCompression

    ours = total = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, AutogradFunctionApply):
            total += 1
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            ours += bool(stack) and isinstance(stack[-1][1], type) and issubclass(stack[-1][1], CosmicStateCompression)
    return ours, total


def _cache_settings(gm: fx.GraphModule) -> contextlib.AbstractContextManager:
    """Let AOTAutograd cache a graph whose only ``autograd.Function`` calls are cosmic's CSC.

    AOTAutograd bypasses its cache for every custom ``autograd.Function`` unless
    ``autograd_cache_allow_custom_autograd_functions`` is set: a warm process then re-traces and
    re-partitions every graph with CSC. Cosmic's CSC is safe to cache: dynamo traces both of its
    passes into the graph (the cache key), and its backward reads only constants baked into them.
    A graph that also calls the user's own ``autograd.Function`` keeps torch's default (bypass).
    The setting is patched for this compile only, never globally.
    """
    ours, total = _csc_function_nodes(gm)
    if ours == 0 or ours != total:
        return contextlib.nullcontext()
    return torch._functorch.config.patch(autograd_cache_allow_custom_autograd_functions=True)


def _lower(gm: fx.GraphModule, example_inputs: Sequence[Any], lowering: Lowering) -> Callable:
    if lowering is Lowering.EAGER:
        return gm.forward
    if lowering is Lowering.AOT_EAGER:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    with _cache_settings(gm):
        return compile_fx(gm, example_inputs)


def cosmic_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: dict[str, Any] | CosmicConfig | None = None,
    runtime: CosmicRuntime | None = None,
    **unexpected: Any,
) -> Callable:
    """``torch.compile`` backend: cosmic passes + CDG/CCE hooks, then the lowering.

    Args:
        gm: the graph dynamo captured.
        example_inputs: its inputs (real parameters are among them, except under DDP).
        options: the ``options=`` dict of ``torch.compile`` (any :class:`CosmicConfig` field, plus
            ``"preset"``), or a :class:`CosmicConfig`. For a transformed model only ``lower`` may
            differ from its transform's config.
        runtime: the model's :class:`~cosmic_fx.runtime.CosmicRuntime` (bound by
            :func:`cosmic_fx.compile` with ``functools.partial``); found from the graph otherwise.

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
    # timed under dynamo's own metrics, so torch._dynamo.utils.compile_times() shows cosmic's share
    with torch._dynamo.utils.dynamo_timed("cosmic_backend.passes"):
        config, active, covered, strip, piece = _prepare(gm, example_inputs, options, runtime)
    compiled = _lower(gm, example_inputs, config.lower)
    if active is None:
        return compiled
    return _report_to_runtime(compiled, weakref.ref(active), covered, strip_efficiency=strip, piece=piece)


def _prepare(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | CosmicConfig | None,
             runtime: CosmicRuntime | None) -> tuple[CosmicConfig, CosmicRuntime | None, frozenset[int], bool, bool]:
    """Everything the backend does before lowering: ``(config, active runtime, covered parameter
    indices, whether the graph returns E_out's sums last, whether it is a piece of a compiled DDP)``."""
    from cosmic_fx.passes import InsertCSC

    real = _real_params(gm, example_inputs)
    rt = runtime if runtime is not None else _find_runtime(real)
    config = _resolve_config(options, rt)
    before = gm.code
    sites = find_sites(gm, config)
    reason = getattr(gm, "compile_subgraph_reason", None)
    graph_break = bool(getattr(reason, "graph_break", False))

    # a transformed model carries its own QCI and CSC, placed by `transform` with the model in view
    transformed = rt is not None and rt.transformed
    missing = [] if transformed else [s.name for s in sites
                                      if s.qualifies and config.qci_at(s.width) and not site_has_qci(gm, s)]
    if missing:
        warn_once(
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

    active = None
    returns_output = False
    covered: frozenset[int] = frozenset()
    if config.hooks_enabled:
        if rt is None and real:
            # a plain model through the entry point: its runtime hooks every trainable parameter of the
            # module being compiled (eager regions after graph breaks too); its hooks own it
            root = _compiled_module(real)
            rt = CosmicRuntime(config, transformed=False)
            rt.bind(root if root is not None else gm,
                    None if root is not None else [(placeholder_fqn(n), p) for n, p in real.items()],
                    hold_by_params=True)
        if rt is not None:
            rt.activate("compiled")
            rt._note_ddp()  # under DDP: E_out comes from the model's forward hook, all-reduced
            active = rt
            keys = _graph_param_keys(gm, real, rt)
            covered = frozenset(keys.values())
            returns_output = _returns_model_output(graph_break, rt)
            if returns_output:
                rt.set_protected(_output_layer(gm, sites, keys, rt))
                if len(covered) == len(rt.names):  # one graph reads every parameter: its order is the forward's
                    rt.set_forward_order(_forward_order(gm, keys, rt))
            _check_recompile_budget(config)
        elif any(isinstance(t, torch._subclasses.FakeTensor) for t in example_inputs):
            warn_once(
                "cosmic backend: received fake parameters and found no cosmic runtime (a model wrapped in "
                "DDP without cosmic_fx.transform?); CDG/CCE hooks are not attached. Transform the model "
                "before wrapping it: DistributedDataParallel(cosmic_fx.transform(model))."
            )

    # dynamo guards on grad mode, so a graph traced under no_grad (evaluation) only ever runs there, where
    # the runtime ignores E_out: computing it would only make that graph slower to compile and run
    wants_e_out = (active is not None and config.reads_e_out and returns_output and active._tracker is None
                   and torch.is_grad_enabled())
    # compiled DDP splits the forward into one graph per bucket, none of which is "the model's": on the
    # first step each piece returns its output's sums and the last piece run gives E_out (the runtime's
    # forward hook takes over from the next forward)
    ddp_piece = (active is not None and config.reads_e_out and not returns_output and active._tracker is None
                 and active_ddp() is not None and torch.is_grad_enabled())
    primary = _primary_output(gm) if wants_e_out or ddp_piece else None
    if primary is not None:
        _add_efficiency_output(gm, primary, config.eps)

    if _LISTENERS:
        record = BackendRecord(
            compile_id=str(gm.meta.get("dynamo_compile_id", "")) if hasattr(gm, "meta") else "",
            graph_before=before,
            graph_after=gm.code,
            sites=[s.info() for s in sites],
            missing_qci=missing,
            csc_inserted=csc_count,
            hooked_params=len(covered),
            lowering=config.lower.value,
            graph_break=graph_break,
            runtime=weakref.ref(active) if active is not None else None,
        )
        for listener in list(_LISTENERS):
            listener(record)

    return config, active, covered, primary is not None, ddp_piece


def _check_recompile_budget(config: CosmicConfig) -> None:
    """Warn when calibrated CDG's frozen sets alone could exhaust dynamo's recompile limit."""
    limit = torch._dynamo.config.recompile_limit
    # each distinct frozen set, and the empty one, is a compiled graph; keep one more for eval mode
    if config.cdg in (CDGMode.CALIBRATED, CDGMode.PREFIX) and config.cdg_max_sets + 2 > limit:
        warn_once(
            f"cosmic backend: cdg_max_sets={config.cdg_max_sets} frozen sets plus the unfrozen model "
            f"need {config.cdg_max_sets + 1} compiled graphs, and torch._dynamo.config.recompile_limit "
            f"is {limit}: leave room for an eval-mode graph by lowering cdg_max_sets to at most "
            f"{max(limit - 2, 1)} or raising the limit. Steps that fall back to eager are reported in "
            "CosmicRuntime.uncompiled_steps.",
            key=f"recompile_budget:{config.cdg_max_sets}:{limit}",
        )


def _report_to_runtime(compiled: Callable, runtime: weakref.ref, covered: frozenset[int],
                       strip_efficiency: bool, piece: bool = False) -> Callable:
    """Tell the runtime that a compiled graph ran (and give it E_out, which the graph returns last).

    The runtime is held weakly: dynamo's cache may outlive the model."""

    def run(*args):
        outs = compiled(*args)
        rt = runtime()
        # DDPOptimizer calls each compiled piece once on fake tensors while it compiles
        seq = outs if isinstance(outs, (tuple, list)) else (outs,)
        fake = any(isinstance(o, torch._subclasses.FakeTensor) for o in seq)
        if rt is not None and torch.is_grad_enabled() and not fake:
            rt.note_compiled_forward(covered)
            if strip_efficiency:
                (rt.set_piece_sums if piece else rt.set_output_sums)(outs[-1])
        if strip_efficiency and isinstance(outs, (tuple, list)):
            return type(outs)(outs[:-1])
        return outs

    return run
