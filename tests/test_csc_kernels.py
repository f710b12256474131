"""CSC's restructured kernels and its eager fast path (the same kernels compiled once per process).

The plumbing of the eager compiled path (3-D views, the 0-d alpha, gradients, fallbacks) is tested
with a kernel cache that compiles with dynamo alone (backend "eager", seconds); Inductor itself is
tested in the slow tests and in tests/test_fast_paths.py.
"""

import math
import warnings

import pytest
import torch
from torch.testing import assert_close

from cosmic_fx import csc as csc_mod
from cosmic_fx.csc import _COMPILE_MIN_NUMEL, _CompiledKernels, cosmic_state_compression

from .conftest import assert_double_backward_matches, literal_csc


def out_and_grad(fn, t, g, *args, **kwargs):
    x = t.detach().clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    out.backward(g.to(out.dtype))
    return out.detach(), x.grad


class Recorder(_CompiledKernels):
    """A kernel cache that compiles with dynamo alone (backend "eager": fast) and records its calls."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(backend="eager")
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.fail = fail

    def _build(self) -> None:
        if self.fail:
            def broken(*args):
                raise RuntimeError("no C++ compiler found")
            self.forward = self.backward = broken
        else:
            super()._build()

    def run(self, fn, *args):
        self.calls.append((fn, tuple(args[0].shape)))
        return super().run(fn, *args)


@pytest.fixture(scope="module")
def _module_kernels():
    return Recorder()  # one cache for the module: its compiled graphs are reused across tests


@pytest.fixture
def kernels(_module_kernels, monkeypatch):
    _module_kernels.calls.clear()
    monkeypatch.setattr(csc_mod, "_KERNELS", _module_kernels)
    return _module_kernels


# ----------------------------------------------------------------------------- eager compiled path
@pytest.mark.parametrize("shape,dim,dtype", [
    ((6, 40), -1, torch.float32), ((6, 40), 0, torch.float32), ((3, 7, 5), 1, torch.float32),
    ((2, 3, 4, 9), -1, torch.float32), ((6, 40), -1, torch.float64), ((3, 7, 5), 1, torch.float64),
])
def test_compiled_eager_path_matches_the_literal_formula(kernels, shape, dim, dtype):
    torch.manual_seed(0)
    k = dim % len(shape)
    as_3d = (math.prod(shape[:k]), shape[k], math.prod(shape[k + 1:]))  # the softmax dim in the middle
    for alpha, scale in ((0.0, 1.0), (0.5, 3.0), (5.0, 1e4)):  # alpha is a tensor there: no recompile
        kernels.calls.clear()
        t = (torch.randn(shape) * scale).to(dtype)
        g = torch.randn(shape, dtype=dtype)
        out, grad = out_and_grad(cosmic_state_compression, t, g, alpha, dim, compiled=True)
        ref_out, ref_grad = out_and_grad(literal_csc, t, g.double(), alpha, dim)
        assert out.dtype == dtype
        assert_close(out, ref_out.to(dtype))
        assert_close(grad, ref_grad.to(dtype))
        assert kernels.calls == [("forward", as_3d), ("backward", as_3d)]


def test_large_inputs_use_the_kernel_by_default_and_small_ones_do_not(kernels):
    small = torch.randn(4, 16)
    cosmic_state_compression(small)
    assert kernels.calls == []
    big = torch.randn(_COMPILE_MIN_NUMEL // 128, 128)
    assert_close(cosmic_state_compression(big), literal_csc(big).float())
    assert kernels.calls == [("forward", (big.shape[0], 128, 1))]
    cosmic_state_compression(big, compiled=False)
    cosmic_state_compression(big.t(), dim=0)  # not contiguous: plain ATen ops
    assert len(kernels.calls) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_run_the_kernel_in_float32(kernels, dtype):
    torch.manual_seed(0)
    t = (torch.randn(8, 64) * 4).to(dtype)
    g = torch.randn(8, 64).to(dtype)
    out, grad = out_and_grad(cosmic_state_compression, t, g, 0.3, compiled=True)
    ref_out, ref_grad = out_and_grad(lambda x, a: literal_csc(x.float(), a).float(), t, g, 0.3)
    assert out.dtype == dtype and grad.dtype == dtype
    assert_close(out, ref_out.to(dtype))
    assert_close(grad, ref_grad.to(dtype))
    assert kernels.calls[0][0] == "forward"


def test_expanded_gradients_and_double_backward_on_the_compiled_path(kernels):
    torch.manual_seed(0)
    t = torch.randn(5, 11, dtype=torch.float64)
    x = t.clone().requires_grad_()
    cosmic_state_compression(x, compiled=True).sum().backward()  # the gradient is an expanded view
    r = t.clone().requires_grad_()
    literal_csc(r).sum().backward()
    assert_close(x.grad, r.grad)
    assert_double_backward_matches(lambda x: cosmic_state_compression(x, compiled=True), literal_csc, t)


def test_tracers_and_modes_never_see_the_compiled_kernel(kernels):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(4, 9)
    with FlopCounterMode(display=False):
        cosmic_state_compression(x, compiled=True)
    module = csc_mod.CosmicStateCompression()
    ep = torch.export.export(module, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("compile" in t or "cosmic" in t for t in targets), targets
    torch.jit.trace(lambda r: cosmic_state_compression(r, compiled=True), (x,), check_trace=False)
    assert kernels.calls == []


def test_a_compiler_failure_warns_once_and_falls_back_to_aten_ops(monkeypatch):
    rec = Recorder(fail=True)
    monkeypatch.setattr(csc_mod, "_KERNELS", rec)
    t = torch.randn(6, 30)
    with pytest.warns(RuntimeWarning, match="could not compile its kernel with Inductor.*no C\\+\\+ compiler found"):
        out = cosmic_state_compression(t, compiled=True)
    assert_close(out, literal_csc(t).float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cosmic_state_compression(t, compiled=True)  # no second warning, no second attempt
    assert len(rec.calls) == 2 and rec.failed.startswith("RuntimeError")


# ----------------------------------------------------------------------------- the 2-exp forward
def test_the_forward_has_two_exps_per_element():
    """The exported forward applies ``exp`` to exactly two elementwise expressions (the row sum's,
    whose result is reused for ``p``, and the sigmoid's): no third ``exp(log p)``, no ``logsumexp``."""
    ep = torch.export.export(csc_mod.CosmicStateCompression(), (torch.randn(4, 9),))
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum(op.startswith("aten.exp") for op in ops) == 2, ops
    assert not any("logsumexp" in op or "sigmoid" in op or "softmax" in op for op in ops), ops


@pytest.mark.slow
def test_inductor_eager_kernel_matches_the_literal_formula(monkeypatch):
    monkeypatch.setattr(csc_mod, "_KERNELS", _CompiledKernels())
    torch.manual_seed(0)
    for shape, dim in (((64, 1100), -1), ((8, 100, 90), 1)):
        t = torch.randn(shape) * 3
        g = torch.randn(shape)
        out, grad = out_and_grad(cosmic_state_compression, t, g, 0.5, dim)
        ref_out, ref_grad = out_and_grad(literal_csc, t, g.double(), 0.5, dim)
        assert_close(out, ref_out.float())
        assert_close(grad, ref_grad.float())
    assert csc_mod._KERNELS.failed is None
