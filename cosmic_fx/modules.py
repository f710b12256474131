"""The modules the passes insert: cosmic state compression (CSC, in ``csc.py``) and the
QuantumClassicalInterface (in ``qci.py``, three forms).

Both follow the source text's formulas exactly (see DESIGN.md); their implementations are written
for speed: CSC is one fused ``autograd.Function`` (see ``csc.py``); the dense QCI computes the projector
and the entropy estimator as a single matmul of width ``dim + 1``, the low-rank and diagonal forms
cost a fraction of it. Measurements: docs/perf.md.
"""

from __future__ import annotations

from .config import CosmicConfig
from .csc import CosmicStateCompression, cosmic_state_compression
from .qci import DiagonalQCI, LowRankQCI, QuantumClassicalInterface, make_qci

__all__ = [
    "CosmicStateCompression",
    "DiagonalQCI",
    "LowRankQCI",
    "QuantumClassicalInterface",
    "cosmic_state_compression",
    "make_csc",
    "make_qci",
]


def make_csc(config: CosmicConfig, feature_dim: int = -1, passthrough: bool = False) -> CosmicStateCompression:
    return CosmicStateCompression(config.csc_alpha, feature_dim, config.eps, passthrough=passthrough)
