"""``cosmic-fx bench perf`` rows for the inserted modules: CSC against a clone (and its eager form
against its compiled form), QCI against the layer it follows, for every QCI form.

Each function builds its arms, times them interleaved with the shared :class:`Timer` and returns
table rows; ``perf.py`` decides which run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .perf_table import Row
from .timing import Timer, ms

__all__ = ["QCI_FORM_GOAL", "bench_csc", "bench_qci", "bench_qci_forms", "literal_csc"]

# issue 10: QCI adds at most 10% to its site's forward+backward at width >= 512 (the cheap forms)
QCI_FORM_GOAL = 1.10
QCI_FORM_GOAL_MIN_WIDTH = 512


def literal_csc(t, alpha: float = 0.5, dim: int = -1, eps: float = 1e-8):
    """The source text's formula, verbatim (the reference arms)."""
    import torch

    s = -(t.softmax(dim) * t.log_softmax(dim))
    return t * torch.sigmoid(t.abs() / (s + eps) - alpha)


def _many_graphs():
    """A context in which one process may compile more than dynamo's default 8 graphs of one code
    object (every ``nn.Sequential`` arm shares ``Sequential.forward``): past the limit dynamo would
    silently run the remaining arms eagerly, and their figures would be wrong."""
    import torch

    return torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096)


# ---------------------------------------------------------------------------------------------- 1. CSC
def bench_csc(shape: tuple[int, ...], timer: Timer, compiler: str, cname: str) -> list[Row]:
    """CSC forward and forward+backward against ``t.clone()`` (goals 5x and 10x under the compiler),
    and the public function run eagerly against its compiled form (goal 2x)."""
    import torch

    from ..csc import cosmic_state_compression

    torch.manual_seed(0)
    x = torch.randn(shape)
    xg = x.clone().requires_grad_()
    g = torch.randn(shape)
    impls = {
        "literal eager": literal_csc,
        f"literal {cname}": torch.compile(literal_csc, backend=compiler, dynamic=False),
        "fast eager": cosmic_state_compression,
        "fast eager ATen ops": lambda t: cosmic_state_compression(t, compiled=False),
        f"fast {cname}": torch.compile(cosmic_state_compression, backend=compiler, dynamic=False),
    }

    def fwd(f):
        return lambda: f(x)

    def fwd_bwd(f):
        def run():
            xg.grad = None
            f(xg).backward(g)
        return run

    arms: dict[str, Callable[[], Any]] = {"clone": lambda: x.clone()}
    for name, f in impls.items():
        arms[f"{name} fwd"] = fwd(f)
        arms[f"{name} fwd+bwd"] = fwd_bwd(f)
    t = timer.compare(arms)
    clone = t["clone"]
    label = "x".join(map(str, shape))
    rows = []
    for kind, goal in (("fwd", 5.0), ("fwd+bwd", 10.0)):
        refs = "; ".join(
            [f"clone {ms(clone)}"]
            + [f"{n} {t[f'{n} {kind}'] / clone:.3g}x" for n in ("literal eager", f"literal {cname}", "fast eager",
                                                                "fast eager ATen ops")]
            + [f"fast {cname} {ms(t[f'fast {cname} {kind}'])}"]
        )
        rows.append(Row("1 CSC", f"CSC {kind} ({label}) / clone, fast CSC under {cname}",
                        t[f"fast {cname} {kind}"] / clone, goal, refs))
    for kind in ("fwd", "fwd+bwd"):
        rows.append(Row(
            "1 CSC", f"CSC {kind} ({label}), public function called eagerly / under {cname}",
            t[f"fast eager {kind}"] / t[f"fast {cname} {kind}"], 2.0,
            f"eager {ms(t[f'fast eager {kind}'])}; {cname} {ms(t[f'fast {cname} {kind}'])}; "
            f"eager with ATen ops (compiled=False) {ms(t[f'fast eager ATen ops {kind}'])}",
        ))
    return rows


