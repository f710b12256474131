"""See exactly what cosmic does to a model: :func:`explain` (before any compilation) and
:func:`watch_backend` (what the ``cosmic`` backend did to the graphs ``torch.compile`` handed it).

:func:`explain` transforms the model the way :func:`cosmic_fx.transform` would and reports, in one
:class:`Report`: every Linear/Conv2d site (shapes, whether it qualified and why not, the nodes,
parameters and FLOPs the rewrite added), the efficiency ``E(p)`` of every parameter against the
output's ``E_out`` (and what CDG would do with it now), the graph before and after as code, their
unified diff, and a DOT diagram with the inserted nodes highlighted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import html
import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from .config import CCEMode, CDGMode, CosmicConfig, CSCPlacement
from .quantities import efficiency

__all__ = ["BackendReport", "BackendWatch", "ParamRow", "Report", "SiteRow", "explain", "watch_backend"]

_FREEING = re.compile(r";\s+(?:\w+ = )+None\s*$")  # fx's `;  x = None` clauses: noise in a diff
_COLORS = {"qci": "#ffd54f", "csc": "#81d4fa", "io": "#e0e0e0", "op": "#ffffff"}


# ----------------------------------------------------------------------------- report data
@dataclasses.dataclass
class SiteRow:
    """One Linear/Conv2d site of the model and what the rewrite added after it."""

    name: str
    kind: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    qualifies: bool
    reason: str
    inserted: list[str]  # targets of the inserted modules, in order (cosmic_qci.<site>, cosmic_csc.<site>)
    params_added: int
    flops_added: int


@dataclasses.dataclass
class ParamRow:
    """One parameter tensor of the transformed model."""

    name: str
    shape: tuple[int, ...]
    efficiency: float  # E(p) along dim 0
    added: bool  # created by the transform (QCI)
    cdg: str  # what CDG would do now: "" (nothing), "skip", "freeze", "low (...)"
    cce_scale: float  # the factor CCE would apply to its gradient now


@dataclasses.dataclass
class _Node:
    name: str
    label: str
    inputs: list[str]
    kind: str  # "io", "op", "qci", "csc"
    guessed_input: bool = False  # module-call view: the input came through non-module ops


class Report:
    """What :func:`explain` found. Print it for a terminal, display it in a notebook, or
    :meth:`to_json` it for tools.

    Attributes:
        model_name: the model's class name.
        path: ``"symbolic_trace"`` or ``"module_swap"`` (see :func:`cosmic_fx.transform`).
        config: the :class:`CosmicConfig` used.
        input_shapes: shapes of the example inputs.
        sites: one :class:`SiteRow` per Linear/Conv2d application, in execution order.
        params: one :class:`ParamRow` per parameter tensor of the transformed model.
        e_out: the efficiency of the transformed model's output (last dim).
        graph_before, graph_after: the graph as code (``forward`` of the traced ``GraphModule``; for
            a model that does not trace, the module calls of one forward).
        inserted_nodes: names of the nodes the passes inserted into ``graph_after``.
        totals: sites found/rewritten, parameters and FLOPs before/after.
        note: why the model was not traced (module_swap path), else ``""``.
    """

    def __init__(self, **fields: Any) -> None:
        self.model_name: str = fields["model_name"]
        self.path: str = fields["path"]
        self.config: CosmicConfig = fields["config"]
        self.input_shapes: list[tuple[int, ...]] = fields["input_shapes"]
        self.sites: list[SiteRow] = fields["sites"]
        self.params: list[ParamRow] = fields["params"]
        self.e_out: float | None = fields["e_out"]
        self.graph_before: str = fields["graph_before"]
        self.graph_after: str = fields["graph_after"]
        self.inserted_nodes: list[str] = fields["inserted_nodes"]
        self.totals: dict[str, int] = fields["totals"]
        self.note: str = fields.get("note", "")
        self._nodes: list[_Node] = fields["nodes"]

    # ------------------------------------------------------------------ derived views
    @property
    def diff(self) -> str:
        """Unified diff of :attr:`graph_before` and :attr:`graph_after`."""
        lines = difflib.unified_diff(
            self.graph_before.splitlines(), self.graph_after.splitlines(),
            fromfile=f"{self.model_name} (before)", tofile=f"{self.model_name} (cosmic)", lineterm="",
        )
        return "\n".join(lines) + "\n"

    @property
    def cdg_would_freeze(self) -> list[str]:
        """Parameters CDG would stop updating now (seed: skipped this step; calibrated: frozen once the
        reading persists for ``cdg_patience`` steps)."""
        return [p.name for p in self.params if p.cdg in ("skip", "freeze")]

    @property
    def dot(self) -> str:
        """Graphviz DOT text of the rewritten graph; inserted QCI/CSC nodes are filled."""
        out = [f'digraph "{self.model_name}" {{', "  rankdir=TB;",
               '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];']
        for node in self._nodes:
            label = node.label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            shape = ", shape=ellipse" if node.kind == "io" else ""
            pen = ", penwidth=2" if node.kind in ("qci", "csc") else ""
            out.append(f'  "{node.name}" [label="{label}", fillcolor="{_COLORS[node.kind]}"{shape}{pen}];')
        for node in self._nodes:
            style = ' [style=dashed, tooltip="through non-module operations"]' if node.guessed_input else ""
            out.extend(f'  "{src}" -> "{node.name}"{style};' for src in node.inputs)
        out.append("}")
        return "\n".join(out) + "\n"

    def svg(self) -> str:
        """The diagram as SVG, rendered by Graphviz's ``dot``.

        Raises:
            RuntimeError: Graphviz is not installed (the message says how to get it, and that
                :attr:`dot` holds the text to render elsewhere).
        """
        exe = shutil.which("dot")
        if exe is None:
            raise RuntimeError(
                "Graphviz's `dot` program was not found on PATH, so no SVG can be rendered. Install "
                "Graphviz (apt install graphviz, brew install graphviz or conda install graphviz), or "
                "render the DOT text of report.dot elsewhere (e.g. https://viz-js.com)."
            )
        done = subprocess.run([exe, "-Tsvg"], input=self.dot, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"Graphviz failed to render the diagram: {done.stderr.strip()}")
        return done.stdout

    def plot(self, ax=None):
        """Draw the rewritten graph with matplotlib (no Graphviz needed); inserted nodes are coloured.

        Args:
            ax: a matplotlib ``Axes`` (a new figure when omitted).

        Returns:
            the ``Axes``.
        """
        import matplotlib.pyplot as plt

        depth: dict[str, int] = {}
        for node in self._nodes:
            depth[node.name] = 1 + max((depth[i] for i in node.inputs if i in depth), default=-1)
        layers: dict[int, list[str]] = {}
        for node in self._nodes:
            layers.setdefault(depth[node.name], []).append(node.name)
        pos = {n: (i - (len(names) - 1) / 2, -d) for d, names in layers.items() for i, n in enumerate(names)}
        if ax is None:
            width = max(len(v) for v in layers.values())
            _, ax = plt.subplots(figsize=(max(4.0, 2.6 * width), max(3.0, 0.5 * len(layers))))
        for node in self._nodes:
            for src in node.inputs:
                ax.annotate("", xy=pos[node.name], xytext=pos[src], arrowprops=dict(
                    arrowstyle="->", color="#777777", linestyle="--" if node.guessed_input else "-", shrinkA=9, shrinkB=9))
        for node in self._nodes:
            x, y = pos[node.name]
            ax.text(x, y, node.label.split("\n")[0], ha="center", va="center", fontsize=7,
                    bbox=dict(boxstyle="round", fc=_COLORS[node.kind], ec="#333333"))
        ax.set_xlim(min(p[0] for p in pos.values()) - 0.8, max(p[0] for p in pos.values()) + 0.8)
        ax.set_ylim(min(p[1] for p in pos.values()) - 0.7, 0.7)
        ax.set_axis_off()
        ax.set_title(f"{self.model_name} after cosmic_fx (yellow: QCI, blue: CSC)", fontsize=9)
        return ax

    # ------------------------------------------------------------------ tables
    def site_table(self, tablefmt: str = "github") -> str:
        """The sites as a table (tabulate format ``tablefmt``)."""
        from tabulate import tabulate

        rows = [(s.name, s.kind, _shape(s.input_shape), _shape(s.output_shape),
                 "yes" if s.qualifies else f"no: {s.reason}", len(s.inserted), f"{s.params_added:,}",
                 f"{s.flops_added:,}") for s in self.sites]
        headers = ["site", "kind", "input", "output", "qualifies", "nodes added", "params added",
                   "FLOPs added"]
        return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)

    def param_table(self, tablefmt: str = "github") -> str:
        """Per-parameter efficiency and what CDG/CCE would do with it now."""
        from tabulate import tabulate

        rows = [(p.name + (" (new)" if p.added else ""), _shape(p.shape), f"{p.efficiency:+.4f}",
                 p.cdg or "-", f"{p.cce_scale:.3f}") for p in self.params]
        headers = ["parameter", "shape", "E(p)", f"CDG ({self.config.cdg.value})", f"CCE x ({self.config.cce.value})"]
        return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)

    def _summary_lines(self) -> list[str]:
        t = self.totals
        lines = [
            f"cosmic_fx.explain: {self.model_name}, input {', '.join(_shape(s) for s in self.input_shapes)}, "
            f"path {self.path}, config {_config_brief(self.config)}",
            f"sites: {t['sites_found']} found, {t['sites_rewritten']} rewritten | parameters: "
            f"{t['params_before']:,} -> {t['params_after']:,} | FLOPs per forward: {t['flops_before']:,} -> "
            f"{t['flops_after']:,} (matmul/conv, torch.utils.flop_counter)",
        ]
        if self.note:
            lines.append(f"note: {self.note}")
        return lines

    def __str__(self) -> str:
        out = self._summary_lines() + ["", self.site_table(), ""]
        extra = [n for n in self.inserted_nodes if not any(n in _node_names(s.inserted) for s in self.sites)]
        if extra:
            out += [f"also inserted: {', '.join(extra)}", ""]
        e_out = "n/a" if self.e_out is None else f"{self.e_out:+.4f}"
        freeze = self.cdg_would_freeze
        out += [f"E_out = {e_out}; CDG ({self.config.cdg.value}) would stop updating now: "
                f"{', '.join(freeze) if freeze else 'nothing'}", "", self.param_table()]
        return "\n".join(out) + "\n"

    def __repr__(self) -> str:
        t = self.totals
        return (f"<cosmic_fx.Report {self.model_name}: {t['sites_rewritten']}/{t['sites_found']} sites rewritten, "
                f"{t['params_after'] - t['params_before']:+,} params>")

    def _repr_html_(self) -> str:
        parts = [f"<p>{'<br>'.join(html.escape(s) for s in self._summary_lines())}</p>",
                 self.site_table("html")]
        try:
            parts.append(f"<div>{self.svg()}</div>")
        except RuntimeError as err:
            parts.append(f"<p><i>Diagram: {html.escape(str(err))} report.plot() draws it with matplotlib.</i></p>")
        e_out = "n/a" if self.e_out is None else f"{self.e_out:+.4f}"
        parts += [f"<p>E_out = {e_out}</p>", self.param_table("html"),
                  "<details><summary>graph diff</summary><pre>" + html.escape(self.diff) + "</pre></details>"]
        return "\n".join(parts)

    # ------------------------------------------------------------------ machine-readable
    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-friendly Python objects."""
        return {
            "model": self.model_name,
            "path": self.path,
            "note": self.note,
            "config": self.config.to_options(),
            "input_shapes": [list(s) for s in self.input_shapes],
            "totals": dict(self.totals),
            "sites": [_jsonable(dataclasses.asdict(s)) for s in self.sites],
            "parameters": [_jsonable(dataclasses.asdict(p)) for p in self.params],
            "e_out": self.e_out,
            "cdg_would_freeze": self.cdg_would_freeze,
            "inserted_nodes": list(self.inserted_nodes),
            "graph_before": self.graph_before,
            "graph_after": self.graph_after,
            "diff": self.diff,
            "dot": self.dot,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)


