"""``cosmic-fx bench zoo``: a pass-rate table over model code nobody here wrote.

Every model of :mod:`cosmic_fx.bench.zoo_models` / :mod:`cosmic_fx.bench.zoo_vision` goes through the
same checks, one column each; a failure in one column is that cell's failure (with a short reason),
never the end of the run, and a missing library is a "skipped" line:

* **sites** — QCIs inserted by ``cosmic_fx.transform`` against the linear-like layers found by running
  the model once under a ``TorchFunctionMode``: every parameter used as the weight of ``F.linear``,
  ``torch.addmm`` (HF ``Conv1D``) or ``conv2d`` (views such as ``MultiheadAttention``'s packed
  ``in_proj_weight`` count once, as their parameter). A layer qualifies when its output width is >
  ``min_width``; pass when there are at least as many QCIs as qualifying layers.
* **kept** — the default ``transform`` returns an instance of the user's class, and its output has the
  original output's type (a ``ModelOutput`` stays one).
* **parity** — identity-init QCIs, CSC off, eval mode: the transformed model's output equals the
  original's (``torch.equal`` is "exact"; else pass within ``rtol=1e-5, atol=1e-6``).
* **train** — ``cosmic_fx.compile`` (default preset) trains ``steps`` Adam steps on one fixed batch
  (MSE of the primary output tensor to a fixed random target): every loss finite, the last below the
  first. Then one step at each of ``extra_batches`` batch sizes.
* **off = compile** — ``cosmic_fx.compile(model, CosmicConfig.off())`` against plain
  ``torch.compile(backend=<lowering>)`` on the same steps from the same init and RNG seed: equal
  losses ("exact", else pass within a relative ``1e-5``).
* **recompiles / breaks** — from ``torch._dynamo`` counter deltas over the whole step sequence
  (several batch sizes): the cosmic run may not recompile or break more than plain ``torch.compile``.
* **eager fallbacks** — training forwards that ran outside any compiled graph (a forward hook that
  only runs eagerly) plus dynamo "recompile limit" hits, in the cosmic run: must be 0.
* **.pt2** — ``cosmic_fx.export`` of the default transform, ``torch.export.load(...).module()`` at another
  batch size equals the in-memory model (exact, else pass within ``rtol=1e-4, atol=1e-5``).

Every run resets dynamo first, so models never share compile caches or recompile budgets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .zoo_models import LibraryMissing, ZooModel, all_models
from .zoo_runs import TrainRun, count_qcis, linear_like_layers, primary_tensor, reason, train_run

__all__ = ["COLUMNS", "Cell", "Row", "Settings", "primary_tensor", "render", "run", "run_model", "select"]

# (key, header): the table's columns, in order
COLUMNS: tuple[tuple[str, str], ...] = (
    ("sites", "QCIs / linear-like"),
    ("kept", "class, output type kept"),
    ("parity", "transform parity"),
    ("train", "trains (loss)"),
    ("off_parity", "off = torch.compile"),
    ("graphs", "recompiles / breaks"),
    ("fallbacks", "eager fallbacks"),
    ("export", ".pt2 round trip"),
)
PARITY_TOL = dict(rtol=1e-5, atol=1e-6)
EXPORT_TOL = dict(rtol=1e-4, atol=1e-5)
OFF_RTOL = 1e-5


@dataclasses.dataclass
class Cell:
    """One table cell: ``ok`` True (pass), False (fail) or None (does not apply)."""

    ok: bool | None
    text: str

    @property
    def status(self) -> str:
        return "n/a" if self.ok is None else ("pass" if self.ok else "fail")

    def short(self, width: int = 48) -> str:
        mark = {"pass": "✓", "fail": "✗", "n/a": "–"}[self.status]
        text = self.text if len(self.text) <= width else self.text[: width - 1] + "…"
        return f"{mark} {text}"


@dataclasses.dataclass
class Row:
    """One model: its cells, or why it was skipped."""

    model: str
    library: str
    cells: dict[str, Cell] = dataclasses.field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """How each model is run.

    Args:
        lower: the lowering of every compiled run (plain ``torch.compile`` uses the same backend).
        steps: training steps on the fixed batch (the loss check).
        batch: the fixed batch size (>= 2: the ``.pt2`` export makes the batch dynamic).
        extra_batches: one more training step at each of these batch sizes (the recompile check).
        lr: Adam's learning rate.
        seed: the RNG seed before building each model and before each run.
        columns: the column keys to run (default: all); the training runs are skipped when none of
            ``train``, ``off_parity``, ``graphs``, ``fallbacks`` is asked for.
    """

    lower: str = "aot_eager"
    steps: int = 5
    batch: int = 4
    extra_batches: tuple[int, ...] = (3, 6)
    lr: float = 1e-3
    seed: int = 0
    columns: tuple[str, ...] = tuple(key for key, _ in COLUMNS)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.columns) - {key for key, _ in COLUMNS})
        if unknown:
            raise ValueError(f"unknown zoo column(s) {unknown}; valid: {', '.join(key for key, _ in COLUMNS)}")
        if self.batch < 2 or self.steps < 2:
            raise ValueError(f"the zoo needs batch >= 2 and steps >= 2; got batch={self.batch}, steps={self.steps}")


_TRAIN_COLUMNS = ("train", "off_parity", "graphs", "fallbacks")


# ----------------------------------------------------------------------------- helpers
def _batches(spec: ZooModel, settings: Settings) -> list[tuple[Any, ...]]:
    fixed = spec.inputs(settings.batch)
    return [fixed] * settings.steps + [spec.inputs(b) for b in settings.extra_batches]


def _compare(expected: Any, got: Any, tol: Mapping[str, float]) -> Cell:
    a, b = primary_tensor(expected), primary_tensor(got)
    if a.shape != b.shape:
        return Cell(False, f"shape {tuple(b.shape)}, expected {tuple(a.shape)}")
    if torch.equal(a, b):
        return Cell(True, "exact")
    diff = (a.double() - b.double()).abs().max().item()
    ok = torch.allclose(a.double(), b.double(), **tol)
    return Cell(ok, f"max abs Δ {diff:.2g}")  # no "|": the cell goes into a markdown table


@contextlib.contextmanager
def _eval_no_grad(*models: nn.Module) -> Iterator[None]:
    from ..scoped import eval_no_grad

    with eval_no_grad(*models):
        yield


# ----------------------------------------------------------------------------- columns
def _cell(fn: Callable[[], Cell]) -> Cell:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one column's exception is that cell's failure
        return Cell(False, reason(err))


def _col_sites(model: nn.Module, inputs: tuple, tm: Callable[[], nn.Module], min_width: int) -> Cell:
    layers = linear_like_layers(model, inputs)
    qualifying = {n: w for n, w in layers.items() if w > min_width}
    extra = f" ({len(layers) - len(qualifying)} too narrow)" if len(layers) != len(qualifying) else ""
    try:
        qcis = count_qcis(tm())
    except Exception as err:  # noqa: BLE001 - say how many layers there were, then why
        return Cell(False, f"?/{len(qualifying)}: {reason(err)}")
    if not qualifying:
        return Cell(None, f"{qcis}/0: no linear-like layer wider than {min_width}{extra}")
    return Cell(qcis >= len(qualifying), f"{qcis}/{len(qualifying)}{extra}")


def _col_kept(model: nn.Module, inputs: tuple, tm: nn.Module) -> Cell:
    problems = []
    if not isinstance(tm, type(model)):
        got = "an fx.GraphModule" if isinstance(tm, torch.fx.GraphModule) else type(tm).__name__
        problems.append(f"returns {got}, not a {type(model).__name__}")
    with _eval_no_grad(model, tm):
        ref, got = model(*inputs), tm(*inputs)
    if type(got) is not type(ref):
        problems.append(f"output {type(got).__name__}, was {type(ref).__name__}")
    return Cell(not problems, "; ".join(problems) or "yes")


def _col_parity(model: nn.Module, inputs: tuple, tm: nn.Module) -> Cell:
    with _eval_no_grad(model, tm):
        return _compare(model(*inputs), tm(*inputs), PARITY_TOL)


def _col_train(run: TrainRun, settings: Settings) -> Cell:
    head = run.losses[: settings.steps]
    if not head:
        return Cell(False, run.error or "no step ran")
    if not all(math.isfinite(v) for v in run.losses):
        first = next(i for i, v in enumerate(run.losses) if not math.isfinite(v))
        return Cell(False, f"non-finite loss at step {first}")
    if run.error:
        return Cell(False, f"step {len(run.losses)}: {run.error}")
    text = f"{head[0]:.3g} → {head[-1]:.3g}"
    return Cell(head[-1] < head[0], text if head[-1] < head[0] else f"not decreasing: {text}")


def _col_off(plain: TrainRun, off: TrainRun) -> Cell:
    if plain.error:
        return Cell(None, f"torch.compile itself fails: {plain.error}")
    if off.error:
        return Cell(False, off.error)
    if len(off.losses) != len(plain.losses):
        return Cell(False, f"{len(off.losses)} steps vs {len(plain.losses)}")
    if off.losses == plain.losses:
        return Cell(True, "exact")
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(off.losses, plain.losses))
    return Cell(rel <= OFF_RTOL, f"loss rel. Δ {rel:.2g}")


def _col_graphs(plain: TrainRun, cosmic: TrainRun) -> Cell:
    if cosmic.error:
        return Cell(False, "no complete run (see train)")
    text = f"{cosmic.recompiles} / {cosmic.breaks}"
    if plain.error:
        return Cell(None, f"{text} (torch.compile fails)")
    ok = cosmic.recompiles <= plain.recompiles and cosmic.breaks <= plain.breaks
    return Cell(ok, f"{text} (torch.compile {plain.recompiles} / {plain.breaks})")


def _col_fallbacks(cosmic: TrainRun, plain: TrainRun) -> Cell:
    if cosmic.error:
        return Cell(False, "no complete run (see train)")
    n = cosmic.eager_calls + cosmic.limit_hits
    if n == 0:
        return Cell(True, "0")
    what = f"{cosmic.eager_calls} of {cosmic.forwards} steps eager"
    if cosmic.limit_hits:
        what += f", recompile limit hit {cosmic.limit_hits}x"
    return Cell(False, what + ("" if plain.error else f" (torch.compile: {plain.eager_calls})"))


def _col_export(tm: nn.Module, spec: ZooModel, settings: Settings) -> Cell:
    import cosmic_fx

    with tempfile.TemporaryDirectory() as tmp:
        path = cosmic_fx.export(tm, spec.inputs(settings.batch), Path(tmp) / "model.pt2")
        loaded = torch.export.load(path).module()
        other = spec.inputs(settings.batch + 1)  # another batch size: the batch must be dynamic
        with _eval_no_grad(tm), torch.no_grad():
            return _compare(tm(*other), loaded(*other), EXPORT_TOL)


# ----------------------------------------------------------------------------- one model, all models
def run_model(spec: ZooModel, settings: Settings | None = None) -> Row:
    """Every column for one model (a failing column never stops the others)."""
    import cosmic_fx
    from cosmic_fx import CosmicConfig

    settings = settings or Settings()
    start = time.perf_counter()
    row = Row(spec.name, spec.library)
    torch.manual_seed(settings.seed)
    try:
        model = spec.build()
        inputs = spec.inputs(settings.batch)
    except LibraryMissing as err:
        row.skipped = str(err)
        return row
    except Exception as err:  # noqa: BLE001
        row.cells = {key: Cell(False, f"model did not build: {reason(err)}") for key in settings.columns}
        row.seconds = time.perf_counter() - start
        return row

    def transformed(config: CosmicConfig) -> Callable[[], nn.Module]:
        result: list[Any] = []

        def get() -> nn.Module:
            if not result:
                try:
                    with torch.random.fork_rng(devices=[]):
                        result.append(cosmic_fx.transform(model, config))
                except Exception as err:  # noqa: BLE001
                    result.append(err)
            if isinstance(result[0], BaseException):
                raise RuntimeError(f"transform failed: {reason(result[0])}")
            return result[0]

        return get

    parity_config = CosmicConfig(csc="none", lower=settings.lower)
    tm_parity, tm_default = transformed(parity_config), transformed(CosmicConfig(lower=settings.lower))
    columns: dict[str, Callable[[], Cell]] = {
        "sites": lambda: _col_sites(model, inputs, tm_parity, parity_config.min_width),
        "kept": lambda: _col_kept(model, inputs, tm_default()),
        "parity": lambda: _col_parity(model, inputs, tm_parity()),
    }
    if any(key in settings.columns for key in _TRAIN_COLUMNS):
        batches = _batches(spec, settings)
        lower = settings.lower

        def train(make: Callable[[nn.Module], nn.Module]) -> TrainRun:
            return train_run(model, make, batches, lr=settings.lr, seed=settings.seed)

        plain = train(lambda m: torch.compile(m, backend=lower))
        off = train(lambda m: cosmic_fx.compile(m, CosmicConfig.off(lower=lower)))
        cosmic = train(lambda m: cosmic_fx.compile(m, CosmicConfig(lower=lower)))
        columns.update({
            "train": lambda: _col_train(cosmic, settings),
            "off_parity": lambda: _col_off(plain, off),
            "graphs": lambda: _col_graphs(plain, cosmic),
            "fallbacks": lambda: _col_fallbacks(cosmic, plain),
        })
    columns["export"] = lambda: _col_export(tm_default(), spec, settings)
    for key, _ in COLUMNS:
        if key in settings.columns:
            row.cells[key] = _cell(columns[key])
    row.seconds = time.perf_counter() - start
    return row


def select(models: Sequence[ZooModel], pattern: str | None = None, quick: bool = False) -> list[ZooModel]:
    """The models ``--quick`` / ``--models REGEX`` (search on the name) select."""
    chosen = [m for m in models if m.quick] if quick else list(models)
    if pattern:
        regex = re.compile(pattern)
        chosen = [m for m in chosen if regex.search(m.name)]
    return chosen


def run(models: Sequence[ZooModel] | None = None, settings: Settings | None = None, *, quick: bool = False,
        pattern: str | None = None, show_progress: bool = True,
        on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Run the zoo (or the selected part of it) and return one :class:`Row` per model.

    ``on_row`` is called with the rows so far after each model (the CLI writes partial results with it).
    """
    from .common import progress

    settings = settings or Settings()
    chosen = select(all_models() if models is None else models, pattern, quick)
    rows = []
    with progress(len(chosen), "zoo", show_progress) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF and dynamo advice would drown the table; failures are in the cells
        for spec in chosen:
            bar.set_postfix_str(spec.name)
            rows.append(run_model(spec, settings))
            bar.update(1)
            if on_row is not None:
                on_row(rows)
    return rows


