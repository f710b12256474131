"""The :class:`Report` that :func:`cosmic_fx.explain` returns, and how it shows itself: tables for a
terminal, HTML for a notebook, a DOT/SVG or matplotlib diagram of the rewritten graph, and JSON.
"""

from __future__ import annotations

import dataclasses
import difflib
import html
import json
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from .config import CosmicConfig

__all__ = ["ParamRow", "PrefixView", "Report", "SiteRow"]

_COLORS = {"qci": "#ffd54f", "csc": "#81d4fa", "io": "#e0e0e0", "op": "#ffffff"}


@dataclasses.dataclass
class SiteRow:
    """One site of the model (see :mod:`cosmic_fx.sites`) and what the rewrite added after it."""

    name: str
    kind: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    qualifies: bool
    reason: str  # why not, or a note on a qualifying site (no QCI below qci_min_width)
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
class PrefixView:
    """Prefix CDG (``cdg="prefix"``) as :func:`cosmic_fx.explain` sees it now.

    Attributes:
        blocks: the freezable blocks from the input side, ``(name, parameter names)``.
        frozen: how many are frozen now.
        would_freeze: how long the frozen prefix would be after the next decision.
        reason: why (:func:`cosmic_fx.policy.prefix_decision`).
        never: the output layer's parameters (never frozen).
    """

    blocks: list[tuple[str, tuple[str, ...]]]
    frozen: int
    would_freeze: int
    reason: str
    never: list[str]

    def __str__(self) -> str:
        names = [f"{i}: {b} ({len(ps)} tensors)" for i, (b, ps) in enumerate(self.blocks)]
        new = [b for b, _ in self.blocks[self.frozen:self.would_freeze]]
        return (f"prefix CDG blocks (input side first): {'; '.join(names) or 'none'}\n"
                f"frozen now: {self.frozen}; would freeze now: {', '.join(new) if new else 'nothing'} "
                f"({self.reason})")


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
        sites: one :class:`SiteRow` per site application, in execution order.
        params: one :class:`ParamRow` per parameter tensor of the transformed model.
        e_out: the efficiency of the transformed model's output (last dim).
        graph_before, graph_after: the graph as code (``forward`` of the traced ``GraphModule``; for
            a model that does not trace, the module calls of one forward).
        inserted_nodes: names of the nodes the passes inserted into ``graph_after``.
        totals: sites found/rewritten, parameters and FLOPs before/after.
        cce: whether CCE acts, for the optimizer given to :func:`explain` (or that it depends on
            the optimizer: the fast preset turns it off under Adam/AdamW), and why
            (:func:`cosmic_fx.runtime.cce.cce_status`).
        note: which path the transform took and why, when it is the module swap, and where output
            CSC does not act on the model's prediction itself (ops after the output layer, another
            layer run last, the output layer run several times); else ``""``.
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
        self.prefix: PrefixView | None = fields.get("prefix")
        self.cce: str = fields.get("cce", "")
        self._cce_header: str = fields.get("cce_header", self.config.cce.value)
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
        reading persists for ``cdg_patience`` steps; prefix: frozen by the next decision)."""
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
                    arrowstyle="->", color="#777777", linestyle="--" if node.guessed_input else "-",
                    shrinkA=9, shrinkB=9))
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

        def qualifies(s: SiteRow) -> str:  # a qualifying site may carry a note (no QCI: qci_min_width)
            if s.qualifies:
                return f"yes ({s.reason})" if s.reason else "yes"
            return f"no: {s.reason}"

        rows = [(s.name, s.kind, _shape(s.input_shape), _shape(s.output_shape), qualifies(s), len(s.inserted),
                 f"{s.params_added:,}", f"{s.flops_added:,}") for s in self.sites]
        headers = ["site", "kind", "input", "output", "qualifies", "nodes added", "params added",
                   "FLOPs added"]
        return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)

    def param_table(self, tablefmt: str = "github") -> str:
        """Per-parameter efficiency and what CDG/CCE would do with it now."""
        from tabulate import tabulate

        rows = [(p.name + (" (new)" if p.added else ""), _shape(p.shape), f"{p.efficiency:+.4f}",
                 p.cdg or "-", f"{p.cce_scale:.3f}") for p in self.params]
        headers = ["parameter", "shape", "E(p)", f"CDG ({self.config.cdg.value})", f"CCE x ({self._cce_header})"]
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
            lines.append(self.note)
        if self.cce:
            lines.append(self.cce)
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
        if self.prefix is not None:
            out += ["", str(self.prefix)]
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
            "cce": self.cce,
            "cdg_would_freeze": self.cdg_would_freeze,
            "prefix": None if self.prefix is None else dataclasses.asdict(self.prefix),
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
