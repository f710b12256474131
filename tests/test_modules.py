import pytest
import torch
from torch import nn
from torch.testing import assert_close

from cosmic_fx.modules import CosmicStateCompression, QuantumClassicalInterface, cosmic_state_compression

from .conftest import literal_csc


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0, 1e4])
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_csc_matches_literal_formula(scale, dim):
    torch.manual_seed(0)
    t = torch.randn(6, 9, 5) * scale
    assert_close(cosmic_state_compression(t, 0.5, dim), literal_csc(t, 0.5, dim).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_csc_half_precision(dtype):
    t = (torch.randn(8, 33) * 4).to(dtype)
    out = cosmic_state_compression(t, 0.3)
    assert out.dtype == dtype
    assert_close(out, literal_csc(t.float(), 0.3).to(dtype))


def test_csc_is_soft_and_gradients_flow():
    t = torch.randn(4, 10, requires_grad=True)
    out = cosmic_state_compression(t, alpha=5.0)
    assert (out[t != 0] != 0).all()
    out.sum().backward()
    ref = t.detach().double().requires_grad_()
    literal_csc(ref, 5.0).sum().backward()
    assert_close(t.grad, ref.grad.float())


def test_csc_edge_inputs():
    assert cosmic_state_compression(torch.tensor(2.0)).item() == pytest.approx(2.0)
    assert cosmic_state_compression(torch.empty(0, 4)).shape == (0, 4)


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf"), "0.5"])
def test_csc_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        cosmic_state_compression(torch.randn(2, 3), alpha)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        CosmicStateCompression(alpha)


def test_csc_bad_eps_and_integer_input():
    with pytest.raises(ValueError, match=r"eps must be a number in \(0, 1e-2\]"):
        cosmic_state_compression(torch.randn(2, 3), 0.5, -1, 0.0)
    with pytest.raises(TypeError, match="needs a floating-point tensor; got torch.int64"):
        cosmic_state_compression(torch.arange(6).reshape(2, 3))


def reference_qci(x, proj: nn.Linear, est: nn.Linear, beta, feature_dim=-1, eps=1e-8):
    """The source text's QCI forward, written with two separate Linear layers."""
    if feature_dim != -1:
        x = x.movedim(feature_dim, -1)
    x_info = proj(x)
    ent = est(x).sigmoid()
    gate = torch.sigmoid(beta * (x_info.abs().mean(-1, keepdim=True) / (ent + eps)))
    out = gate * x_info + (1 - gate) * x
    return out if feature_dim == -1 else out.movedim(-1, feature_dim)


def _split(qci: QuantumClassicalInterface):
    d = qci.dim
    proj, est = nn.Linear(d, d), nn.Linear(d, 1)
    with torch.no_grad():
        proj.weight.copy_(qci.projector_weight)
        proj.bias.copy_(qci.bias[:d])
        est.weight.copy_(qci.estimator_weight)
        est.bias.copy_(qci.bias[d:])
    return proj, est


@pytest.mark.parametrize("feature_dim,shape", [(-1, (5, 12)), (-1, (2, 3, 12)), (-3, (2, 12, 4, 4)), (-3, (12, 3, 3))])
def test_qci_seed_init_matches_two_linear_reference(feature_dim, shape):
    torch.manual_seed(0)
    qci = QuantumClassicalInterface(12, beta=0.7, init="seed", feature_dim=feature_dim)
    x = torch.randn(shape)
    proj, est = _split(qci)
    assert_close(qci(x), reference_qci(x, proj, est, qci.beta, feature_dim))
    assert not torch.equal(qci(x), x)


@pytest.mark.parametrize("feature_dim,shape", [(-1, (5, 12)), (-3, (2, 12, 4, 4)), (-3, (12, 3, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qci_identity_init_is_exact(feature_dim, shape, dtype):
    qci = QuantumClassicalInterface(12, feature_dim=feature_dim, dtype=dtype)
    x = torch.randn(shape, dtype=dtype) * 10
    out = qci(x)
    assert out.dtype == dtype
    assert torch.equal(out, x)


def test_qci_identity_init_still_learns():
    qci = QuantumClassicalInterface(8)
    x = torch.randn(4, 8)
    (qci(x) * torch.randn(4, 8)).sum().backward()
    assert qci.weight.grad.abs().sum() > 0


def test_qci_errors():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        QuantumClassicalInterface(0)
    with pytest.raises(ValueError, match="feature_dim must be -1"):
        QuantumClassicalInterface(4, feature_dim=1)
    with pytest.raises(ValueError,
                       match=r"expects 4 features on the channel dimension; got input of shape \(2, 5, 3, 3\)"):
        QuantumClassicalInterface(4, feature_dim=-3)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="qci_init must be one of"):
        QuantumClassicalInterface(4, init="zeros")


def test_qci_parameter_count_equals_seed_layout():
    qci = QuantumClassicalInterface(10)
    # P: 10x10 + 10, h: 10 + 1, beta: 1
    assert sum(p.numel() for p in qci.parameters()) == 100 + 10 + 10 + 1 + 1
