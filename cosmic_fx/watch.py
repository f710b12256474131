"""See what the ``cosmic`` backend did to the graphs ``torch.compile`` handed it: :func:`watch_backend`
records, during a ``with`` block, every graph, graph break and recompile, and what the CDG/CCE hooks
did, in a :class:`BackendReport`. (Also importable from :mod:`cosmic_fx.inspect`.)
"""

from __future__ import annotations

import dataclasses
import html
import re
from typing import Any

from torch import nn

__all__ = ["BackendReport", "BackendWatch", "watch_backend"]


@dataclasses.dataclass
class BackendReport:
    """What the ``cosmic`` backend did while a :func:`watch_backend` block ran.

    Attributes:
        graphs: one :class:`cosmic_fx.backend.BackendRecord` per graph dynamo handed to the backend
            (``graph_before`` / ``graph_after`` are its code before and after the cosmic passes).
        graph_breaks: graph breaks dynamo took during the block (its ``graph_break`` counters; at
            least the number of graphs that ended in one).
        recompiles: graphs compiled again for a frame already compiled once (guards failed: new
            shapes, a ``requires_grad`` change from CDG freezing, ...).
        break_reasons: dynamo's reasons for the graph breaks seen (first line of each).
        hooked_params: parameters with CDG/CCE hooks (from the model's :class:`CosmicRuntime`).
        frozen: parameters calibrated CDG holds frozen now.
        freeze_events: ``(step, names)`` for every change of the frozen set.
        last_step: what CDG/CCE did in the latest backward (see :class:`cosmic_fx.CosmicRuntime`).
        outside_graphs: parameters whose gradients came from code dynamo ran outside every compiled
            graph (the eager regions after graph breaks); they are hooked like the rest.
    """

    graphs: list
    graph_breaks: int
    recompiles: int
    break_reasons: list[str]
    hooked_params: int = 0
    frozen: list[str] = dataclasses.field(default_factory=list)
    freeze_events: list = dataclasses.field(default_factory=list)
    last_step: dict = dataclasses.field(default_factory=dict)
    outside_graphs: list[str] = dataclasses.field(default_factory=list)

    def table(self, tablefmt: str = "github") -> str:
        from tabulate import tabulate

        rows = []
        for r in self.graphs:
            qualifying = [s for s in r.sites if s.qualifies]
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
        if self.outside_graphs:
            lines += ["", f"{len(self.outside_graphs)} parameter(s) trained outside compiled graphs (eager regions "
                      "after graph breaks; hooked like the rest): " + ", ".join(self.outside_graphs[:8])
                      + (" ..." if len(self.outside_graphs) > 8 else "")]
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
        self._graphs: list = []

    def __enter__(self) -> BackendWatch:
        from torch._dynamo.utils import counters

        from .backend import add_listener

        self._handle = add_listener(self._graphs.append)
        self._reasons = {k: dict(counters[k]) for k in ("graph_break", "unimplemented")}
        return self

    def __exit__(self, *exc: Any) -> None:
        from torch._dynamo.utils import counters

        from .runtime import hooks_of

        self._handle.remove()
        graphs = self._graphs
        reasons, breaks = [], 0
        for key, before in self._reasons.items():
            for reason, count in counters[key].items():
                if count > before.get(reason, 0):
                    if key == "graph_break":
                        breaks += count - before.get(reason, 0)
                    first = str(reason).strip().splitlines()[0]
                    where = re.search(r'File "([^"]+)", line (\d+)', str(reason))
                    reasons.append(first + (f" ({where.group(1)}:{where.group(2)})" if where else ""))
        recompiles = sum(1 for r in graphs if (m := re.match(r"\d+/(\d+)", r.compile_id)) and int(m.group(1)) > 0)
        rt = hooks_of(self.model) if self.model is not None else None
        self.report = BackendReport(
            graphs=graphs, graph_breaks=max(breaks, sum(r.graph_break for r in graphs)), recompiles=recompiles,
            break_reasons=list(dict.fromkeys(reasons)),
            hooked_params=rt.num_hooked if rt else 0, frozen=rt.frozen if rt else [],
            freeze_events=list(rt.freeze_events) if rt else [], last_step=dict(rt.last_step) if rt else {},
            outside_graphs=rt.outside_graphs if rt else [],
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