def _shape(shape: Sequence[int] | None) -> str:
    return "?" if shape is None else "(" + ", ".join(str(s) for s in shape) + ")"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _node_names(targets: list[str]) -> list[str]:
    return [t.replace(".", "_") for t in targets]


def _config_brief(config: CosmicConfig) -> str:
    default = CosmicConfig().to_options()
    changed = {k: v for k, v in config.to_options().items() if default[k] != v}
    return "default" if not changed else ", ".join(f"{k}={v}" for k, v in changed.items())


# ----------------------------------------------------------------------------- explain
def explain(model: nn.Module, example_inputs: Any, config: CosmicConfig | None = None) -> Report:
    """Transform ``model`` as :func:`cosmic_fx.transform` would and report every change.

    The model is run once (and its transformed form once) on ``example_inputs`` in eval mode under
    ``torch.no_grad()``, to get shapes, FLOPs and ``E_out``; its modes, weights and the global RNG
    state are left as they were.

    Args:
        model: the original model, or one returned by :func:`cosmic_fx.transform` (traced path).
        example_inputs: a tensor or a tuple of tensors (positional arguments of ``forward``).
        config: a :class:`CosmicConfig`; default ``CosmicConfig()``, or the transform's own config
            when ``model`` is already transformed.

    Returns:
        a :class:`Report`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> report = cosmic_fx.explain(model, torch.randn(2, 8))
        >>> [(s.name, s.qualifies, s.inserted) for s in report.sites]
        [('0', True, ['cosmic_qci.0']), ('2', False, [])]
        >>> print(report)   # doctest: +SKIP
    """
    from .tracer import symbolic_trace
    from .transform import transform, transform_info

    inputs = _as_tuple(example_inputs)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    if not isinstance(model, nn.Module):
        raise TypeError(f"cosmic_fx.explain expects an nn.Module; got {type(model).__name__}")
    info = transform_info(model)
    if info is not None:
        if config is not None and config != info.config:
            raise ValueError("this model was already transformed with another config; pass config=None, or "
                             "explain the original model with the new config")
        if info.path != "symbolic_trace":
            raise ValueError("cosmic_fx.explain needs the original model for a model transformed by module swap "
                             f"({type(model).__name__} does not symbolic-trace); pass the model you gave to "
                             "cosmic_fx.transform")
        config, tm, original = info.config, model, _strip_inserted(model)
        before_gm = original
    else:
        config = config or CosmicConfig()
        original = model
        with torch.random.fork_rng(devices=[]):  # seed-init QCIs must not move the user's RNG
            tm = transform(model, config)
        info = transform_info(tm)
        before_gm = symbolic_trace(model) if info.path == "symbolic_trace" else None
    name = type(model).__name__

    with _eval_no_grad(original, tm):
        shapes = _site_shapes(original, inputs)
        flops_before = _flops(original, inputs)
        flops_after = _flops(tm, inputs)
        out, protected = _run_recording_output_layer(tm, inputs)
        if info.path == "symbolic_trace":
            before_code, after_code = _code(before_gm), _code(tm)
            nodes = _fx_nodes(tm)
        else:
            before_code, _ = _module_calls(original, inputs, config=None)
            after_code, nodes = _module_calls(tm, inputs, config=config)

    inserted_nodes = [n.name for n in nodes if n.kind in ("qci", "csc")]
    sites = _site_rows(tm, info, shapes)
    e_out = None
    tensor = _first_float(out)
    if tensor is not None:
        e_out = float(efficiency(tensor, -1, config.eps))
    params = _param_rows(original, tm, config, e_out, protected)
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
                  inserted_nodes=inserted_nodes, totals=totals, nodes=nodes,
                  note="" if info.trace_error is None else f"symbolic_trace failed ({info.trace_error}); "
                  "the graphs are the module calls of one forward")


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if not example_inputs:
        raise ValueError("example_inputs is empty; pass a tensor or a tuple of tensors the model's forward accepts")
    return example_inputs


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


