"""The modules the passes insert: cosmic state compression (CSC) and the QuantumClassicalInterface.

Both follow the source text's formulas exactly (see DESIGN.md); their implementations are written
for speed: CSC is one fused ``autograd.Function`` (one ``exp`` per element for ``p`` and ``log p``, a
hand-derived backward that saves only the input and one value per row), QCI computes the projector
and the entropy estimator as a single matmul of width ``dim + 1``. Measurements: docs/perf.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CosmicConfig, QCIInit
from .quantities import DEFAULT_EPS

__all__ = [
    "CosmicStateCompression",
    "QuantumClassicalInterface",
    "cosmic_state_compression",
]

# sigmoid(z) rounds to exactly 1.0 in float32 and float64 for every z >= 40; clamping there keeps the
# result bit-identical while avoiding exp() of huge negative arguments (slow on vectorised CPU paths).
_SIGMOID_SATURATION = 40.0
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _log_p_floor(dtype: torch.dtype, eps: float) -> float:
    """A floor for ``log p`` below which ``s = -p log p`` is invisible next to ``eps``.

    At ``log p = -(60 - log eps)``, ``s < 1e-24 * eps``: ``s + eps == eps`` in float32 and float64, so
    clamping there does not change the result. It keeps ``exp(log p)`` out of the denormal range,
    where a vectorised exp is 10-40x slower (measured: docs/perf.md). Capped where ``exp`` of the
    floor is still a normal number of the dtype.
    """
    cap = 700.0 if dtype == torch.float64 else 87.0
    return -min(cap, 60.0 - math.log(eps))


def _csc_composite(x: torch.Tensor, alpha: float, dim: int, eps: float) -> torch.Tensor:
    """CSC written out of place, for autograd to differentiate (double backward only)."""
    log_p = torch.log_softmax(x, dim).clamp_min(_log_p_floor(x.dtype, eps))
    s = -(log_p.exp() * log_p)
    return x * torch.sigmoid((x.abs() / (s + eps) - alpha).clamp_max(_SIGMOID_SATURATION))


class _CSCFunction(torch.autograd.Function):
    """Fused CSC: the forward saves only ``x`` and the row-wise ``logsumexp``; the backward is derived
    by hand (one row reduction plus elementwise work), so Inductor emits one kernel for each.

    With ``p = softmax(x)``, ``l = log p``, ``r = 1 / (s + eps)``, ``z = |x| r - alpha``,
    ``sigma = sigmoid(z)``, ``w = g sigma' (z + alpha)`` and ``c = w x r p (l + 1)``:
    ``dx = g sigma + w + c - p * sum(c)``. Temporaries are updated in place (the forward runs without
    autograd; under torch.compile / export functionalization turns them into pure ops).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float, dim: int, eps: float) -> torch.Tensor:
        lse = torch.logsumexp(x, dim, keepdim=True)
        log_p = (x - lse).clamp_(min=_log_p_floor(x.dtype, eps))
        denom = log_p.exp().mul_(log_p).sub_(eps).neg_()  # s + eps = eps - p log p
        out = x.abs().div_(denom).sub_(alpha).clamp_(max=_SIGMOID_SATURATION).sigmoid_().mul_(x)
        ctx.save_for_backward(x, lse)
        ctx.alpha, ctx.dim, ctx.eps = alpha, dim, eps
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, lse = ctx.saved_tensors
        alpha, dim, eps = ctx.alpha, ctx.dim, ctx.eps
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiable
            out = _csc_composite(x, alpha, dim, eps)
            return torch.autograd.grad(out, x, g, create_graph=True)[0], None, None, None
        floor = _log_p_floor(x.dtype, eps)
        log_p = x - lse
        clamped = log_p <= floor  # there s is constant (its derivative is below float resolution)
        log_p.clamp_(min=floor)
        p = log_p.exp()
        r = (p * log_p).sub_(eps).neg_().reciprocal_()
        z_plus_alpha = (x.abs() * r).clamp_(max=_SIGMOID_SATURATION + alpha)
        sig = (z_plus_alpha - alpha).sigmoid_()
        w = (1 - sig).mul_(sig).mul_(z_plus_alpha).mul_(g)
        c = (w * x).mul_(r).mul_(p).mul_(log_p.add_(1)).masked_fill_(clamped, 0.0)
        dx = (g * sig).add_(w).add_(c).sub_(p.mul_(c.sum(dim, keepdim=True)))
        return dx, None, None, None


