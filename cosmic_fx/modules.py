"""The modules the passes insert: cosmic state compression (CSC, in ``csc.py``) and the
QuantumClassicalInterface, plus the module-swap wrapper ``CosmicSite``.

Both follow the source text's formulas exactly (see DESIGN.md); their implementations are written
for speed: CSC is one fused ``autograd.Function`` (see ``csc.py``), QCI computes the projector and the
entropy estimator as a single matmul of width ``dim + 1``. Measurements: docs/perf.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CosmicConfig, QCIInit
from .csc import CosmicStateCompression, cosmic_state_compression
from .quantities import DEFAULT_EPS

__all__ = [
    "CosmicSite",
    "CosmicStateCompression",
    "QuantumClassicalInterface",
    "cosmic_state_compression",
]

class QuantumClassicalInterface(nn.Module):
    """The quantum-classical interface: a learned gate between a projection of ``x`` and ``x``.

    ``P = Linear(dim, dim)``, ``h = Linear(dim, 1)``, learnable scalar ``beta``::

        g   = sigmoid(beta * mean_f(|P(x)|) / (sigmoid(h(x)) + eps))
        out = g * P(x) + (1 - g) * x

    ``mean_f`` averages over the feature dimension: the last dim for Linear outputs
    (``feature_dim=-1``), the channel dim for Conv2d outputs (``feature_dim=-3``, i.e. dim 1 of NCHW,
    and dim 0 of an unbatched CHW tensor). ``P`` and ``h`` are stored as one ``(dim + 1, dim)`` weight
    and computed as one matmul (on a channels-last view for channel features). ``out`` is evaluated as
    ``x + g * (P(x) - x)``, the same expression, which makes the identity init exact.

    Args:
        dim: the number of features.
        beta: initial gate temperature.
        init: ``"identity"`` (``P`` = identity, so the module returns ``x`` exactly until trained)
            or ``"seed"`` (``nn.Linear``'s default init for both ``P`` and ``h``, as the source text).
        feature_dim: -1 (Linear outputs) or -3 (Conv2d outputs).
        eps: the epsilon of the gate.

    Example:
        >>> qci = QuantumClassicalInterface(16)
        >>> x = torch.randn(4, 16)
        >>> torch.equal(qci(x), x)   # identity init is exact
        True
    """

    def __init__(
        self,
        dim: int,
        beta: float = 1.0,
        *,
        init: QCIInit | str = QCIInit.IDENTITY,
        feature_dim: int = -1,
        eps: float = DEFAULT_EPS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"QuantumClassicalInterface dim must be a positive int; got {dim!r}")
        if feature_dim not in (-1, -3):
            raise ValueError(f"feature_dim must be -1 (Linear outputs) or -3 (Conv2d outputs); got {feature_dim}")
        self.dim, self.feature_dim, self.eps = dim, feature_dim, float(eps)
        self.init = QCIInit.parse(init, "qci_init")
        factory = {"device": device, "dtype": dtype}
        self.beta = nn.Parameter(torch.tensor(float(beta), **factory))
        # rows [0, dim) are the projector P, row dim is the entropy estimator h
        self.weight = nn.Parameter(torch.empty(dim + 1, dim, **factory))
        self.bias = nn.Parameter(torch.empty(dim + 1, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.dim)  # nn.Linear's default init for fan_in = dim
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)
            if self.init is QCIInit.IDENTITY:
                self.weight[: self.dim].copy_(torch.eye(self.dim))
                self.bias[: self.dim].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fd = self.feature_dim
        if x.dim() < -fd or x.shape[fd] != self.dim:
            where = "last" if fd == -1 else "channel"
            raise ValueError(
                f"QuantumClassicalInterface(dim={self.dim}) expects {self.dim} features on the {where} "
                f"dimension; got input of shape {tuple(x.shape)}"
            )
        # channel features go through the same matmul on a channels-last view (not a 1x1 conv:
        # cuDNN's default TF32 convolutions would break the exact identity at init)
        z = F.linear(x if fd == -1 else x.movedim(fd, -1), self.weight, self.bias)
        if fd != -1:
            z = z.movedim(-1, fd)
        proj, h = z.split([self.dim, 1], dim=fd)
        gate = torch.sigmoid(self.beta * proj.abs().mean(fd, keepdim=True) / (torch.sigmoid(h) + self.eps))
        return x + gate * (proj - x)

    @property
    def projector_weight(self) -> torch.Tensor:
        """``P.weight`` of the source text (a view)."""
        return self.weight[: self.dim]

    @property
    def estimator_weight(self) -> torch.Tensor:
        """``h.weight`` of the source text (a view, shape ``(1, dim)``)."""
        return self.weight[self.dim :]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, feature_dim={self.feature_dim}, init={self.init.value}"


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


def make_qci(width: int, feature_dim: int, config: CosmicConfig, like: torch.Tensor | None) -> QuantumClassicalInterface:
    """A QCI configured by ``config``, on the device and dtype of ``like`` (a site's weight)."""
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    return QuantumClassicalInterface(
        width, config.qci_beta, init=config.qci_init, feature_dim=feature_dim, eps=config.eps, **factory
    )


def make_csc(config: CosmicConfig, feature_dim: int = -1, passthrough: bool = False) -> CosmicStateCompression:
    return CosmicStateCompression(config.csc_alpha, feature_dim, config.eps, passthrough=passthrough)