@contextlib.contextmanager
def _eval_no_grad(*models: nn.Module) -> Iterator[None]:
    """Eval mode (no BatchNorm statistics update, no dropout) and no grad; every module's mode restored."""
    modes = {id(m): (m, m.training) for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.values():
            m.training = training


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


def _site_shapes(model: nn.Module, inputs: tuple) -> dict[str, list[tuple[tuple | None, tuple | None]]]:
    """(input shape, output shape) of every Linear/Conv2d call, per module name, in call order."""
    from .modules import CosmicSite

    shapes: dict[str, list[tuple[tuple | None, tuple | None]]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and not isinstance(mod, CosmicSite):
            def record(m, args, out, name=name):
                arg = args[0] if args else None
                shapes.setdefault(name, []).append((_shape_of(arg) if isinstance(arg, torch.Tensor) else None,
                                                    _shape_of(out) if isinstance(out, torch.Tensor) else None))
            handles.append(mod.register_forward_hook(record))
    try:
        _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


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


def _run_recording_output_layer(model: nn.Module, inputs: tuple) -> tuple[Any, list[torch.Tensor]]:
    """Run the model; return its output and the output layer's parameters: those of the last
    Linear/Conv2d called and of every module called after it (as the backend protects them)."""
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, a: order.append(m)) for m in model.modules()
               if any(True for _ in m.parameters(recurse=False))]
    try:
        out = _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    last = max((i for i, m in enumerate(order) if isinstance(m, (nn.Linear, nn.Conv2d))), default=None)
    protected = [] if last is None else [p for m in order[last:] for p in m.parameters(recurse=False)]
    return out, protected


