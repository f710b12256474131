"""Cosmic state compression (CSC): ``T * sigmoid(|T| / (s + eps) - alpha)``, ``s = -softmax * log_softmax``.

One fused ``autograd.Function`` with a hand-derived backward that saves only the input and one value
per row. The forward is written so that Inductor computes two ``exp`` per element (``e = exp(x - m)``
is stored by the sum pass and reused for ``p = e / z``; the other is the sigmoid's), the backward
two as well. Eagerly, large inputs run through the same two functions compiled once per process
(:class:`_CompiledKernels`), so the public function costs about what its compiled form does.
Measurements: docs/perf.md.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .quantities import DEFAULT_EPS

__all__ = ["CosmicStateCompression", "cosmic_state_compression"]

# sigmoid(z) rounds to exactly 1.0 in float32 and float64 for every z >= 40; clamping there keeps the
# result bit-identical while avoiding exp() of huge negative arguments (denormals: 10-40x slower on
# vectorised CPU paths).
_SIGMOID_SATURATION = 40.0
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# below this many elements an eager call runs the ATen ops directly: a compiled call's fixed cost
# (guards, wrapper, about 50 us) would exceed what it saves
_COMPILE_MIN_NUMEL = 1 << 16


def _log_p_floor(dtype: torch.dtype, eps: float) -> float:
    """A floor for ``log p`` below which ``s = -p log p`` is invisible next to ``eps``.

    At ``log p = -(60 - log eps)``, ``s < 1e-24 * eps``: ``s + eps == eps`` in float32 and float64, so
    clamping there does not change the result. It keeps ``exp`` out of the denormal range, where a
    vectorised exp is 10-40x slower (measured: docs/perf.md). Capped where ``exp`` of the floor is
    still a normal number of the dtype.
    """
    cap = 700.0 if dtype == torch.float64 else 87.0
    return -min(cap, 60.0 - math.log(eps))


def _csc_forward(x: torch.Tensor, alpha: float | torch.Tensor, dim: int, eps: float,
                 floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CSC forward: returns ``(out, logsumexp)``. In-place ops on temporaries only (lean eagerly; under
    torch.compile / torch.export functionalization makes them pure).

    ``e = exp(x - m)`` feeds both the row sum and ``p = e / z``, so Inductor stores it in the sum pass
    and the output pass needs only the sigmoid's exp (the ``log p = x - logsumexp; p = exp(log p)``
    form costs a third exp per element: 19-26% slower). Clamping ``x - m`` at ``floor`` changes ``z``
    by less than ``d * exp(floor)`` (``z >= 1``): invisible; those elements' ``log p`` is clamped too,
    so their ``s + eps == eps`` exactly as in the literal formula. ``x / (1 + exp(alpha - r))`` is
    ``x * sigmoid(r - alpha)`` with one division instead of a division and a multiply (10% faster
    under Inductor).
    """
    m = x.amax(dim, keepdim=True)
    e = (x - m).clamp_min_(floor).exp_()
    z = e.sum(dim, keepdim=True)
    lse = z.log().add_(m)
    log_p = (x - lse).clamp_min_(floor)
    s_eps = e.div_(z).mul_(log_p).sub_(eps).neg_()  # s + eps = eps - p log p
    one_plus = x.abs().div_(s_eps).sub_(alpha).neg_().clamp_min_(-_SIGMOID_SATURATION).exp_().add_(1)
    return torch.div(x, one_plus), lse


def _csc_backward(x: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, alpha: float | torch.Tensor, dim: int,
                  eps: float, floor: float) -> torch.Tensor:
    """The gradient of CSC, derived by hand (one row reduction plus elementwise work).

    With ``p = softmax(x)``, ``l = log p``, ``r = 1 / (s + eps)``, ``z = |x| r - alpha``,
    ``sigma = sigmoid(z)``, ``w = g sigma' (z + alpha)`` and ``c = w x r p (l + 1)``:
    ``dx = g sigma + w + c - p * sum(c)``. Where ``log p`` is clamped, ``s`` is constant (its
    derivative is below float resolution), so ``c`` is 0 there.
    """
    log_p = x - lse
    clamped = log_p <= floor
    log_p.clamp_min_(floor)
    p = log_p.exp()
    r = (p * log_p).sub_(eps).neg_().reciprocal_()
    z_plus_alpha = x.abs().mul_(r).clamp_max_(alpha + _SIGMOID_SATURATION)
    sig = (z_plus_alpha - alpha).sigmoid_()
    gs = g * sig
    w = sig.neg_().add_(1).mul_(gs).mul_(z_plus_alpha)  # g sigma (1 - sigma) (z + alpha)
    c = (w * x).mul_(r).mul_(p).mul_(log_p.add_(1)).masked_fill_(clamped, 0.0)
    return gs.add_(w).add_(c).sub_(p.mul_(c.sum(dim, keepdim=True)))


