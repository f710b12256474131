"""The quantum-classical interface (QCI) in three forms of its projector ``P``; the gate is the text's.

Every form computes, over the feature dimension ``f``::

    g   = sigmoid(beta * mean_f(|P(x)|) / (sigmoid(h(x)) + eps))
    out = g * P(x) + (1 - g) * x          evaluated as  lerp(x, P(x), g) = x + g * (P(x) - x)

with ``h = Linear(dim, 1)`` and a learnable scalar ``beta``. The forms differ in ``P``:

========== ===================================== ============================================
form       ``P(x)``                              cost per site (GEMM FLOPs per row)
========== ===================================== ============================================
dense      ``W x + b`` (``Linear(dim, dim)``)    ``2 dim (dim + 1)``, as the source text
lowrank    ``x + B (A x) + b``, rank ``r``       ``2 dim (2 r + 1)``
diagonal   ``s * x + b``                         ``2 dim`` (``h`` only), elementwise work
========== ===================================== ============================================

With ``init="identity"`` (``W = I``; ``B = 0``; ``s = 1``; ``b = 0``) every form returns ``x``
exactly until trained: ``P(x)`` is exactly ``x``, so the lerp returns ``x`` whatever the gate. That
holds for non-finite inputs too: a row (the features of one position; of one pixel for channel
features) whose ``mean_f |P(x)|`` is not finite -- a NaN or infinite input feature, or an overflow --
comes out as it went in, at any init (``P`` is undefined on it: ``0 * inf`` is NaN). Gradients
through such a row are not finite, as in the model without the QCI.
Under torch.compile / torch.export the forms use ops Inductor fuses into one pass over the
activations; eagerly, fused ATen kernels (an L1 norm, a GEMV, addcmul, lerp) that avoid temporaries.
Measurements: docs/perf.md.
"""

from __future__ import annotations

import math
import zlib
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import CosmicConfig, QCIForm, QCIInit
from .csc import _plain_eager_context
from .quantities import DEFAULT_EPS

__all__ = ["QCI_FORMS", "DiagonalQCI", "LowRankQCI", "QuantumClassicalInterface", "make_qci", "qci_seed"]