def _first_float(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    for item in values:
        found = _first_float(item)
        if found is not None:
            return found
    return None


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


def _module_calls(model: nn.Module, inputs: tuple, config: CosmicConfig | None) -> tuple[str, list[_Node]]:
    """Code-like listing of the leaf-module calls of one forward (for models that do not trace).

    Names follow the traced path's scheme (``cosmic_qci.<site>``), so before and after diff cleanly.
    Data flow is known where a module's input is exactly another module's output; other inputs came
    through functions (``torch.relu``, ``x * 2``) and are marked ``...``.
    """
    from .modules import CosmicSite

    display: dict[int, tuple[str, nn.Module]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, CosmicSite):
            display[id(mod.base_layer)] = (name, mod.base_layer)
            for part, root in (("qci", "cosmic_qci"), ("csc", "cosmic_csc")):
                if getattr(mod, part) is not None:
                    display[id(getattr(mod, part))] = (f"{root}.{name}", getattr(mod, part))
        elif id(mod) not in display and not any(True for _ in mod.children()):
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
        keep.append(out)

    handles = [m.register_forward_hook(lambda m, a, o, t=t: add_call(t, a, o)) for t, m in display.values()]
    raw: list[Any] = []
    handles.append(model.register_forward_hook(lambda m, a, o: raw.append(o), prepend=True))
    try:
        out = _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    if config is not None and config.csc is CSCPlacement.OUTPUT and raw and raw[0] is not out:
        add_call("cosmic_csc.output", (raw[0],), out)
    lines = [f"def forward(self, {', '.join(arg_names)}):"]
    for var, target, srcs, guessed in calls:
        lines.append(f"    {var} = self.{target}({'...' if guessed else ', '.join(srcs)})")
    lines.append(f"    return {producer.get(id(out), '...')}")
    nodes = [_Node(v, v, [], "io") for v in arg_names]
    for var, target, srcs, guessed in calls:
        kind = "qci" if target.startswith("cosmic_qci.") else "csc" if target.startswith("cosmic_csc.") else "op"
        nodes.append(_Node(var, f"{var}\ncall_module: {target}", srcs or arg_names[:1], kind, guessed))
    last = producer.get(id(out))
    nodes.append(_Node("output", "output", [last] if last else [], "io", last is None))
    return "\n".join(lines) + "\n", nodes


def _site_rows(tm: nn.Module, info, shapes: dict[str, list]) -> list[SiteRow]:
    from .modules import CosmicSite

    seen: dict[str, int] = {}
    rows = []
    for name, kind, _width, qualifies, reason in info.sites:
        calls = shapes.get(name, [])
        i = seen.get(name, 0)
        seen[name] = i + 1
        in_shape, out_shape = calls[i] if i < len(calls) else (None, None)
        inserted: list[nn.Module] = []
        targets: list[str] = []
        if info.path == "symbolic_trace":
            for node in tm.graph.nodes:
                meta = node.meta.get("cosmic_fx", {})
                if meta.get("site") == name and meta.get("inserted_by"):
                    targets.append(str(node.target))
                    inserted.append(tm.get_submodule(str(node.target)))
        else:
            parent, _, child = name.rpartition(".")
            holder = tm.get_submodule(parent) if parent else tm
            site_mod = getattr(holder, child, None)
            if isinstance(site_mod, CosmicSite):
                for part, root in (("qci", "cosmic_qci"), ("csc", "cosmic_csc")):
                    if getattr(site_mod, part) is not None:
                        targets.append(f"{root}.{name}")
                        inserted.append(getattr(site_mod, part))
        params_added = sum(p.numel() for m in inserted for p in m.parameters())
        flops = _flops_of_modules(inserted, out_shape)
        rows.append(SiteRow(name, kind, in_shape, out_shape, qualifies, reason, targets, params_added, flops))
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
                protected: list[torch.Tensor]) -> list[ParamRow]:
    base = {id(p) for p in original.parameters()}
    named = [(n, p) for n, p in tm.named_parameters()]
    effs = {n: float(efficiency(p.detach(), 0, config.eps)) for n, p in named}
    hooked = [n for n, p in named if p.requires_grad]
    mean_e = sum(effs[n] for n in hooked) / max(len(hooked), 1)
    protected_ids = {id(p) for p in protected}
    low = {n for n, p in named if e_out is not None and effs[n] < e_out and p.requires_grad}
    verdict: dict[str, str] = {}
    if config.cdg is CDGMode.SEED:
        verdict = {n: "skip" for n in low}
    elif config.cdg is CDGMode.CALIBRATED:
        by_name = dict(named)
        guarded = {n for n in low if config.cdg_protect_output and id(by_name[n]) in protected_ids}
        candidates = sorted(low - guarded, key=lambda n: effs[n])
        limit = math.ceil(config.cdg_max_frozen * len(hooked))  # as CosmicHooks rounds its cap
        verdict = {n: "low (output layer, protected)" for n in guarded}
        verdict.update({n: "freeze" for n in candidates[:limit]})
        verdict.update({n: "low (over the cap)" for n in candidates[limit:]})
    rows = []
    for n, p in named:
        if config.cce is CCEMode.SEED:
            scale = effs[n]
        elif config.cce is CCEMode.RELATIVE:
            scale = min(max(1.0 + config.cce_gamma * (effs[n] - mean_e), config.cce_min), config.cce_max)
        else:
            scale = 1.0
        rows.append(ParamRow(n, tuple(p.shape), effs[n], id(p) not in base, verdict.get(n, ""), scale))
    return rows


