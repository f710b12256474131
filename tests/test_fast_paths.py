"""Every fast path equals the literal formula or the unfused module: forward and gradients."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from cosmic_fx.modules import QuantumClassicalInterface, cosmic_state_compression


def literal_csc(t, alpha=0.5, dim=-1, eps=1e-8):
    """The source text's CSC, verbatim, in float64 (autograd differentiates it)."""
    x = t.double()
    s = -(x.softmax(dim) * x.log_softmax(dim))
    return x * torch.sigmoid(x.abs() / (s + eps) - alpha)


def csc_and_grad(fn, t, g, *args):
    x = t.detach().clone().requires_grad_()
    out = fn(x, *args)
    out.backward(g.to(out.dtype))
    return out.detach(), x.grad


# ---------------------------------------------------------------- CSC
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0, 1e4, 1e7])
@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 5.0])
def test_csc_forward_and_gradient_match_the_literal_formula(scale, dim, alpha):
    torch.manual_seed(0)
    t = torch.randn(6, 9, 7) * scale
    g = torch.randn(6, 9, 7)
    out, grad = csc_and_grad(cosmic_state_compression, t, g, alpha, dim)
    ref_out, ref_grad = csc_and_grad(literal_csc, t, g.double(), alpha, dim)
    assert out.dtype == torch.float32
    assert_close(out, ref_out.float())
    assert_close(grad, ref_grad.float())


def test_csc_typical_activations_exercise_both_sigmoid_regimes():
    # the sigmoid saturates (z > 40, clamped) for many elements and not for others: both branches of
    # the fast path are compared with the literal formula
    torch.manual_seed(0)
    t = torch.randn(64, 256)
    s = -(t.softmax(-1) * t.log_softmax(-1))
    z = t.abs() / (s + 1e-8) - 0.5
    assert (z > 40).float().mean() > 0.2 and (z < 10).float().mean() > 0.1
    g = torch.randn(64, 256)
    out, grad = csc_and_grad(cosmic_state_compression, t, g)
    ref_out, ref_grad = csc_and_grad(literal_csc, t, g.double())
    assert_close(out, ref_out.float())
    assert_close(grad, ref_grad.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_csc_half_precision_forward_and_gradient(dtype, scale):
    torch.manual_seed(0)
    t = (torch.randn(16, 40) * scale).to(dtype)
    g = torch.randn(16, 40).to(dtype)
    out, grad = csc_and_grad(cosmic_state_compression, t, g, 0.3)
    # reference: the literal formula on the same (rounded) input, computed in float32 like the fast path
    ref_out, ref_grad = csc_and_grad(lambda x, a: literal_csc(x.float(), a).float(), t, g, 0.3)
    assert out.dtype == dtype and grad.dtype == dtype
    assert_close(out, ref_out.to(dtype))
    assert_close(grad, ref_grad.to(dtype))


@pytest.mark.parametrize("eps", [1e-2, 1e-8, 1e-20])
def test_csc_gradcheck_in_float64(eps):
    torch.manual_seed(0)
    x = (torch.randn(3, 6, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: cosmic_state_compression(t, 0.5, -1, eps), (x,))
    assert torch.autograd.gradcheck(lambda t: cosmic_state_compression(t, 1.0, 0, eps), (x,))


def test_csc_double_backward_matches_the_literal_formula():
    torch.manual_seed(0)
    t = torch.randn(4, 7, dtype=torch.float64)
    x = t.clone().requires_grad_()
    (gx,) = torch.autograd.grad(cosmic_state_compression(x).pow(2).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    r = t.clone().requires_grad_()
    (gr,) = torch.autograd.grad(literal_csc(r).pow(2).sum(), r, create_graph=True)
    (ggr,) = torch.autograd.grad(gr.sum(), r)
    assert_close(gx, gr)
    assert_close(ggx, ggr)


def test_csc_edge_shapes_have_gradients():
    for shape in [(), (1,), (5, 1), (0, 4)]:
        t = torch.randn(shape)
        g = torch.ones(shape)
        out, grad = csc_and_grad(cosmic_state_compression, t, g)
        ref_out, ref_grad = csc_and_grad(literal_csc, t, g.double())
        assert out.shape == t.shape and grad.shape == t.shape
        assert_close(out, ref_out.float())
        assert_close(grad, ref_grad.float())


def test_csc_large_magnitude_is_finite_and_exact_where_saturated():
    t = torch.tensor([[1e30, -1e30, 0.0, 3.0], [-5e5, 2e5, 1e-30, -1e-30]])
    out, grad = csc_and_grad(cosmic_state_compression, t, torch.ones_like(t))
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    ref = literal_csc(t).float()
    assert_close(out, ref)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_csc_under_torch_compile_matches_eager(backend):
    torch.manual_seed(0)
    t = torch.randn(8, 33) * 3
    g = torch.randn(8, 33)
    compiled = torch.compile(cosmic_state_compression, backend=backend, fullgraph=True)
    out, grad = csc_and_grad(compiled, t, g, 0.5, -1)
    ref_out, ref_grad = csc_and_grad(literal_csc, t, g.double())
    assert_close(out, ref_out.float())
    assert_close(grad, ref_grad.float())


def test_csc_exports_to_plain_aten_and_round_trips(tmp_path):
    from cosmic_fx.modules import CosmicStateCompression

    model = nn.Sequential(nn.Linear(5, 12), CosmicStateCompression(0.4))
    x = torch.randn(3, 5)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("cosmic" in t or "autograd_function" in t for t in targets), targets
    path = tmp_path / "csc.pt2"
    torch.export.save(ep, path)
    assert_close(torch.export.load(path).module()(x), model(x))
