"""The modules the passes insert: cosmic state compression (CSC, in ``csc.py``) and the
QuantumClassicalInterface (in ``qci.py``, three forms), plus the module-swap wrapper ``CosmicSite``.

Both follow the source text's formulas exactly (see DESIGN.md); their implementations are written
for speed: CSC is one fused ``autograd.Function`` (see ``csc.py``); the dense QCI computes the projector
and the entropy estimator as a single matmul of width ``dim + 1``, the low-rank and diagonal forms
cost a fraction of it. Measurements: docs/perf.md.
"""

from __future__ import annotations

from torch import nn

from .config import CosmicConfig
from .csc import CosmicStateCompression, cosmic_state_compression
from .qci import DiagonalQCI, LowRankQCI, QuantumClassicalInterface, make_qci

__all__ = [
    "CosmicSite",
    "CosmicStateCompression",
    "DiagonalQCI",
    "LowRankQCI",
    "QuantumClassicalInterface",
    "cosmic_state_compression",
    "make_csc",
    "make_qci",
]


class CosmicSite(nn.Module):
    """The module-swap form of a rewritten site, used when a model does not symbolic-trace.

    ``base_layer`` is the user's original ``nn.Linear`` / ``nn.Conv2d`` (shared, not copied), then an
    optional ``qci`` and an optional ``csc`` follow, in that order.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        qci: QuantumClassicalInterface | None = None,
        csc: CosmicStateCompression | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.qci = qci
        self.csc = csc

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if self.qci is not None:
            out = self.qci(out)
        if self.csc is not None:
            out = self.csc(out)
        return out


def make_csc(config: CosmicConfig, feature_dim: int = -1, passthrough: bool = False) -> CosmicStateCompression:
    return CosmicStateCompression(config.csc_alpha, feature_dim, config.eps, passthrough=passthrough)