# ----------------------------------------------------------------------------- the backend's view
@dataclasses.dataclass
class BackendReport:
    """What the ``cosmic`` backend did while a :func:`watch_backend` block ran.

    Attributes:
        graphs: one :class:`cosmic_fx.backend.BackendRecord` per graph dynamo handed to the backend
            (``graph_before`` / ``graph_after`` are its code before and after the cosmic passes).
        graph_breaks: graphs that ended in a graph break.
        recompiles: graphs compiled again for a frame already compiled once (guards failed: new
            shapes, a ``requires_grad`` change from CDG freezing, ...).
        break_reasons: dynamo's reasons for the graph breaks seen (first line of each).
        hooked_params: parameters with CDG/CCE hooks (from the model's :class:`CosmicHooks`).
        frozen: parameters calibrated CDG holds frozen now.
        freeze_events: ``(step, names)`` for every change of the frozen set.
        last_step: what CDG/CCE did in the latest backward (see :class:`cosmic_fx.CosmicHooks`).
    """

    graphs: list
    graph_breaks: int
    recompiles: int
    break_reasons: list[str]
    hooked_params: int = 0
    frozen: list[str] = dataclasses.field(default_factory=list)
    freeze_events: list = dataclasses.field(default_factory=list)
    last_step: dict = dataclasses.field(default_factory=dict)

    def table(self, tablefmt: str = "github") -> str:
        from tabulate import tabulate

        rows = []
        for r in self.graphs:
            qualifying = [s for s in r.sites if s[3]]
            rows.append((r.compile_id, len(r.sites), len(qualifying) - len(r.missing_qci),
                         ", ".join(r.missing_qci) or "-", r.csc_inserted, r.hooked_params, r.lowering,
                         "yes" if r.graph_break else "no"))
        return tabulate(rows, headers=["compile id", "sites", "with QCI", "missing QCI", "CSC inserted",
                                       "params hooked", "lowering", "ends in graph break"],
                        tablefmt=tablefmt, disable_numparse=True)

    def __str__(self) -> str:
        lines = [f"cosmic backend: {len(self.graphs)} graph(s), {self.graph_breaks} graph break(s), "
                 f"{self.recompiles} recompile(s); {self.hooked_params} parameter(s) hooked, "
                 f"{len(self.frozen)} frozen now", "", self.table()]
        if self.break_reasons:
            lines += ["", "graph break reasons:"] + [f"  - {r}" for r in self.break_reasons]
        if self.freeze_events:
            lines += ["", "CDG freeze events (step: frozen set):"]
            lines += [f"  {step}: {', '.join(names) or '(none)'}" for step, names in self.freeze_events]
        return "\n".join(lines) + "\n"

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(str(self).split(chr(10))[0])}</pre>" + self.table("html")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["freeze_events"] = [[step, list(names)] for step, names in self.freeze_events]
        return d


