"""See exactly what cosmic does to a model, before any compilation: :func:`explain`.

:func:`explain` transforms the model the way :func:`cosmic_fx.transform` would and reports, in one
:class:`~cosmic_fx.report.Report`: every site (shapes, whether it qualified and why not,
the nodes, parameters and FLOPs the rewrite added), the efficiency ``E(p)`` of every parameter against
the output's ``E_out`` (and what CDG would do with it now), the graph before and after as code, their
unified diff, and a DOT diagram with the inserted nodes highlighted. ``cosmic-fx inspect``
(:mod:`cosmic_fx.cli.inspect`) is its command line.

What the ``cosmic`` backend did to the graphs ``torch.compile`` handed it is :func:`watch_backend`
(in :mod:`cosmic_fx.watch`, importable from here too).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
from torch import fx, nn

from . import policy
from .checks import check_module
from .config import CCEMode, CDGMode, CosmicConfig
from .quantities import efficiency
from .report import ParamRow, PrefixView, Report, SiteRow, _Node, _shape
from .runtime.cce import cce_skipped_for, cce_status
from .runtime.eager import first_float_tensor
from .scoped import eval_no_grad
from .watch import BackendReport, BackendWatch, watch_backend

log = logging.getLogger(__name__)

__all__ = ["BackendReport", "BackendWatch", "ParamRow", "Report", "SiteRow", "explain", "watch_backend"]

_FREEING = re.compile(r";\s+(?:\w+ = )+None\s*$")  # fx's `;  x = None` clauses: noise in a diff


def explain(model: nn.Module, example_inputs: Any, config: CosmicConfig | None = None,
            optimizer: torch.optim.Optimizer | None = None) -> Report:
    """Transform ``model`` as :func:`cosmic_fx.transform` would and report every change.

    The model is run once (and its transformed form once) on ``example_inputs`` in eval mode under
    ``torch.no_grad()``, to get shapes, FLOPs and ``E_out``; its modes, weights and the global RNG
    state are left as they were.

    Args:
        model: the original model, or one returned by :func:`cosmic_fx.transform` (traced path).
        example_inputs: a tensor or a tuple of tensors (positional arguments of ``forward``).
        config: a :class:`CosmicConfig`; default ``CosmicConfig()``, or the transform's own config
            when ``model`` is already transformed.
        optimizer: the ``torch.optim`` optimizer that will step the model, if known (default: the one
            the model's runtime already watches or fuses, if any). It decides whether CCE acts: with
            ``cce_skip_adaptive`` (the fast preset) CCE is off under Adam/AdamW; then
            ``report.cce`` says so and why, and every ``cce_scale`` is 1. Without one, ``report.cce``
            says that it depends on the optimizer.

    Returns:
        a :class:`Report`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> report = cosmic_fx.explain(model, torch.randn(2, 8))
        >>> [(s.name, s.qualifies, s.inserted) for s in report.sites]
        [('0', True, ['cosmic_qci.0']), ('2', False, [])]
        >>> print(report)   # doctest: +SKIP

        The fast preset has CCE off; turned on there, it depends on the optimizer (off under Adam/AdamW):

        >>> cosmic_fx.explain(model, torch.randn(2, 8), cosmic_fx.CosmicConfig.fast()).cce
        "CCE: off (cce='off')"
        >>> fast = cosmic_fx.CosmicConfig.fast(cce="relative")
        >>> cosmic_fx.explain(model, torch.randn(2, 8), fast).cce.startswith("CCE (relative): depends on the optimizer")
        True
        >>> adamw = torch.optim.AdamW(model.parameters())
        >>> report = cosmic_fx.explain(model, torch.randn(2, 8), fast, optimizer=adamw)
        >>> report.cce.startswith("CCE (relative): off for this AdamW")
        True
    """
    from .tracer import symbolic_trace
    from .transform import transform, transform_info

    check_module(model, "cosmic_fx.explain")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("cosmic_fx.explain: optimizer must be a torch.optim.Optimizer (the one that will step the "
                        f"model) or None; got {type(optimizer).__name__}")
    inputs = _as_tuple(example_inputs)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    _check_not_meta(model, inputs)
    info = transform_info(model)
    if info is not None:
        if config is not None and config != info.config:
            raise ValueError("this model was already transformed with another config; pass config=None, or "
                             "explain the original model with the new config")
        if info.path != "symbolic_trace":
            raise ValueError("cosmic_fx.explain needs the original model for a model transformed by module swap "
                             f"({type(model).__name__} does not symbolic-trace); pass the model you gave to "
                             "cosmic_fx.transform")
        config, tm = info.config, model
        before_gm = original = _strip_inserted(info.graph_module)
    else:
        config = config or CosmicConfig()
        original = model
        with torch.random.fork_rng(devices=[]):  # seed-init QCIs must not move the user's RNG
            tm = transform(model, config)
        info = transform_info(tm)
        before_gm = symbolic_trace(model) if info.path == "symbolic_trace" else None
    name = type(model).__name__

    with eval_no_grad(original, tm):
        shapes = _site_shapes(original, inputs, before_gm)
        flops_before = _flops(original, inputs)
        flops_after = _flops(tm, inputs)
        out, protected, order, seen = _run_recording_output_layer(tm, inputs)
        if info.path == "symbolic_trace":
            before_code, after_code = _code(before_gm), _code(info.graph_module)
            nodes = _fx_nodes(info.graph_module)
        else:
            before_code, _ = _module_calls(original, inputs)
            after_code, nodes = _module_calls(tm, inputs)

    inserted_nodes = [n.name for n in nodes if n.kind in ("qci", "csc")]
    sites = _site_rows(tm, info, shapes)
    e_out = None
    tensor = first_float_tensor(out)
    if tensor is not None:
        e_out = float(efficiency(tensor, -1, config.eps))
    prefix = _prefix_view(tm, config, protected, order) if config.cdg is CDGMode.PREFIX else None
    optimizer = optimizer if optimizer is not None else _known_optimizer(tm)
    cce_off = cce_skipped_for(config, optimizer)
    params = _param_rows(original, tm, config, e_out, protected, prefix, cce_off)
    before_params = {id(p): p for p in original.parameters()}
    after_params = {id(p): p for p in tm.parameters()}
    totals = {
        "sites_found": len(sites),
        "sites_rewritten": len(info.rewritten),
        "params_before": sum(p.numel() for p in before_params.values()),
        "params_after": sum(p.numel() for p in after_params.values()),
        "flops_before": flops_before,
        "flops_after": flops_after,
    }
    return Report(model_name=name, path=info.path, config=config, input_shapes=[_shape_of(x) for x in inputs],
                  sites=sites, params=params, e_out=e_out, graph_before=before_code, graph_after=after_code,
                  inserted_nodes=inserted_nodes, totals=totals, nodes=nodes, prefix=prefix,
                  cce=cce_status(config, optimizer), cce_header=_cce_header(config, optimizer),
                  note=_note(model, tm, info, out, seen))


def _known_optimizer(tm: nn.Module) -> torch.optim.Optimizer | None:
    """The optimizer the model's runtime fuses or watches already, if any (the one that decides CCE)."""
    from .runtime import runtime_of
    from .runtime.optim_update import OptimizerUpdate

    rt = runtime_of(tm)
    if rt is None:
        return None
    if isinstance(rt.fused, OptimizerUpdate):
        return rt.fused.optimizer
    return next(iter(list(rt._watched.keys())), None)


def _cce_header(config: CosmicConfig, optimizer: torch.optim.Optimizer | None) -> str:
    """The CCE column's label: the mode, or that it is off for this optimizer / depends on it."""
    if cce_skipped_for(config, optimizer):
        return f"off for {type(optimizer).__name__}"
    if optimizer is None and config.cce is not CCEMode.OFF and config.cce_skip_adaptive:
        return f"{config.cce.value}; 1 under Adam/AdamW"
    return config.cce.value


def _note(model: nn.Module, tm: nn.Module, info, out: Any, seen: _OutputCSCSeen) -> str:
    """The report's note: the module-swap path's line, then where output CSC is not on the prediction."""
    csc = _output_csc_notes(tm, info, out, seen) if info.output_csc is not None else []
    return ". ".join(filter(None, [_path_note(model, info), " ".join(csc)]))


def _output_csc_notes(tm: nn.Module, info, out: Any, seen: _OutputCSCSeen) -> list[str]:
    """Where output CSC does not act as documented (on the model's prediction, before the forward
    computes its loss from it), read from one forward of the transformed model."""
    from .outputs import primary_path

    head = info.output_csc
    if not seen.csc_outputs:
        return [f"output CSC sits on the output layer {head}, which this forward did not run: the output is "
                "not compressed."]
    notes = []
    if info.path == "module_swap" and seen.last_site is not None and seen.last_site != head:
        notes.append(
            f"output CSC sits on {head}, the last site in module order (no forward had run when the model was "
            f"transformed), but the forward runs {seen.last_site} last: the output is computed from {head}'s "
            "compressed output by later layers. Register the head last in __init__, or use csc='sites' or "
            "csc='none'.")
        return notes
    if len(seen.csc_outputs) > 1:
        notes.append(f"the output layer {head} ran {len(seen.csc_outputs)} times in one forward; output CSC "
                     "acted on each of its outputs.")
    path = primary_path(out)
    leaf = out
    for key in path or ():
        leaf = leaf[key]
    if path is not None and not any(leaf is t for t in seen.csc_outputs):
        notes.append(
            f"output CSC acts on the output of the output layer {head}, where a loss the forward computes from "
            "it sees it; the model's output is computed from that by further operations (a norm, a scale, a "
            "slice), so it is not CSC of the output itself.")
    return notes


def _path_note(model: nn.Module, info) -> str:
    """The report's line on a module-swap transform: the path taken and why, in a user's words (the
    tracer's own error goes to the debug log)."""
    if info.path != "module_swap":
        return ""
    error = info.trace_error or ""
    log.debug("cosmic_fx.explain: %s does not symbolic-trace (%s); explaining the module-swap transform",
              type(model).__name__, error)
    detail = error.split(": ", 1)[-1]
    if "has forward hooks" in error or "depends on self.training" in error:
        why = f"a traced graph would change this model's behaviour: {detail}"
    elif type(model).__module__.startswith("transformers."):
        why = ("this model's forward cannot be traced by torch.fx.symbolic_trace, which is normal for Hugging "
               "Face models")
    elif "cannot be used as inputs to control flow" in error:
        why = ("this model's forward branches on tensor values (data-dependent control flow), which "
               "torch.fx.symbolic_trace cannot follow")
    else:
        why = f"torch.fx.symbolic_trace cannot trace this model's forward ({detail})"
    return (f"path: module swap (forward hooks on each site), because {why}; nothing is lost: the same sites "
            "are rewritten, and the graphs below are the module calls of one forward")


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if not example_inputs:
        raise ValueError("example_inputs is empty; pass a tensor or a tuple of tensors the model's forward accepts")
    return example_inputs


def _check_not_meta(model: nn.Module, inputs: tuple) -> None:
    """explain runs the model and reads values (E(p), E_out): meta tensors have shapes but no values."""
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        shown = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ValueError(
            f"cosmic_fx.explain needs real weights, but {type(model).__name__} has {len(meta)} parameter(s)/buffer(s) "
            f"on the meta device ({shown}): it runs the model and measures E(p) from the weights' values. "
            "Materialise the model first: model.to_empty(device='cpu') and then initialise it (e.g. call each "
            "module's reset_parameters()), or load its weights (model.load_state_dict(state_dict, assign=True))."
        )
    if any(isinstance(x, torch.Tensor) and x.is_meta for x in inputs):
        raise ValueError("cosmic_fx.explain needs real example inputs, not tensors on the meta device: it runs the "
                         "model on them; pass e.g. torch.randn(...) of the same shape")


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def _strip_inserted(tm: fx.GraphModule) -> fx.GraphModule:
    """The traced graph without the nodes the passes inserted (shares the model's modules)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in tm.graph.nodes:
        if node.meta.get("cosmic_fx", {}).get("inserted_by"):
            env[node] = env[node.args[0]]
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    gm = fx.GraphModule(tm, graph, type(tm).__name__)
    return gm


def _site_shapes(model: nn.Module, inputs: tuple, traced: fx.GraphModule | None) -> dict[str, list[tuple]]:
    """(input shape, output shape) of every site application, per site name, in call order: from the
    traced graph when there is one (functional sites included), else from hooks on the site modules."""
    shapes: dict[str, list[tuple[tuple | None, tuple | None]]] = {}
    if traced is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        from .tracer import find_sites, site_input, site_value

        try:
            ShapeProp(traced).propagate(*inputs)
        except Exception:  # noqa: BLE001 - the model's own error is reported by the run that follows
            return shapes
        for site in find_sites(traced):
            arg = site_input(site)
            value = site_value(site)
            meta = (value or site.node).meta.get("tensor_meta")
            if value is None and isinstance(meta, (tuple, list)):
                meta = meta[site.output_index]
            in_meta = arg.meta.get("tensor_meta") if arg is not None else None
            shapes.setdefault(site.name, []).append((_meta_shape(in_meta), _meta_shape(meta)))
        return shapes

    from .sites import module_sites

    handles = []
    for site in module_sites(model):
        def record(m, args, out, site=site):
            arg = args[0] if args else None
            if site.output_index is not None and isinstance(out, (tuple, list)):
                out = out[site.output_index]
            shapes.setdefault(site.name, []).append((_shape_of(arg) if isinstance(arg, torch.Tensor) else None,
                                                     _shape_of(out) if isinstance(out, torch.Tensor) else None))
        holder = model.get_submodule(site.module) if site.module else model
        handles.append(holder.register_forward_hook(record, prepend=True))
    try:
        _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _meta_shape(meta: Any) -> tuple[int, ...] | None:
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _call(model: nn.Module, inputs: tuple) -> Any:
    try:
        return model(*inputs)
    except Exception as err:
        shapes = ", ".join(_shape(_shape_of(x)) for x in inputs)
        raise ValueError(
            f"{type(model).__name__} cannot run on example inputs of shape {shapes}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{_first_layer_hint(model)}"
        ) from err


def _first_layer_hint(model: nn.Module) -> str:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            return f" (its first layer {name} is {mod!r}: it expects inputs of shape (N, {mod.in_channels}, H, W))"
        if isinstance(mod, nn.Linear):
            return f" (its first layer {name} is {mod!r}: it expects inputs of shape (..., {mod.in_features}))"
        if isinstance(mod, nn.Embedding):
            return f" (its first layer {name} is {mod!r}: it expects integer token ids below {mod.num_embeddings})"
    return ""


def _flops(model: nn.Module, inputs: tuple) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _call(model, inputs)
    return int(counter.get_total_flops())


@dataclasses.dataclass
class _OutputCSCSeen:
    """What one forward showed about the output CSC: the last site module it ran (by name) and every
    value the output CSC returned."""

    last_site: str | None = None
    csc_outputs: list[Any] = dataclasses.field(default_factory=list)


def _run_recording_output_layer(model: nn.Module,
                                inputs: tuple) -> tuple[Any, list[torch.Tensor], list, _OutputCSCSeen]:
    """Run the model; return its output, the output layer's parameters
    (:func:`cosmic_fx.policy.output_layer` over the module calls, as the runtime protects them), the
    parameters in the order the forward read them, and what it showed about the output CSC."""
    from .runtime.eager import _ParamOrder
    from .sites import is_site_module

    order: list[nn.Module] = []
    seen = _OutputCSCSeen()
    handles = [m.register_forward_pre_hook(lambda m, a: order.append(m)) for m in model.modules()
               if any(True for _ in m.parameters(recurse=False))]
    csc = _submodule(model, "cosmic_csc.output")
    if csc is not None:
        handles.append(csc.register_forward_hook(lambda m, a, out: seen.csc_outputs.append(out)))
    try:
        with _ParamOrder() as reads:
            out = _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    calls = [policy.Call(is_site_module(m), tuple(m.parameters(recurse=False))) for m in order]
    last = policy.output_site([c.is_site for c in calls])
    if last is not None:
        names = {id(m): n for n, m in model.named_modules()}
        seen.last_site = names.get(id(order[last]))
    return out, list(policy.output_layer(calls)), reads.order, seen


def _submodule(model: nn.Module, target: str) -> nn.Module | None:
    try:
        return model.get_submodule(target)
    except AttributeError:
        return None


def _prefix_view(tm: nn.Module, config: CosmicConfig, protected: list[torch.Tensor],
                 order: list[torch.Tensor]) -> PrefixView:
    """Prefix CDG's blocks of ``tm`` and what its next decision would do
    (:func:`cosmic_fx.policy.prefix_decision` on the runtime's readings so far)."""
    from .runtime import runtime_of

    rt = runtime_of(tm)
    names = {id(p): n for n, p in tm.named_parameters(remove_duplicate=False)}
    if not rt.prefix.known:  # module swap: the runtime learns the order at the first forward
        rt.set_protected(names[id(p)] for p in protected if id(p) in names)
        rt.set_forward_order(names[id(p)] for p in order if id(p) in names)
    length, reason = rt.prefix.preview(config, rt.steps)
    blocks = [(name, params) for name, params in rt.prefix_units]
    return PrefixView(blocks=blocks, frozen=rt.prefix.length, would_freeze=length, reason=reason,
                      never=sorted(rt.protected))


def _code(gm: fx.GraphModule) -> str:
    lines = [_FREEING.sub("", line).rstrip() for line in gm.code.strip("\n").splitlines()]
    return "\n".join(line for line in lines if line) + "\n"


def _fx_nodes(gm: fx.GraphModule) -> list[_Node]:
    nodes = []
    for node in gm.graph.nodes:
        inserted = node.meta.get("cosmic_fx", {}).get("inserted_by")
        kind = {"insert_qci": "qci", "insert_csc": "csc"}.get(inserted or "", "op")
        if node.op in ("placeholder", "output"):
            kind = "io"
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        label = node.name if node.op in ("placeholder", "output") else f"{node.name}\n{node.op}: {target}"
        nodes.append(_Node(node.name, label, [n.name for n in node.all_input_nodes], kind))
    return nodes


def _module_calls(model: nn.Module, inputs: tuple) -> tuple[str, list[_Node]]:
    """Code-like listing of the module calls of one forward (for models that do not trace): leaf
    modules, site modules and the inserted ``cosmic_qci.<site>`` / ``cosmic_csc.<site>`` modules.

    Data flow is known where a module's input is exactly another module's output (or an item of
    it); other inputs came through functions (``torch.relu``, ``x * 2``) and are marked ``...``.
    """
    from .sites import site_module_kinds

    kinds = site_module_kinds(model)
    display: dict[int, tuple[str, nn.Module]] = {}
    for name, mod in model.named_modules():
        inside = any(name.startswith(f"{shown}.") for shown, m in display.values() if id(m) in kinds)
        if not inside and id(mod) not in display and (id(mod) in kinds or not any(True for _ in mod.children())):
            display[id(mod)] = (name, mod)
    calls: list[tuple[str, str, list[str], bool]] = []  # (var, target, inputs, guessed)
    producer: dict[int, str] = {}
    keep: list[Any] = []  # keeps outputs alive so that their ids stay unique
    arg_names = [f"input_{i}" if len(inputs) > 1 else "x" for i in range(len(inputs))]
    for arg, var in zip(inputs, arg_names):
        producer[id(arg)] = var
    used: dict[str, int] = {}

    def add_call(target: str, args: tuple, out: Any) -> None:
        base = target.replace(".", "_") or "self"
        count = used.get(base, 0)
        used[base] = count + 1
        var = base if count == 0 else f"{base}_{count}"
        srcs = [producer[id(a)] for a in args if isinstance(a, torch.Tensor) and id(a) in producer]
        guessed = not srcs and bool(calls)
        calls.append((var, target, srcs or ([calls[-1][0]] if calls else []), guessed))
        producer[id(out)] = var
        if isinstance(out, tuple):
            producer.update({id(item): f"{var}[{i}]" for i, item in enumerate(out)})
        keep.append(out)

    # prepended: a layer's call is recorded with its own output, before a hook applies its QCI
    handles = [m.register_forward_hook(lambda m, a, o, t=t: add_call(t, a, o), prepend=True)
               for t, m in display.values()]
    try:
        out = _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    lines = [f"def forward(self, {', '.join(arg_names)}):"]
    for var, target, srcs, guessed in calls:
        lines.append(f"    {var} = self.{target}({'...' if guessed else ', '.join(srcs)})")
    lines.append(f"    return {producer.get(id(out), '...')}")
    nodes = [_Node(v, v, [], "io") for v in arg_names]
    for var, target, srcs, guessed in calls:
        kind = "qci" if target.startswith("cosmic_qci.") else "csc" if target.startswith("cosmic_csc.") else "op"
        nodes.append(_Node(var, f"{var}\ncall_module: {target}", [s.split("[")[0] for s in srcs] or arg_names[:1],
                           kind, guessed))
    last = producer.get(id(out))
    nodes.append(_Node("output", "output", [last.split("[")[0]] if last else [], "io", last is None))
    return "\n".join(lines) + "\n", nodes


def _site_rows(tm: nn.Module, info, shapes: dict[str, list]) -> list[SiteRow]:
    seen: dict[str, int] = {}
    rows = []
    for site in info.sites:
        name = site.name
        calls = shapes.get(name, [])
        i = seen.get(name, 0)
        seen[name] = i + 1
        in_shape, out_shape = calls[i] if i < len(calls) else (None, None)
        targets: list[str] = []
        if info.path == "symbolic_trace":
            for node in info.graph_module.graph.nodes:
                meta = node.meta.get("cosmic_fx", {})
                if meta.get("site") == name and meta.get("inserted_by") and node.op == "call_module":
                    targets.append(str(node.target))
        else:
            for root in ("cosmic_qci", "cosmic_csc"):
                try:
                    tm.get_submodule(f"{root}.{name}")
                    targets.append(f"{root}.{name}")
                except AttributeError:
                    pass
        targets = list(dict.fromkeys(targets))
        inserted = [tm.get_submodule(t) for t in targets]
        params_added = sum(p.numel() for m in inserted for p in m.parameters()) if i == 0 else 0
        flops = _flops_of_modules(inserted, out_shape)
        rows.append(SiteRow(name, site.kind, in_shape, out_shape, site.qualifies, site.reason, targets,
                            params_added, flops))
    return rows


def _flops_of_modules(modules: list[nn.Module], shape: tuple[int, ...] | None) -> int:
    if not modules or shape is None:
        return 0
    from torch.utils.flop_counter import FlopCounterMode

    like = next((p for m in modules for p in m.parameters()), None)
    x = torch.zeros(shape, dtype=like.dtype if like is not None else torch.float32,
                    device=like.device if like is not None else None)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for m in modules:
            x = m(x)
    return int(counter.get_total_flops())


def _param_rows(original: nn.Module, tm: nn.Module, config: CosmicConfig, e_out: float | None,
                protected: list[torch.Tensor], prefix: PrefixView | None = None,
                cce_off: bool = False) -> list[ParamRow]:
    """What CDG and CCE would do to each parameter now: the runtime's decision functions
    (:mod:`cosmic_fx.policy`) applied to this forward's readings, as a first step would apply them
    (``cce_off``: the optimizer turns CCE off, :func:`~cosmic_fx.runtime.cce.cce_skipped_for`)."""
    base = {id(p) for p in original.parameters()}
    named = [(n, p) for n, p in tm.named_parameters()]
    effs = {n: float(efficiency(p.detach(), 0, config.eps)) for n, p in named}
    hooked = [n for n, p in named if p.requires_grad]
    mean_e = policy.mean_efficiency(effs[n] for n in hooked)
    protected_ids = {id(p) for p in protected}
    guarded = {n for n, p in named if id(p) in protected_ids} if config.cdg_protect_output else set()
    low = {n for n in hooked if policy.is_low(effs[n], e_out)}
    verdict: dict[str, str] = {}
    if config.cdg is CDGMode.SEED:
        verdict = {n: "skip" for n in hooked if policy.cdg_seed_skips(effs[n], e_out)}
    elif config.cdg is CDGMode.CALIBRATED:
        # as if every low reading had lasted cdg_patience steps: what the next decision would freeze
        wanted, _ = policy.choose_frozen_set({n: config.cdg_patience for n in low}, effs, frozenset(), guarded,
                                             len(hooked), [frozenset()], config)
        verdict = {n: "low (output layer, protected)" for n in low & guarded}
        verdict.update({n: "low (over the cap)" for n in low - guarded - wanted})
        verdict.update({n: "freeze" for n in wanted})
    elif prefix is not None:
        for i, (block, names) in enumerate(prefix.blocks):
            state = "frozen" if i < prefix.frozen else "freeze" if i < prefix.would_freeze else ""
            verdict.update({n: state or f"block {i} ({block})" for n in names})
        verdict.update({n: "output layer (never frozen)" for n in prefix.never})
    rows = []
    for n, p in named:
        scale = policy.cce_multiplier(effs[n], mean_e, config) if n in hooked and not cce_off else 1.0
        rows.append(ParamRow(n, tuple(p.shape), effs[n], id(p) not in base, verdict.get(n, ""), scale))
    return rows