class QuantumClassicalInterface(nn.Module):
    """The quantum-classical interface with the source text's dense projector ``P = Linear(dim, dim)``.

    ``mean_f`` averages over the feature dimension: the last dim for Linear outputs
    (``feature_dim=-1``), the channel dim for Conv2d outputs (``feature_dim=-3``, i.e. dim 1 of NCHW,
    and dim 0 of an unbatched CHW tensor). ``P`` and ``h`` are stored as one ``(dim + 1, dim)``
    ``weight`` (rows ``[0, dim)`` are ``P``, row ``dim`` is ``h``) and ``bias``, and computed as one
    matmul (on a channels-last view for channel features). The cheaper forms, :class:`LowRankQCI`
    and :class:`DiagonalQCI`, subclass it: ``isinstance(m, QuantumClassicalInterface)`` holds for all.

    Args:
        dim: the number of features.
        beta: initial gate temperature.
        init: ``"identity"`` (``P`` = identity, so the module returns ``x`` exactly until trained)
            or ``"seed"`` (``nn.Linear``'s default init for both ``P`` and ``h``, as the source text).
        feature_dim: -1 (Linear outputs) or -3 (Conv2d outputs).
        eps: the epsilon of the gate.
        generator: where the initial values are drawn from (on the CPU, then copied to the
            parameters' device). ``None``: the global RNG, as ``nn.Linear`` does; :func:`make_qci`
            (used by :func:`cosmic_fx.transform`) passes a generator of the QCI's own, so that
            creating QCIs leaves the global RNG state as it was.

    Example:
        >>> qci = QuantumClassicalInterface(16)
        >>> x = torch.randn(4, 16)
        >>> torch.equal(qci(x), x)   # identity init is exact
        True
    """

    form: ClassVar[QCIForm] = QCIForm.DENSE

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
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{type(self).__name__} dim must be a positive int; got {dim!r}")
        if feature_dim not in (-1, -3):
            raise ValueError(f"feature_dim must be -1 (Linear outputs) or -3 (Conv2d outputs); got {feature_dim}")
        self.dim, self.feature_dim, self.eps = dim, feature_dim, float(eps)
        self.init = QCIInit.parse(init, "qci_init")
        factory = {"device": device, "dtype": dtype}
        self.beta = nn.Parameter(torch.tensor(float(beta), **factory))
        self._create_parameters(factory)
        # every form: bias[:dim] is P's bias, bias[dim] is h's (registered last: the dense form keeps
        # the parameter order beta, weight, bias of earlier versions)
        self.bias = nn.Parameter(torch.empty(dim + 1, **factory))
        self.reset_parameters(generator)

    # ------------------------------------------------------------------ per form
    def _create_parameters(self, factory: dict) -> None:
        self.weight = nn.Parameter(torch.empty(self.dim + 1, self.dim, **factory))

    def _init_projector(self, bound: float, gen: torch.Generator | None) -> None:
        """Initialise the form's parameters in place (under ``no_grad``) with :func:`_uniform_` from
        ``gen``; ``bias`` is already drawn."""
        _uniform_(self.weight, bound, gen)
        if self.init is QCIInit.IDENTITY:
            self.weight[: self.dim].copy_(torch.eye(self.dim))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P(x), h(x))`` with the features on ``self.feature_dim``."""
        fd = self.feature_dim
        # channel features go through the same matmul on a channels-last view (not a 1x1 conv:
        # cuDNN's default TF32 convolutions would break the exact identity at init)
        z = F.linear(x if fd == -1 else x.movedim(fd, -1), self.weight, self.bias)
        if fd != -1:
            z = z.movedim(-1, fd)
        proj, h = z.split([self.dim, 1], dim=fd)
        return proj, h

    @property
    def projector_weight(self) -> torch.Tensor:
        """``P.weight`` of the source text, ``(dim, dim)``: a view of ``weight`` here; computed from the
        form's parameters (``I + B A``, ``diag(scale)``) in the subclasses."""
        return self.weight[: self.dim]

    @property
    def estimator_weight(self) -> torch.Tensor:
        """``h.weight`` of the source text, shape ``(1, dim)`` (a view)."""
        return self.weight[self.dim :]

    # ------------------------------------------------------------------ shared
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw the initial values again (``init`` decides which are fixed), from ``generator``
        (``None``: the global RNG)."""
        bound = 1.0 / math.sqrt(self.dim)  # nn.Linear's default init for fan_in = dim
        with torch.no_grad():
            _uniform_(self.bias, bound, generator)
            if self.init is QCIInit.IDENTITY:
                self.bias[: self.dim].zero_()
            self._init_projector(bound, generator)

    @property
    def projector_bias(self) -> torch.Tensor:
        """``P.bias`` of the source text (a view of ``bias``)."""
        return self.bias[: self.dim]

    @property
    def estimator_bias(self) -> torch.Tensor:
        """``h.bias`` of the source text, shape ``(1,)`` (a view of ``bias``)."""
        return self.bias[self.dim :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fd = self.feature_dim
        if x.dim() < -fd or x.shape[fd] != self.dim:
            where = "last" if fd == -1 else "channel"
            raise ValueError(
                f"{type(self).__name__}(dim={self.dim}) expects {self.dim} features on the {where} "
                f"dimension; got input of shape {tuple(x.shape)}"
            )
        proj, h = self._project(x)
        if torch.compiler.is_compiling():
            mean_abs = proj.abs().mean(fd, keepdim=True)  # Inductor fuses it into the pass that makes proj
        else:
            # eagerly one fused kernel and no |P(x)| temporary (measured: docs/perf.md)
            mean_abs = torch.linalg.vector_norm(proj, 1, dim=fd, keepdim=True) / self.dim
        gate = torch.sigmoid(self.beta * mean_abs / (torch.sigmoid(h) + self.eps))
        # lerp(x, P(x), g) = x + g (P(x) - x) = g P(x) + (1 - g) x in one pass; it returns x exactly
        # whenever P(x) == x (the identity init), whatever the gate
        out = torch.lerp(x, proj, gate)
        return _pass_non_finite_rows(x, out, mean_abs)

    def _feature_view(self, v: torch.Tensor) -> torch.Tensor:
        """A per-feature vector shaped to broadcast against inputs with features on ``feature_dim``."""
        return v if self.feature_dim == -1 else v.view(-1, 1, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, feature_dim={self.feature_dim}, init={self.init.value}, form={self.form.value}"


class LowRankQCI(QuantumClassicalInterface):
    """QCI with a low-rank projector ``P(x) = x + B (A x) + b`` (``P = I + B A``), rank ``r``.

    Parameters: ``down`` = ``A`` ``(rank, dim)``, ``up`` = ``B`` ``(dim, rank)``, ``h_weight``
    ``(1, dim)``, ``bias`` ``(dim + 1)`` (``P``'s then ``h``'s), ``beta``. ``A`` and ``h`` share one
    matmul of width ``rank + 1``. ``init="identity"`` zeroes ``B`` and ``P``'s bias (LoRA-style: ``A``
    random, so ``B`` gets a gradient at once); ``"seed"`` draws everything from ``nn.Linear``'s init.

    Args:
        dim, beta, init, feature_dim, eps, device, dtype: as :class:`QuantumClassicalInterface`.
        rank: the rank ``r``, in ``[1, dim]``.

    Example:
        >>> qci = LowRankQCI(64, rank=8)
        >>> x = torch.randn(4, 64)
        >>> torch.equal(qci(x), x), tuple(qci.up.shape)
        (True, (64, 8))
    """

    form = QCIForm.LOWRANK

    def __init__(self, dim: int, beta: float = 1.0, *, rank: int = 16, **kwargs) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max(dim, 1):
            raise ValueError(f"LowRankQCI rank must be an int in [1, dim={dim}]; got {rank!r}")
        # set before nn.Module.__init__ (a plain int is allowed there): _create_parameters reads it
        self.rank = rank
        super().__init__(dim, beta, **kwargs)

    def _create_parameters(self, factory: dict) -> None:
        self.down = nn.Parameter(torch.empty(self.rank, self.dim, **factory))
        self.up = nn.Parameter(torch.empty(self.dim, self.rank, **factory))
        self.h_weight = nn.Parameter(torch.empty(1, self.dim, **factory))

    def _init_projector(self, bound: float, gen: torch.Generator | None) -> None:
        _uniform_(self.down, bound, gen)
        _uniform_(self.h_weight, bound, gen)
        if self.init is QCIInit.IDENTITY:
            self.up.zero_()
        else:
            _uniform_(self.up, 1.0 / math.sqrt(self.rank), gen)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fd = self.feature_dim
        xl = x if fd == -1 else x.movedim(fd, -1)
        # one GEMM for A x and h(x); B's output is exactly 0 while B = 0, so P(x) is exactly x
        t = F.linear(xl, torch.cat([self.down, self.h_weight]), F.pad(self.bias[self.dim:], (self.rank, 0)))
        a, h = t.split([self.rank, 1], dim=-1)
        proj = F.linear(a, self.up, self.bias[: self.dim]) + xl
        if fd != -1:
            proj, h = proj.movedim(-1, fd), h.movedim(-1, fd)
        return proj, h

    @property
    def projector_weight(self) -> torch.Tensor:
        """``P = I + B A``, ``(dim, dim)``, computed (not a view)."""
        return torch.eye(self.dim, dtype=self.up.dtype, device=self.up.device) + self.up @ self.down

    @property
    def estimator_weight(self) -> torch.Tensor:
        return self.h_weight

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"


class DiagonalQCI(QuantumClassicalInterface):
    """QCI with a diagonal projector ``P(x) = scale * x + b`` (per-feature scale and bias).

    Parameters: ``scale`` ``(dim)``, ``h_weight`` ``(1, dim)``, ``bias`` ``(dim + 1)`` (``P``'s then
    ``h``'s), ``beta``. No GEMM but ``h``'s: ``h(x)`` is written as a product and a sum over the
    features, so that under Inductor it shares one pass over ``x`` with ``mean_f |P(x)|``.
    ``init="identity"``: ``scale = 1``, ``b = 0``; ``"seed"``: the diagonal and bias of an
    ``nn.Linear``-initialised ``P``.

    Args:
        dim, beta, init, feature_dim, eps, device, dtype: as :class:`QuantumClassicalInterface`.

    Example:
        >>> qci = DiagonalQCI(32, feature_dim=-3)   # after a Conv2d with 32 output channels
        >>> x = torch.randn(2, 32, 5, 5)
        >>> torch.equal(qci(x), x)
        True
    """

    form = QCIForm.DIAGONAL

    def _create_parameters(self, factory: dict) -> None:
        self.scale = nn.Parameter(torch.empty(self.dim, **factory))
        self.h_weight = nn.Parameter(torch.empty(1, self.dim, **factory))

    def _init_projector(self, bound: float, gen: torch.Generator | None) -> None:
        _uniform_(self.h_weight, bound, gen)
        if self.init is QCIInit.IDENTITY:
            self.scale.fill_(1.0)
        else:
            _uniform_(self.scale, bound, gen)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fd, view = self.feature_dim, self._feature_view
        proj = torch.addcmul(view(self.bias[: self.dim]), x, view(self.scale))
        if fd == -1 and not torch.compiler.is_compiling():
            h = F.linear(x, self.h_weight, self.bias[self.dim:])  # eagerly: one GEMV, no temporary
        else:
            # a product and a sum: Inductor computes it in the same pass over x as mean |P(x)|
            h = (x * view(self.h_weight[0])).sum(fd, keepdim=True) + self.bias[self.dim]
        return proj, h

    @property
    def projector_weight(self) -> torch.Tensor:
        """``P = diag(scale)``, ``(dim, dim)``, computed (not a view)."""
        return torch.diag(self.scale)

    @property
    def estimator_weight(self) -> torch.Tensor:
        return self.h_weight


def _pass_non_finite_rows(x: torch.Tensor, out: torch.Tensor, mean_abs: torch.Tensor) -> torch.Tensor:
    """``out``, with ``x`` in every row whose ``mean_f |P(x)|`` is not finite.

    A non-finite feature poisons its whole row: ``P``'s matmul multiplies it by the zeros of the
    identity (``0 * inf`` is NaN), and ``lerp`` computes ``inf - inf``. Such a row passes through as it
    came in, so the identity init is exact for every input and a transformed model has the model's own
    NaN/inf pattern. ``mean_abs`` is already there (one value per row): the check reads it, not the
    activations. Eagerly on the CPU the row check decides whether the (rare) replacement pass runs at
    all; elsewhere a ``where`` that Inductor fuses into the pass that writes ``out``, and that on CUDA
    eager costs one elementwise pass (a data-dependent branch would synchronise the device instead).
    The eager CPU check is one sum over the row means and one read: a fixed few microseconds per call.
    """
    # is_compiling first: under dynamo nothing else may be traced; the branch only on plain eager CPU
    # tensors (vmap, tracers and dispatch modes must see the where). The sum of the row means is finite
    # exactly when every row is (or overflows: then the where runs, still correct); one op and a read
    if (not torch.compiler.is_compiling() and _plain_eager_context(x) and x.device.type == "cpu"
            and math.isfinite(float(mean_abs.detach().sum()))):
        return out
    return torch.where(torch.isfinite(mean_abs), out, x)


QCI_FORMS: dict[QCIForm, type[QuantumClassicalInterface]] = {
    QCIForm.DENSE: QuantumClassicalInterface,
    QCIForm.LOWRANK: LowRankQCI,
    QCIForm.DIAGONAL: DiagonalQCI,
}


def _uniform_(t: torch.Tensor, bound: float, gen: torch.Generator | None) -> None:
    """``t.uniform_(-bound, bound)``; with a generator, drawn on the CPU in float32 and copied, so that
    one (CPU) generator gives the same values on every device and dtype and no device RNG moves."""
    if gen is None:
        t.uniform_(-bound, bound)
    else:
        t.copy_(torch.empty(t.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen))


def qci_seed(site: str) -> int:
    """The seed of the generator a site's QCI is initialised from: derived from the site's name and
    ``torch.initial_seed()`` (the seed of the last ``torch.manual_seed``), which reading does not change.

    So ``torch.manual_seed(s)`` before :func:`cosmic_fx.transform` gives the same QCI values on every
    run and other values for another ``s`` (seed-init runs over several seeds differ as they did),
    each site's values do not depend on which other sites got a QCI, and the global RNG is left as
    it was: the model's dropout draws the same numbers as it would without the transform.

    Example:
        >>> _ = torch.manual_seed(0); a = qci_seed("fc1")
        >>> _ = torch.manual_seed(0); torch.rand(3).shape, qci_seed("fc1") == a, qci_seed("fc2") == a
        (torch.Size([3]), True, False)
    """
    return zlib.crc32(f"{torch.initial_seed()}/{site}".encode())


def make_qci(width: int, feature_dim: int, config: CosmicConfig, like: torch.Tensor | None,
             site: str = "") -> QuantumClassicalInterface:
    """The QCI ``config`` asks for (form, init, beta, eps) at a site of ``width`` features, on the
    device and dtype of ``like`` (the site's weight). A low-rank site narrower than ``qci_rank`` uses
    its width as the rank. Its initial values come from a generator of its own, seeded with
    :func:`qci_seed` of ``site`` (the site's name): the global RNG state is not touched.

    Example:
        >>> state = torch.get_rng_state()
        >>> make_qci(64, -1, CosmicConfig(qci_form="lowrank", qci_rank=8), None, "fc1").rank
        8
        >>> torch.equal(torch.get_rng_state(), state)
        True
    """
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    generator = torch.Generator().manual_seed(qci_seed(site))
    kwargs = {"init": config.qci_init, "feature_dim": feature_dim, "eps": config.eps, "generator": generator,
              **factory}
    if config.qci_form is QCIForm.LOWRANK:
        kwargs["rank"] = min(config.qci_rank, width)
    return QCI_FORMS[config.qci_form](width, config.qci_beta, **kwargs)