# ---------------------------------------------------------------------------------------------- 2. QCI
def bench_qci(rows_dim: tuple[int, int], timer: Timer, compiler: str, cname: str) -> list[Row]:
    """The dense QCI alone against a ``Linear(dim, dim + 1)`` (the same GEMM), fwd+bwd (goal 1.15x)."""
    import torch
    from torch import nn

    from ..modules import QuantumClassicalInterface

    n, d = rows_dim
    torch.manual_seed(0)
    qci = QuantumClassicalInterface(d, init="seed")
    lin = nn.Linear(d, d + 1)
    x = torch.randn(n, d, requires_grad=True)
    g, g1 = torch.randn(n, d), torch.randn(n, d + 1)
    arms = {
        "Linear eager": _train_step(lin, x, g1),
        "QCI eager": _train_step(qci, x, g),
        f"Linear {cname}": _train_step(torch.compile(lin, backend=compiler, dynamic=False), x, g1, lin),
        f"QCI {cname}": _train_step(torch.compile(qci, backend=compiler, dynamic=False), x, g, qci),
    }
    t = timer.compare(arms)
    return [
        Row("2 QCI", f"QCI fwd+bwd / Linear({d}, {d + 1}) fwd+bwd, {mode}, input {n}x{d}",
            t[f"QCI {mode}"] / t[f"Linear {mode}"], 1.15,
            f"plain Linear {mode} {ms(t[f'Linear {mode}'])}; QCI {mode} {ms(t[f'QCI {mode}'])}")
        for mode in (cname, "eager")
    ]


def _train_step(run, x, grad, module=None):
    """One forward+backward of ``run`` on ``x`` (which requires grad, as a site's input does)."""
    module = module if module is not None else run

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        run(x).backward(grad)
    return step


def bench_qci_forms(rows: int, widths: tuple[int, ...], forms: tuple[str, ...], timer: Timer, compiler: str | None,
                    cname: str, rank: int = 16) -> list[Row]:
    """``Linear(w, w)`` followed by each QCI form against ``Linear(w, w)`` alone, forward+backward,
    eagerly and compiled (``compiler=None``: eagerly only), at each width: what a QCI adds to the site
    it follows. Goal (issue 10): at most 10% at width >= 512 for the forms meant to be cheap
    (low-rank, diagonal); the dense form and narrower widths are reported without a goal."""
    import torch
    from torch import nn

    from ..config import CosmicConfig
    from ..modules import make_qci

    out = []
    with _many_graphs():
        for w in widths:
            torch.manual_seed(0)
            x = torch.randn(rows, w, requires_grad=True)
            g = torch.randn(rows, w)
            base = nn.Linear(w, w)
            modules = {"Linear": base}
            for form in forms:
                cfg = CosmicConfig(qci_form=form, qci_rank=rank, qci_init="seed")  # seed: every term is live
                site = nn.Linear(w, w)
                site.load_state_dict(base.state_dict())
                modules[form] = nn.Sequential(site, make_qci(w, -1, cfg, None))
            arms = {}
            for name, m in modules.items():
                arms[f"{name} eager"] = _train_step(m, x, g)
                if compiler is not None:
                    arms[f"{name} {cname}"] = _train_step(torch.compile(m, backend=compiler, dynamic=False), x, g, m)
            t = timer.compare(arms)
            for form in forms:
                for mode in ("eager",) if compiler is None else (cname, "eager"):
                    cheap = form != "dense" and w >= QCI_FORM_GOAL_MIN_WIDTH
                    what = f"{form}, rank {min(rank, w)}" if form == "lowrank" else form
                    out.append(Row(
                        "2 QCI forms", f"Linear({w}, {w}) + QCI {what} / Linear({w}, {w}), fwd+bwd, {mode}, "
                        f"input {rows}x{w}", t[f"{form} {mode}"] / t[f"Linear {mode}"],
                        QCI_FORM_GOAL if cheap else None,
                        f"Linear {mode} {ms(t[f'Linear {mode}'])}; with QCI {ms(t[f'{form} {mode}'])}",
                    ))
    return out
