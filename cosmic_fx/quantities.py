"""The three quantities every cosmic mechanism is built on — one definition, used everywhere.

For a tensor ``T`` and a dimension ``d`` (model outputs: the last dim; parameters: dim 0):

* information ``I(T) = mean(|T|)``
* entropy     ``S(T, d) = mean(-softmax(T, d) * log_softmax(T, d))``
* efficiency  ``E(T, d) = (I - S) / (I + S + eps)``, in (-1, 1)

They are computed in float32 (float64 stays float64) whatever the input dtype, and are
differentiable. Edge cases have defined answers: a 0-d or one-element tensor is one value along
``d`` (softmax 1, entropy 0); an empty tensor has ``I = S = E = 0``.
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_EPS", "efficiency", "efficiency_from_sums", "efficiency_sums", "entropy", "info", "quantities"]

DEFAULT_EPS = 1e-8


def _as_compute(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.is_complex()):
        # integer tensors are valid data, not an error: their entropy is that of their values
        return t.to(torch.float32)
    if t.is_complex():
        raise TypeError("cosmic quantities are defined for real tensors; got a complex tensor")
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def _check_dim(t: torch.Tensor, dim: int) -> None:
    ndim = max(t.dim(), 1)
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(t.shape)}")


def info(t: torch.Tensor) -> torch.Tensor:
    """Information ``I(T) = mean(|T|)`` as a 0-d float32 tensor (0 for an empty tensor).

    Example:
        >>> info(torch.tensor([1.0, -3.0]))
        tensor(2.)
    """
    x = _as_compute(t)
    if x.numel() == 0:
        return x.new_zeros(())
    return x.abs().mean()


def entropy(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy ``S(T, d) = mean(-softmax(T, d) * log_softmax(T, d))`` as a 0-d tensor.

    Example:
        >>> entropy(torch.zeros(4))  # uniform: mean(-1/4 * log(1/4)) = log(4) / 4
        tensor(0.3466)
    """
    x = _as_compute(t)
    _check_dim(x, dim)
    if x.numel() == 0:
        return x.new_zeros(())
    if x.dim() == 0:
        x = x.reshape(1)
    log_p = torch.log_softmax(x, dim)
    return -(log_p.exp() * log_p).mean()


def efficiency(t: torch.Tensor, dim: int = -1, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Classical efficiency ``E = (I - S) / (I + S + eps)`` as a 0-d tensor in (-1, 1).

    Args:
        t: any real tensor (computed in float32 for half/bfloat16 inputs).
        dim: the softmax dimension of the entropy (outputs: -1; parameters: 0).
        eps: keeps the denominator away from zero.

    Example:
        >>> w = torch.nn.Linear(4, 3).weight
        >>> bool(-1 < efficiency(w, dim=0) < 1)
        True
    """
    i, s = info(t), entropy(t, dim)
    return (i - s) / (i + s + eps)


def efficiency_sums(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``[sum |T|, sum(-softmax * log_softmax), numel]`` as a float64 tensor of 3 values.

    Sums over shards add up to the sums of the whole tensor (the softmax is taken along ``dim``, so
    shards must split another dimension, e.g. the batch): a distributed run all-reduces them and
    :func:`efficiency_from_sums` gives ``E`` of the full batch, not a mean of per-rank values.

    Example:
        >>> t = torch.randn(6, 5)
        >>> e = efficiency_from_sums(efficiency_sums(t[:2]) + efficiency_sums(t[2:]))
        >>> torch.allclose(e, efficiency(t).double())
        True
    """
    x = _as_compute(t)
    _check_dim(x, dim)
    if x.numel() == 0:
        return torch.zeros(3, dtype=torch.float64, device=x.device)
    if x.dim() == 0:
        x = x.reshape(1)
    log_p = torch.log_softmax(x, dim)
    return torch.stack([x.abs().sum(), -(log_p.exp() * log_p).sum(), x.new_tensor(float(x.numel()))]).double()


def efficiency_from_sums(sums: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``E`` from the sums of :func:`efficiency_sums` (0 for an empty tensor)."""
    n = sums[2].clamp_min(1.0)
    i, s = sums[0] / n, sums[1] / n
    return (i - s) / (i + s + eps)


def quantities(t: torch.Tensor, dim: int = -1, eps: float = DEFAULT_EPS) -> dict[str, float]:
    """``{"I": ..., "S": ..., "E": ...}`` as Python floats, for reports."""
    with torch.no_grad():
        i, s = info(t), entropy(t, dim)
        return {"I": float(i), "S": float(s), "E": float((i - s) / (i + s + eps))}