class BackendWatch:
    """Context manager returned by :func:`watch_backend`; its :attr:`report` is ready after the block."""

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model
        self.report: BackendReport | None = None

    def __enter__(self) -> BackendWatch:
        from torch._dynamo.utils import counters

        from .backend import backend_records

        self._seen = {id(r) for r in backend_records()}
        self._reasons = {k: dict(counters[k]) for k in ("graph_break", "unimplemented")}
        return self

    def __exit__(self, *exc: Any) -> None:
        from torch._dynamo.utils import counters

        from .backend import backend_records
        from .hooks import hooks_of

        graphs = [r for r in backend_records() if id(r) not in self._seen]
        reasons = []
        for key, before in self._reasons.items():
            for reason, count in counters[key].items():
                if count > before.get(reason, 0):
                    first = str(reason).strip().splitlines()[0]
                    where = re.search(r'File "([^"]+)", line (\d+)', str(reason))
                    reasons.append(first + (f" ({where.group(1)}:{where.group(2)})" if where else ""))
        recompiles = sum(1 for r in graphs if (m := re.match(r"\d+/(\d+)", r.compile_id)) and int(m.group(1)) > 0)
        hooks = hooks_of(self.model) if self.model is not None else None
        self.report = BackendReport(
            graphs=graphs, graph_breaks=sum(r.graph_break for r in graphs), recompiles=recompiles,
            break_reasons=list(dict.fromkeys(reasons)),
            hooked_params=hooks.num_hooked if hooks else 0, frozen=hooks.frozen if hooks else [],
            freeze_events=list(hooks.freeze_events) if hooks else [], last_step=dict(hooks.last_step) if hooks else {},
        )