def _check_alpha_eps(alpha: float, eps: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"CSC alpha must be a finite number >= 0; got {alpha!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1e-2:
        raise ValueError(f"CSC eps must be a number in (0, 1e-2]; got {eps!r}")


def cosmic_state_compression(
    t: torch.Tensor, alpha: float = 0.5, dim: int = -1, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Cosmic state compression: ``T * sigmoid(|T| / (s + eps) - alpha)``.

    ``s = -softmax(T, dim) * log_softmax(T, dim)`` elementwise. A soft mask: it never produces exact
    zeros from nonzero inputs. Computed in float32 for float16/bfloat16 inputs; returns ``t``'s dtype.
    The implementation is fused (one exp per element for ``p`` and ``log p``, a hand-derived
    backward that saves only ``t`` and one value per row); it matches the literal formula within
    float32 rounding, also for large magnitudes, and traces under ``torch.compile`` and
    ``torch.export``.

    Args:
        t: a floating-point tensor.
        alpha: the entropy threshold, finite and >= 0.
        dim: the softmax dimension.
        eps: the epsilon of the formula.

    Example:
        >>> y = cosmic_state_compression(torch.randn(4, 10), alpha=0.5)
        >>> y.shape
        torch.Size([4, 10])
    """
    _check_alpha_eps(alpha, eps)
    return _compress(t, alpha, dim, eps)


def _compress(t: torch.Tensor, alpha: float, dim: int, eps: float) -> torch.Tensor:
    """:func:`cosmic_state_compression` with ``alpha`` and ``eps`` already checked (a module checks them
    once: under ``torch.compile(dynamic=True)`` its float attributes are symbolic, and checking them
    with ``math.isfinite`` on every call would break the graph)."""
    if not t.is_floating_point():
        raise TypeError(
            f"cosmic_state_compression needs a floating-point tensor; got {t.dtype}. "
            "Cast integer data to float before the model (e.g. x.float())."
        )
    x = t.float() if t.dtype in _LOW_PRECISION else t
    if x.dim() == 0:
        return _CSCFunction.apply(x.reshape(1), float(alpha), -1, float(eps)).reshape(()).to(t.dtype)
    return _CSCFunction.apply(x, float(alpha), dim, float(eps)).to(t.dtype)


class CosmicStateCompression(nn.Module):
    """Module form of :func:`cosmic_state_compression` (no parameters).

    With ``passthrough=True`` (used at model outputs) values that are not floating-point tensors
    (integer predictions, masks, ``None``) are returned unchanged instead of raising.

    Example:
        >>> csc = CosmicStateCompression(alpha=0.3)
        >>> csc(torch.randn(2, 5)).shape
        torch.Size([2, 5])
    """

    def __init__(self, alpha: float = 0.5, dim: int = -1, eps: float = DEFAULT_EPS, *, passthrough: bool = False) -> None:
        super().__init__()
        _check_alpha_eps(alpha, eps)
        self.alpha, self.dim, self.eps, self.passthrough = float(alpha), int(dim), float(eps), passthrough

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.passthrough and not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            return x
        return _compress(x, self.alpha, self.dim, self.eps)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, dim={self.dim}, eps={self.eps}" + (", passthrough=True" if self.passthrough else "")


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


def make_qci(width: int, feature_dim: int, config: CosmicConfig, like: torch.Tensor | None) -> QuantumClassicalInterface:
    """A QCI configured by ``config``, on the device and dtype of ``like`` (a site's weight)."""
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    return QuantumClassicalInterface(
        width, config.qci_beta, init=config.qci_init, feature_dim=feature_dim, eps=config.eps, **factory
    )


def make_csc(config: CosmicConfig, feature_dim: int = -1, passthrough: bool = False) -> CosmicStateCompression:
    return CosmicStateCompression(config.csc_alpha, feature_dim, config.eps, passthrough=passthrough)
