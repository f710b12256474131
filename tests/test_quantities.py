import math

import pytest
import torch
from torch.testing import assert_close

from cosmic_fx.quantities import efficiency, entropy, info, quantities


def reference(t: torch.Tensor, dim: int, eps: float = 1e-8):
    """I, S, E written out with explicit loops over the softmax axis, in float64."""
    x = t.double().movedim(dim, -1).reshape(-1, t.shape[dim])
    s_total = 0.0
    for row in x.tolist():
        m = max(row)
        z = sum(math.exp(v - m) for v in row)
        for v in row:
            p = math.exp(v - m) / z
            s_total += -p * math.log(p) if p > 0 else 0.0
    s = s_total / x.numel()
    i = sum(abs(v) for v in t.double().flatten().tolist()) / t.numel()
    return i, s, (i - s) / (i + s + eps)


@pytest.mark.parametrize("shape,dim", [((5,), 0), ((3, 7), -1), ((3, 7), 0), ((2, 3, 4), 1), ((6, 2, 3, 3), 0)])
def test_matches_independent_formula(shape, dim):
    torch.manual_seed(1)
    t = torch.randn(shape) * 2
    i, s, e = reference(t, dim)
    assert_close(info(t), torch.tensor(i, dtype=torch.float32))
    assert_close(entropy(t, dim), torch.tensor(s, dtype=torch.float32))
    assert_close(efficiency(t, dim), torch.tensor(e, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_computes_in_float32(dtype):
    t = (torch.randn(16, 32) * 3).to(dtype)
    e = efficiency(t, 0)
    assert e.dtype == torch.float32
    _, _, expected = reference(t.float(), 0)
    assert_close(e, torch.tensor(expected, dtype=torch.float32))


def test_float64_stays_float64():
    assert efficiency(torch.randn(4, 4, dtype=torch.float64)).dtype == torch.float64


def test_edge_cases_have_defined_answers():
    # 0-d and one-element: softmax is 1, entropy 0, so E = |x| / (|x| + eps)
    assert entropy(torch.tensor(3.0)).item() == 0.0
    assert_close(efficiency(torch.tensor(-2.0)), torch.tensor(2.0 / (2.0 + 1e-8)))
    assert_close(efficiency(torch.tensor([0.5])), torch.tensor(0.5 / (0.5 + 1e-8)))
    # empty: all zero, never NaN
    for fn in (info, entropy, efficiency):
        assert fn(torch.empty(0, 3)).item() == 0.0
    # constant tensor of n values along dim: entropy = log(n) / n
    assert_close(entropy(torch.full((4, 8), 2.0), -1), torch.tensor(math.log(8) / 8))
    # all zeros: I = 0, so E = -S / (S + eps) ~ -1
    assert efficiency(torch.zeros(10)).item() == pytest.approx(-1.0, abs=1e-6)


def test_range_and_grad():
    t = torch.randn(8, 8, requires_grad=True)
    e = efficiency(t, 0)
    assert -1 < e.item() < 1
    e.backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


def test_errors():
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        entropy(torch.randn(3, 4), 2)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        info([1.0, 2.0])
    q = quantities(torch.randn(3, 5))
    assert set(q) == {"I", "S", "E"} and all(isinstance(v, float) for v in q.values())


def test_integer_tensors_are_measured_as_float():
    assert_close(info(torch.tensor([1, -3])), torch.tensor(2.0))