def watch_backend(model: nn.Module | None = None) -> BackendWatch:
    """Record what the ``cosmic`` backend does during a ``with`` block.

    Graphs are compiled on the first calls of a compiled model (and again on recompiles), so put
    those calls inside the block.

    Args:
        model: the model whose CDG/CCE hooks to report (the compiled module, its ``_orig_mod`` or the
            transformed model: any of them holds the hooked parameters).

    Example:
        >>> tm = cosmic_fx.transform(model)   # doctest: +SKIP
        >>> compiled = torch.compile(tm, backend="cosmic", options={"lower": "aot_eager"})   # doctest: +SKIP
        >>> with cosmic_fx.inspect.watch_backend(tm) as watch:   # doctest: +SKIP
        ...     compiled(x).sum().backward()
        >>> print(watch.report)   # graphs, graph breaks, recompiles, hooks   # doctest: +SKIP
    """
    return BackendWatch(model)


# ----------------------------------------------------------------------------- CLI
_INSPECT_EPILOG = """\
examples:
  cosmic-fx inspect cosmic_fx.models:DigitsCNN --input-shape 8,1,8,8
  cosmic-fx inspect my_model.py:build --input-shape 4,64 --format diff
  cosmic-fx inspect my_model.py:build --input-shape 4,64 --format dot | dot -Tsvg > graph.svg
  cosmic-fx inspect lm.py:build --input-shape 2,16 --input-dtype int64 --int-high 100 --preset seed
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model/input arguments shared by ``inspect`` and ``export``."""
    parser.add_argument("model", metavar="FILE.py:FACTORY",
                        help="a Python file (or an importable module) and a function or class in it that "
                             "returns the nn.Module, called without arguments")
    parser.add_argument("--input-shape", dest="input_shapes", action="append", type=parse_shape, required=True,
                        metavar="N,C,...", help="shape of an example input (repeat for several inputs)")
    parser.add_argument("--input-dtype", choices=["float32", "float64", "int64"], default="float32",
                        help="dtype of the example inputs (int64: random token ids in [0, --int-high))")
    parser.add_argument("--int-high", type=int, default=2, help="upper bound (exclusive) of int64 inputs (default 2)")
    parser.add_argument("--preset", choices=["default", "seed", "off"], default="default",
                        help="cosmic config preset (default: the measured default)")
    parser.add_argument("--csc", choices=["output", "sites", "none"], default=None, help="override the CSC placement")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed before building the model")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="a state_dict for the model the factory builds (.safetensors, or a torch.save file "
                             "loaded with weights_only=True)")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,1,8,8"`` -> ``(8, 1, 8, 8)``; an ``argparse`` type (bad input is a usage error)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; expected comma-separated sizes like 8,1,8,8") from None
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be a positive integer")
    return shape