def _csc_composite(x: torch.Tensor, alpha: float, dim: int, eps: float) -> torch.Tensor:
    """CSC written out of place, for autograd to differentiate (double backward only)."""
    log_p = torch.log_softmax(x, dim).clamp_min(_log_p_floor(x.dtype, eps))
    s = -(log_p.exp() * log_p)
    return x * torch.sigmoid((x.abs() / (s + eps) - alpha).clamp_max(_SIGMOID_SATURATION))


class _CompiledKernels:
    """:func:`_csc_forward` / :func:`_csc_backward` compiled with Inductor, for eager calls on large
    inputs. One instance per process (:data:`_KERNELS`): a cache of compiled code, like dynamo's own,
    not model state.

    Every input is viewed as ``(outer, d, inner)`` with the reduction on dim 1 and dynamic sizes, and
    ``alpha`` is a 0-d tensor: shapes, dims and alpha values share a handful of compiled graphs (per
    dtype, ``eps`` and whether ``outer``/``inner`` is 1) instead of one per combination. ``eps`` and
    the floor stay Python constants: as tensors they make Inductor keep ``p`` and ``r`` in memory
    (30% slower). If Inductor cannot compile here (no C++ compiler, no Triton), a warning says so once
    and eager ATen ops are used from then on.
    """

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend
        self.forward = None
        self.backward = None
        self.failed: str | None = None

    def _build(self) -> None:
        opts = {"backend": self.backend, "dynamic": True, "fullgraph": True}
        self.forward = torch.compile(_csc_forward, **opts)
        self.backward = torch.compile(_csc_backward, **opts)

    def run(self, fn: str, *args):
        """``fn`` ("forward"/"backward") compiled, or ``None`` when compiling is not possible here."""
        if self.failed is not None:
            return None
        if self.forward is None:
            self._build()
        try:
            return getattr(self, fn)(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: use eager ATen ops
            self.failed = f"{type(err).__name__}: {err}"
            warnings.warn(
                "cosmic_state_compression: could not compile its kernel with Inductor, so eager calls run "
                f"unfused ATen ops (slower, same results). Reason: {self.failed[:300]}",
                RuntimeWarning, stacklevel=4,
            )
            return None


_KERNELS = _CompiledKernels()


def _plain_eager_context(x: torch.Tensor) -> bool:
    """True when ``x`` is a plain tensor computed eagerly: no compiler, exporter, tracer, functorch
    transform or dispatch mode is looking (they must see ATen ops, never a compiled call)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (
        type(x) is torch.Tensor
        and x.layout == torch.strided
        and x.device.type in ("cpu", "cuda")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and _get_current_dispatch_mode() is None
        and not torch._C._is_torch_function_mode_enabled()
        and not torch._C._are_functorch_transforms_active()
    )


def _as_3d(x: torch.Tensor, dim: int) -> torch.Tensor:
    """A contiguous ``x`` as an ``(outer, d, inner)`` view, the softmax dim in the middle."""
    d = x.dim()
    dim = dim % d
    outer = math.prod(x.shape[:dim])
    inner = math.prod(x.shape[dim + 1:])
    return x.view(outer, x.shape[dim], inner)


def _use_compiled(x: torch.Tensor, compiled: bool | None) -> bool:
    # is_compiling first: under dynamo nothing else here may be traced (no guards on x)
    if compiled is False or torch.compiler.is_compiling() or not _plain_eager_context(x):
        return False
    return x.is_contiguous() and (compiled is True or x.numel() >= _COMPILE_MIN_NUMEL)


class _CSCFunction(torch.autograd.Function):
    """Fused CSC: the forward saves only ``x`` and the row-wise ``logsumexp``; the backward is
    :func:`_csc_backward`. Under torch.compile / torch.export dynamo inlines both (plain ATen ops);
    eagerly, large contiguous inputs run the compiled kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float, dim: int, eps: float, compiled: bool | None) -> torch.Tensor:
        floor = _log_p_floor(x.dtype, eps)
        result = None
        if _use_compiled(x, compiled):
            alpha_t = torch.tensor(alpha, dtype=x.dtype, device=x.device)
            result = _KERNELS.run("forward", _as_3d(x, dim), alpha_t, 1, eps, floor)
            if result is not None:
                out, lse = result
                shape = list(x.shape)
                shape[dim % x.dim()] = 1
                result = out.view(x.shape), lse.view(shape)
        if result is None:
            result = _csc_forward(x, alpha, dim, eps, floor)
        out, lse = result
        ctx.save_for_backward(x, lse)
        ctx.alpha, ctx.dim, ctx.eps, ctx.compiled = alpha, dim, eps, compiled
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, lse = ctx.saved_tensors
        alpha, dim, eps = ctx.alpha, ctx.dim, ctx.eps
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiable
            out = _csc_composite(x, alpha, dim, eps)
            return torch.autograd.grad(out, x, g, create_graph=True)[0], None, None, None, None
        floor = _log_p_floor(x.dtype, eps)
        dx = None
        if _use_compiled(x, ctx.compiled) and type(g) is torch.Tensor:
            alpha_t = torch.tensor(alpha, dtype=x.dtype, device=x.device)
            x3 = _as_3d(x, dim)
            g = g.contiguous()  # e.g. the expanded ones of out.sum().backward()
            dx = _KERNELS.run("backward", x3, lse.view(x3.shape[0], 1, x3.shape[2]), g.view(x3.shape),
                              alpha_t, 1, eps, floor)
            dx = None if dx is None else dx.view(x.shape)
        if dx is None:
            dx = _csc_backward(x, lse, g, alpha, dim, eps, floor)
        return dx, None, None, None, None


