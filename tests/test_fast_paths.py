"""Every fast path equals the literal formula or the unfused module: forward and gradients."""

import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from cosmic_fx.modules import cosmic_state_compression

from .conftest import assert_double_backward_matches, literal_csc, mlp_batches, small_mlp


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
    assert_double_backward_matches(lambda x: cosmic_state_compression(x), literal_csc, t)


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


# ---------------------------------------------------------------- CCE fused into backward
def _batches(n):
    # scale 3: the literal CDG skips some parameters (4 of 6) and updates the others
    return mlp_batches(n, scale=3)


def _train(cfg, engine, steps=4, lr=0.1):
    from cosmic_fx import attach_hooks, hooks_of

    model = small_mlp()
    run = model if engine == "eager" else torch.compile(model, backend="cosmic", options={"config": cfg})
    hooks = attach_hooks(model, cfg) if engine == "eager" else None
    opt = None if cfg.cce_fused_lr is not None else torch.optim.SGD(model.parameters(), lr=lr)
    grads_left = []
    for x, y in _batches(steps):
        loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        grads_left.append([n for n, p in model.named_parameters() if p.grad is not None])
        if opt is not None:
            opt.step()
            opt.zero_grad()
    hooks = hooks or hooks_of(model)
    hooks.remove()
    return model, grads_left


@pytest.mark.parametrize("engine", ["eager", "compile"])
@pytest.mark.parametrize("preset", ["seed", "relative"])
def test_fused_cce_update_equals_scaled_grad_then_separate_sgd_step(engine, preset):
    from cosmic_fx import CosmicConfig

    if preset == "seed":
        base = CosmicConfig.seed(lower="aot_eager")
    else:
        base = CosmicConfig.off(cce="relative", lower="aot_eager")
    ref, ref_left = _train(base, engine)
    fused, fused_left = _train(base.replace(cce_fused_lr=0.1), engine)
    assert all(ref_left) and not any(fused_left)  # fused: every gradient freed inside backward
    for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(fused.parameters(), small_mlp().parameters()))


@pytest.mark.parametrize("lr", [0, -0.1, float("nan"), True, "0.1"])
def test_fused_cce_lr_is_validated(lr):
    from cosmic_fx import CosmicConfig

    with pytest.raises(ValueError, match="cce_fused_lr must be None or a finite learning rate > 0"):
        CosmicConfig(cce_fused_lr=lr)
    assert CosmicConfig.off(cce_fused_lr=1).hooks_enabled  # plain SGD in backward: hooks needed
    assert CosmicConfig.from_options({"cce_fused_lr": 0.5}).cce_fused_lr == 0.5


# ---------------------------------------------------------------- CDG removes work
def _count_backward_mms(model, x):
    from torch.profiler import ProfilerActivity, profile

    loss = model(x).pow(2).mean()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))


def test_calibrated_cdg_freezing_skips_the_weight_gradient_gemm():
    from cosmic_fx import CosmicConfig, attach_hooks

    model = small_mlp()
    x = torch.randn(8, 6)
    before = _count_backward_mms(model, x)
    model.zero_grad()
    cfg = CosmicConfig.off(cdg="calibrated", cdg_patience=1, cdg_interval=1, cdg_max_frozen=0.5, efficiency_every=1)
    hooks = attach_hooks(model, cfg)
    for bx, by in _batches(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(bx), by).backward()
    frozen_weights = [n for n in hooks.frozen if n.endswith("weight")]
    assert frozen_weights, hooks.frozen
    model.zero_grad()
    after = _count_backward_mms(model, x)
    assert after <= before - len(frozen_weights)
    hooks.remove()


# ---------------------------------------------------------------- recompile limit
def test_hitting_the_recompile_limit_is_reported_not_silent():
    from cosmic_fx import CosmicConfig, hooks_of

    cfg = CosmicConfig.off(cce="relative", lower="aot_eager")
    model = small_mlp()
    compiled = torch.compile(model, backend="cosmic", options={"config": cfg})
    params = list(model.parameters())
    x = torch.randn(4, 6)
    with torch._dynamo.config.patch(recompile_limit=2), pytest.warns(RuntimeWarning, match=r"recompile_limit \(2\)"):
        for i in range(4):  # four distinct frozen sets, two compiled graphs allowed
            for j, p in enumerate(params):
                p.requires_grad_(j != i)
            compiled(x).sum().backward()
    hooks = hooks_of(model)
    assert hooks.compiled and hooks.recompile_limit_hit
    assert hooks.uncompiled_steps == 2
    for p in params:
        p.requires_grad_(True)
    hooks.remove()


def test_no_uncompiled_steps_within_the_limit():
    from cosmic_fx import CosmicConfig, hooks_of

    cfg = CosmicConfig.off(cce="relative", lower="aot_eager")
    model = small_mlp()
    compiled = torch.compile(model, backend="cosmic", options={"config": cfg})
    for _ in range(3):
        compiled(torch.randn(4, 6)).sum().backward()
    hooks = hooks_of(model)
    assert hooks.compiled and hooks.uncompiled_steps == 0 and not hooks.recompile_limit_hit
    hooks.remove()


def test_frozen_set_bound_that_would_exhaust_the_recompile_limit_warns():
    from cosmic_fx import CosmicConfig, detach_hooks
    from cosmic_fx.notices import _WARNED

    _WARNED.clear()
    model = small_mlp()
    cfg = CosmicConfig.off(cdg="calibrated", cdg_max_sets=7, lower="aot_eager")
    compiled = torch.compile(model, backend="cosmic", options={"config": cfg})
    with pytest.warns(UserWarning, match=r"cdg_max_sets=7 frozen sets .* need 8 compiled graphs"):
        compiled(torch.randn(4, 6))
    detach_hooks(model)
    _WARNED.clear()
    ok = CosmicConfig.off(cdg="calibrated", lower="aot_eager")  # default bound: 4 sets + none + eval
    model = small_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.compile(model, backend="cosmic", options={"config": ok})(torch.randn(4, 6))
    detach_hooks(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [None, "inductor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_csc_on_cuda_matches_the_literal_formula(backend, dtype):
    torch.manual_seed(0)
    t = (torch.randn(64, 300, device="cuda") * 30).to(dtype)
    g = torch.randn(64, 300, device="cuda").to(dtype)
    fn = cosmic_state_compression if backend is None else torch.compile(cosmic_state_compression, backend=backend)
    out, grad = csc_and_grad(fn, t, g, 0.5, -1)
    ref_out, ref_grad = csc_and_grad(lambda x, a, d: literal_csc(x.float(), a, d), t, g.float(), 0.5, -1)
    assert_close(out, ref_out.to(dtype))
    assert_close(grad, ref_grad.to(dtype))