def model_and_inputs(args: argparse.Namespace) -> tuple[nn.Module, tuple[torch.Tensor, ...], CosmicConfig]:
    """Build the model, example inputs and config from the shared arguments (errors as ``CLIError``)."""
    from .cli import CLIError

    torch.manual_seed(args.seed)
    model = load_factory(args.model)()
    if not isinstance(model, nn.Module):
        raise CLIError(f"{args.model} returned {type(model).__name__}, not an nn.Module")
    if args.weights:
        load_weights(model, args.weights)
    if args.input_dtype == "int64":
        inputs = tuple(torch.randint(0, max(args.int_high, 1), s) for s in args.input_shapes)
    else:
        inputs = tuple(torch.rand(s, dtype=getattr(torch, args.input_dtype)) for s in args.input_shapes)
    overrides = {} if args.csc is None else {"csc": args.csc}
    config = CosmicConfig.preset(args.preset, **overrides)
    shapes = " ".join(f"--input-shape {','.join(map(str, s))}" for s in args.input_shapes)
    with _eval_no_grad(model):
        try:
            model(*inputs)
        except Exception as err:
            raise CLIError(f"{shapes} does not fit {type(model).__name__}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}{_first_layer_hint(model)}") from None
    return model, inputs, config


def load_weights(model: nn.Module, file: str) -> None:
    """Load a state_dict file into ``model`` without unpickling objects (errors as ``CLIError``)."""
    from .cli import CLIError

    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CLIError(f"--weights {file}: no such file") from None
    except Exception as err:
        raise CLIError(f"--weights {file} is not a readable state_dict ({type(err).__name__}: "
                       f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); it may be corrupt") from None
    if not isinstance(state, dict):
        raise CLIError(f"--weights {file} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CLIError(f"--weights {file} does not fit {type(model).__name__}: {err}") from None


def load_factory(spec: str):
    """``"path/to/file.py:make"`` or ``"package.module:make"`` -> the callable (errors as ``CLIError``)."""
    import importlib
    import importlib.util
    import os
    import sys

    from .cli import CLIError

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise CLIError(f"{spec!r}: expected FILE.py:FACTORY (e.g. model.py:build) or package.module:FACTORY")
    if where.endswith(".py") or os.sep in where or os.path.exists(where):
        if not os.path.isfile(where):
            raise CLIError(f"{where}: no such file")
        name = f"_cosmic_user_{abs(hash(os.path.abspath(where)))}"
        module_spec = importlib.util.spec_from_file_location(name, where)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up here
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            sys.modules.pop(name, None)
            raise CLIError(f"{where} failed to import: {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise CLIError(f"cannot import {where!r}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        available = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
        raise CLIError(f"{where} has no callable {attr!r}; it defines: {', '.join(available) or 'nothing callable'}")

    def build():
        try:
            return factory()
        except Exception as err:
            raise CLIError(f"{spec}() failed: {type(err).__name__}: {err}") from None

    return build


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .cli import CLIError

    model, inputs, config = model_and_inputs(args)
    try:
        report = explain(model, inputs, config)
    except (ValueError, TypeError, RuntimeError) as err:
        raise CLIError(str(err)) from None
    if args.format == "svg":
        try:
            text = report.svg()
        except RuntimeError as err:
            raise CLIError(str(err)) from None
    else:
        text = {"table": str, "code": lambda r: r.graph_after, "diff": lambda r: r.diff,
                "dot": lambda r: r.dot, "json": lambda r: r.to_json() + "\n"}[args.format](report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        print(text, end="")
    return 0


def register_cli(subparsers) -> None:
    """Add ``cosmic-fx inspect``."""
    p = subparsers.add_parser(
        "inspect", help="show what cosmic does to a model: sites, parameters, graph diff, diagram",
        description="Transform a model with cosmic_fx and report every change (cosmic_fx.explain).",
        epilog=_INSPECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--format", choices=["table", "code", "diff", "dot", "svg", "json"], default="table",
                   help="table: sites and parameters; code: the rewritten graph; diff: before vs after; "
                        "dot: Graphviz text; svg: rendered by Graphviz (needs `dot`); json: everything")
    p.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    p.set_defaults(func=_cmd_inspect)