def _check_alpha_eps(alpha: float, eps: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"CSC alpha must be a finite number >= 0; got {alpha!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1e-2:
        raise ValueError(f"CSC eps must be a number in (0, 1e-2]; got {eps!r}")


def cosmic_state_compression(
    t: torch.Tensor, alpha: float = 0.5, dim: int = -1, eps: float = DEFAULT_EPS, *, compiled: bool | None = None
) -> torch.Tensor:
    """Cosmic state compression: ``T * sigmoid(|T| / (s + eps) - alpha)``.

    ``s = -softmax(T, dim) * log_softmax(T, dim)`` elementwise. A soft mask: it never produces exact
    zeros from nonzero inputs. Computed in float32 for float16/bfloat16 inputs; returns ``t``'s dtype.
    The implementation is fused (two exp per element forward and backward, a hand-derived backward
    that saves only ``t`` and one value per row); it matches the literal formula within float32
    rounding, also for large magnitudes, and traces under ``torch.compile`` and ``torch.export``.

    Called eagerly on a large contiguous tensor (at least 65,536 elements), it runs a kernel compiled
    with Inductor once per process (the first such call compiles for a few seconds; later shapes,
    dims and alpha values reuse it), which makes it about as fast as under ``torch.compile``. If
    Inductor cannot compile on this machine it warns once and runs the same formula as ATen ops.

    Args:
        t: a floating-point tensor.
        alpha: the entropy threshold, finite and >= 0.
        dim: the softmax dimension.
        eps: the epsilon of the formula.
        compiled: eager calls only: ``None`` (default) uses the compiled kernel for large inputs,
            ``True`` for every input, ``False`` never. Ignored under ``torch.compile``, export and
            other tracing (they always see ATen ops).

    Example:
        >>> y = cosmic_state_compression(torch.randn(4, 10), alpha=0.5)
        >>> y.shape
        torch.Size([4, 10])
    """
    _check_alpha_eps(alpha, eps)
    return _compress(t, alpha, dim, eps, compiled)


def _compress(t: torch.Tensor, alpha: float, dim: int, eps: float, compiled: bool | None = None) -> torch.Tensor:
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
        return _CSCFunction.apply(x.reshape(1), float(alpha), -1, float(eps), False).reshape(()).to(t.dtype)
    return _CSCFunction.apply(x, float(alpha), dim, float(eps), compiled).to(t.dtype)


class CosmicStateCompression(nn.Module):
    """Module form of :func:`cosmic_state_compression` (no parameters).

    With ``passthrough=True`` (used at model outputs) values that are not floating-point tensors
    (integer predictions, masks, ``None``) are returned unchanged instead of raising.

    Example:
        >>> csc = CosmicStateCompression(alpha=0.3)
        >>> csc(torch.randn(2, 5)).shape
        torch.Size([2, 5])
    """

    def __init__(self, alpha: float = 0.5, dim: int = -1, eps: float = DEFAULT_EPS, *,
                 passthrough: bool = False) -> None:
        super().__init__()
        _check_alpha_eps(alpha, eps)
        self.alpha, self.dim, self.eps, self.passthrough = float(alpha), int(dim), float(eps), passthrough

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.passthrough and not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            return x
        return _compress(x, self.alpha, self.dim, self.eps)

    def extra_repr(self) -> str:
        extra = ", passthrough=True" if self.passthrough else ""
        return f"alpha={self.alpha}, dim={self.dim}, eps={self.eps}{extra}"