# ----------------------------------------------------------------------------- table
def pass_rates(rows: Sequence[Row]) -> dict[str, tuple[int, int]]:
    """Per column: (passed, applicable) over the models that ran (skipped rows and n/a cells excluded)."""
    out = {}
    for key, _ in COLUMNS:
        cells = [r.cells[key] for r in rows if r.skipped is None and key in r.cells and r.cells[key].ok is not None]
        out[key] = (sum(c.ok for c in cells), len(cells))
    return out


def render(rows: Sequence[Row], settings: Settings) -> str:
    """The markdown table, the pass rate per column, and every failure with its full reason."""
    from tabulate import tabulate

    headers = ["model", "library", *[h for _, h in COLUMNS], "time s"]
    body = []
    for r in rows:
        if r.skipped is not None:
            body.append([r.model, r.library, f"skipped: {r.skipped}", *[""] * len(COLUMNS)])
            continue
        body.append([r.model, r.library, *[r.cells[k].short() if k in r.cells else "" for k, _ in COLUMNS],
                     f"{r.seconds:.0f}"])
    rates = pass_rates(rows)
    body.append(["**pass rate**", "", *[f"{p}/{n} ({100 * p / n:.0f}%)" if n else "—" for p, n in
                                        (rates[k] for k, _ in COLUMNS)], f"{sum(r.seconds for r in rows):.0f}"])
    ran = sum(r.skipped is None for r in rows)
    lines = [
        f"torch {torch.__version__}, lowering {settings.lower}, {settings.steps} Adam steps (lr {settings.lr}) "
        "at batch "
        f"{settings.batch}, then batches {', '.join(map(str, settings.extra_batches)) or 'none'}; "
        f"{ran} model(s) ran, {len(rows) - ran} skipped",
        "",
        tabulate(body, headers=headers, tablefmt="github"),
    ]
    failures = [(r.model, h, r.cells[k].text) for r in rows if r.skipped is None
                for k, h in COLUMNS if k in r.cells and r.cells[k].ok is False]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {m} / {h}: {text}" for m, h, text in failures]
    return "\n".join(lines)


def to_json(rows: Sequence[Row], settings: Settings) -> dict[str, Any]:
    rates = pass_rates(rows)
    return {
        "torch": torch.__version__,
        "settings": dataclasses.asdict(settings),
        "columns": dict(COLUMNS),
        "pass_rate": {k: {"passed": p, "applicable": n} for k, (p, n) in rates.items()},
        "models": [
            {"model": r.model, "library": r.library, "skipped": r.skipped, "seconds": round(r.seconds, 2),
             "cells": {k: {"status": c.status, "text": c.text} for k, c in r.cells.items()}}
            for r in rows
        ],
    }
